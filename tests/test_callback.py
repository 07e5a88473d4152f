"""StanceCallback inside a real transformers Trainer on tiny-qwen2, and run_from_model on full and
peft fine-tunes: the report, the series, the trace, agreement with the harness's own loop, and the
refusals."""

import json
import math
from functools import partial

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerControl, TrainerState, TrainingArguments

import stance_harness
from stance_harness import measure as harness_measure
from stance_harness.runs.batches import collate, encode_examples, framing_for
from stance_harness.core.errors import HarnessError

STEPS, EXAMPLES, LR = 4, 10, 1e-3
# One batch of every example per step, no weight decay: the Trainer's AdamW steps are the harness loop's.
RECIPE = {"learning_rate": LR, "num_train_epochs": STEPS, "per_device_train_batch_size": EXAMPLES, "seed": 0}


def trainer_for(loaded, stance, model, out, callbacks, epochs=STEPS, **overrides):
    items = encode_examples(framing_for(loaded.tokenizer), stance.training_examples(EXAMPLES), 128)
    data = [{"input_ids": ids, "labels": labels} for ids, labels in items]

    def collator(rows):
        return collate([(r["input_ids"], r["labels"]) for r in rows], loaded.tokenizer.pad_token_id, "cpu")

    args = TrainingArguments(**{
        "output_dir": str(out), "per_device_train_batch_size": EXAMPLES, "num_train_epochs": epochs,
        "learning_rate": LR, "weight_decay": 0.0, "warmup_steps": 0, "lr_scheduler_type": "linear",
        "optim": "adamw_torch", "max_grad_norm": 1.0, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "use_cpu": True, "remove_unused_columns": False, "seed": 0, "disable_tqdm": True, **overrides})
    return Trainer(model=model, args=args, train_dataset=data, data_collator=collator,
                   processing_class=loaded.tokenizer, callbacks=callbacks)


def fresh(loaded):
    return AutoModelForCausalLM.from_pretrained(loaded.path)


@pytest.fixture(scope="module")
def trained(tiny_qwen2, stance, tmp_path_factory):
    """A full fine-tune of 4 steps by the Trainer, measured every 2 steps."""
    reports = tmp_path_factory.mktemp("callback-reports")
    callback = stance_harness.StanceCallback(stance="curious-uncertainty", every=2, base=tiny_qwen2, reports_dir=reports)
    model = fresh(tiny_qwen2)
    trainer = trainer_for(tiny_qwen2, stance, model, tmp_path_factory.mktemp("out"), [callback])
    trainer.train()
    return callback, trainer, model, reports


def test_the_callback_writes_a_report_whose_checks_pass(trained):
    callback, _, _, reports = trained
    assert callback.passed and callback.report_path.parent == reports
    assert {p.name for p in callback.report_path.iterdir()} >= {"report.json", "report.md", "index.html"}
    payload = json.loads((callback.report_path / "report.json").read_text())
    outcomes = {t["nodeid"]: t["outcome"] for t in payload["tests"]}
    assert outcomes == {"StanceCallback::assert_gradients_stable": "passed",
                        "StanceCallback::assert_behavior_shift": "passed", "StanceCallback::series": "passed"}
    (summary,) = payload["runs"].values()
    assert summary["origin"] == "model" and summary["model"]["name"] == "tiny-qwen2"
    assert summary["recipe"]["learning_rate"] == LR and summary["examples"] == EXAMPLES
    # the Trainer counts no tokens per step: the report says none, not 0 per second
    assert summary["instruments"]["tokens_per_s"] is None and summary["instruments"]["examples_per_s"] > 0
    assert summary["measurements"]["forgetting"]["adapted"] == callback.series[-1]["perplexity"]
    # the run's checks, made again on it with bounds of our own
    stance_harness.assert_behavior_shift(callback.run, min_effect=0.05)
    stance_harness.assert_gradients_stable(callback.run, max_grad_norm=10.0)
    stance_harness.assert_only_targets_changed(callback.run)


def test_the_series_is_measured_every_n_steps_against_the_start(trained):
    callback, _, _, _ = trained
    run = callback.run
    assert [row["step"] for row in callback.series] == [0, 2, 4]
    start, middle, end = callback.series
    assert start["behavior_shift"] == 0.0 and start["forgetting"] == 0.0  # the base against itself
    assert middle["low"] <= middle["behavior_shift"] <= middle["high"] and middle["behavior_shift"] > 0
    assert end["behavior_shift"] == run.behavior()["effect"]["mean"]
    assert end["forgetting"] == run.forgetting()["relative_increase"]
    assert start["perplexity"] == pytest.approx(run.forgetting()["base"], rel=1e-9)


