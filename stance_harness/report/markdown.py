"""The Markdown report (report.md): provenance, the tests table, each test's checks and tables,
and each run's counts, instruments, per-layer change and measurements."""

from __future__ import annotations

import json

from tabulate import tabulate

from stance_harness.report.findings import findings
from stance_harness.report.findings import table_rows as finding_rows
from stance_harness.report.model import normalized
from stance_harness.report.sections import (
    LAYER_COLUMNS,
    OUTCOME_MARK,
    baseline_text,
    clean_message,
    configuration_labels,
    configurations,
    gate_rows,
    gate_rules,
    human,
    measurement_tables,
    origin_text,
    reply_order,
    report_id_of,
    session_status,
    test_rows,
)

REPLIES_SHOWN = 5  # as the HTML page: the probes that moved most; report.json has every reply
REPLY_CHARS = 200


def _table(rows: list[dict], floatfmt=".4g", numparse=True) -> str:
    if not rows:
        return "_(empty)_"
    return tabulate([list(r.values()) for r in rows], headers=list(rows[0].keys()), tablefmt="github", floatfmt=floatfmt,
                    disable_numparse=not numparse)


def render_markdown(payload: dict, forest_image: str | None = None) -> str:
    """report.md: the status and gate, the findings (and `forest_image`, a file beside it, when
    given), provenance, tests, then each run. Old payloads are migrated first (report/model.py)."""
    payload = normalized(payload)
    prov = payload["provenance"]
    lines = [
        f"# stance-harness report {report_id_of(payload)}", "",
        *status_lines(payload),
        *findings_lines(payload, forest_image),
        f"- started: {payload['started']}  finished: {payload['finished']}",
        f"- model: `{prov['model'].get('name')}` ({prov['model'].get('id')}, revision {prov['model'].get('revision')})",
        f"- git: {prov['git'].get('commit')}{' (dirty)' if prov['git'].get('dirty') else ''}",
        "- libraries: " + ", ".join(f"{k} {v}" for k, v in prov["environment"]["libraries"].items()),
        *(["- methods from outside the harness: " + ", ".join(map(_origin, prov["methods"]))]
          if prov.get("methods") else []),
        f"- command: `{' '.join(prov['args'])}`", "",
        *(["**INTERRUPTED**: this session was stopped before its end; tests marked `-` did not run.", ""]
          if payload.get("interrupted") else []),
        "## Tests", "", _table(test_rows(payload)), "",
    ]
    for test in payload["tests"]:
        if not (test["checks"] or test["tables"] or test["notes"] or test["metrics"]):
            continue
        lines += [f"### {test['nodeid']}  ({OUTCOME_MARK.get(test['outcome'], test['outcome'])})", ""]
        if test.get("message") and test["outcome"] != "passed":
            lines += [f"> {line}" for line in clean_message(test["message"]).splitlines()] + [""]
        lines += [f"> {note}" for note in test["notes"]] + ([""] if test["notes"] else [])
        for check in test["checks"]:
            mark = "PASS" if check.get("passed") else "FAIL"
            lines += [f"**{check.get('check')}** {mark}: {check.get('summary')}", ""]
            if check.get("rows") and not check.get("passed"):
                lines += [_table([dict(zip(check.get("headers") or [], row)) for row in check["rows"]]), ""]
        if test["metrics"]:
            lines += [_table([{"metric": k, "value": v} for k, v in test["metrics"].items()]), ""]
        for table in test["tables"]:
            lines += [f"**{table['title']}**", "", _table(table["rows"]), ""]
    lines += ["## Runs", ""]
    groups = configurations(payload["runs"])
    for ids, label in zip(groups, configuration_labels(payload["runs"], groups)):
        if len(ids) == 1:
            lines += run_lines(payload["runs"][ids[0]], f"{label} ({ids[0]})")
        else:
            lines += configuration_lines([payload["runs"][run_id] for run_id in ids], label)
    return "\n".join(lines) + "\n"


