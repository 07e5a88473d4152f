"""The store of reports: report folders (`reports/<report-id>/`, a `latest` pointer, the index
page), saved baselines (`reports/baselines/NAME.json`), and resolving what a user names
(`latest`, a report id, a baseline name, or a path) to a loaded report or baseline."""

from __future__ import annotations

import html
import json
import os
import re
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from stance_harness.core.files import atomic_write, read_json
from stance_harness.core.metrics import Estimate, Spread, is_number, metrics_from_payload, test_metrics, tests_by_id
from stance_harness.core.registry import HarnessError, suggest
from stance_harness.core.results import json_safe
from stance_harness.report import figures
from stance_harness.report import html as pages
from stance_harness.report.findings import changes_since, findings
from stance_harness.report.markdown import render_markdown
from stance_harness.report.model import REPORT_FORMAT, ReportFormatError, load_report, normalized, read_report
from stance_harness.report.sections import report_id_of

BASELINE_FORMAT = 1
BASELINE_DIR = "baselines"
FIGURE_CACHE = ".figures"  # drawn figures, by content (report/html.py's FigureCache)
_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def new_report_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + os.urandom(2).hex()


def write_report(reports_dir: Path, payload: dict, move_latest: bool = True,
                 progress: Callable[[str], None] | None = None) -> Path:
    """report.json, report.md and index.html (with runs/*.html) in reports/<report-id>/, then
    `latest` (unless told not to move it) and reports/index.html. Each file is written atomically.
    The payload gains `format` and `changes` (since the previous report on the same model).
    `progress` hears a line before (what is being written) and one after (how long it took, and
    how many figures were drawn: a figure is drawn once, then reused from the figure cache)."""
    report_id = report_id_of(payload)
    report_dir = Path(reports_dir) / report_id
    say = progress or (lambda _line: None)
    say(f"writing the report to {report_dir}/: report.json, report.md, index.html and "
        f"{len(payload.get('runs') or {})} run page(s) for {len(payload.get('tests') or [])} test(s)")
    started = time.perf_counter()
    payload["format"] = REPORT_FORMAT
    previous = previous_report(reports_dir, payload)
    if previous is not None:
        payload["changes"] = changes_since(normalized(payload), previous)
    cache = write_report_files(report_dir, payload, reports_dir)
    if move_latest:
        atomic_write(Path(reports_dir) / "latest", report_id + "\n")
    write_index(reports_dir)
    say(f"wrote the report in {time.perf_counter() - started:.1f}s ({figure_counts(cache)})")
    return report_dir


def figure_counts(cache: figures.FigureCache) -> str:
    return f"{cache.drawn} figure(s) drawn, {cache.reused} reused from the figure cache"


def previous_report(reports_dir, payload: dict) -> dict | None:
    """The newest earlier report in reports_dir on the same model as `payload` (complete), or None."""
    current = load_report(payload)
    for report_id in list_reports(reports_dir):
        if report_id >= current.report_id:  # report ids start with their UTC time: only earlier ones
            continue
        try:
            earlier = read_report(Path(reports_dir) / report_id / "report.json")
        except ReportFormatError:
            continue  # an unreadable or newer report is not what this one is compared with
        if earlier.model_name == current.model_name and not earlier.interrupted:
            return earlier.to_dict()
    return None


FOREST_FILE = "forest.png"


def write_report_files(report_dir: Path, payload: dict, reports_dir: Path | None = None) -> figures.FigureCache:
    """A report's files in report_dir, each written atomically (an existing report is rewritten):
    report.json first, then report.md (with forest.png), then the HTML pages; figures are cached
    in `reports_dir` when given. Returns the figure cache, which counts what it drew and reused."""
    report_dir = Path(report_dir)
    # no indent: json's C encoder writes a 5-seed session's 7 MB in a tenth of the time its Python one takes
    text = json.dumps(json_safe({**payload, "format": REPORT_FORMAT}), default=str)
    atomic_write(report_dir / "report.json", text)
    complete = normalized(json.loads(text))  # what report.json holds
    cache = figures.FigureCache(None if reports_dir is None else Path(reports_dir) / FIGURE_CACHE)
    forest = None
    try:
        rows = findings(complete)
        forest = figures.png_bytes(cache.get("forest", rows, lambda: figures.forest_figure(rows)))
    except Exception as exc:  # noqa: BLE001 - the tables of report.md do not need the picture
        warnings.warn(f"stance-harness: the forest plot failed: {exc!r}", stacklevel=2)
    if forest:
        atomic_write(report_dir / FOREST_FILE, forest)
    atomic_write(report_dir / "report.md", render_markdown(complete, forest_image=FOREST_FILE if forest else None))
    _write_html(cache, report_dir, complete)
    return cache


