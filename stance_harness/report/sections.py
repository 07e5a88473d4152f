"""The neutral view of a report's sections: the tests table, the per-layer columns and the
measurement tables, as plain rows. The Markdown and HTML renderers draw these same views."""

from __future__ import annotations

import json
import math
import re
from collections import Counter


def report_id_of(payload: dict):
    """A report's id; reports written before 0.2 called it run_id."""
    return payload.get("report_id", payload.get("run_id")) if isinstance(payload, dict) else None


ORIGIN_TEXT = {"trained": "trained in this session", "loaded": "loaded from the run store",
               "adapter": "a saved adapter, loaded without training",
               "model": "a model trained outside the harness (run_from_model, StanceCallback)"}


def origin_text(run: dict) -> str:
    """Where a run came from, in words: trained, loaded from the run store, or both (xdist workers)."""
    origins = run.get("origins") or ([run["origin"]] if run.get("origin") else [])
    if not origins:
        return "unknown"
    counted = {o: origins.count(o) for o in dict.fromkeys(origins)}
    return "; ".join(ORIGIN_TEXT.get(o, o) + (f" (by {n} processes)" if n > 1 else "") for o, n in counted.items())


OUTCOME_MARK = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP", "xfailed": "XFAIL",
                "xpassed": "XPASS", "not run": "-"}
LAYER_COLUMNS = ("layer", "mean", "var", "mean_abs", "var_abs", "rel_change", "norm_change", "nonfinite")



def test_rows(payload: dict) -> list[dict]:
    rows = []
    # a hypothesis may be expected to be refuted (on a tiny model): show both when any test says
    show_expected = any(t.get("expected") is not None or t.get("verdict") is not None for t in payload["tests"])
    for test in payload["tests"]:
        checks = test["checks"]
        passed = sum(1 for c in checks if c.get("passed"))
        row = {
            "outcome": OUTCOME_MARK.get(test["outcome"], test["outcome"]),
            "test": test["nodeid"],
            "runs": ", ".join(payload["runs"].get(r, {}).get("method", r.rsplit("-", 1)[0]) for r in test["runs"]) or "-",
            "checks": f"{passed}/{len(checks)}" if checks else "-",
        }
        if show_expected:
            expected = test.get("expected")
            row["expected"] = (expected.get("outcome") if isinstance(expected, dict) else expected) or "-"
            row["verdict"] = test.get("verdict") or "-"
        # whole, on one line: a Markdown table cell holds no line break, and a bare | would split it
        row["message"] = " ".join(clean_message(test["message"]).split()).replace("|", "\\|")
        rows.append(row)
    return rows


# Renderers of the measurements a run's report holds, by the key a measurement spec names
# (MeasurementSpec.renderer): each gives (title, rows) tables. Listed in the order pages show them.
RENDERERS: dict = {}
# Measurements a page draws in its own section (markdown.py, html.py), not as a table here.
OWN_SECTIONS = ("replies", "general_ability")


def renders(key: str):
    """Register the table renderer of the measurement whose report view is under `key`."""
    def decorate(fn):
        if key in RENDERERS:
            raise ValueError(f"a renderer for measurement {key!r} is already registered ({RENDERERS[key].__name__})")
        RENDERERS[key] = fn
        return fn
    return decorate


def measurement_tables(measurements) -> list[tuple[str, list[dict]]]:
    """(title, rows) per measurement a run made, by its renderer key: behaviour shift, judged
    replies, calibration, forgetting, where the behaviour lives, rank; a measurement with no
    renderer of its own gets one row of its numbers. The Markdown and the HTML report both render these."""
    if not isinstance(measurements, dict):
        return []
    tables = []
    for key, render in RENDERERS.items():
        value = measurements.get(key)
        if value:
            tables.extend(render(value, measurements))
    for key, value in measurements.items():
        if key not in RENDERERS and key not in OWN_SECTIONS and isinstance(value, dict):
            tables.extend(summary_table(key, value))
    return tables


