"""The findings: one row per claim a session checked, and what changed since an earlier report.

A claim is a check that measured an effect (an estimate, usually with an interval, a margin and a
unit of replication); a test with no such check is one claim, its verdict only. The numbers are
read from each check's fields generically, so checks that gain fields (seeds, run-level labels,
the family's correction) show them without a change here, and older reports without them still
read. Rows are plain dicts: the HTML, the Markdown, the forest plot and the terminal all draw them.
"""

from __future__ import annotations

import math
import re

FINDING_COLUMNS = ("hypothesis", "estimate", "interval", "margin", "unit", "verdict", "corrected", "change")


def _number(value):
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _first(sources: list[dict], *keys):
    for source in sources:
        for key in keys:
            if source.get(key) is not None:
                return source[key]
    return None


def readable_name(nodeid: str) -> str:
    """`suites/test_x.py::test_lora_forgets_less[r8]` -> `lora forgets less (r8)`."""
    name = str(nodeid).rsplit("::", 1)[-1]
    name, _, params = name.partition("[")
    words = re.sub(r"^test_?", "", name).replace("_", " ").strip() or name
    return words + (f" ({params.rstrip(']')})" if params else "")


def hypothesis_of(test: dict) -> str:
    """The hypothesis in words: the test's docstring's first paragraph, or its name made readable."""
    doc = (test.get("doc") or "").strip()
    if doc:
        return " ".join(doc.split("\n\n", 1)[0].split())
    return readable_name(test.get("nodeid", "?"))


def suite_of(nodeid: str) -> str:
    return str(nodeid).split("::", 1)[0]


def _estimate(metrics: dict, check: dict):
    value = _first([check, metrics], "estimate", "effect", "shift", "difference", "rho", "retained")
    if isinstance(value, dict):
        value = value.get("estimate", value.get("mean"))
    return _number(value)


def _interval(metrics: dict, check: dict):
    interval = _first([check, metrics], "interval", "ci")
    if isinstance(interval, (list, tuple)) and len(interval) == 2:
        return _number(interval[0]), _number(interval[1])
    effect = metrics.get("effect")
    if isinstance(effect, dict) and "low" in effect:
        return _number(effect.get("low")), _number(effect.get("high"))
    return _number(_first([check, metrics], "low")), _number(_first([check, metrics], "high"))


def claim_of(test: dict, check: dict | None) -> dict:
    """One finding row (numbers may be None)."""
    metrics = (check or {}).get("metrics") or {}
    metrics = metrics if isinstance(metrics, dict) else {}
    sources = [check or {}, metrics]
    low, high = _interval(metrics, check or {}) if check else (None, None)
    seeds = _first(sources, "seeds", "replicates", "n_seeds", "runs_per_side")
    if seeds is None and metrics.get("seeds_a") is not None:  # per arm (analysis/replication.py)
        a, b = metrics.get("seeds_a"), metrics.get("seeds_b")
        seeds = a if a == b or b is None else f"{a} and {b}"
    corrected = _first(sources, "holds_after_correction", "survives_correction")
    scope = metrics.get("scope")
    return {
        "test": test.get("nodeid"), "suite": suite_of(test.get("nodeid", "")), "hypothesis": hypothesis_of(test),
        "check": (check or {}).get("check"), "metric": _first(sources, "metric"),
        "estimate": _estimate(metrics, check) if check else None, "low": low, "high": high,
        "margin": _number(_first(sources, "margin", "min_effect", "min_rho")),
        "claim": _first(sources, "claim"), "unit": _first(sources, "unit"), "n": _first(sources, "n"),
        "seeds": seeds if not isinstance(seeds, list) else len(seeds),
        "label": _first(sources, "label", "run_label") or (scope if scope not in (None, "method-level") else None),
        "rests_on": _first(sources, "rests_on"), "family": (check or {}).get("family"),
        "verdict": (check or {}).get("verdict") or test.get("verdict") or _verdict_of_outcome(test.get("outcome")),
        "corrected": None if corrected is None else bool(corrected),
        "p_holm": _number(_first(sources, "p_holm")),
        "outcome": test.get("outcome"), "change": None,
    }


def _verdict_of_outcome(outcome) -> str | None:
    return {"passed": "supported", "failed": "refuted", "xfailed": "refuted", "xpassed": "supported"}.get(outcome)


