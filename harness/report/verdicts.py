"""What each hypothesis found, per model, kept as data beside the suites; and the session-wide
Holm correction of the claims' p-values.

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

from ..analysis.paired import holm
from ..files import atomic_write
from ..registry import HarnessError
from .records import VERDICTS, repeat_base

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
    from tabulate import tabulate

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
            return (f"{m['estimate']:+.4g} [{m['low']:+.4g}, {m['high']:+.4g}] ({m.get('metric')}, {m.get('n')} "
                    f"{m.get('unit')}s{rests}{scope})")
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
        out[key] = {"verdict": verdict, "reason": reason or "-", "interval": interval_of(first.get("checks", []))}
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


def correct_for_multiplicity(records: list[dict]) -> list[dict]:
    """Holm-correct the p-values of every comparison check of the session, in place (each check
    gains `p_holm` and `holds_after_correction`); returns one row per claim for the report."""
    claims = [(record, check) for record in records for check in record.get("checks", [])
              if isinstance((check.get("metrics") or {}).get("p_value"), (int, float))]
    if not claims:
        return []
    adjusted = holm([check["metrics"]["p_value"] for _, check in claims])
    rows = []
    for (record, check), p_holm in zip(claims, adjusted):
        level = check["metrics"].get("level", 0.025)
        supported = check.get("verdict") == "supported"
        check["p_holm"] = p_holm
        check["holds_after_correction"] = supported and p_holm <= level
        rows.append({"test": record["nodeid"], "check": check["check"], "verdict": check.get("verdict"),
                     "p": check["metrics"]["p_value"], "p (Holm)": p_holm, "level": level,
                     "note": "holds only before the correction" if supported and p_holm > level else ""})
    return rows
