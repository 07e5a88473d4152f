"""The judging rules (stance_harness/judging.py) as plain functions, without pytester: what a test's
outcome means (supported, refuted, inconclusive, or an error), held against a recorded verdict or
--inconclusive, and the expected_outcome mark. tests/test_verdicts.py runs them inside pytest."""

import types
from pathlib import Path

import pytest

from stance_harness import HypothesisFailed, HypothesisInconclusive
from stance_harness.core.errors import HarnessError
from stance_harness.core.results import CheckResult
from stance_harness.judging import (VERDICT_KEY, VerdictChanged, expectation, harness_error_line, hold_against_record,
                                    judge_call, not_a_refutation, short_message, verdict_of, without_record)
from stance_harness.report.records import TestRecord

HERE = Path(__file__)


def raised(make):
    try:
        make()
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        return exc
    raise AssertionError("nothing was raised")


def raise_in(filename: str, code: str = "assert 1 == 2, 'inner'"):
    """An exception raised by code whose frame says it lives in `filename`."""
    return raised(lambda: exec(compile(code, filename, "exec"), {}))


FAILED = HypothesisFailed(CheckResult("assert_x", False, "worse by 2"))
INCONCLUSIVE = HypothesisInconclusive(CheckResult("assert_x", False, "straddles 0", verdict="inconclusive"))


# -- what an outcome is ------------------------------------------------------------------------
def test_an_outcome_is_supported_refuted_inconclusive_or_not_a_claim():
    assert verdict_of(None, HERE) == "supported"
    assert verdict_of(FAILED, HERE) == "refuted"
    assert verdict_of(INCONCLUSIVE, HERE) == "inconclusive"
    assert verdict_of(ValueError("x"), HERE) is None
    assert verdict_of(HarnessError("bad input"), HERE) is None


def test_an_assert_refutes_only_from_the_test_itself_or_pytest():
    assert verdict_of(raise_in(str(HERE)), HERE) == "refuted"  # the test's own assert
    assert verdict_of(raise_in("/somewhere/_pytest/python_api.py"), HERE) == "refuted"  # pytest.approx, raises
    assert verdict_of(raise_in("/somewhere/site-packages/lib.py"), HERE) is None  # a library's assert: an error
    assert verdict_of(AssertionError("no traceback"), HERE) is None


def test_a_library_assert_is_replaced_by_an_error_naming_where():
    inner = raise_in("/somewhere/site-packages/lib.py")
    replaced = not_a_refutation(inner)
    assert isinstance(replaced, RuntimeError) and replaced.__cause__ is inner
    assert str(replaced) == ("an AssertionError raised inside /somewhere/site-packages/lib.py, not by the test or a "
                             "harness helper, is an error, not a refutation of the hypothesis: inner")


def _a_test_that_errs():
    raise HarnessError("recipe: fp16=True on the CPU")


def test_a_harness_error_is_one_line_naming_the_tests_line():
    error = raised(_a_test_that_errs)
    line = _a_test_that_errs.__code__.co_firstlineno + 1
    assert harness_error_line(error, _a_test_that_errs.__code__, HERE) == (
        f"stance-harness: recipe: fp16=True on the CPU (test_judging.py:{line})")
    assert harness_error_line(error, None, HERE) == "stance-harness: recipe: fp16=True on the CPU"
    assert harness_error_line(ValueError("x"), _a_test_that_errs.__code__, HERE) is None


# -- held against the record -------------------------------------------------------------------
RECORD_TEST = "suites/test_a.py::test_claim"


def test_the_recorded_verdict_again_passes_or_xfails_with_its_reason():
    record = TestRecord(RECORD_TEST)
    assert hold_against_record(RECORD_TEST, "tiny-qwen2", {"verdict": "supported"}, "supported", record) is None
    with pytest.raises(pytest.xfail.Exception, match=r"^recorded refuted on tiny-qwen2: too small to tell$"):
        hold_against_record(RECORD_TEST, "tiny-qwen2", {"verdict": "refuted", "reason": "too small to tell"},
                            "refuted", record)
    assert not record.held_for_family