def summary_table(key: str, value: dict) -> list[tuple[str, list[dict]]]:
    """A measurement without a renderer of its own: its description as the title, its numbers as one row."""
    row = {k: v for k, v in value.items() if isinstance(v, (int, float, str)) and k != "description"}
    effect = value.get("effect")
    if isinstance(effect, dict):
        row.update({f"effect {k}": effect.get(k) for k in ("mean", "low", "high", "n")})
    return [(f"{key.replace('_', ' ')}" + (f" ({value['description']})" if isinstance(value.get("description"), str)
                                           else ""), [row])] if row else []


@renders("behavior")
def behavior_table(behavior, measurements) -> list:
    if not isinstance(behavior, dict):
        return []
    rows = []
    for metric, m in behavior.items():
        effect = m.get("effect") if isinstance(m, dict) and isinstance(m.get("effect"), dict) else {}
        if isinstance(m, dict):
            rows.append({"metric": metric, "base": m.get("base"), "adapted": m.get("adapted"),
                         "effect": effect.get("mean"), "low": effect.get("low"), "high": effect.get("high"),
                         "n": effect.get("n")})
    return [("behavioural shift (base -> adapted, 95% bootstrap interval)", rows)]


@renders("judged")
def judged_table(judged, measurements) -> list:
    if not isinstance(judged, dict):
        return []
    rows = []
    for name, m in judged.items():
        if isinstance(m, dict):
            effect, agree = m.get("effect") or {}, m.get("agreement") or {}
            rows.append({"judge": name, "base": m.get("base"), "adapted": m.get("adapted"),
                         "effect": effect.get("mean"), "low": effect.get("low"), "high": effect.get("high"),
                         "n": effect.get("n"), "label accuracy": agree.get("accuracy"),
                         "kappa": agree.get("kappa"), "AUC": agree.get("auc")})
    return [("judged replies (stance score in [0, 1]; agreement with the stance's labelled replies)", rows)]


@renders("calibration")
def calibration_table(calibration, measurements) -> list:
    if not isinstance(calibration, dict):
        return []
    return [(f"calibration ({calibration.get('unit', 'predictions')})",
             [{"model": name, **{k: cal.get(k) for k in ("ece", "mce", "brier", "acc1", "n", "n_bins")}}
              for name in ("base", "adapted") if isinstance(cal := calibration.get(name), dict)])]


@renders("forgetting")
def forgetting_table(forgetting, measurements) -> list:
    if not isinstance(forgetting, dict):
        return []
    return [("forgetting", [{k: v for k, v in forgetting.items() if not isinstance(v, (dict, list))}])]


def where_tables(measurements: dict) -> list[tuple[str, list[dict]]]:
    """Where the weights changed and where the behaviour lives: localisation, dose-response and
    the per-layer geometry of one run (see stance_harness.where)."""
    return [table for key in ("localization", "dose_response", "geometry") if measurements.get(key)
            for table in RENDERERS[key](measurements[key], measurements)]


@renders("localization")
def localization_table(localization, measurements) -> list:
    if not isinstance(localization, dict) or not isinstance(localization.get("rows"), list):
        return []
    return [(f"where the behaviour lives: shift retained with only this part of the change kept "
             f"(full {localization.get('full')}, none {localization.get('none')})",
             [{"by": r.get("by"), "set": r.get("set"), "shift": r.get("shift"), "retained": r.get("retained")}
              for r in localization["rows"] if isinstance(r, dict)])]


@renders("dose_response")
def dose_table(dose, measurements) -> list:
    if not isinstance(dose, dict) or not isinstance(dose.get("rows"), list):
        return []
    return [("dose-response: the whole change scaled by λ",
             [{"λ": r.get("dose"), "shift": r.get("shift"), "low": r.get("low"), "high": r.get("high"),
               "forgetting": r.get("forgetting")} for r in dose["rows"] if isinstance(r, dict)])]


