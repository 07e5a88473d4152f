"""The Markdown report (report.md): provenance, the tests table, each test's checks and tables,
and each run's counts, instruments, per-layer change and measurements."""

from __future__ import annotations

import json

from .sections import (LAYER_COLUMNS, OUTCOME_MARK, baseline_text, gate_rows, gate_rules, measurement_tables,
                       origin_text, report_id_of, session_status, test_rows)


def _table(rows: list[dict], floatfmt=".4g", numparse=True) -> str:
    from tabulate import tabulate

    if not rows:
        return "_(empty)_"
    return tabulate([list(r.values()) for r in rows], headers=list(rows[0].keys()), tablefmt="github", floatfmt=floatfmt,
                    disable_numparse=not numparse)


def render_markdown(payload: dict) -> str:
    prov = payload["provenance"]
    lines = [
        f"# stance-harness report {report_id_of(payload)}", "",
        *status_lines(payload),
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
        lines += [f"> {note}" for note in test["notes"]] + ([""] if test["notes"] else [])
        for check in test["checks"]:
            mark = "PASS" if check["passed"] else "FAIL"
            lines += [f"**{check['check']}** {mark}: {check['summary']}", ""]
            if check["rows"] and not check["passed"]:
                lines += [_table([dict(zip(check["headers"], row)) for row in check["rows"]]), ""]
        if test["metrics"]:
            lines += [_table([{"metric": k, "value": v} for k, v in test["metrics"].items()]), ""]
        for table in test["tables"]:
            lines += [f"**{table['title']}**", "", _table(table["rows"]), ""]
    lines += ["## Runs", ""]
    for run_id, run in payload["runs"].items():
        counts = run["counts"]
        trace = run["trace"]
        loss = trace["loss"]
        lines += [
            f"### {run_id}", "",
            f"- method `{run['method']}` {json.dumps(run['config'])}; stance `{run['stance']['name']}` "
            f"v{run['stance']['version']}, {run['examples']} examples",
            f"- recipe: {json.dumps(run['recipe'])}",
            f"- origin: {origin_text(run)}",
            f"- trainable {counts['trainable']:,} / frozen {counts['frozen']:,} ({counts['trainable_pct']:.3g}% trainable); "
            + (f"{counts['params_per_example']:,.0f} trainable params per example; " if counts['params_per_example'] is not None
               else "no training examples (a saved adapter); ")
            + "stance storage "
            f"{counts['stance_bytes']:,} B vs full weights {counts['full_weights_bytes']:,} B",
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
    return "\n".join(lines) + "\n"


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