def test_the_trace_holds_the_trainers_steps(trained):
    callback, trainer, _, _ = trained
    logged = [entry for entry in trainer.state.log_history if "grad_norm" in entry]
    trace = callback.run.trace
    assert len(trace.grad_norm) == len(logged) == STEPS and not trace.nonfinite
    assert trace.grad_norm == pytest.approx([e["grad_norm"] for e in logged], rel=1e-6)
    assert trace.loss == pytest.approx([e["loss"] for e in logged], rel=1e-6)
    assert trace.lr == pytest.approx([e["learning_rate"] for e in logged], rel=1e-9)
    assert len(trace.weight_norm) == STEPS + 1 and len(trace.step_time) == STEPS


def test_the_callback_and_the_harness_loop_agree_on_the_weight_change(trained, harness):  # the session fixture
    callback, _, _, _ = trained
    ours, theirs = callback.run, harness.train("full", examples=EXAMPLES, recipe=RECIPE)
    assert ours.trace.grad_norm == pytest.approx(theirs.trace.grad_norm, rel=1e-4)
    mine = {d.raw_name: math.sqrt(d.moments.total_sq) for d in ours.effective_deltas}
    other = {d.raw_name: math.sqrt(d.moments.total_sq) for d in theirs.effective_deltas}
    assert mine.keys() == other.keys() and len(mine) > 100
    assert mine == pytest.approx(other, rel=1e-3)
    rows = {r["layer"]: r["rel_change"] for r in ours.layer_table()}
    assert rows == pytest.approx({r["layer"]: r["rel_change"] for r in theirs.layer_table()}, rel=1e-3)
    assert ours.behavior()["effect"]["mean"] == pytest.approx(theirs.behavior()["effect"]["mean"], rel=1e-3)


def test_the_callback_does_not_change_training(trained, tiny_qwen2, stance, tmp_path):
    _, _, with_callback, _ = trained
    without = fresh(tiny_qwen2)
    trainer_for(tiny_qwen2, stance, without, tmp_path, []).train()
    theirs = dict(without.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in with_callback.named_parameters())


def test_a_failed_check_is_recorded_not_raised(tiny_qwen2, stance, tmp_path):
    checks = [partial(stance_harness.check_behavior_shift, min_effect=10.0), stance_harness.check_gradients_stable,
              partial(stance_harness.check_behavior_shift, metric="loglik")]
    callback = stance_harness.StanceCallback(every=1, base=tiny_qwen2, reports_dir=tmp_path / "reports", checks=checks)
    trainer = trainer_for(tiny_qwen2, stance, fresh(tiny_qwen2), tmp_path / "out", [callback], epochs=2)
    trainer.train()
    assert trainer.state.global_step == 2 and [r["step"] for r in callback.series] == [0, 1, 2]
    assert not callback.passed and [r.passed for r in callback.results] == [False, True]
    tests = json.loads((callback.report_path / "report.json").read_text())["tests"]
    failed, stable, broken = tests[:3]
    assert failed["nodeid"] == "StanceCallback::assert_behavior_shift" and failed["outcome"] == "failed"
    assert "is not above min_effect +10" in failed["message"]
    assert stable["outcome"] == "passed"
    assert broken["outcome"] == "error" and "no behaviour metric 'loglik'" in broken["message"]
    assert callback.errors == [broken["message"]]


def test_non_finite_gradients_are_caught(tiny_qwen2, stance, tmp_path):
    model = fresh(tiny_qwen2)
    target = model.model.layers[3].mlp.down_proj.weight
    target.register_hook(lambda grad: grad * float("nan"))
    callback = stance_harness.StanceCallback(every=10, base=tiny_qwen2, reports_dir=None,
                                      checks=[stance_harness.check_gradients_stable])
    # the NaN weights the step made cannot be measured: the series says so, and training ends as usual
    with pytest.warns(UserWarning, match=r"measuring step 1 failed: ValueError: values must be finite"):
        trainer_for(tiny_qwen2, stance, model, tmp_path, [callback], epochs=1, max_grad_norm=0.0).train()
    assert [r["step"] for r in callback.series] == [0, 1] and callback.series[1]["behavior_shift"] is None
    (result,) = callback.results
    assert not result.passed
    assert result.summary.startswith("non-finite gradient at step 0 in L3.down_proj.weight")