def test_supported_where_inconclusive_was_recorded_waits_for_the_family():
    record = TestRecord(RECORD_TEST)
    with pytest.raises(pytest.xfail.Exception, match="recorded inconclusive on tiny-qwen2; supported alone, so the "
                                                     "Holm correction over its test file decides"):
        hold_against_record(RECORD_TEST, "tiny-qwen2", {"verdict": "inconclusive"}, "supported", record)
    assert record.held_for_family


def test_a_changed_verdict_fails_with_the_record_and_the_interval():
    record = TestRecord(RECORD_TEST)
    record.checks.append({"metrics": {"low": 0.1, "high": 0.3, "estimate": 0.2, "metric": "ece", "n": 3,
                                      "unit": "seed"}})
    with pytest.raises(VerdictChanged) as info:
        hold_against_record(RECORD_TEST + "[repeat1]", "tiny-qwen2", {"verdict": "supported", "reason": "clear"},
                            "refuted", record)
    message = str(info.value)
    assert message.startswith("the verdict on tiny-qwen2 changed: recorded supported, now refuted\n")
    assert RECORD_TEST + " " in message and "[repeat1]" not in message  # the repetition's base is the record's key
    assert "+0.2 [+0.1, +0.3] (ece, 3 seeds)" in message and "the record said: clear" in message


def test_a_changed_verdict_on_clock_times_is_data_about_a_machine_and_does_not_fail():
    import stance_harness.measurements  # noqa: F401 - declares step_time, a wall-clock metric

    timed = TestRecord(RECORD_TEST)
    timed.checks.append({"metrics": {"low": -0.01, "high": 0.01, "estimate": 0.0, "metric": "step_time", "n": 10,
                                     "unit": "run"}})
    with pytest.raises(pytest.xfail.Exception, match=r"^recorded refuted on tiny-qwen2, found inconclusive here: a "
                                                     r"claim on clock times \(step_time\) depends on the machine"):
        hold_against_record(RECORD_TEST, "tiny-qwen2", {"verdict": "refuted", "seeds": 5}, "inconclusive", timed)
    with pytest.raises(pytest.xfail.Exception, match=r"^recorded inconclusive on tiny-qwen2, found supported here"):
        hold_against_record(RECORD_TEST, "tiny-qwen2", {"verdict": "inconclusive", "seeds": 5}, "supported", timed)
    assert not timed.held_for_family  # not left for the family's correction to fail at the end
    # one check on a metric that is not a clock time makes it a claim about the runs: held against the record
    timed.checks.append({"metrics": {"low": 0.1, "high": 0.3, "estimate": 0.2, "metric": "ece", "n": 3,
                                     "unit": "seed"}})
    with pytest.raises(VerdictChanged, match="recorded refuted, now inconclusive"):
        hold_against_record(RECORD_TEST, "tiny-qwen2", {"verdict": "refuted", "seeds": 5}, "inconclusive", timed)


def test_a_record_made_with_other_seeds_is_another_claim_and_does_not_fail():
    record = TestRecord(RECORD_TEST, seeds=1)  # --seeds 1 against a record of 5 seeds per arm
    with pytest.raises(pytest.xfail.Exception, match=r"^recorded inconclusive on tiny-qwen2 with 5 seeds per arm; "
                                                     r"this session trained 1, another claim, and found it refuted: "
                                                     r"not held against the record$"):
        hold_against_record(RECORD_TEST, "tiny-qwen2", {"verdict": "inconclusive", "seeds": 5}, "refuted", record)
    assert not record.held_for_family
    # the same verdict with other seeds stands as recorded; the same seeds and another verdict still fail
    assert hold_against_record(RECORD_TEST, "tiny-qwen2", {"verdict": "supported", "seeds": 5}, "supported",
                               record) is None
    with pytest.raises(VerdictChanged):
        hold_against_record(RECORD_TEST, "tiny-qwen2", {"verdict": "inconclusive", "seeds": 1}, "refuted", record)


# -- without a record: --inconclusive ---------------------------------------------------------
def test_inconclusive_without_a_record_does_what_the_option_says():
    with pytest.raises(pytest.skip.Exception, match=r"^inconclusive: straddles 0$"):
        without_record("inconclusive", "skip", INCONCLUSIVE, None)
    assert without_record("inconclusive", "pass", INCONCLUSIVE, None) is None
    with pytest.raises(HypothesisInconclusive):
        without_record("inconclusive", "fail", INCONCLUSIVE, None)


