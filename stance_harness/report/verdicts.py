"""What each hypothesis found, per model, kept as data beside the suites; and the Holm
correction over each family of claims (the comparison checks of one test file), which decides.

`--record-verdicts` writes, for each test file's directory, `verdicts/<model>.json`:

    {"model": "tiny-qwen2", "recorded": "...", "provenance": {...},
     "tests": {"suites/test_x.py::test_y": {"verdict": "refuted", "reason": "...", "interval": "..."}}}

A later session on that model reads it: a test whose verdict is the recorded one passes (a
recorded refutation or inconclusive result is reported as XFAIL, with the recorded reason); a
changed verdict fails with a table of hypothesis, recorded, now and interval. With no record for
the model, a test means what pytest makes of it: a refuted claim fails. Nothing here imports pytest.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

from tabulate import tabulate

from stance_harness.core.errors import HarnessError
from stance_harness.core.files import atomic_write
from stance_harness.core.results import VERDICTS
from stance_harness.report.records import repeat_base

VERDICTS_DIR = "verdicts"


def model_slug(model: str) -> str:
    """A file name for `--model`: an alias as it is, a hub id with `--`, a directory by its name."""
    path = Path(model)
    name = path.name if (path.is_absolute() or model.startswith(".") or path.exists()) else model.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name) or "model"


def record_file(test_path: Path, model: str) -> Path:
    return Path(test_path).parent / VERDICTS_DIR / f"{model_slug(model)}.json"


class VerdictBook:
    """The recorded verdicts of the suites on one model, read once per file."""

    def __init__(self, model: str):
        self.model = model
        self._files: dict[Path, dict] = {}

    def _load(self, path: Path) -> dict:
        if path not in self._files:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                data = {}
            except (OSError, ValueError) as exc:
                raise HarnessError(f"the verdict record {path} is unreadable ({type(exc).__name__}: {exc}); "
                                   f"delete it, or write it again with --record-verdicts") from None
            self._files[path] = data.get("tests", {}) if isinstance(data, dict) else {}
        return self._files[path]

    def recorded(self, test_path: Path, test_id: str) -> dict | None:
        """The recorded entry of one test (keyed by its id without --repeat's part), or None."""
        entry = self._load(record_file(test_path, self.model)).get(test_id)
        return entry if isinstance(entry, dict) and entry.get("verdict") in VERDICTS else None


def changed_message(test_id: str, recorded: dict, now: str, interval: str, model: str) -> str:
    table = tabulate([[test_id, recorded["verdict"], now, interval]],
                     headers=["hypothesis", "recorded", "now", "interval"], tablefmt="simple")
    return (f"the verdict on {model} changed: recorded {recorded['verdict']}, now {now}\n{table}\n"
            f"the record said: {recorded.get('reason') or '-'}\n"
            f"(if the change is expected, record again with --record-verdicts)")


def interval_of(checks: list[dict]) -> str:
    """The interval of a test's first comparison check, as text, or '-'."""
    for check in checks:
        m = check.get("metrics") or {}
        if "low" in m and "high" in m and "estimate" in m:
            # what the verdict rests on (seeds, units, method, p) and a run-level claim's label
            rests = f"; {m['rests_on']}" if m.get("rests_on") else ""
            scope = f"; {m['scope']}" if m.get("scope") not in (None, "method-level") else ""
            low, high, estimate = (f"{v:+.4g}" if isinstance(v, (int, float)) else str(v)  # json_safe: "-inf"
                                   for v in (m["low"], m["high"], m["estimate"]))
            units = f"{m.get('n')} {m.get('unit')}" + ("" if m.get("n") == 1 else "s")
            return f"{estimate} [{low}, {high}] ({m.get('metric')}, {units}{rests}{scope})"
    return "-"


def verdict_entries(records: list[dict]) -> dict[str, dict]:
    """{test id: {verdict, reason, interval}} from test records; repetitions that disagree are
    inconclusive; a test that errored or was skipped has no verdict."""
    grouped: dict[str, list[dict]] = {}
    for record in records:
        if record.get("verdict") in VERDICTS:
            grouped.setdefault(repeat_base(record["nodeid"]), []).append(record)
    out = {}
    for key, group in grouped.items():
        verdicts = {r["verdict"] for r in group}
        verdict = verdicts.pop() if len(verdicts) == 1 else "inconclusive"
        first = group[0]
        reason = first.get("message") or "; ".join(c["summary"] for c in first.get("checks", []))[:400]
        if len(group) > 1:
            reason = (f"{len(group)} repetitions: " + ", ".join(r["verdict"] for r in group) + "; " + (reason or ""))
        out[key] = {"verdict": verdict, "reason": reason or "-", "interval": interval_of(first.get("checks", [])),
                    "seeds": first.get("seeds")}
    return out


def save_records(records: list[dict], rootdir: Path, model: str, provenance: dict) -> list[Path]:
    """Write each test's verdict into verdicts/<model>.json beside its test file; entries of tests
    not run this session stay as they were. Returns the files written."""
    by_file: dict[Path, dict] = {}
    for key, entry in verdict_entries(records).items():
        path = record_file(Path(rootdir) / key.split("::", 1)[0], model)
        by_file.setdefault(path, {})[key] = entry
    written = []
    for path, entries in by_file.items():
        try:
            old = json.loads(path.read_text(encoding="utf-8")).get("tests", {})
        except (OSError, ValueError, AttributeError):
            old = {}
        document = {"model": model, "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "provenance": provenance, "tests": dict(sorted({**old, **entries}.items()))}
        atomic_write(path, json.dumps(document, indent=2, default=str) + "\n")
        written.append(path)
    return written


def family_of(nodeid: str) -> str:
    """The family a test's claims belong to: its test file."""
    return nodeid.split("::", 1)[0]


def _claims(records) -> dict[str, list]:
    """{family: [(record, check)]}: every check with a p-value and a verdict, in record order."""
    families: dict[str, list] = {}
    for record in records:
        nodeid = record["nodeid"] if isinstance(record, dict) else record.nodeid
        checks = record["checks"] if isinstance(record, dict) else record.checks
        for check in checks:
            if isinstance((check.get("metrics") or {}).get("p_value"), (int, float)) and check.get("verdict") in VERDICTS:
                families.setdefault(family_of(nodeid), []).append((record, check))
    return families



def _holm(p_values: list[float]) -> list[float]:
    """Holm's adjusted p-values (analysis.paired.holm), imported at the first family of claims."""
    from stance_harness.analysis.paired import holm  # why: numpy and scipy; pytest's start-up imports this module

    return holm(p_values)


def correct_families(records, inconclusive: str = "fail", recorded=None) -> list[str]:
    """Holm over each family, in place on TestRecords: a claim supported alone whose adjusted p
    exceeds its level becomes inconclusive, and so does its test (outcome per --inconclusive:
    failed, skipped or passed; with a record for it, what the record says). Returns the node ids
    whose outcome changed from passed to failed."""
    failed = []
    for family, claims in _claims(records).items():
        adjusted = _holm([check["metrics"]["p_value"] for _, check in claims])
        for (record, check), p_holm in zip(claims, adjusted):
            level = check["metrics"].get("level", 0.025)
            check["family"], check["family_size"], check["p_holm"] = family, len(claims), p_holm
            demoted = check["verdict"] == "supported" and p_holm > level
            check["holds_after_correction"] = check["verdict"] == "supported" and not demoted
            if not demoted:
                continue
            why = (f"supported alone, inconclusive after Holm's correction over the {len(claims)} claims of {family} "
                   f"(adjusted p {p_holm:.3g} > {level:g})")
            check["verdict_before_correction"], check["verdict"] = "supported", "inconclusive"
            check["summary"] = f"{why}: {check['summary']}"
            if record.verdict != "supported":
                continue
            record.verdict, record.message = "inconclusive", why
            before = record.outcome
            expected = recorded(record) if recorded is not None else None
            if expected is not None:
                record.outcome = "xfailed" if expected["verdict"] == "inconclusive" else "failed"
            else:
                record.outcome = {"fail": "failed", "skip": "skipped", "pass": before}[inconclusive]
            if before == "passed" and record.outcome == "failed":
                failed.append(record.nodeid)
    return failed


def correct_for_multiplicity(records: list[dict]) -> list[dict]:
    """One row per claim for the report: its family, p, Holm-adjusted p, and whether it holds after
    the correction (taken from `correct_families` where it ran; computed here otherwise)."""
    rows = []
    for family, claims in _claims(records).items():
        adjusted = _holm([check["metrics"]["p_value"] for _, check in claims])
        for (record, check), p_holm in zip(claims, adjusted):
            level = check["metrics"].get("level", 0.025)
            p_holm = check.get("p_holm", p_holm)
            before = check.get("verdict_before_correction", check.get("verdict"))
            holds = before == "supported" and p_holm <= level
            check.setdefault("p_holm", p_holm)
            check.setdefault("holds_after_correction", holds)
            rows.append({"test": record["nodeid"], "check": check["check"], "family": family,
                         "verdict": check.get("verdict"), "p": check["metrics"]["p_value"], "p (Holm)": p_holm,
                         "level": level,
                         "note": "supported alone; inconclusive after the correction" if before == "supported"
                         and not holds else ""})
    return rows
