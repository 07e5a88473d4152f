"""Behaviour shift, forgetting, calibration and rank on real runs, against hand computations."""

import dataclasses
import math

import pytest
import torch

from conftest import QUICK
from stance_harness import (HypothesisFailed, assert_behavior_shift, assert_ece, assert_ece_not_worse,
                     assert_low_rank_update, assert_no_forgetting)
from stance_harness.analysis.calibration import calibration
from stance_harness.core.errors import HarnessError

LORA = {"r": 4, "alpha": 8, "target_modules": ["qv"]}
STRONG = dict(QUICK, num_train_epochs=2)


@pytest.fixture(scope="module")
def full_run(harness):
    return harness.train("full", examples=10, recipe=STRONG)


@pytest.fixture(scope="module")
def lora_run(harness):
    return harness.train("lora", examples=10, recipe=STRONG, **LORA)


def _hand_mean_logprob(model, tokenizer, prompt, text):
    """Straight from the model: mean log p(token) over the reply, framed as in training."""
    head = tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]
    tail = tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + tail])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(logp[len(head) + i - 1, t]) for i, t in enumerate(tail)) / len(tail)


# -- behavioural shift -----------------------------------------------------------------------
def test_loglik_margin_matches_a_hand_computation(full_run):
    found = full_run.behavior("loglik_margin")
    tok = full_run.loaded.tokenizer
    for probe, row in list(zip(full_run.stance.probes, found["per_probe"]))[:3]:
        for model, key in ((full_run.loaded.base, "base"), (full_run.model, "adapted")):
            margin = (_hand_mean_logprob(model, tok, probe.prompt, probe.stance)
                      - _hand_mean_logprob(model, tok, probe.prompt, probe.neutral))
            assert row[key] == pytest.approx(margin, abs=1e-4)
    assert found["effect"]["mean"] == pytest.approx(sum(r["delta"] for r in found["per_probe"]) / 16)
    assert found["effect"]["low"] <= found["effect"]["mean"] <= found["effect"]["high"]