def test_a_lora_model_trained_by_the_trainer(tiny_qwen2, stance, tmp_path, monkeypatch):
    model = get_peft_model(fresh(tiny_qwen2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    callback = stance_harness.StanceCallback(every=2, base=tiny_qwen2, reports_dir=None)
    calls = []
    measure_nll = harness_measure.heldout_window_nll
    monkeypatch.setattr(harness_measure, "heldout_window_nll", lambda *a, **k: calls.append(1) or measure_nll(*a, **k))
    trainer_for(tiny_qwen2, stance, model, tmp_path, [callback]).train()
    run = callback.run
    # the base's held-out text read once; the model's at steps 0, 2, 4 and once more on the final Run
    assert [r["step"] for r in callback.series] == [0, 2, 4] and len(calls) == 1 + 4
    assert callback.passed and run.method.name == "peft" and run.changed_frozen() == []
    changed = {d.kind for d in run.effective_deltas if d.moments.total_sq > 0}
    assert changed == {"q_proj", "v_proj"}
    # the base is the model with its adapter off, sharing its storage
    ids = torch.tensor([tiny_qwen2.tokenizer("I am not sure")["input_ids"]])
    with torch.no_grad(), model.disable_adapter():
        off = model(input_ids=ids).logits
    assert torch.equal(run.loaded.base(input_ids=ids).logits, off)
    # without the snapshot, LoRA's update is taken from B = 0: the same ΔW
    again = stance_harness.run_from_model(model, tiny_qwen2, stance=stance)
    assert {d.raw_name: d.moments.total_sq for d in again.effective_deltas} == pytest.approx(
        {d.raw_name: d.moments.total_sq for d in run.effective_deltas}, rel=1e-6)
    assert again.behavior()["effect"]["mean"] == pytest.approx(run.behavior()["effect"]["mean"], rel=1e-6)


def test_run_from_model_on_an_ia3_model(tiny_qwen2):
    model = get_peft_model(fresh(tiny_qwen2), IA3Config(target_modules=["k_proj", "down_proj"],
                                                        feedforward_modules=["down_proj"]))
    untouched = stance_harness.run_from_model(model, tiny_qwen2)
    assert all(d.moments.total_sq == 0 for d in untouched.effective_deltas)  # IA³ starts at the identity
    with torch.no_grad():
        model.base_model.model.model.layers[2].self_attn.k_proj.ia3_l["default"].mul_(1.5)
    run = stance_harness.run_from_model(model, tiny_qwen2, name="ia3")
    changed = {(d.layer, d.kind) for d in run.effective_deltas if d.moments.total_sq > 0}
    assert changed == {(2, "k_proj")} and run.label == "ia3"
    assert run.behavior()["effect"]["n"] == len(run.stance.probes)


def test_run_from_model_on_a_full_fine_tune(tiny_qwen2):
    model = fresh(tiny_qwen2)
    frozen = model.model.layers[0].self_attn.o_proj.weight
    frozen.requires_grad_(False)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(0.01)
        frozen.add_(0.01)  # a frozen weight that differs from the base's
    run = stance_harness.run_from_model(model, tiny_qwen2, name="mine")
    base = dict(tiny_qwen2.base.named_parameters())
    assert all(run.before[n] is not None and run.before[n].data_ptr() == base[n].data_ptr() for n in run.before)
    assert "model.layers.0.self_attn.o_proj.weight" not in run.before
    assert run.changed_frozen() == ["model.layers.0.self_attn.o_proj.weight"]
    changed = {(d.layer, d.kind) for d in run.effective_deltas if d.moments.total_sq > 0}
    assert changed == {(1, "down_proj")}
    stance_harness.assert_change_concentrated(run, layers=[1], kinds=["down_proj"], min_share=0.99)
    assert math.isfinite(run.forgetting()["relative_increase"]) and run.replies()["rows"]
    # ΔW = 0.01 everywhere is rank one; every other matrix is unchanged
    rank = {r["matrix"]: r for r in run.rank()["rows"]}
    assert rank["L1.down_proj.weight"]["rank"] == 1 and rank["L1.down_proj.weight"]["stable_rank"] == pytest.approx(1)
    assert {m for m, r in rank.items() if r["rank"]} == {"L1.down_proj.weight"}
    calibration = run.calibration()
    assert 0 <= calibration["adapted"]["ece"] <= 1 and calibration["adapted"] != calibration["base"]


def test_run_from_model_takes_a_transformers_base_object(tiny_qwen2):
    base, model = fresh(tiny_qwen2), fresh(tiny_qwen2)
    with torch.no_grad():
        model.model.layers[5].self_attn.v_proj.weight.mul_(1.1)
    run = stance_harness.run_from_model(model, base, tokenizer=tiny_qwen2.tokenizer)
    assert run.loaded.base is base and run.loaded.spec.source == "object"
    assert {(d.layer, d.kind) for d in run.effective_deltas if d.moments.total_sq > 0} == {(5, "v_proj")}
    with pytest.raises(HarnessError, match=r"give tokenizer="):
        stance_harness.run_from_model(model, fresh(tiny_qwen2))


def test_a_model_of_another_architecture_is_refused(tiny_qwen2):
    config = AutoConfig.from_pretrained(tiny_qwen2.path)
    config.num_hidden_layers = 2
    with pytest.raises(HarnessError, match=r"is not a fine-tune of tiny-qwen2: it lacks the base's "
                                           r"model\.layers\.2\..* \(and \d+ more\)"):
        stance_harness.run_from_model(AutoModelForCausalLM.from_config(config), tiny_qwen2)
    config = AutoConfig.from_pretrained(tiny_qwen2.path)
    config.intermediate_size *= 2
    with pytest.raises(HarnessError, match=r"its parameter model\.layers\.0\.mlp\.gate_proj\.weight \[\d+, 64\] "
                                           r"is \[\d+, 64\] in the base"):
        stance_harness.run_from_model(AutoModelForCausalLM.from_config(config), tiny_qwen2)


def test_a_stance_that_does_not_exist_is_refused(tiny_qwen2):
    with pytest.raises(HarnessError, match=r"unknown stance 'curious-uncertanty'\. Did you mean: curious-uncertainty"):
        stance_harness.run_from_model(fresh(tiny_qwen2), tiny_qwen2, stance="curious-uncertanty")
    with pytest.raises(HarnessError, match=r"unknown stance 'nope'"):
        stance_harness.StanceCallback(stance="nope")


def test_bad_arguments_are_refused(tiny_qwen2):
    model = fresh(tiny_qwen2)
    with pytest.raises(HarnessError, match=r"is not a peft model, so give base="):
        stance_harness.run_from_model(model)
    with pytest.raises(HarnessError, match=r"the model is the tiny-qwen2 base itself"):
        stance_harness.run_from_model(tiny_qwen2.base, tiny_qwen2)
    with pytest.raises(HarnessError, match=r"the model is the given base itself; fine-tune a copy"):
        stance_harness.run_from_model(model, model, tokenizer=tiny_qwen2.tokenizer)
    assert all(p.requires_grad for p in model.parameters())  # refused before anything was frozen
    with pytest.raises(HarnessError, match=r"base must be stance_harness.load_model\(...\)'s LoadedModel or a transformers "
                                           r"model, not str"):
        stance_harness.run_from_model(model, "tiny-qwen2", tokenizer=tiny_qwen2.tokenizer)
    with pytest.raises(HarnessError, match=r"before\['nope'\] \[2\] is not a parameter of the model"):
        stance_harness.run_from_model(model, tiny_qwen2, before={"nope": torch.zeros(2)})
    for every in (0, 2.5, True):
        with pytest.raises(HarnessError, match=rf"every must be a whole number of steps >= 1, not {every!r}"):
            stance_harness.StanceCallback(every=every)
    with pytest.raises(HarnessError, match=r"base must be stance_harness.load_model\(...\)'s LoadedModel or None, not str"):
        stance_harness.StanceCallback(base="tiny-qwen2")
    two = get_peft_model(fresh(tiny_qwen2), LoraConfig(r=2, target_modules=["q_proj"]))
    two.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(HarnessError, match=r"holds adapters \['default', 'other'\]"):
        stance_harness.run_from_model(two)


def test_the_callback_needs_a_tokenizer(tiny_qwen2, tmp_path):
    callback = stance_harness.StanceCallback(every=1)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(HarnessError, match=r"the Trainer has no tokenizer \(processing_class\); give "
                                           r"StanceCallback\(tokenizer=...\)"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=fresh(tiny_qwen2), processing_class=None)