def write_index(reports_dir) -> None:
    try:
        pages.write_index(reports_dir)
    except Exception as exc:  # noqa: BLE001 - the reports themselves are complete
        warnings.warn(f"stance-harness: the index of reports failed: {exc!r}", stacklevel=2)


def _write_html(cache: figures.FigureCache, report_dir: Path, payload: dict) -> None:
    """The HTML pages. A bug in drawing them must not cost the session its JSON and Markdown
    reports (already written), so a failure becomes a page that says so."""
    try:
        # figures drawn for an earlier report of the same runs are reused
        written = pages.render_pages(payload, figure_cache=cache)
    except Exception as exc:  # noqa: BLE001 - reported on the page and as a warning
        warnings.warn(f"stance-harness: the HTML report failed: {exc!r}; report.json and report.md are complete",
                      stacklevel=2)
        written = {"index.html": (
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>report failed</title></head><body>"
            "<h1>The HTML report could not be drawn</h1><p>See report.md and report.json beside this file.</p><pre>"
            + html.escape(traceback.format_exc()) + "</pre></body></html>\n")}
    for name, text in written.items():
        atomic_write(report_dir / name, text)


def check_baseline_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise HarnessError(f"bad baseline name {name!r}: use letters, digits, '.', '_' and '-' "
                           "(not starting with '.'), e.g. main or lora-r8")
    return name


def baselines_dir(reports_dir) -> Path:
    return Path(reports_dir) / BASELINE_DIR


def baseline_path(reports_dir, name: str) -> Path:
    return baselines_dir(reports_dir) / f"{check_baseline_name(name)}.json"


def _numbers_only(metrics: dict) -> dict:
    return {str(k): json_safe(float(v)) if isinstance(v, (Spread, Estimate)) else json_safe(v)
            for k, v in metrics.items() if is_number(v)}


def baseline_from_payload(name: str, payload: dict) -> dict:
    """The baseline document for a report (or another baseline) payload."""
    if not isinstance(payload, dict):
        raise HarnessError("a baseline is saved from a report payload (a dict with report_id and tests)")
    tests = {}
    for nodeid, entry in tests_by_id(payload).items():
        metrics = test_metrics(entry)
        saved: dict = {"metrics": _numbers_only(metrics)}
        intervals = {str(k): json_safe([v.low, v.high]) for k, v in metrics.items() if isinstance(v, Estimate)}
        if intervals:
            saved["intervals"] = intervals
        if isinstance(entry, dict) and entry.get("outcome") is not None:
            saved["outcome"] = entry["outcome"]
        repeats = entry.get("repeats") if isinstance(entry, dict) else None
        if isinstance(repeats, dict):
            stats = {}
            for metric, values in (repeats.get("metrics") or {}).items():
                if isinstance(values, dict) and is_number(values.get("mean")):
                    stats[str(metric)] = {k: json_safe(v) for k, v in values.items() if is_number(v)}
            saved["repeats"] = {"n": repeats.get("n"), "metrics": stats}
        tests[nodeid] = saved
    return {
        "format": BASELINE_FORMAT,
        "name": name,
        "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "report_id": report_id_of(payload),
        "provenance": json_safe(payload.get("provenance") or {}),
        "tests": tests,
    }


def save_baseline(reports_dir, name: str, payload: dict) -> Path:
    """Write `reports_dir/baselines/<name>.json` from a report payload; an existing one is replaced."""
    path = baseline_path(reports_dir, name)
    document = baseline_from_payload(name, payload)
    atomic_write(path, json.dumps(document, indent=2, default=str) + "\n")
    return path


def list_baselines(reports_dir) -> list[str]:
    folder = baselines_dir(reports_dir)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if p.is_file() and _NAME_RE.fullmatch(p.stem))


def _read_json(path: Path, what: str) -> dict:
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise HarnessError(f"{what} {path} holds a JSON {type(data).__name__}, not an object")
    return data


