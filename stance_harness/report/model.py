"""The report's data model: what report.json holds, typed, with one loader for every version.

`load_report(data)` is the only way a renderer reads a payload: it migrates a report written by an
older harness (no `format`: version 1, possibly `run_id` for `report_id`, tests and runs missing
later keys) to the current shape, filling what is absent with empty values, and keeps keys it does
not know (a newer harness's fields, another helper's check fields) so they survive a rewrite.
`Report.to_dict()` is the payload again, complete: the Markdown and HTML renderers index it freely.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from stance_harness.core.files import read_json
from stance_harness.core.errors import HarnessError

REPORT_FORMAT = 2  # 1: reports before this module (no `format` key); 2: format, doc per test, changes


class ReportFormatError(HarnessError):
    """A report.json this harness cannot read: not an object, or from a newer harness."""


def _known(cls, data: dict) -> tuple[dict, dict]:
    names = {f.name for f in fields(cls)} - {"extra"}
    return {k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names}


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value) -> list:
    return value if isinstance(value, list) else []


@dataclass
class TestEntry:
    """One test's record (see report/records.py's TestRecord), as report.json holds it."""

    __test__ = False  # not a pytest test class, despite the name

    nodeid: str
    outcome: str = "not run"
    duration: float = 0.0
    message: str | None = None
    doc: str | None = None  # the test's docstring: the hypothesis in words (format 2)
    runs: list = field(default_factory=list)
    checks: list = field(default_factory=list)
    tables: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    expected: dict | None = None
    verdict: str | None = None
    repeats: dict | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data) -> "TestEntry":
        data = _dict(data)
        known, extra = _known(cls, data)
        known["nodeid"] = str(known.get("nodeid") or "?")
        known["outcome"] = known.get("outcome") or "not run"
        for key in ("runs", "checks", "tables", "notes"):
            known[key] = [c for c in _list(known.get(key)) if key != "checks" or isinstance(c, dict)]
        known["metrics"] = _dict(known.get("metrics"))
        if isinstance(known.get("expected"), str):  # an early report kept the outcome only
            known["expected"] = {"outcome": known["expected"], "reason": None}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **out}


RUN_DEFAULTS = {"method": "?", "config": {}, "recipe": {}, "stance": {}, "model": {}, "examples": None,
                "counts": {}, "trace": {}, "instruments": {}, "layers": {}, "measurements": {}, "origins": []}
COUNT_KEYS = ("trainable", "frozen", "trainable_pct", "params_per_example", "stance_bytes", "full_weights_bytes")
TRACE_KEYS = {"loss": [], "grad_norm": [], "nonfinite": [], "skipped_steps": [], "halted_at": None,
              "halt_reason": None}


def migrate_run(run_id: str, run) -> dict:
    """A run's summary with every key the renderers read (old runs lack measurements, instruments,
    most of the trace, an adapter view)."""
    run = dict(_dict(run))
    for key, default in RUN_DEFAULTS.items():
        if run.get(key) is None and default is not None:
            run[key] = type(default)()
    run.setdefault("run_id", run_id)
    if not run["origins"] and run.get("origin"):
        run["origins"] = [run["origin"]]
    run["counts"] = {**{k: None for k in COUNT_KEYS}, **_dict(run["counts"])}
    run["trace"] = {**{k: (type(v)() if isinstance(v, list) else v) for k, v in TRACE_KEYS.items()},
                    **_dict(run["trace"])}
    stance = _dict(run["stance"])
    run["stance"] = {"name": stance.get("name", "?"), "version": stance.get("version"), **stance}
    layers = _dict(run["layers"])
    run["layers"] = {"effective": _list(layers.get("effective")),
                     "adapter": _list(layers.get("adapter")) if "adapter" in layers else _list(layers.get("effective")),
                     **{k: v for k, v in layers.items() if k not in ("effective", "adapter")}}
    return run


PROVENANCE_DEFAULTS = {"model": {}, "models": [], "model_args": {}, "stances": [], "methods": [], "git": {},
                       "environment": {}, "args": [], "argv": []}


@dataclass
class Report:
    """A whole report. `runs` and `provenance` stay dicts (their shape belongs to run.py and
    provenance.py), with every key a renderer reads present."""

    report_id: str
    started: str | None = None
    finished: str | None = None
    provenance: dict = field(default_factory=dict)
    tests: list[TestEntry] = field(default_factory=list)
    runs: dict = field(default_factory=dict)
    metric_directions: dict = field(default_factory=dict)
    multiplicity: list = field(default_factory=list)
    gate: dict | None = None
    changes: dict | None = None  # since the previous report on the same model (report/findings.py)
    interrupted: bool = False
    exit_code: int | None = None
    format: int = REPORT_FORMAT
    migrated_from: int | None = None  # the format read, when older than this one
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "tests")}
        out["tests"] = [t.to_dict() for t in self.tests]
        if out["migrated_from"] is None:
            del out["migrated_from"]
        return {**self.extra, **out}

    @property
    def model_name(self) -> str | None:
        model = _dict(self.provenance.get("model"))
        return model.get("name") or model.get("id")


def load_report(data) -> Report:
    """The report in `data` (a parsed report.json, or a session's payload), migrated to this format."""
    if isinstance(data, Report):
        return data
    if not isinstance(data, dict):
        raise ReportFormatError(f"a report is a JSON object with report_id, tests and runs, not a "
                                f"{type(data).__name__}")
    version = data.get("format", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ReportFormatError(f"report field 'format' is {version!r}: allowed values are 1 to {REPORT_FORMAT}")
    if version > REPORT_FORMAT:
        raise ReportFormatError(f"report format {version} is newer than this stance-harness reads "
                                f"(1 to {REPORT_FORMAT}): upgrade stance-harness to read it")
    known, extra = _known(Report, data)
    extra.pop("run_id", None)  # format 1 before 0.2 named the report id run_id
    known["report_id"] = str(data.get("report_id") or data.get("run_id") or "?")
    provenance = _dict(known.get("provenance"))
    known["provenance"] = {**{k: type(v)() for k, v in PROVENANCE_DEFAULTS.items()}, **provenance}
    env = _dict(known["provenance"]["environment"])
    known["provenance"]["environment"] = {"libraries": {}, "machine": {}, **env}
    known["tests"] = [TestEntry.from_dict(t) for t in _list(known.get("tests")) if isinstance(t, dict)]
    known["runs"] = {str(k): migrate_run(str(k), v) for k, v in _dict(known.get("runs")).items()}
    for key in ("metric_directions",):
        known[key] = _dict(known.get(key))
    known["multiplicity"] = _list(known.get("multiplicity"))
    known["interrupted"] = bool(known.get("interrupted"))
    known["format"] = REPORT_FORMAT
    known["migrated_from"] = version if version < REPORT_FORMAT else data.get("migrated_from")
    return Report(**known, extra=extra)


def normalized(data) -> dict:
    """The payload as a complete dict of this format: what the renderers read."""
    return load_report(data).to_dict()


def read_report(path) -> Report:
    """report.json at `path`, loaded and migrated."""
    path = Path(path)
    data = read_json(path, "report", ReportFormatError)
    try:
        return load_report(data)
    except ReportFormatError as err:
        raise ReportFormatError(f"{path}: {err}") from None
