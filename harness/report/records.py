"""What one test contributes to the report: its runs, checks, tables, metrics and notes."""

from __future__ import annotations

import contextvars
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

# The running test's record, made on first use, so tests that never touch the harness
# leave nothing in the report.
_current: contextvars.ContextVar["Callable[[], TestRecord] | None"] = contextvars.ContextVar(
    "stance_harness_record", default=None)


@dataclass
class CheckResult:
    """The structured outcome of one assertion helper."""

    check: str
    passed: bool
    summary: str
    headers: list[str] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    def render(self) -> str:
        from tabulate import tabulate

        text = f"{self.check}: {self.summary}"
        if self.rows:
            text += "\n" + tabulate(self.rows, headers=self.headers, floatfmt=".4g", tablefmt="simple")
        return text

    def as_dict(self) -> dict:
        return json_safe(asdict(self))


@dataclass
class TestRecord:
    __test__ = False  # not a pytest test class, despite the name

    nodeid: str
    outcome: str = "not run"
    duration: float = 0.0
    message: str | None = None
    runs: list[str] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    expected: dict | None = None  # {"outcome": "refuted", "reason": ...} from @pytest.mark.expected_outcome
    verdict: str | None = None  # "supported" or "refuted": what the run showed, whatever was expected
    repeats: dict | None = None  # under --repeat N: {"n", "metrics": {name: {mean, std, min, max, n}}}

    # -- the API a suite uses through the `stance_report` fixture --------------------------
    def table(self, title: str, rows: list[dict]) -> None:
        """Add a titled table (a list of dicts with the same keys) to this test's report."""
        self.tables.append({"title": title, "rows": json_safe(rows)})

    def metric(self, name: str, value: float) -> None:
        self.metrics[name] = json_safe(value)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def use_run(self, run) -> None:
        if run.run_id not in self.runs:
            self.runs.append(run.run_id)

    def add_check(self, result: CheckResult) -> None:
        self.checks.append(result.as_dict())

    def as_dict(self) -> dict:
        return asdict(self)


def set_current_record(make_record: Callable[[], TestRecord] | None):
    return _current.set(make_record)


def reset_current_record(token) -> None:
    _current.reset(token)


def emit(result: CheckResult, published: dict | None = None) -> None:
    """Add a check to the running test's record; `published` metrics become the test's metrics
    (what baselines compare and JUnit XML shows)."""
    make_record = _current.get()
    if make_record is not None:
        record = make_record()
        record.add_check(result)
        for name, value in (published or {}).items():
            record.metric(name, value)


def json_safe(value):
    """Floats that JSON can hold (NaN/inf become strings), containers recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return json_safe(value.item())  # a 0-d tensor or a numpy scalar
    if hasattr(value, "tolist") and callable(value.tolist):
        return json_safe(value.tolist())
    return value
