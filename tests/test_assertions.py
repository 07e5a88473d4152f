"""Each helper passes on a run that satisfies it and fails, with its table, on one that does not."""

import copy

import pytest

from conftest import detached
import torch

from stance_harness import HypothesisFailed, assert_change_concentrated, assert_change_spread, assert_only_targets_changed
from stance_harness.report.records import TestRecord


def clone(run):
    """A run with its own copy of the model, safe to tamper with."""
    return detached(run, model=copy.deepcopy(run.model))


def test_only_targets_changed_passes_for_lora(quick_run):
    result = assert_only_targets_changed(quick_run("lora"))
    assert result.passed
    assert "frozen tensors bit-identical" in result.summary
    assert result.metrics["changed_tensors"] == 24 * 2 * 2  # A and B on q and v of 24 layers


def test_only_targets_changed_passes_for_surgical_targets(quick_run):
    run = quick_run("lora", layers=[13, 15])
    assert assert_only_targets_changed(run, layers=[13, 15], kinds=["q_proj", "v_proj"]).passed


def test_only_targets_changed_fails_when_a_frozen_weight_moves(quick_run):
    run = clone(quick_run("lora"))
    with torch.no_grad():
        run.model.get_base_model().model.layers[3].self_attn.q_proj.weight[0, 0] += 1e-3
    with pytest.raises(HypothesisFailed) as err:
        assert_only_targets_changed(run)
    message = str(err.value)
    assert "assert_only_targets_changed: 1 tensors break the rule" in message
    assert "L3.q_proj.weight" in message and "frozen, but its bytes changed" in message


def test_only_targets_changed_fails_when_change_is_outside_the_targets(quick_run):
    with pytest.raises(HypothesisFailed) as err:
        assert_only_targets_changed(quick_run("lora"), layers=[13])
    message = str(err.value)
    assert "L0.q_proj.lora_A" in message and "outside the targets, but changed" in message
    assert "L13.q_proj.lora_A" not in message


def test_only_targets_changed_fails_when_a_target_did_not_move(quick_run):
    run = clone(quick_run("lora"))
    name = "base_model.model.model.layers.5.self_attn.v_proj.lora_B.default.weight"
    with torch.no_grad():
        dict(run.model.named_parameters())[name].copy_(run.before[name])
    with pytest.raises(HypothesisFailed) as err:
        assert_only_targets_changed(run)
    assert "L5.v_proj.lora_B" in str(err.value) and "a target, but unchanged" in str(err.value)


def test_change_concentrated_passes_for_surgical_lora(quick_run):
    result = assert_change_concentrated(quick_run("lora", layers=[13, 15]), layers=[13, 15], min_share=0.999)
    assert result.passed and result.metrics["share"] == pytest.approx(1.0)


def test_change_concentrated_fails_for_full_ft_with_a_table_of_shares(quick_run):
    with pytest.raises(HypothesisFailed) as err:
        assert_change_concentrated(quick_run("full"), layers=[13], kinds=["v_proj"], min_share=0.5)
    message = str(err.value)
    assert "of the change (sq_fro, effective view) is in layers [13] x ['v_proj']; < required 50.0%" in message
    lines = message.splitlines()
    assert lines[1].split() == ["layer", "share", "in", "target"]
    assert sum(1 for line in lines if line.startswith("L")) == 24
    # only L13 has an "in target" value: the share of its v_proj, which is the checked share
    l13 = next(line.split() for line in lines if line.startswith("L13 "))
    assert len(l13) == 3 and float(l13[2]) == pytest.approx(err.value.result.metrics["share"], rel=1e-3)
    assert all(len(line.split()) == 2 for line in lines if line.startswith("L") and not line.startswith("L13 "))
    assert err.value.result.metrics["share"] < 0.5


def test_change_concentrated_fails_clearly_when_nothing_changed(quick_run):
    run = clone(quick_run("full"))
    with torch.no_grad():
        for name, param in run.model.named_parameters():
            param.copy_(run.before[name])
    with pytest.raises(HypothesisFailed, match="the run changed nothing"):
        assert_change_concentrated(run, layers=[13], min_share=0.1)


def test_change_concentrated_rejects_bad_layers_and_share(quick_run):
    from stance_harness.core.errors import HarnessError

    with pytest.raises(HarnessError, match="layer 40 does not exist"):
        assert_change_concentrated(quick_run("full"), layers=[40])
    with pytest.raises(ValueError, match=r"min_share must be in \[0, 1\]"):
        assert_change_concentrated(quick_run("full"), layers=[1], min_share=1.5)


def test_change_spread_passes_for_full_ft(quick_run):
    result = assert_change_spread(quick_run("full"), top_k=2, max_share=0.5)
    assert result.passed and result.metrics["top_k_share"] < 0.5
    assert result.summary.startswith("the top 2 layers (")


def test_change_spread_fails_for_surgical_lora_with_ranked_table(quick_run):
    with pytest.raises(HypothesisFailed) as err:
        assert_change_spread(quick_run("lora", layers=[13, 15]), top_k=2, max_share=0.5)
    message = str(err.value)
    assert "hold 100.0% of the layer change; > allowed 50.0%" in message
    lines = message.splitlines()
    assert lines[1].split() == ["layer", "share", "rank"]
    assert {lines[3].split()[0], lines[4].split()[0]} == {"L13", "L15"}


def test_change_spread_fails_clearly_when_nothing_changed(quick_run):
    run = clone(quick_run("lora", layers=[13, 15]))
    with torch.no_grad():
        for name, param in run.model.named_parameters():
            if name in run.before:
                param.copy_(run.before[name])
    with pytest.raises(HypothesisFailed, match="the run changed no layer"):
        assert_change_spread(run)


def test_results_are_recorded_for_the_report_pass_or_fail(quick_run):
    record = TestRecord("t")
    lora, full = record.use_run(quick_run("lora")), record.use_run(quick_run("full"))  # what the train fixture does
    try:
        assert_only_targets_changed(lora)
        with pytest.raises(HypothesisFailed):
            assert_change_concentrated(full, layers=[0], min_share=0.9)
    finally:
        record.release_run(lora)
        record.release_run(full)
    assert [c["passed"] for c in record.checks] == [True, False]
    assert record.checks[1]["headers"] == ["layer", "share", "in target"]


def test_failures_are_assertion_errors_with_hidden_helper_frames():
    assert issubclass(HypothesisFailed, AssertionError)
    import stance_harness.checks.weights as module

    for helper in (module.assert_change_concentrated, module.assert_change_spread, module.assert_only_targets_changed):
        assert "__tracebackhide__" in helper.__code__.co_varnames
