"""What the model now says: each probe's reply before and after, and general ability scored on replies."""

import dataclasses

import pytest

from conftest import QUICK
from stance_harness import measure
from stance_harness.analysis.ability import load_probeset
from stance_harness.analysis.behavior import replies_in_order
from stance_harness.core.errors import HarnessError


@pytest.fixture(scope="module")
def full_run(harness):
    return harness.train("full", examples=10, recipe=dict(QUICK, num_train_epochs=2))


def _copy(run, run_id):
    """The run with its own measurements and its own base cache, so patched replies stay here."""
    return dataclasses.replace(run, run_id=run_id, loaded=dataclasses.replace(run.loaded))


def test_replies_are_the_greedy_replies_of_both_models_with_their_markers(full_run):
    found = full_run.replies()
    prompts = [p.prompt for p in full_run.stance.probes]
    assert [r["probe"] for r in found["rows"]] == prompts
    assert [r["base_reply"] for r in found["rows"]] == measure.greedy_replies(full_run.loaded.base, full_run.framing,
                                                                             prompts)
    assert [r["adapted_reply"] for r in found["rows"]] == measure.greedy_replies(full_run.model, full_run.framing,
                                                                                prompts)
    margins = full_run.behavior("loglik_margin")["per_probe"]
    assert [r["margin_change"] for r in found["rows"]] == pytest.approx([m["delta"] for m in margins])
    rate = full_run.behavior("marker_rate")  # read from the same replies
    assert rate["adapted"] == sum(r["adapted_marker"] for r in found["rows"]) / len(prompts)
    assert "replies" in full_run.summary()["measurements"]


def test_a_probe_whose_reply_changed_is_listed_first(full_run, monkeypatch):
    n = len(full_run.stance.probes)
    base = ["The answer is Paris."] * n
    adapted = list(base)
    adapted[5] = "I'm not sure; could you tell me which Paris you mean?"
    replies = iter([base, adapted])
    monkeypatch.setattr(measure, "greedy_replies", lambda *a, **k: next(replies))
    rows = _copy(full_run, "one-changed").replies()["rows"]
    assert [r["changed"] for r in rows].count(True) == 1 and rows[5]["adapted_marker"]
    ordered = replies_in_order(rows)
    assert ordered[0]["probe"] == full_run.stance.probes[5].prompt
    rest = [abs(r["margin_change"]) for r in ordered[1:]]
    assert rest == sorted(rest, reverse=True)


def test_general_ability_lists_a_regression_with_both_replies(full_run, monkeypatch):
    probes = load_probeset().probes
    base = ["The capital of Australia is Canberra."] + ["I do not know."] * (len(probes) - 1)
    adapted = ["The capital of Australia is Sydney."] + base[1:]
    replies = iter([base, adapted])
    monkeypatch.setattr(measure, "greedy_replies", lambda *a, **k: next(replies))
    run = _copy(full_run, "ability")
    found = run.general_ability()
    assert [r["id"] for r in found["regressions"]] == ["capital-australia"]
    assert found["regressions"][0]["base_reply"] == base[0] and found["regressions"][0]["adapted_reply"] == adapted[0]
    assert found["families"]["factual"]["retention"] == 0.0
    assert found["per_unit"][0] == -1.0 and sum(found["per_unit"]) == -1.0
    assert run.unit_values("general_ability") == ("probe", found["per_unit"])
    assert run.unit_ids("general_ability")[0] == "ability probe capital-australia"  # paired by probe id


def test_the_general_ability_of_a_real_run_is_measured_on_both_models(full_run):
    found = full_run.general_ability()
    assert found["probes"] == len(load_probeset().probes)
    assert set(found["families"]) == {"factual", "arithmetic", "instruction"}
    assert 0.0 <= found["base_accuracy"] <= 1.0 and 0.0 <= found["adapted_accuracy"] <= 1.0
    assert "rows" not in full_run.summary()["measurements"]["general_ability"]


def test_replies_need_a_causal_lm(harness):
    run = harness.train("full", task="stance-classification", model="tiny-qwen2", examples=10, recipe=QUICK)
    with pytest.raises(HarnessError, match="replies are generated on the stance-lm task"):
        run.replies()
