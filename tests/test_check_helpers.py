"""The public helpers a plug-in check is built with (stance_harness.checks.common): `takes_runs`
checks a check's arguments before it measures, `conclude` records its result in the test's
report, `asserting` makes assert_X of check_X. Exercised on a toy check over stand-in runs (a
label and the sinks a test's record listens on), so no model is built."""

import pytest

from stance_harness.checks.common import (HypothesisFailed, HypothesisInconclusive, asserting, conclude,
                                          takes_runs)
from stance_harness.core.errors import HarnessError
from stance_harness.core.results import CheckResult
from stance_harness.runs.runset import RunSet


class StandIn:
    """What every check uses of a run: its label, its id and the sinks of the tests holding it."""

    def __init__(self, label: str, value: float, seed: int = 0):
        self.label, self.run_id, self.value, self.sinks = label, f"{label}-s{seed}", value, []


def verdict_of(value: float) -> str:
    return "supported" if value > 1 else "refuted" if value < -1 else "inconclusive"


@takes_runs("run")
def check_toy(run, scale: float = 1.0) -> CheckResult:
    """Supported above 1, refuted below -1, inconclusive between."""
    value = run.value * scale
    verdict = verdict_of(value)
    return conclude([run], CheckResult("assert_toy", verdict == "supported", f"{run.label}: {value:g}", ["value"],
                                       [[value]], {"value": value}, verdict=verdict), {f"{run.label}.toy": value})


assert_toy = asserting(check_toy)


@takes_runs("a", "b", lists=True)
def check_toy_greater(a, b) -> CheckResult:
    mean = lambda runs: sum(r.value for r in (runs if isinstance(runs, (list, tuple)) else [runs]))  # noqa: E731
    return CheckResult("assert_toy_greater", mean(a) > mean(b), "a > b")


@takes_runs("run", paired=True)
def check_toy_metric(run, metric: str = "behavior_shift") -> CheckResult:
    return CheckResult("assert_toy_metric", True, metric)


# -- conclude -------------------------------------------------------------------------------------
def test_conclude_records_the_result_and_its_metrics_once_in_each_test_holding_a_run():
    heard = []
    a, b = StandIn("a", 2.0), StandIn("b", 2.0)
    a.sinks.append(lambda result, published: heard.append(("test1", result.check, published)))
    shared = lambda result, published: heard.append(("test2", result.check, published))  # noqa: E731
    a.sinks.append(shared)
    b.sinks.append(shared)  # one test holding both runs hears the result once
    result = CheckResult("assert_toy", True, "fine")
    assert conclude([a, b], result, {"a.toy": 2.0}) is result
    assert heard == [("test1", "assert_toy", {"a.toy": 2.0}), ("test2", "assert_toy", {"a.toy": 2.0})]


def test_conclude_outside_a_test_records_nothing_and_returns_the_result():
    result = CheckResult("assert_toy", False, "not fine")
    assert conclude([StandIn("a", 0.0)], result) is result


# -- asserting --------------------------------------------------------------------------------------
def test_asserting_returns_the_result_when_the_claim_holds():
    run = StandIn("lora", 3.0)
    heard = []
    run.sinks.append(lambda result, published: heard.append(published))
    result = assert_toy(run)
    assert (result.check, result.passed, result.verdict, result.summary) == ("assert_toy", True, "supported", "lora: 3")
    assert heard == [{"lora.toy": 3.0}]
    assert assert_toy.__name__ == "assert_toy" and check_toy.__name__ == "check_toy"


def test_asserting_raises_hypothesis_failed_with_the_result_when_refuted():
    with pytest.raises(HypothesisFailed, match=r"^assert_toy: lora: -3\n") as caught:
        assert_toy(StandIn("lora", -3.0))
    assert caught.value.result.verdict == "refuted"
    assert check_toy(StandIn("lora", -3.0)).verdict == "refuted"  # the check_ form returns it instead


def test_asserting_raises_inconclusive_which_is_no_assertion_error():
    with pytest.raises(HypothesisInconclusive, match=r"^assert_toy: lora: 0\.5") as caught:
        assert_toy(StandIn("lora", 0.5))
    assert not isinstance(caught.value, AssertionError) and caught.value.result.verdict == "inconclusive"


# -- takes_runs -------------------------------------------------------------------------------------
def test_takes_runs_refuses_what_is_not_a_run_naming_the_helper_as_called():
    with pytest.raises(HarnessError, match=r"^check_toy: `run` must be a Run \(what train\(\.\.\.\) returns\), or a "
                                           r"RunSet .*, got 3 \(type int\)"):
        check_toy(3)
    with pytest.raises(HarnessError, match=r"^assert_toy: `run` must be a Run"):
        assert_toy("lora")


def test_takes_runs_names_the_train_fixture_passed_instead_of_a_run():
    def _train(method="full"):
        return None

    with pytest.raises(HarnessError, match=r"`run` must be .*got the `train` fixture itself \(a function\); call "
                                           r"it: run = train\('lora', \.\.\.\)"):
        assert_toy(_train)


def test_takes_runs_checks_a_single_run_check_on_each_seed_of_a_runset():
    runs = RunSet([StandIn("lora", 3.0, 0), StandIn("lora", -3.0, 1), StandIn("lora", 2.0, 2)])
    result = check_toy(runs)
    assert (result.passed, result.verdict) == (False, "refuted")
    assert result.summary == "fails for 1 of 3 seeds: seed 1: lora: -3"
    assert result.rows == [[0, "supported", "lora: 3"], [1, "refuted", "lora: -3"], [2, "supported", "lora: 2"]]
    assert check_toy(RunSet([StandIn("lora", 3.0, 0), StandIn("lora", 5.0, 1)])).summary == \
        "assert_toy holds for all 2 seeds"
    with pytest.raises(HypothesisFailed, match="fails for 1 of 3 seeds"):
        assert_toy(runs)


def test_takes_runs_refuses_a_run_compared_with_itself():
    run, other = StandIn("lora", 1.0), StandIn("full", 0.0)
    assert check_toy_greater(run, other).passed
    with pytest.raises(HarnessError, match=r"^check_toy_greater: `a` and `b` are the same run \(lora-s0\); a run "
                                           r"compared with itself differs by exactly 0"):
        check_toy_greater(run, run)
    with pytest.raises(HarnessError, match=r"^check_toy_greater: `a` holds run lora-s0 twice"):
        check_toy_greater([run, run], [other, StandIn("x", 0.0)])


def test_takes_runs_paired_refuses_an_unknown_metric_with_a_suggestion():
    assert check_toy_metric(StandIn("lora", 0.0), "behavior_shift").passed
    with pytest.raises(HarnessError, match=r"^check_toy_metric: no metric 'behaviour_shift' to compare\..*Did you mean: "
                                           r"behavior_shift\?.*Paired comparisons take .*behavior_shift"):
        check_toy_metric(StandIn("lora", 0.0), "behaviour_shift")


def test_a_call_with_wrong_arguments_raises_pythons_own_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'scael'"):
        check_toy(StandIn("lora", 1.0), scael=2)