def load_baseline(reports_dir, name: str) -> dict:
    path = baseline_path(reports_dir, name)
    if not path.is_file():
        known = list_baselines(reports_dir)
        listing = f"existing baselines: {', '.join(known)}" if known else "there are no baselines yet"
        raise HarnessError(f"no baseline {name!r} in {baselines_dir(reports_dir)}.{suggest(name, known)} "
                           f"{listing} (save one with `stance-harness save NAME REPORT`)")
    data = _read_json(path, "baseline")
    if not isinstance(data.get("tests"), dict):
        raise HarnessError(f"baseline {path} has no 'tests' mapping")
    return data


def list_reports(reports_dir) -> list[str]:
    """Report ids with a report.json, newest first (report ids start with their UTC time)."""
    root = Path(reports_dir)
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.name != BASELINE_DIR and (p / "report.json").is_file()),
                  reverse=True)


def latest_report(reports_dir) -> str:
    pointer = Path(reports_dir) / "latest"
    try:
        report_id = pointer.read_text(encoding="utf-8").strip()
    except OSError:
        raise HarnessError(f"no {pointer}: no session has written a report there yet") from None
    if not report_id:
        raise HarnessError(f"{pointer} is empty")
    return report_id


@dataclass
class Source:
    """One side of a comparison, loaded."""

    spec: str
    kind: str  # "report" or "baseline"
    path: Path
    data: dict

    @property
    def label(self) -> str:
        if self.kind == "baseline":
            return f"baseline {self.data.get('name', self.spec)} (report {report_id_of(self.data)}, saved {self.data.get('saved')})"
        return f"report {report_id_of(self.data) or self.spec}"

    @property
    def metrics(self) -> dict[str, dict]:
        return metrics_from_payload(self.data)


def _load_file(spec: str, path: Path) -> Source:
    if path.is_dir():
        path = path / "report.json"
    data = _read_json(path, "file")
    tests = data.get("tests")
    if isinstance(tests, dict):
        return Source(spec, "baseline", path, data)
    if isinstance(tests, list):
        return Source(spec, "report", path, data)
    raise HarnessError(f"{path} is neither a report.json nor a baseline: it has no 'tests'")


def load_source(source: str, reports_dir) -> Source:
    """Resolve `latest`, a report id, a baseline name, or a path (in that order)."""
    root = Path(reports_dir)
    spec = str(source)
    if spec == "latest":
        report_id = latest_report(root)
        path = root / report_id / "report.json"
        if not path.is_file():
            raise HarnessError(f"{root / 'latest'} names report {report_id!r}, but {path} does not exist")
        return _load_file(spec, path)
    report_path = root / spec / "report.json"
    is_name = bool(_NAME_RE.fullmatch(spec))
    is_report = is_name and report_path.is_file()
    is_baseline = is_name and (baselines_dir(root) / f"{spec}.json").is_file()
    if is_report and is_baseline:
        raise HarnessError(f"{spec!r} is both a report and a baseline in {root}: pass a path instead "
                           f"({report_path} or {baselines_dir(root) / (spec + '.json')})")
    if is_report:
        return _load_file(spec, report_path)
    if is_baseline:
        return Source(spec, "baseline", baseline_path(root, spec), load_baseline(root, spec))
    path = Path(spec)
    if path.is_file() or (path.is_dir() and (path / "report.json").is_file()):
        return _load_file(spec, path)
    if not root.is_dir():
        raise HarnessError(f"no report, baseline or file {spec!r}: the reports directory {root} does not exist "
                           "(pass --reports-dir)")
    reports, baselines = list_reports(root), list_baselines(root)
    known = ["latest"] + reports + baselines
    shown = ", ".join(reports[:3]) + (f" (+{len(reports) - 3} more)" if len(reports) > 3 else "")
    raise HarnessError(f"no report, baseline or file {spec!r} in {root}.{suggest(spec, known)} "
                       f"Reports: {shown or 'none'}; baselines: {', '.join(baselines) or 'none'}")


def load_metrics(source: str, reports_dir) -> dict[str, dict]:
    """{nodeid: {metric: value}} of a baseline name, a report id, `latest`, or a report/baseline path."""
    return load_source(source, reports_dir).metrics