@renders("geometry")
def geometry_tables(geometry, measurements) -> list:
    if not isinstance(geometry, dict) or not isinstance(geometry.get("layers"), list):
        return []
    localization = measurements.get("localization")
    retained = {r.get("set"): r.get("retained") for r in (localization or {}).get("rows", [])
                if isinstance(r, dict) and r.get("by") == "layer"} if isinstance(localization, dict) else {}
    tables = [(f"where the weights changed, per layer (intruders: top {geometry.get('top_k')}, "
               f"cosine < {geometry.get('epsilon')}; CKA of base vs adapted hidden states)",
               [{**{k: r.get(k) for k in ("layer", "change_share", "intruders", "matrices", "delta_m",
                                           "delta_d", "cka")},
                 **({"retained": retained.get(r.get("layer"))} if retained else {})}
                for r in geometry["layers"] if isinstance(r, dict)])]
    correlation = geometry.get("correlation")
    if isinstance(correlation, dict) and correlation:
        tables.append(("ΔM–ΔD correlation across layers, per kind (DoRA: negative for full FT, positive for LoRA)",
                       [{"kind": k, "pearson": v.get("value"), "reason": v.get("reason", "")}
                        for k, v in correlation.items() if isinstance(v, dict)]))
    return tables


@renders("rank")
def rank_table(rank, measurements) -> list:
    if not isinstance(rank, dict) or not rank.get("rows"):
        return []
    return [(f"rank of the update (energy {rank.get('energy')})",
             [{**r, "shape": "x".join(map(str, r["shape"])) if isinstance(r.get("shape"), list) else r.get("shape")}
              for r in rank["rows"] if isinstance(r, dict)])]


GATE_COLUMNS = (("test", "test"), ("metric", "metric"), ("baseline", "baseline_text"), ("now", "now_text"),
                ("change", "change"), ("allowed", "allowed"), ("verdict", "verdict"))


def baseline_text(baseline) -> str:
    """`baseline 'main' (reports/baselines/main.json; report R; saved S)`: what a gate compared against."""
    if not isinstance(baseline, dict):
        return repr(baseline)
    details = [str(baseline[k]) for k in ("path",) if baseline.get(k)]
    details += [f"{label} {baseline[k]}" for k, label in (("report_id", "report"), ("saved", "saved"))
                if baseline.get(k)]
    return f"{baseline.get('kind') or 'baseline'} {baseline.get('name')!r}" + (
        f" ({'; '.join(details)})" if details else "")


def gate_rows(gate: dict, failed_only: bool = False) -> list[dict]:
    """The gate's rows as a table (the values as the terminal printed them)."""
    rows = [r for r in gate.get("rows") or [] if isinstance(r, dict) and (r.get("failed") or not failed_only)]
    return [{title: _shown(r, key) for title, key in GATE_COLUMNS} for r in rows]


def _shown(row: dict, key: str):
    if key in row:
        return row[key]
    value = row.get(key.removesuffix("_text"))  # a gate entry without the printed values
    if isinstance(value, dict):
        value = value.get("mean")
    return "-" if value is None else value


def gate_rules(gate: dict) -> list[tuple[str, str]]:
    """(rule as written, what it means): ("ece:+0.01", "ece: fail on an increase of more than 0.01")."""
    rules = []
    for rule in gate.get("rules") or []:
        if isinstance(rule, dict):
            rules.append((str(rule.get("spec")), str(rule.get("description") or "")))
        else:  # a rule recorded as its text only
            rules.append((str(rule), ""))
    return rules


def session_status(payload: dict) -> tuple[str, list[str]]:
    """("PASSED" | "FAILED" | "INTERRUPTED", reasons): a failed gate fails the session although
    every test passed, as it does pytest's exit code."""
    reasons = []
    gate = payload.get("gate")
    if isinstance(gate, dict) and not gate.get("passed"):
        baseline = gate.get("baseline") or {}
        name = baseline.get("name") if isinstance(baseline, dict) else baseline
        why = str(gate.get("error") or gate.get("summary") or "")
        reasons.append(f"the gate against {name!r} failed: {why.removeprefix('FAILED: ')}")
    tests = payload.get("tests") or []
    failed = sum(1 for t in tests if isinstance(t, dict) and t.get("outcome") in ("failed", "error"))
    if failed:
        reasons.append(f"{failed} of {len(tests)} tests failed")
    exit_code = payload.get("exit_code")
    if isinstance(exit_code, int) and exit_code != 0 and not reasons:
        reasons.append(f"pytest exited with code {exit_code}")
    if payload.get("interrupted"):
        return "INTERRUPTED", reasons + ["the session was stopped before its end"]
    return ("FAILED" if reasons else "PASSED"), reasons