def run_lines(run: dict, title: str) -> list[str]:
    """One run's section: what it trained, its instruments, per-layer change and measurements."""
    counts = run["counts"]
    trace = run["trace"]
    loss = trace["loss"]
    if counts.get("trainable") is None:  # an old or partial run summary: what it has
        return [f"### {title}", "", f"- origin: {origin_text(run)}", "", *_measurement_lines(run.get("measurements")),
                *replies_lines(run), *ability_lines(run)]
    lines = [
        f"### {title}", "",
        f"- method `{run['method']}` {json.dumps(run['config'])}; stance `{run['stance']['name']}` "
        f"v{run['stance']['version']}, {run['examples']} examples",
        f"- recipe: {json.dumps(run['recipe'])}",
        f"- origin: {origin_text(run)}",
        f"- trainable {counts['trainable']:,} / frozen {counts['frozen']:,} ({counts['trainable_pct']:.3g}% trainable); "
        + (f"{counts['params_per_example']:,.0f} trainable params per example; " if counts['params_per_example'] is not None
           else "no training examples (a saved adapter); ")
        + "stance storage "
        f"{human(counts['stance_bytes'], 'bytes')} vs full weights {human(counts['full_weights_bytes'], 'bytes')}",
        f"- {len(loss)} steps, loss {loss[0] if loss else 'n/a'} -> {loss[-1] if loss else 'n/a'}"
        + (f"; HALTED at step {trace['halted_at']}: {trace['halt_reason']}" if trace["halted_at"] is not None else ""),
        "",
    ]
    if run.get("analysis_error"):
        lines += [f"**analysis failed:** {run['analysis_error']}", ""]
    instruments = run.get("instruments") or {}
    if instruments:
        lines += ["**instruments**", "", _table([{k: v for k, v in instruments.items() if k != "first_nonfinite"}]), ""]
        if instruments.get("first_nonfinite"):
            lines += [f"first non-finite value: {json.dumps(instruments['first_nonfinite'])}", ""]
    for view in ("effective", "adapter"):
        rows = run["layers"][view]
        if not rows or (view == "adapter" and run["layers"]["adapter"] == run["layers"]["effective"]):
            continue
        title = "per-layer change" + (" (adapter A/B tensors)" if view == "adapter" else "")
        lines += [f"**{title}**", "", _table([{k: r[k] for k in LAYER_COLUMNS} for r in rows]), ""]
    lines += _measurement_lines(run.get("measurements"))
    lines += replies_lines(run) + ability_lines(run)
    return lines


