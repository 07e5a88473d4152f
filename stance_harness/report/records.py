"""What one test contributes to the report: its runs, checks, tables, metrics and notes."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass, field

from stance_harness.core.results import CheckResult, json_safe
from stance_harness.core.metrics import Estimate, declare_metric, is_declared


class UndeclaredMetricWarning(UserWarning):
    """A test published a metric whose direction nobody declared, so no rule can gate it."""


@dataclass
class TestRecord:
    __test__ = False  # not a pytest test class, despite the name

    nodeid: str
    outcome: str = "not run"
    duration: float = 0.0
    message: str | None = None
    doc: str | None = None  # the test function's docstring: the hypothesis in words (findings)
    runs: list[str] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    intervals: dict = field(default_factory=dict)  # {metric: [low, high]}: a metric's 95% interval, where it has one
    notes: list[str] = field(default_factory=list)
    expected: dict | None = None  # {"outcome": "refuted", "reason": ...} from @pytest.mark.expected_outcome
    verdict: str | None = None  # "supported" or "refuted": what the run showed, whatever was expected
    repeats: dict | None = None  # under --repeat N: {"n", "metrics": {name: {mean, std, min, max, n}}}
    held_for_family: bool = False  # supported alone against a recorded inconclusive: the family's Holm decides
    seeds: int | None = None  # training seeds per configuration of the runs it was handed (1: run-level)

    # -- the API a suite uses through the `stance_report` fixture --------------------------
    def table(self, title: str, rows: list[dict]) -> None:
        """Add a titled table (a list of dicts with the same keys) to this test's report."""
        self.tables.append({"title": title, "rows": json_safe(rows)})

    def metric(self, name: str, value: float, direction: str | None = None, description: str = "",
               interval: tuple[float, float] | None = None) -> None:
        """Publish a metric (baselines compare it, JUnit shows it). Its direction must be known:
        declared by whoever produces it, or given here ("lower" or "higher" is better). `interval`
        (low, high), or an Estimate's own, is kept for gate rules with @ci."""
        if direction is not None:
            declare_metric(name.rsplit(".", 1)[-1], direction, description)
        elif not is_declared(name):
            warnings.warn(UndeclaredMetricWarning(
                f"metric {name!r} has no declared direction, so a --fail-on rule cannot gate it: declare it with "
                f"stance_harness.declare_metric({name.rsplit('.', 1)[-1]!r}, 'lower' or 'higher', '...') or pass "
                f"direction= to stance_report.metric"), stacklevel=2)
        if interval is None and isinstance(value, Estimate):
            interval = (value.low, value.high)
        if interval is not None:
            low, high = (float(v) for v in interval)
            if low > high:
                raise ValueError(f"metric {name!r}: interval ({low}, {high}) has its low end above its high end")
            if math.isfinite(low) and math.isfinite(high):  # a collapsed run's infinite one gates nothing
                self.intervals[name] = [low, high]
        self.metrics[name] = json_safe(float(value) if isinstance(value, Estimate) else value)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def use_run(self, run):
        """This test holds `run`: list it, and record the checks made on it here until `release_run`."""
        if run.run_id not in self.runs:
            self.runs.append(run.run_id)
        if self.add_check not in run.sinks:
            run.sinks.append(self.add_check)
        return run

    def release_run(self, run) -> None:
        if self.add_check in run.sinks:
            run.sinks.remove(self.add_check)

    def conclude(self, outcome: str, duration: float, verdict: str | None, message: str | None) -> None:
        """The test's outcome and verdict (supported, refuted, inconclusive; None when it errored
        another way or never ran its claim)."""
        self.outcome = outcome
        self.duration += duration
        if message is not None:
            self.message = message
        self.verdict = verdict

    def add_check(self, result: CheckResult, published: dict | None = None) -> None:
        """A check on a run this test uses; `published` metrics become the test's metrics."""
        self.checks.append(result.as_dict())
        for name, value in (published or {}).items():
            self.metric(name, value)

    def as_dict(self) -> dict:
        return asdict(self)


_REPEAT_PART = re.compile(r"repeat\d+")


def repeat_base(nodeid: str) -> str:
    """The test id without --repeat's part: `test_x[repeat2-lora]` -> `test_x[lora]`; `test_x[repeat0]` -> `test_x`."""
    head, bracket, params = nodeid.partition("[")
    if not bracket or not params.endswith("]"):
        return nodeid
    parts = params[:-1].split("-")
    kept = [p for p in parts if not _REPEAT_PART.fullmatch(p)]
    if len(kept) == len(parts):
        return nodeid
    return head + (f"[{'-'.join(kept)}]" if kept else "")