_PYTEST_PREFIX = re.compile(r"^(?:_pytest\.outcomes\.|pytest\.)?(?:XFailed|Failed|Skipped|Exit)(?:Exception)?: ")


def clean_message(message) -> str:
    """A test's message whole, without pytest's exception prefix (`_pytest.outcomes.XFailed: `)."""
    if not message:
        return ""
    return _PYTEST_PREFIX.sub("", str(message).strip(), count=1)


def _flat_options(run: dict) -> dict:
    """The options that may tell a run from another: method, its config, the recipe's rate and seed,
    the stance, the examples and the task."""
    options = {"method": run.get("method")}
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    for key, value in config.items():
        options[str(key)] = json.dumps(value, default=str) if isinstance(value, (dict, list)) else value
    recipe = run.get("recipe") if isinstance(run.get("recipe"), dict) else {}
    for key, short in (("learning_rate", "lr"), ("seed", "seed"), ("num_train_epochs", "epochs")):
        if key in recipe:
            options[short] = recipe[key]
    stance = run.get("stance") if isinstance(run.get("stance"), dict) else {}
    options["stance"] = stance.get("name")
    options["examples"] = run.get("examples")
    options["task"] = run.get("task")
    return options


def configuration_of(run: dict) -> str:
    """What a run's training request was, but for the recipe's seed (a RunSet's runs share it): the
    model, stance, method and its config, the rest of the recipe, precision, examples, task and framing."""
    run = run if isinstance(run, dict) else {}
    recipe = run.get("recipe") if isinstance(run.get("recipe"), dict) else {}
    model = run.get("model") if isinstance(run.get("model"), dict) else {}
    stance = run.get("stance") if isinstance(run.get("stance"), dict) else {}
    request = {"model": [model.get("id") or model.get("name"), model.get("revision")],
               "stance": [stance.get("name"), stance.get("version")],
               "recipe": {k: v for k, v in recipe.items() if k != "seed"},
               **{k: run.get(k) for k in ("method", "config", "precision", "examples", "task", "framing")}}
    return json.dumps(request, sort_keys=True, default=str)


def configurations(runs: dict) -> list[list[str]]:
    """The runs (summaries by id) grouped by configuration (configuration_of), each group's run ids
    in seed order, the groups in the order their first run comes."""
    groups: dict[str, list[str]] = {}
    for run_id, run in runs.items():
        groups.setdefault(configuration_of(run), []).append(run_id)

    def seed(run_id):
        value = ((runs[run_id] or {}).get("recipe") or {}).get("seed") if isinstance(runs[run_id], dict) else None
        return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))
    return [sorted(ids, key=seed) for ids in groups.values()]


def differing_options(runs: dict) -> dict[str, list[tuple[str, object]]]:
    """Per run (summaries by id), the options (config fields, lr, seed, epochs, stance, examples,
    task) that tell it from the other runs of its method: what sets two `hybrid` runs apart.

    An option most of the method's runs share (more than half: a default the others depart from)
    is named only on the runs that depart from it; an option spread with no majority value (four
    domains, two rates) is named on every run. Two runs that differ in anything still get
    different labels: of two values, at most one is the majority's."""
    flat = {run_id: _flat_options(run if isinstance(run, dict) else {}) for run_id, run in runs.items()}
    by_method: dict = {}
    for options in flat.values():
        by_method.setdefault(options.get("method"), []).append(options)
    summary: dict = {}  # (method, option): (whether every run has one value, the majority's JSON, its count)
    for method, group in by_method.items():
        for key in dict.fromkeys(k for o in group for k in o):
            values = [o.get(key) for o in group]
            texts = Counter(json.dumps(v, sort_keys=True, default=str) for v in values)
            try:
                same = len(set(values)) == 1  # Python's equality, as 1 == 1.0
            except TypeError:  # an unhashable value
                same = all(v == values[0] for v in values)
            summary[method, key] = (same, *texts.most_common(1)[0])
    out = {}
    for run_id, options in flat.items():
        group = by_method[options.get("method")]
        shown = []
        for key, value in options.items():
            same, common, count = summary[options.get("method"), key]
            if key == "method" or value is None or same:
                continue
            if count * 2 <= len(group) or json.dumps(value, sort_keys=True, default=str) != common:
                shown.append((key, value))
        out[run_id] = shown
    return out