def configuration_lines(seeds: list[dict], label: str) -> list[str]:
    """A configuration's seeds (runs differing only in the recipe's seed): what they share, one
    table of their instruments, the per-layer change as the seeds' mean, min and max, each
    measurement table with a seed column, and each seed's replies. report.json has every run."""
    first = seeds[0]
    names = [f"seed {(run.get('recipe') or {}).get('seed')}" for run in seeds]
    recipe = {k: v for k, v in (first.get("recipe") or {}).items() if k != "seed"}
    lines = [f"### {label}", "",
             f"- method `{first['method']}` {json.dumps(first['config'])}; stance `{first['stance']['name']}` "
             f"v{first['stance']['version']}, {first['examples']} examples",
             f"- recipe: {json.dumps(recipe)}; seeds {', '.join(n.split(' ', 1)[1] for n in names)}", ""]
    table = []
    for name, run in zip(names, seeds):
        loss, trace = run["trace"]["loss"], run["trace"]
        instruments = {k: v for k, v in (run.get("instruments") or {}).items()
                       if not isinstance(v, (dict, list)) and k not in ("first_nonfinite", "halted_at")}
        table.append({"seed": name.split(" ", 1)[1], "run": run["run_id"], "origin": origin_text(run),
                      "steps": len(loss), "loss": f"{loss[0]} -> {loss[-1]}" if loss else "n/a",
                      "halted": f"at step {trace['halted_at']}: {trace['halt_reason']}"
                      if trace.get("halted_at") is not None else "no", **instruments})
    lines += ["**seeds**", "", _table(table, numparse=False), ""]
    lines += [f"**analysis failed ({name}):** {run['analysis_error']}" for name, run in zip(names, seeds)
              if run.get("analysis_error")]
    for view in ("effective", "adapter"):
        if view == "adapter" and all(run["layers"]["adapter"] == run["layers"]["effective"] for run in seeds):
            continue
        values: dict[str, list] = {}
        for run in seeds:
            for row in run["layers"][view]:
                if isinstance(row, dict) and isinstance(row.get("rel_change"), (int, float)):
                    values.setdefault(str(row.get("layer")), []).append(float(row["rel_change"]))
        if values:
            title = "per-layer change" + (" (adapter A/B tensors)" if view == "adapter" else "")
            lines += [f"**{title}: relative change over the {len(seeds)} seeds**", "",
                      _table([{"layer": layer, "seeds": len(v), "mean": sum(v) / len(v), "min": min(v), "max": max(v)}
                              for layer, v in values.items()]), ""]
    merged: dict[str, list[dict]] = {}
    for name, run in zip(names, seeds):
        for title, rows in measurement_tables(run.get("measurements")):
            merged.setdefault(title, []).extend({"seed": name.split(" ", 1)[1], **row} for row in rows)
    for title, rows in merged.items():
        lines += [f"**{title}**", "", _table(rows), ""]
    for name, run in zip(names, seeds):
        more = replies_lines(run) + ability_lines(run)
        if more:
            lines += [f"**{name}** ({run['run_id']})", "", *more]
    return lines


def findings_lines(payload: dict, forest_image: str | None = None) -> list[str]:
    """The findings table, what changed since the previous report, and the forest plot."""
    rows = findings(payload)
    if not rows:
        return []
    lines = ["## Findings", ""]
    changes = payload.get("changes")
    if isinstance(changes, dict):
        lines += [f"compared with the previous report on this model, {changes.get('previous')}: "
                  f"{len(changes.get('rows') or [])} change(s)", ""]
    lines += [_table(finding_rows(rows), numparse=False), ""]
    if forest_image:
        lines += [f"![forest plot: every claim's effect and interval against its margin]({forest_image})", ""]
    return lines


def _cut(text) -> str:
    text = " ".join(str(text or "").split()).replace("|", "\\|")
    return text if len(text) <= REPLY_CHARS else text[:REPLY_CHARS] + f"… ({len(text)} characters)"


def replies_lines(run: dict) -> list[str]:
    """A run's replies, base and adapted, the probes that moved most first (issue 31)."""
    replies = (run.get("measurements") or {}).get("replies")
    rows = replies.get("rows") if isinstance(replies, dict) else replies
    rows = [r for r in rows or [] if isinstance(r, dict)]
    if not rows:
        return []
    ordered = reply_order(rows)
    shown = [{"probe": _cut(r.get("probe")), "base reply": _cut(r.get("base_reply")),
              "adapted reply": _cut(r.get("adapted_reply")), "margin change": r.get("margin_change"),
              "changed": "yes" if r.get("changed") else "no"} for r in ordered[:REPLIES_SHOWN]]
    more = len(rows) - len(shown)
    return [f"**replies** ({sum(1 for r in rows if r.get('changed'))} of {len(rows)} changed; moved most first"
            + (f"; {more} more in report.json" if more > 0 else "") + ")", "", _table(shown, numparse=False), ""]


