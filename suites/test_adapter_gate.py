"""Gate saved stance adapters: the measurements a CI job checks before an adapter ships.

Run with one or more `--adapter [NAME=]PATH` (a peft adapter of any tuner type, or a fully
fine-tuned checkpoint, saved as safetensors, for example by `stance_harness.runs.adapters.save_adapter` or
docs/examples/train_adapter.py) on the `--model` base it was trained for:

    pytest suites/test_adapter_gate.py --adapter curious=adapters/curious-v2 \
        --compare-baseline main --fail-on 'behavior_shift:-10%' 'forgetting:+0.02' 'ece:+0.01@ci'

Nothing is trained. Each adapter is loaded onto a copy of the base sharing its weights (one
made for another base is refused) and measured against that base on the stance's held-out
probes: the stance its stance_harness.json names, or `--stance NAME`. Its metrics are named
NAME (`curious.ece`). The bounds below are floors every shippable adapter must clear;
regressions between versions are the baseline comparison's job. Without `--adapter` these
tests skip.
"""

from stance_harness import assert_behavior_shift, assert_ece, assert_no_forgetting

MAX_FORGETTING = 0.25  # relative held-out perplexity increase
MAX_ECE = 0.5  # next-token calibration on the probes' stance replies


def test_adapter_moves_the_model_toward_the_stance(adapter_run):
    """The stance continuation gains log-likelihood over the neutral one, beyond noise."""
    assert_behavior_shift(adapter_run, "loglik_margin", min_effect=0.0)


def test_adapter_changes_next_token_distributions(adapter_run, stance_report):
    kl = adapter_run.behavior("kl")["effect"]
    markers = adapter_run.behavior("marker_rate")
    stance_report.metric(f"{adapter_run.label}.kl", kl["mean"], interval=(kl["low"], kl["high"]))
    stance_report.metric(f"{adapter_run.label}.marker_rate", markers["adapted"])
    assert_behavior_shift(adapter_run, "kl", min_effect=0.0)


def test_adapter_does_not_forget_general_text(adapter_run):
    assert_no_forgetting(adapter_run, max_increase=MAX_FORGETTING)


def test_adapter_stays_calibrated(adapter_run):
    assert_ece(adapter_run, max=MAX_ECE)

