"""The judging rules: what a hypothesis test's call found (supported, refuted or inconclusive),
and what pytest makes of it. A verdict recorded for this model (verdicts/<model>.json) judges
it; without one, --inconclusive decides what an inconclusive claim does; an `expected_outcome`
mark says what the embedded tiny models are expected to show.

The plugin's hooks call these; each takes plain values, so each is testable without pytester.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

import stance_harness
from stance_harness.core.errors import HarnessError
from stance_harness.core.metrics import is_wall_clock
from stance_harness.report.records import repeat_base
from stance_harness.report.verdicts import changed_message, interval_of

VERDICT_KEY = pytest.StashKey[str]()  # what the test's call found: supported, refuted or inconclusive
HARNESS_FIXTURES = {"train", "adapter_run", "stance_report"}  # a test using one of these is judged as a hypothesis
EXPECTED_MARK = "expected_outcome"
EXPECTED_MARK_DOC = (f"{EXPECTED_MARK}(outcome, reason, on='embedded'): the hypothesis is expected to be 'refuted' "
                     "(or 'supported') on the embedded tiny models ('embedded') or on any model ('any')")


class VerdictChanged(Exception):
    """What a hypothesis found differs from what was recorded for this model."""


def _check_outcomes() -> tuple[type, type]:
    # the public names, looked up when first judged: the checks' module imports torch
    return stance_harness.HypothesisFailed, stance_harness.HypothesisInconclusive


def verdict_of(error: BaseException | None, test_file: Path) -> str | None:
    """supported: the test passed; refuted: a helper's HypothesisFailed, or an AssertionError of the
    test's own code (`test_file`) or of pytest's (pytest.raises, approx); inconclusive: a helper's
    HypothesisInconclusive; None: anything else (an error stays an error)."""
    failed, inconclusive = _check_outcomes()
    if error is None:
        return "supported"
    if isinstance(error, inconclusive):
        return "inconclusive"
    if isinstance(error, failed):
        return "refuted"
    if isinstance(error, AssertionError):
        frames = list(frames_of(error.__traceback__))
        raised_in = Path(frames[-1].tb_frame.f_code.co_filename).resolve() if frames else None
        ours = raised_in is not None and (raised_in == Path(test_file).resolve()  # the test's own assert
                                          or "_pytest" in raised_in.parts)  # pytest.raises, approx: its own checks
        return "refuted" if ours else None
    return None


def frames_of(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def not_a_refutation(error: AssertionError) -> BaseException:
    """An AssertionError raised inside a library is an error of the test, not a refutation."""
    frames = list(frames_of(error.__traceback__))
    where = frames[-1].tb_frame.f_code.co_filename if frames else "?"
    replaced = RuntimeError(f"an AssertionError raised inside {where}, not by the test or a harness helper, "
                            f"is an error, not a refutation of the hypothesis: {error}")
    replaced.__cause__ = error
    return replaced


def harness_error_line(error: BaseException, test_code, test_file: Path) -> str | None:
    """A harness error (bad input, an analysis stage over --analysis-timeout) as one `stance-harness:`
    line naming the line of the test (`test_code`: its function's code) it came from; None for others."""
    if not isinstance(error, HarnessError):
        return None
    lines = [tb.tb_lineno for tb in frames_of(error.__traceback__) if tb.tb_frame.f_code is test_code]
    where = f" ({Path(test_file).name}:{lines[-1]})" if lines else ""
    return f"stance-harness: {error}{where}"


def hold_against_record(nodeid: str, model: str, recorded: dict, verdict: str, record) -> None:
    """The verdict against the one recorded for `model`: the same passes (an expected refutation or
    inconclusive xfails, giving the record's reason); a different one raises VerdictChanged. Supported
    where inconclusive was recorded waits for the Holm correction over its test file (xfail now;
    `record`, the test's TestRecord, is marked to be judged at the end of the session). A record
    made with another number of training seeds per arm is of another claim (one seed: two runs,
    not the methods), so a different verdict then xfails, saying so, instead of failing; so does a
    claim on clock times (`wall_clock_metrics`), whose record is data about another machine's load."""
    seeds, recorded_seeds = getattr(record, "seeds", None), recorded.get("seeds")
    if verdict != recorded["verdict"] and seeds and recorded_seeds and seeds != recorded_seeds:
        pytest.xfail(f"recorded {recorded['verdict']} on {model} with {recorded_seeds} seeds per arm; this session "
                     f"trained {seeds}, another claim, and found it {verdict}: not held against the record")
    timed = wall_clock_metrics(record.checks if record else []) if verdict != recorded["verdict"] else []
    if timed:
        pytest.xfail(f"recorded {recorded['verdict']} on {model}, found {verdict} here: a claim on clock times "
                     f"({', '.join(timed)}) depends on the machine and its load, so its record is data about "
                     f"the machine it was made on, not held against this one")
    if verdict == "supported" and recorded["verdict"] == "inconclusive":
        # supported alone; whether it stays supported is known only when its family (the test
        # file) is Holm-corrected at the end of the session, which then judges it against the record
        record.held_for_family = True
        pytest.xfail(f"recorded inconclusive on {model}; supported alone, so the Holm correction over its test "
                     f"file decides at the end of the session")
    if verdict != recorded["verdict"]:
        interval = interval_of(record.checks if record else [])
        raise VerdictChanged(changed_message(repeat_base(nodeid), recorded, verdict, interval, model))
    if verdict != "supported":
        pytest.xfail(f"recorded {verdict} on {model}: {recorded.get('reason') or '-'}")


def wall_clock_metrics(checks: list[dict]) -> list[str]:
    """The metrics a test's checks compared, when every one is a clock time (else none)."""
    metrics = sorted({(c.get("metrics") or {}).get("metric") for c in checks} - {None})
    return metrics if metrics and all(is_wall_clock(m) for m in metrics) else []


def without_record(verdict: str, inconclusive: str, error: BaseException | None, result):
    """Where no verdict is recorded: an inconclusive claim fails, is skipped or passes as
    --inconclusive (`inconclusive`) says; anything else stands: `error` raised, else `result`."""
    if verdict == "inconclusive":
        if inconclusive == "skip":
            pytest.skip(f"inconclusive: {error.result.summary}")
        if inconclusive == "pass":
            return None
    if error is not None:
        raise error
    return result


def judge_call(item, session, result, error: BaseException | None):
    """What pytest makes of a test's call (`result`, or the `error` it raised): a test that uses no
    harness fixture stands as it is; a hypothesis is held against its record, else --inconclusive."""
    fixtures = set(getattr(item, "fixturenames", ()))
    if not HARNESS_FIXTURES & fixtures:
        if error is not None:  # a test that does not use the harness is not judged
            raise error
        return result
    verdict = verdict_of(error, item.path)
    if verdict is None:  # not a claim's outcome: an error stays an error
        line = harness_error_line(error, getattr(getattr(item, "obj", None), "__code__", None), item.path)
        if line is not None:
            pytest.fail(line, pytrace=False)
        raise not_a_refutation(error) if isinstance(error, AssertionError) else error
    if item.nodeid in session.records or "train" in fixtures:
        item.stash[VERDICT_KEY] = verdict
    # --record-verdicts records what the test finds now, so the old record does not judge it
    judged_by_record = not (item.get_closest_marker(EXPECTED_MARK) or session.options.record_verdicts)
    recorded = session.verdicts.recorded(item.path, repeat_base(item.nodeid)) if judged_by_record else None
    if recorded is not None:
        hold_against_record(item.nodeid, session.options.model, recorded, verdict, session.record(item.nodeid))
        return None
    return without_record(verdict, session.options.inconclusive, error, result)


def expectation(args: tuple, kwargs: dict, is_embedded: Callable[[], bool]) -> dict:
    """An `expected_outcome` mark's arguments checked: outcome, reason, on, and whether it applies
    to this session's model (`is_embedded()`: it is one of the embedded tiny models)."""
    outcome = args[0] if args else kwargs.get("outcome")
    reason, on = kwargs.get("reason", ""), kwargs.get("on", "embedded")
    if outcome not in ("refuted", "supported") or on not in ("embedded", "any") or not reason:
        raise pytest.UsageError(f"@pytest.mark.{EXPECTED_MARK}('refuted'|'supported', reason='...', "
                                f"on='embedded'|'any'); got args={args} kwargs={kwargs}")
    return {"outcome": outcome, "reason": reason, "on": on, "applies": on == "any" or is_embedded()}


def short_message(call, report) -> str:
    """The one line a failed or skipped test's record keeps: a check's summary, else the exception."""
    if call.excinfo is not None:
        failed, inconclusive = _check_outcomes()
        if isinstance(call.excinfo.value, (failed, inconclusive)):
            return call.excinfo.value.result.summary
        return call.excinfo.exconly().strip()
    return str(report.longrepr)
