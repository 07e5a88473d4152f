"""reports/<run-id>/report.json and report.md, written atomically, plus a `latest` pointer."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from .records import json_safe

OUTCOME_MARK = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP", "xfailed": "XFAIL",
                "xpassed": "XPASS", "not run": "-"}


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + os.urandom(2).hex()


def atomic_write(path: Path, text: str) -> None:
    """Write beside the target, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; reports are for CI artifacts and colleagues
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def git_info(root: Path) -> dict:
    def git(*args):
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {"commit": commit, "dirty": bool(git("status", "--porcelain")) if commit else None,
            "branch": git("rev-parse", "--abbrev-ref", "HEAD")}


def environment_info() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    libs = {}
    for name in ("stance-harness", "torch", "transformers", "peft", "bitsandbytes", "safetensors", "pytest"):
        try:
            libs[name] = version(name)
        except PackageNotFoundError:
            libs[name] = None
    machine = {"python": platform.python_version(), "platform": platform.platform(),
               "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count()}
    try:
        import torch

        machine["torch_threads"] = torch.get_num_threads()
        machine["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return {"libraries": libs, "machine": machine}


def write_reports(reports_dir: Path, payload: dict) -> Path:
    """report.json, report.md and index.html in reports/<run-id>/, then `latest` and reports/index.html."""
    run_dir = reports_dir / payload["run_id"]
    atomic_write(run_dir / "report.json", json.dumps(json_safe(payload), indent=2, default=str))
    atomic_write(run_dir / "report.md", render_markdown(payload))
    _write_html_reports(reports_dir, run_dir, payload)
    return run_dir


def _write_html_reports(reports_dir: Path, run_dir: Path, payload: dict) -> None:
    """The HTML page and the index of runs. A bug in drawing them must not cost the session its
    JSON and markdown reports (already written), so a failure becomes a page that says so."""
    import html
    import traceback
    import warnings

    from .html import render_html, write_index

    try:
        page = render_html(json.loads(json.dumps(json_safe(payload), default=str)))  # what report.json holds
    except Exception as exc:  # noqa: BLE001 - reported on the page and as a warning
        warnings.warn(f"stance-harness: the HTML report failed: {exc!r}; report.json and report.md are complete",
                      stacklevel=2)
        page = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>report failed</title></head><body>"
                "<h1>The HTML report could not be drawn</h1><p>See report.md and report.json beside this file.</p><pre>"
                + html.escape(traceback.format_exc()) + "</pre></body></html>\n")
    atomic_write(run_dir / "index.html", page)
    atomic_write(reports_dir / "latest", payload["run_id"] + "\n")
    try:
        write_index(reports_dir)
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"stance-harness: the index of reports failed: {exc!r}", stacklevel=2)


def _table(rows: list[dict], floatfmt=".4g") -> str:
    from tabulate import tabulate

    if not rows:
        return "_(empty)_"
    return tabulate([list(r.values()) for r in rows], headers=list(rows[0].keys()), tablefmt="github", floatfmt=floatfmt)


def test_rows(payload: dict) -> list[dict]:
    rows = []
    # a hypothesis may be expected to be refuted (on a tiny model): show both when any test says
    show_expected = any(t.get("expected") is not None or t.get("verdict") is not None for t in payload["tests"])
    for test in payload["tests"]:
        checks = test["checks"]
        passed = sum(1 for c in checks if c["passed"])
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
        row["message"] = (test["message"] or "").splitlines()[0][:100] if test["message"] else ""
        rows.append(row)
    return rows


LAYER_COLUMNS = ("layer", "mean", "var", "mean_abs", "var_abs", "rel_change", "norm_change", "nonfinite")


def render_markdown(payload: dict) -> str:
    prov = payload["provenance"]
    lines = [
        f"# stance-harness report {payload['run_id']}", "",
        f"- started: {payload['started']}  finished: {payload['finished']}",
        f"- model: `{prov['model'].get('name')}` ({prov['model'].get('id')}, revision {prov['model'].get('revision')})",
        f"- git: {prov['git'].get('commit')}{' (dirty)' if prov['git'].get('dirty') else ''}",
        "- libraries: " + ", ".join(f"{k} {v}" for k, v in prov["environment"]["libraries"].items()),
        f"- command: `{' '.join(prov['args'])}`", "",
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


def measurement_tables(measurements) -> list[tuple[str, list[dict]]]:
    """(title, rows) per measurement a run made: behaviour shift, calibration, forgetting, rank.
    The Markdown and the HTML report both render these."""
    if not isinstance(measurements, dict):
        return []
    tables = []
    behavior = measurements.get("behavior")
    if isinstance(behavior, dict) and behavior:
        rows = []
        for metric, m in behavior.items():
            effect = m.get("effect") if isinstance(m, dict) and isinstance(m.get("effect"), dict) else {}
            if isinstance(m, dict):
                rows.append({"metric": metric, "base": m.get("base"), "adapted": m.get("adapted"),
                             "effect": effect.get("mean"), "low": effect.get("low"), "high": effect.get("high"),
                             "n": effect.get("n")})
        tables.append(("behavioural shift (base -> adapted, 95% bootstrap interval)", rows))
    calibration = measurements.get("calibration")
    if isinstance(calibration, dict) and calibration:
        tables.append((f"calibration ({calibration.get('unit', 'predictions')})",
                       [{"model": name, **{k: cal.get(k) for k in ("ece", "mce", "brier", "acc1", "n", "n_bins")}}
                        for name in ("base", "adapted") if isinstance(cal := calibration.get(name), dict)]))
    forgetting = measurements.get("forgetting")
    if isinstance(forgetting, dict) and forgetting:
        tables.append(("forgetting", [{k: v for k, v in forgetting.items() if not isinstance(v, (dict, list))}]))
    rank = measurements.get("rank")
    if isinstance(rank, dict) and rank.get("rows"):
        tables.append((f"rank of the update (energy {rank.get('energy')})",
                       [{**r, "shape": "x".join(map(str, r["shape"])) if isinstance(r.get("shape"), list) else r.get("shape")}
                        for r in rank["rows"] if isinstance(r, dict)]))
    return tables


def _measurement_lines(measurements) -> list[str]:
    lines = []
    for title, rows in measurement_tables(measurements):
        lines += [f"**{title}**", "", _table(rows), ""]
    return lines