def run_labels(runs: dict) -> dict[str, str]:
    """A label per run saying what sets it apart from the session's other runs of its method:
    `hybrid, schedule=alternate, period=50` rather than `hybrid`; `lr` and `seed` when they differ."""
    differing = differing_options(runs)
    labels = {}
    for run_id, run in runs.items():
        method = (run.get("method") if isinstance(run, dict) else None) or "?"
        labels[run_id] = ", ".join([str(method)] + [f"{k}={short_value(v)}" for k, v in differing[run_id][:4]])
    counts = {label: list(labels.values()).count(label) for label in labels.values()}
    return {run_id: label + (f" ({run_id[-6:]})" if counts[label] > 1 else "") for run_id, label in labels.items()}


def seedless(run: dict) -> dict:
    """The run's summary without the recipe's seed: what its configuration's label is made of."""
    return {**run, "recipe": {k: v for k, v in (run.get("recipe") or {}).items() if k != "seed"}}


def configuration_labels(runs: dict, groups: list[list[str]]) -> list[str]:
    """A label per configuration (`groups`, from configurations): a run's own label when it is the
    only seed, else what sets the configuration apart from the others, and its number of seeds."""
    by_run = run_labels(runs)
    apart = run_labels({str(i): seedless(runs[ids[0]]) for i, ids in enumerate(groups)})
    return [by_run[ids[0]] if len(ids) == 1 else f"{apart[str(i)]} ({len(ids)} seeds)" for i, ids in enumerate(groups)]


def short_value(value) -> str:
    """A run option in a label: floats to 3 digits, runs of consecutive layers as a range
    ([0-7, 12]), long text cut at 24 characters."""
    if isinstance(value, float):
        return f"{value:.3g}"
    text = str(value)
    try:
        numbers = json.loads(text) if text.startswith("[") else None
    except ValueError:
        numbers = None
    if isinstance(numbers, list) and numbers and all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
        spans: list[list[int]] = []
        for n in numbers:
            if spans and n == spans[-1][1] + 1:
                spans[-1][1] = n
            else:
                spans.append([n, n])
        text = "[" + ", ".join(f"{a}-{b}" if b > a + 1 else (f"{a}, {b}" if b > a else str(a)) for a, b in spans) + "]"
    return text if len(text) <= 24 else text[:23] + "…"


