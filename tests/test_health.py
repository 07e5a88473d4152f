"""Training that collapses without a NaN is caught (issue 14), and a stuck analysis stage stops
without crashing the process."""

import pytest

from stance_harness import HypothesisFailed, assert_gradients_stable, assert_training_healthy, check_training_healthy
from stance_harness.runs.instruments import Trace, health_events

COLLAPSE = {"learning_rate": 10.0, "max_grad_norm": None, "num_train_epochs": 4, "per_device_train_batch_size": 5,
            "seed": 0}


def test_a_collapse_without_nan_is_caught_at_its_step(harness):
    run = harness.train("full", examples=10, recipe=COLLAPSE, instruments={"nonfinite": "record"})
    assert not run.trace.nonfinite
    assert_gradients_stable(run)  # nothing went non-finite: this check alone passes it
    kinds = {e["what"]: e["step"] for e in run.trace.health}
    assert kinds["weight growth"] == 0 and kinds["loss rise"] == 1 and kinds["uniform loss"] == 1
    with pytest.raises(HypothesisFailed, match=r"training collapsed at step 0: weight growth .* loss rise at step 1"):
        assert_training_healthy(run)
    assert run.forgetting()["relative_increase"] > 1  # held-out perplexity rose many-fold (or to inf)


def test_a_healthy_run_passes(quick_run):
    result = assert_training_healthy(quick_run("full"))
    assert result.passed and "gradients alive" in result.summary


def _trace(loss, grads, weights, uniform=6.93):
    return Trace(loss=list(loss), grad_norm=list(grads), weight_norm=list(weights), uniform_loss=uniform)


def test_vanished_gradients_are_found_from_their_first_zero_step():
    events = health_events(_trace([5, 4, 4, 4, 4], [1.0, 0.5, 0.0, 0.0, 0.0], [10] * 6))
    assert events == [{"step": 2, "what": "vanished gradients",
                       "detail": "every gradient exactly 0 from step 2 to the end (3 steps)"}]
    # a single zero step at the end, or zeros from the very start (nothing trained), is not a collapse
    assert health_events(_trace([5, 4, 4], [1.0, 0.5, 0.0], [10] * 4)) == []
    assert health_events(_trace([5, 5, 5], [0.0, 0.0, 0.0], [10] * 4)) == []


def test_the_thresholds_decide():
    trace = _trace([5.0, 7.0, 7.2], [1, 1, 1], [10, 11, 30, 31], uniform=None)
    assert health_events(trace) == []  # +44% loss and 3.1x weights: within the defaults (+50%, 10x)
    assert {e["what"] for e in health_events(trace, loss_rise=0.3, weight_growth=2.5)} == {"loss rise", "weight growth"}
    assert health_events(trace, loss_rise=0.5, weight_growth=5.0) == []
    uniform = _trace([5.0, 6.7], [1, 1], [10, 10, 10])
    assert [e["what"] for e in health_events(uniform)] == ["uniform loss"]  # 6.7 >= 95% of 6.93


def test_the_helper_names_the_first_event():
    class Run:
        label, sinks = "full", []
        trace = _trace([5.0, 9.0, 9.0], [1, 1, 1], [10, 10, 10, 10])

    result = check_training_healthy(Run(), max_loss_rise=0.5)
    assert not result.passed and result.summary.startswith("training collapsed at step 1: loss rise")
    assert result.headers == ["step", "loss", "grad norm", "largest layer", ""]


def test_an_overrunning_stage_ends_the_session_with_exit_code_1_not_a_crash(pytester):
    pytester.makepyfile('''
        import time

        from stance_harness import assert_change_concentrated
        from stance_harness.runs.methods.base import register_method
        from stance_harness.runs.methods.full import FullFineTuning

        @register_method
        class SlowAnalysis(FullFineTuning):
            name = "slow-analysis"

            def effective_deltas(self, model, before, anatomy):
                while True:  # busy inside torch, as a real overrun is
                    (model.get_input_embeddings().weight @ model.get_input_embeddings().weight.T).sum()

        def test_slow(train):
            run = train("slow-analysis", examples=5, recipe={"num_train_epochs": 1})
            assert_change_concentrated(run, layers=[0], min_share=0.0)
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--analysis-timeout", "2")
    result.assert_outcomes(failed=1)
    assert result.ret == 1  # a failed test, not an abort (134) at interpreter shutdown
    result.stdout.fnmatch_lines(["*analysis stage 'effective_deltas' did not finish within 2s and was stopped*"])
    assert "terminate called" not in result.stderr.str()