def ability_lines(run: dict) -> list[str]:
    ability = (run.get("measurements") or {}).get("general_ability")
    if not isinstance(ability, dict) or not ability:
        return []
    lines = [f"**general ability** ({ability.get('probeset')}, {ability.get('probes')} probes): accuracy "
             f"{ability.get('base_accuracy')} -> {ability.get('adapted_accuracy')}, backward transfer "
             f"{ability.get('backward_transfer')}, selectivity {ability.get('selectivity')}, pattern "
             f"{ability.get('pattern')}", ""]
    families = [{"family": k, **{c: v.get(c) for c in ("probes", "base_accuracy", "adapted_accuracy", "retention")}}
                for k, v in (ability.get("families") or {}).items() if isinstance(v, dict)]
    if families:
        lines += [_table(families), ""]
    regressions = [{"probe": r.get("id"), "prompt": _cut(r.get("prompt")), "base reply": _cut(r.get("base_reply")),
                    "adapted reply": _cut(r.get("adapted_reply")), "why": r.get("adapted_why")}
                   for r in ability.get("regressions") or [] if isinstance(r, dict)]
    if regressions:
        lines += ["regressions (base right, adapted wrong):", "", _table(regressions, numparse=False), ""]
    return lines


def status_lines(payload: dict) -> list[str]:
    """The report's first lines: the session's status, then the gate, if one ran (above everything,
    so a failed gate is the first thing a reader of the report sees)."""
    status, reasons = session_status(payload)
    lines = [f"**{status}**" + (": " + "; ".join(reasons) if reasons else ""), ""]
    gate = payload.get("gate")
    if not isinstance(gate, dict):
        return lines
    passed = bool(gate.get("passed"))
    lines += [f"## {'✅ Gate passed' if passed else '❌ Gate FAILED'}: compared with "
              f"{baseline_text(gate.get('baseline'))}", ""]
    if gate.get("error"):
        lines += [f"**the comparison could not be made:** {gate['error']}", ""]
    else:
        lines += [f"**{gate.get('summary')}**", ""]
    rules = gate_rules(gate)
    lines += ["rules: " + ("; ".join(f"`{spec}`" + (f" ({meaning})" if meaning else "") for spec, meaning in rules)
                           if rules else "none (every shared metric is listed, and nothing fails)"), ""]
    failed = gate_rows(gate, failed_only=True)
    if failed:
        lines += ["regressions:", "", _table(failed, numparse=False), ""]  # the digits the terminal printed
    every = gate_rows(gate)
    if every and len(every) > len(failed):
        lines += [f"all {len(every)} comparisons:", "", _table(every, numparse=False), ""]
    notes = [f"only in the baseline (missing now): {t}" for t in gate.get("only_baseline") or []]
    notes += [f"only now (no baseline): {t}" for t in gate.get("only_now") or []] + list(gate.get("notes") or [])
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    return lines


def _measurement_lines(measurements) -> list[str]:
    lines = []
    for title, rows in measurement_tables(measurements):
        lines += [f"**{title}**", "", _table(rows), ""]
    return lines


def render_step_summary(payload: dict, comparison, baseline: str | None, exit_code: int, model: str) -> str:
    """What GitHub Actions shows on the job's page ($GITHUB_STEP_SUMMARY): the pass/fail table
    of the harness's tests and, when a baseline was compared, the gate's table."""
    lines = [f"## stance-harness on `{model}`: {'passed' if exit_code == 0 else f'FAILED (exit code {exit_code})'}", ""]
    if payload["tests"]:
        lines += [_table(test_rows(payload)), ""]
    if comparison is not None:
        lines += [f"### Gate: compared with baseline `{baseline}`", ""]
        rows = [{"test": r.test, "metric": r.metric, "baseline": _mean(r.as_dict()["baseline"]),
                 "now": _mean(r.as_dict()["now"]), "change": r.change, "allowed": r.allowed, "verdict": r.verdict}
                for r in comparison.rows]
        lines += [_table(rows) if rows else "_no metric compared_", "", f"**{comparison.summary()}**", ""]
    return "\n".join(lines) + "\n"


def _mean(value):
    """A repeated metric's mean (its spread is in report.md); anything else as it is."""
    return value.get("mean") if isinstance(value, dict) else ("-" if value is None else value)


def _origin(method: dict) -> str:
    package = f"{method['package']} {method.get('version')}" if method.get("package") else "no package"
    return f"`{method['name']}` ({package}, module {method.get('module')}, source {method.get('source')})"