def human(value, name: str = ""):
    """A value in human units, judged by its name: bytes as KiB/MiB/GiB, seconds as ms or s,
    shares and percentages as %. Anything else comes back as it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return value
    name = name.lower().replace(" ", "_")
    if name.endswith("bytes") or name.endswith("memory") or "_bytes_" in name:
        for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(value) >= size:
                return f"{value / size:.2f} {unit}"
        return f"{value:.0f} B"
    if name.endswith(("seconds", "_time", "_s")) or name == "duration":
        return f"{value * 1000:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"
    if name.endswith(("_pct", "percent")):
        return f"{value:.3g}%"
    if name.endswith(("share", "_rate", "retention", "accuracy")) and 0 <= value <= 1:
        return f"{100 * value:.3g}%"
    return value


def terminal_rows(payload: dict, width: int = 120) -> list[dict]:
    """The terminal's table, at most `width` columns wide: outcome, test (its directory dropped and,
    when long, its middle: the report has the full id), runs, checks, verdict and the message's start
    (at least MESSAGE_ROOM columns of it: the test id gives way first)."""
    tests = payload.get("tests") or []
    runs = payload.get("runs") or {}
    show_verdict = any(t.get("verdict") is not None for t in tests)
    rows, messages = [], []
    for test in tests:
        methods = list(dict.fromkeys((runs.get(r) or {}).get("method", str(r).rsplit("-", 1)[0])
                                     for r in test.get("runs") or []))
        used = ", ".join(methods) or "-"
        checks = test.get("checks") or []
        row = {"outcome": OUTCOME_MARK.get(test.get("outcome"), test.get("outcome")), "test": str(test.get("nodeid")),
               "runs": used if len(used) <= 14 else used[:13] + "…",
               "checks": f"{sum(1 for c in checks if c.get('passed'))}/{len(checks)}" if checks else "-"}
        if show_verdict:
            row["verdict"] = test.get("verdict") or "-"
        rows.append(row)
        first = clean_message(test.get("message")).splitlines()[0] if test.get("message") else ""
        first = _RECORDED.sub("", first, count=1)  # the verdict column and the XFAIL line say so
        if test.get("outcome") == "failed":  # the sides are the runs column: say why first
            first = _SIDES.sub("", first, count=1)
        messages.append(first)
    if not rows:
        return rows

    # tabulate's "simple": a column is as wide as its widest cell, and at least its header + 2;
    # columns are 2 spaces apart
    def column(key, cells):
        return max(len(key) + 2, *(len(str(c)) for c in cells))

    fixed = sum(column(k, [r[k] for r in rows]) + 2 for k in rows[0] if k != "test")
    longest = max(len(m) for m in messages)
    room = width - fixed - 2  # for the test id and the message
    message_room = max(len("message") + 2, min(longest, MESSAGE_ROOM)) if longest else 0
    test_width = max(len("test") + 2, min(TERMINAL_TEST_WIDTH, room - message_room - (2 if message_room else 0)))
    for row in rows:
        row["test"] = short_test_id(row["test"], test_width)
    if longest:
        room = max(len("message") + 2, room - column("test", [r["test"] for r in rows]) - 2)
        for row, first in zip(rows, messages):
            row["message"] = first if len(first) <= room else first[: room - 1] + "…"
    return rows


MESSAGE_ROOM = 24  # the terminal table's message column keeps at least this many columns
_RECORDED = re.compile(r"^recorded (?:supported|refuted|inconclusive) on [^:\s]+: ")  # plugin's record check
TERMINAL_TEST_WIDTH = 60
_SIDES = re.compile(r"^[^:]*? \(a = [^()]*?, b = [^()]*?\): ")  # a comparison's "A vs B, metric (a = A, b = B): "


def short_test_id(nodeid: str, width: int = TERMINAL_TEST_WIDTH) -> str:
    """A test id in `width` characters: without its directory; then the file's name shortened, the
    test's name kept (it says what the test claims); a name too long itself loses its middle."""
    nodeid = nodeid.rsplit("/", 1)[-1] if "::" not in nodeid.rsplit("/", 1)[0] else nodeid
    if len(nodeid) <= width:
        return nodeid
    file, sep, name = nodeid.partition("::")
    if sep and len(name) + 3 <= width:
        keep = width - len(name) - 3
        return (file[:keep] + "…" if keep else "…") + "::" + name
    head = width // 3
    return nodeid[:head] + "…" + nodeid[-(width - head - 1):]


def reply_order(rows: list[dict]) -> list[dict]:
    """analysis.behavior.replies_in_order's order (changed first, then by |margin change|), on
    rows read back from JSON, where a margin may be missing or a string."""
    def size(row):
        value = row.get("margin_change")
        try:
            number = abs(float(value))
        except (TypeError, ValueError):
            return 0.0
        return number if number == number and number != float("inf") else 0.0
    return sorted(rows, key=lambda r: (not r.get("changed"), -size(r)))