def findings(payload: dict) -> list[dict]:
    """Every claim of the session, in test order, with what changed since the previous report
    (payload["changes"], when written)."""
    rows = []
    for test in payload.get("tests") or []:
        if not isinstance(test, dict):
            continue
        measured = [c for c in test.get("checks") or [] if isinstance(c, dict)
                    and _estimate(c.get("metrics") if isinstance(c.get("metrics"), dict) else {}, c) is not None]
        if measured:
            rows += [claim_of(test, check) for check in measured]
        elif test.get("checks") or test.get("verdict") or test.get("outcome") in ("failed", "error"):
            rows.append(claim_of(test, None))
    changes = payload.get("changes") if isinstance(payload.get("changes"), dict) else {}
    by_key = {(c.get("test"), c.get("check")): c.get("change") for c in changes.get("rows") or []
              if isinstance(c, dict)}
    for row in rows:
        row["change"] = by_key.get((row["test"], row["check"]))
    return rows


def _key(row: dict) -> tuple:
    return row.get("test"), row.get("check")


def changes_since(payload: dict, previous: dict) -> dict:
    """What moved between `previous` and `payload` (both complete payloads): verdict flips, and
    estimates outside the previous report's interval; claims new since then are marked new."""
    before = {_key(r): r for r in findings({**previous, "changes": None})}
    rows = []
    for row in findings({**payload, "changes": None}):
        old = before.get(_key(row))
        if old is None:
            if before:
                rows.append({"test": row["test"], "check": row["check"], "change": "new claim"})
            continue
        notes = []
        if old["verdict"] != row["verdict"]:
            notes.append(f"verdict {old['verdict'] or '–'} → {row['verdict'] or '–'}")
        low, high, estimate = old["low"], old["high"], row["estimate"]
        if None not in (low, high, estimate) and all(map(math.isfinite, (low, high, estimate))) \
                and not low <= estimate <= high:
            notes.append(f"estimate {estimate:+.3g} outside the previous interval [{low:+.3g}, {high:+.3g}]")
        if notes:
            rows.append({"test": row["test"], "check": row["check"], "change": "; ".join(notes),
                         "before": old["verdict"], "now": row["verdict"]})
    return {"previous": previous.get("report_id"), "previous_started": previous.get("started"), "rows": rows}


def fmt_number(value, digits: int = 3) -> str:
    number = _number(value)
    if number is None:
        return "–"
    if not math.isfinite(number):
        return str(number)
    return f"{number:+.{digits}g}"


def interval_text(row: dict) -> str:
    if row.get("low") is None and row.get("high") is None:
        return "–"
    return f"[{fmt_number(row.get('low'))}, {fmt_number(row.get('high'))}]"


def units_text(row: dict) -> str:
    parts = []
    if row.get("n") is not None:
        parts.append(f"{row['n']} {row.get('unit') or 'units'}")
    elif row.get("unit"):
        parts.append(str(row["unit"]))
    if row.get("seeds") is not None:
        parts.append(f"{row['seeds']} seed{'' if row['seeds'] == 1 else 's'}" + (" per arm" if isinstance(row["seeds"], int) else ""))
    return ", ".join(parts) or "–"


def corrected_text(row: dict) -> str:
    if row.get("corrected") is None:
        return "–"
    return "holds" if row["corrected"] else "not after correction"


def table_rows(rows: list[dict], width: int | None = None) -> list[dict]:
    """The findings as text cells (report.md; the terminal with `width`, the table's columns at
    most: the hypothesis and the change are cut to fit, the report has them whole)."""
    out = [{"hypothesis": row["hypothesis"], "estimate": fmt_number(row["estimate"]),
            "interval": interval_text(row), "margin": fmt_number(row["margin"]), "units": units_text(row),
            "verdict": row["verdict"] or "–", "corrected": corrected_text(row), "change": row.get("change") or ""}
           for row in rows]
    if width and out:
        for row in out:
            row["corrected"] = {"holds": "holds", "not after correction": "lost"}.get(row["corrected"], "–")
            row["change"] = _cut(row["change"], 24)
        # tabulate's "simple" format: a column is as wide as its header + 2 or its widest cell; 2 spaces apart
        fixed = sum(2 + max(len(k) + 2, *(len(r[k]) for r in out)) for k in out[0] if k != "hypothesis")
        room = max(16, width - fixed)
        for row in out:
            row["hypothesis"] = _cut(row["hypothesis"], room)
    return out


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