def test_kl_is_zero_for_the_base_against_itself_and_positive_after_training(full_run):
    same = dataclasses.replace(full_run, model=full_run.loaded.base, run_id="identity")
    assert same.behavior("kl")["adapted"] == pytest.approx(0.0, abs=1e-9)
    assert same.behavior("loglik_margin")["effect"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert full_run.behavior("kl")["effect"]["low"] > 0


def test_marker_rate_counts_replies_with_markers(full_run, monkeypatch):
    from stance_harness import measure

    replies = iter([["I'm not sure, could you tell me?"] * 4 + ["Paris."] * 12,  # base
                    ["I’m NOT sure."] * 10 + ["Paris."] * 6])  # adapted (curly apostrophe, caps)
    monkeypatch.setattr(measure, "greedy_replies", lambda *a, **k: next(replies))
    # a copy of the base's LoadedModel, so its cached base replies are not shared
    run = dataclasses.replace(full_run, run_id="markers", loaded=dataclasses.replace(full_run.loaded))
    found = run.behavior("marker_rate")
    assert (found["base"], found["adapted"]) == (4 / 16, 10 / 16)
    assert found["effect"]["mean"] == pytest.approx(6 / 16)


def test_behavior_helper_passes_and_fails_with_a_probe_table(full_run, lora_run):
    result = assert_behavior_shift(full_run, "loglik_margin", min_effect=0.0)
    assert result.passed and "16 probes" in result.summary
    with pytest.raises(HypothesisFailed, match=r"lower end .* is not above min_effect \+5") as info:
        assert_behavior_shift(lora_run, "loglik_margin", min_effect=5.0)
    assert info.value.result.headers == ["probe", "base", "adapted", "delta"]
    assert len(info.value.result.rows) == 16
    with pytest.raises(HypothesisFailed, match="upper end .* is not below max_effect"):
        assert_behavior_shift(full_run, "kl", min_effect=None, max_effect=1e-6)


def test_behavior_refuses_unknown_metrics_and_classification_runs(full_run, harness):
    with pytest.raises(HarnessError, match="no behaviour metric 'kl_div'.*Did you mean: kl"):
        full_run.behavior("kl_div")
    clf = harness.train("feature-extraction", examples=10, recipe=QUICK, task="stance-classification")
    with pytest.raises(HarnessError, match="measured on the stance-lm task"):
        clf.behavior("kl")


# -- forgetting --------------------------------------------------------------------------------
def test_perplexity_matches_the_models_own_loss(full_run):
    from stance_harness.runs.data import general_text_windows
    from stance_harness.measure import HELDOUT_WINDOW_TOKENS, HELDOUT_WINDOWS

    found = full_run.forgetting()
    items = general_text_windows(full_run.loaded.tokenizer, HELDOUT_WINDOW_TOKENS, HELDOUT_WINDOWS, 0, "heldout")
    ids = torch.tensor([i for i, _ in items])
    with torch.no_grad():
        loss = full_run.loaded.base(input_ids=ids, labels=ids).loss  # HF shifts labels itself
    assert found["base"] == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert found["relative_increase"] == pytest.approx(found["adapted"] / found["base"] - 1)


def test_forgetting_helper_passes_and_fails(full_run, lora_run):
    assert assert_no_forgetting(lora_run, max_increase=0.5).passed
    with pytest.raises(HypothesisFailed, match=r"held-out perplexity .* allowed \+0\.00%"):
        assert_no_forgetting(full_run, max_increase=0.0)


# -- calibration ---------------------------------------------------------------------------------
def test_lm_calibration_equals_calibration_over_full_vocabulary_probabilities(lora_run):
    from stance_harness import measure
    from stance_harness.analysis.calibration import calibration_from_predictions

    found = lora_run.calibration()
    prompts = [p.prompt for p in lora_run.stance.probes]
    pairs = measure.continuation_logits(lora_run.model, lora_run.framing, prompts,
                                        [p.stance for p in lora_run.stance.probes])
    probs = torch.cat([torch.softmax(logits.double(), -1) for logits, _ in pairs])
    labels = torch.cat([targets for _, targets in pairs])
    reference = calibration(probs, labels).as_dict()
    for key in ("ece", "mce", "brier", "acc1", "n"):
        assert found["adapted"][key] == pytest.approx(reference[key], abs=1e-9), key
    assert found["base"] is not None and found["unit"] == "next token"
    direct = calibration_from_predictions(*measure.token_prediction_summaries(pairs))
    assert direct.ece == pytest.approx(reference["ece"], abs=1e-12)


def test_ece_helpers_pass_and_fail(full_run, lora_run):
    assert assert_ece(lora_run, max=1.0).passed
    with pytest.raises(HypothesisFailed, match=r"ECE 0\.\d+ \(15 bins, \d+ next token predictions.*allowed 0\.0000"):
        assert_ece(lora_run, max=0.0)
    worse, better = sorted([full_run, lora_run], key=lambda r: r.calibration()["adapted"]["ece"], reverse=True)
    assert assert_ece_not_worse(better, than=worse, tol=0.0).passed  # (a run against itself is refused)
    with pytest.raises(HypothesisFailed, match=f"{worse.label} ECE .* vs {better.label} ECE"):
        assert_ece_not_worse(worse, than=better, tol=0.0)


# -- rank ------------------------------------------------------------------------------------------
def test_lora_updates_have_at_most_rank_r_and_full_finetuning_more(full_run, lora_run):
    lora_ranks = [r["rank"] for r in lora_run.rank(0.999)["rows"]]
    assert lora_ranks and max(lora_ranks) <= LORA["r"]
    assert assert_low_rank_update(lora_run, energy=0.9, max_rank=LORA["r"]).passed
    with pytest.raises(HypothesisFailed, match=r"highest energy-0\.9 rank of ΔW over 168 block matrices is \d+.*allowed 4"):
        assert_low_rank_update(full_run, energy=0.9, max_rank=LORA["r"])
    full_mean = sum(r["rank"] for r in full_run.rank(0.9)["rows"]) / len(full_run.rank(0.9)["rows"])
    lora_mean = sum(r["rank"] for r in lora_run.rank(0.9)["rows"]) / len(lora_run.rank(0.9)["rows"])
    assert full_mean > lora_mean


def test_measurements_reach_the_run_summary_and_every_report(lora_run):
    from stance_harness.report.html import render_pages
    from stance_harness.report.markdown import render_markdown
    from stance_harness.report.sections import measurement_tables

    lora_run.behavior("kl")
    lora_run.calibration()  # measured here too: under xdist the test that measures it may run elsewhere
    lora_run.rank(0.9)
    summary = lora_run.summary()
    assert {"behavior", "calibration", "rank"} <= set(summary["measurements"])
    assert summary["measurements"]["rank"]["energy"] == 0.9  # flat: what the reports read
    assert summary["task"] == "stance-lm"
    titles = [title for title, _ in measurement_tables(summary["measurements"])]
    assert any(t.startswith("rank of the update") for t in titles) and any(t.startswith("behavioural") for t in titles)
    payload = {"run_id": "r", "started": "", "finished": "", "tests": [], "runs": {lora_run.run_id: summary},
               "provenance": {"model": {}, "git": {}, "environment": {"libraries": {}}, "args": []}}
    html = render_pages(payload)  # a run's tables are on its own page, beside index.html
    run_pages = [text for path, text in html.items() if path.startswith("runs/")]
    for page in (*run_pages, render_markdown(payload)):
        assert "rank of the update" in page and "behavioural shift" in page and "calibration" in page


def test_qlora_is_measured_against_its_own_quantized_base(harness):
    run = harness.train("qlora", examples=10, recipe=QUICK, target_modules=["qv"])
    found = run.forgetting()
    with run.model.disable_adapter():
        quantized_base = run.model
        from stance_harness.measure import heldout_perplexity

        expected = heldout_perplexity(quantized_base, run.loaded.tokenizer)
    full_precision = heldout_perplexity(run.loaded.base, run.loaded.tokenizer)
    assert found["base"] == pytest.approx(expected, rel=1e-6)
    assert found["base"] != pytest.approx(full_precision, rel=1e-6)  # 4-bit rounding is not training's doing


def test_lora_ranks_from_the_factors_equal_the_materialised_update(lora_run):
    """The factor route (QR of B and Aᵀ, SVD of the r x r core) against float64 SVDs of ΔW itself."""
    import inspect

    from stance_harness.analysis.rank import energy_rank, stable_rank

    found = {r["matrix"]: r for r in lora_run.rank(0.9)["rows"]}
    pairs = lora_run.method.effective_deltas(lora_run.model, lora_run.before, lora_run.anatomy)
    assert inspect.isgenerator(pairs)  # one matrix at a time, never a whole model's worth
    checked = 0
    for name, start, end in pairs:
        where = lora_run.anatomy.name_of(name)
        if start.ndim == 2 and where.layer is not None:
            delta = end.double() - start.double()
            assert found[str(where)]["rank"] == energy_rank(delta, 0.9)
            assert found[str(where)]["stable_rank"] == pytest.approx(stable_rank(delta), rel=1e-3)
            checked += 1
    assert checked == len(found) == 48  # q and v in each of 24 layers