def test_other_verdicts_without_a_record_stand_as_they_are():
    assert without_record("supported", "pass", None, "result") == "result"
    with pytest.raises(HypothesisFailed):
        without_record("refuted", "pass", FAILED, None)


# -- the expected_outcome mark -------------------------------------------------------------------
def test_an_expectation_applies_on_the_models_it_names():
    def never():
        raise AssertionError("on='any' does not ask what the model is")

    assert expectation(("refuted",), {"reason": "tiny"}, lambda: True) == {
        "outcome": "refuted", "reason": "tiny", "on": "embedded", "applies": True}
    assert not expectation(("refuted",), {"reason": "tiny"}, lambda: False)["applies"]
    assert expectation((), {"outcome": "supported", "reason": "r", "on": "any"}, never)["applies"]


@pytest.mark.parametrize("args, kwargs", [(("wrong",), {"reason": "r"}), (("refuted",), {}),
                                          (("refuted",), {"reason": "r", "on": "gpu"})])
def test_a_malformed_expectation_is_a_usage_error(args, kwargs):
    with pytest.raises(pytest.UsageError, match=r"^@pytest.mark.expected_outcome\('refuted'\|'supported', "
                                                r"reason='...', on='embedded'\|'any'\); got args="):
        expectation(args, kwargs, lambda: True)


# -- the call, judged whole ------------------------------------------------------------------------
def _item(fixtures, marker=None):
    return types.SimpleNamespace(nodeid=RECORD_TEST, path=HERE, fixturenames=fixtures, stash=pytest.Stash(),
                                 get_closest_marker=lambda name: marker, obj=None)


def _session(recorded=None, inconclusive="fail", record_verdicts=False):
    records = {RECORD_TEST: TestRecord(RECORD_TEST)}
    return types.SimpleNamespace(
        records=records, record=records.__getitem__,
        options=types.SimpleNamespace(model="tiny-qwen2", inconclusive=inconclusive, record_verdicts=record_verdicts),
        verdicts=types.SimpleNamespace(recorded=lambda path, nodeid: recorded))


def test_a_test_without_harness_fixtures_is_not_judged():
    item = _item(["tmp_path"])
    assert judge_call(item, _session(), "r", None) == "r"
    with pytest.raises(HypothesisInconclusive):
        judge_call(item, _session(inconclusive="pass"), None, INCONCLUSIVE)
    assert VERDICT_KEY not in item.stash


def test_a_hypothesis_is_judged_and_its_verdict_kept():
    item = _item(["train", "stance_report"])
    assert judge_call(item, _session(inconclusive="pass"), None, INCONCLUSIVE) is None
    assert item.stash[VERDICT_KEY] == "inconclusive"
    with pytest.raises(VerdictChanged, match="recorded supported, now refuted"):
        judge_call(_item(["stance_report"]), _session(recorded={"verdict": "supported"}), None, FAILED)


def test_under_record_verdicts_or_an_expectation_the_record_does_not_judge():
    assert judge_call(_item(["train"]), _session(recorded={"verdict": "refuted"}, record_verdicts=True), "r", None) == "r"
    marked = _item(["train"], marker=object())
    assert judge_call(marked, _session(recorded={"verdict": "refuted"}), "r", None) == "r"


def test_an_error_that_is_no_claim_stays_an_error():
    with pytest.raises(ValueError):
        judge_call(_item(["train"]), _session(), None, ValueError("x"))
    with pytest.raises(RuntimeError, match="is an error, not a refutation"):
        judge_call(_item(["train"]), _session(), None, raise_in("/somewhere/site-packages/lib.py"))
    with pytest.raises(pytest.fail.Exception, match=r"^stance-harness: bad input$"):
        judge_call(_item(["train"]), _session(), None, HarnessError("bad input"))


def test_the_short_message_is_a_checks_summary_else_the_exception():
    def call(error):
        return types.SimpleNamespace(excinfo=pytest.ExceptionInfo.from_exc_info((type(error), error, None)))

    assert short_message(call(FAILED), None) == "worse by 2"
    assert short_message(call(ValueError("bad")), None) == "ValueError: bad"
    assert short_message(types.SimpleNamespace(excinfo=None), types.SimpleNamespace(longrepr="skipped: why")) == (
        "skipped: why")
