"""reports/<run-id>/index.html, one self-contained page per session, and reports/index.html.

The page needs nothing outside itself: the CSS is inline, every figure is a PNG in a
`data:` URI drawn with matplotlib's Agg canvas, and there is no JavaScript. All text
taken from the payload is escaped. Every section reads the payload defensively, because
older reports lack keys that newer ones have (`measurements`, `instruments`, most of
`trace`, `expected`, `verdict`, `repeats`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import Counter
from pathlib import Path

from ..files import atomic_write
from .sections import (LAYER_COLUMNS, OUTCOME_MARK, baseline_text, gate_rows, gate_rules, measurement_tables,
                       origin_text, report_id_of, session_status)

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "not run")
DPI = 90

CSS = """
:root { --fg:#1d232a; --muted:#5b6570; --line:#d5dbe1; --bg:#ffffff; --alt:#f5f7f9; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); background: var(--bg); margin: 0 auto; padding: 1rem 1.5rem 3rem; max-width: 1200px; }
h1 { font-size: 1.45rem; margin: .2rem 0 .6rem; }
h2 { font-size: 1.2rem; margin: 2rem 0 .6rem; border-bottom: 2px solid var(--line); padding-bottom: .2rem; }
h3 { font-size: 1.02rem; margin: 1.4rem 0 .4rem; word-break: break-all; }
h4 { font-size: .95rem; margin: 1rem 0 .3rem; color: var(--muted); }
code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: .88em; }
table { border-collapse: collapse; margin: .4rem 0 .9rem; font-size: .86rem; }
th, td { border: 1px solid var(--line); padding: .22rem .5rem; text-align: left; vertical-align: top; }
th { background: var(--alt); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) td { background: #fbfcfd; }
.wrap { overflow-x: auto; }
dl.prov { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; margin: .4rem 0 1rem; }
dl.prov dt { color: var(--muted); }
dl.prov dd { margin: 0; word-break: break-word; }
.badge { display: inline-block; padding: .05rem .45rem; border-radius: .3rem; font-weight: 700; font-size: .78rem;
         letter-spacing: .02em; white-space: nowrap; }
.o-passed { background: #d7f5dd; color: #11612a; }
.o-failed { background: #fbd9d9; color: #9b1111; }
.o-error { background: #9b1111; color: #fff; }
.o-skipped, .o-not-run { background: #e6e8eb; color: #4a525a; }
.o-xfailed { background: #fde7c8; color: #8a4b00; }
.o-xpassed { background: #efe0fb; color: #5b1f8a; }
.v-supported { color: #11612a; font-weight: 600; }
.v-refuted { color: #9b1111; font-weight: 600; }
.agree { color: #11612a; } .disagree { color: #9b1111; font-weight: 700; }
.nonfinite { color: #b00020; font-weight: 700; }
.note { border-left: 3px solid #8aa4c1; background: #f2f6fa; padding: .3rem .7rem; margin: .3rem 0; white-space: pre-wrap; }
.err { border-left: 3px solid #b00020; background: #fdf0f0; padding: .3rem .7rem; margin: .3rem 0; white-space: pre-wrap; }
.msg { color: var(--muted); min-width: 14rem; max-width: 30rem; overflow-wrap: anywhere; }
table.tests td.mono { min-width: 16rem; max-width: 34rem; overflow-wrap: anywhere; }
.check { margin: .25rem 0; }
.muted { color: var(--muted); }
figure { margin: .4rem 0 1rem; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: .82rem; }
section.test, section.run { border-top: 1px solid var(--line); }
details > summary { cursor: pointer; color: var(--muted); margin: .3rem 0; }
nav a { margin-right: .8rem; }
.kv { display: flex; flex-wrap: wrap; gap: .2rem 1.2rem; margin: .3rem 0; }
.kv span { color: var(--muted); } .kv b { color: var(--fg); font-weight: 600; font-variant-numeric: tabular-nums; }
.latest { background: #1f6feb; color: #fff; }
.status { font-size: 1.05rem; margin: .2rem 0 .6rem; }
.s-passed { background: #11612a; color: #fff; } .s-failed, .s-interrupted { background: #b00020; color: #fff; }
.gate { border: 2px solid; border-radius: .4rem; padding: .5rem .9rem; margin: .6rem 0 1rem; }
.gate h2 { border: 0; margin: 0 0 .3rem; padding: 0; }
.gate-failed { border-color: #b00020; background: #fdecec; } .gate-failed h2 { color: #9b1111; }
.gate-passed { border-color: #11612a; background: #e9f7ec; } .gate-passed h2 { color: #11612a; }
.gate ul { margin: .2rem 0 .5rem; padding-left: 1.3rem; }
"""


# -- small helpers ---------------------------------------------------------------------------

# Built as strings, not jinja2 templates (issue 17 asked for one or a reason): each section is a
# small function beside the figure it draws, every payload value passes through `_e`, and the
# browser test pins the page; a template port would move markup away from that data shaping.
def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _float(value) -> float:
    """A number from the payload as a float: NaN for missing or unreadable values."""
    if isinstance(value, bool) or value is None:
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # "nan", "inf", "-inf" included
        except ValueError:
            return math.nan
    return math.nan


def _is_nonfinite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


def _fmt(value, floatfmt: str = ".4g") -> str:
    """Plain text for one value (not yet escaped)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        return format(value, floatfmt) if math.isfinite(value) else str(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _cell(value) -> str:
    text = _e(_fmt(value))
    if _is_nonfinite(value):
        return f'<td class="num nonfinite">{text}</td>'
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="num">{text}</td>'
    return f"<td>{text}</td>"


def _table(rows: list[dict], caption: str | None = None) -> str:
    """A table from dicts; the columns are the union of keys, in first-seen order."""
    if not rows:
        return '<p class="muted">(empty)</p>'
    columns: list[str] = []
    for row in rows:
        for key in (row if isinstance(row, dict) else {}):
            if key not in columns:
                columns.append(key)
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(row.get(c)) if isinstance(row, dict) else "<td></td>" for c in columns)
                   + "</tr>" for row in rows)
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    return f'<div class="wrap"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _badge(outcome) -> str:
    outcome = outcome or "not run"
    cls = "o-" + re.sub(r"[^a-z]+", "-", str(outcome).lower()).strip("-")
    return f'<span class="badge {_e(cls)}">{_e(OUTCOME_MARK.get(outcome, outcome))}</span>'


def _anchor(prefix: str, name) -> str:
    return prefix + "-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip("-")


def _figure_html(fig, alt: str, caption: str | None = None) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    fig.clear()  # a bare Figure is not tracked by pyplot: dropping it frees it
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">{cap}</figure>'


class FigureCache:
    """Drawn figures kept on disk by what they show: a run's figure is drawn once, and a later
    report of the same run (a warm re-run) reuses it. Drawing is most of a report's cost: about
    0.4 s a figure. The key holds this module's source, so a change to the drawing is a new key."""

    def __init__(self, directory: Path | None):
        self.directory = Path(directory) if directory is not None else None

    def get(self, kind: str, data, draw) -> str:
        if self.directory is None:
            return draw()
        import hashlib

        blob = json.dumps([kind, data], sort_keys=True, default=str).encode()
        key = hashlib.sha256(_SOURCE_KEY + blob).hexdigest()[:32]
        path = self.directory / f"{key}.html"
        try:
            return path.read_text(encoding="utf-8")
        except OSError:
            pass
        html_text = draw()
        try:
            atomic_write(path, html_text)
        except OSError:
            pass  # a read-only reports directory only costs drawing again
        return html_text


_SOURCE_KEY = Path(__file__).read_bytes()


def _new_figure(width: float, height: float, **margins):
    """A bare Figure (not pyplot's, so nothing global) with fixed margins: constrained layout
    would cost a third of the drawing time, and these figures have known shapes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(**{"left": 0.07, "right": 0.98, "bottom": 0.15, "top": 0.82, "wspace": 0.22, **margins})
    return fig


def _lr(run: dict):
    return (run.get("recipe") or {}).get("learning_rate")


def _stance_name(run: dict) -> str:
    stance = run.get("stance") or {}
    name = stance.get("name", "?")
    return f"{name} v{stance['version']}" if stance.get("version") else str(name)


def _run_title(run: dict) -> str:
    lr = _lr(run)
    return (f"{run.get('method', '?')} · stance {_stance_name(run)}"
            + (f" · lr {_fmt(lr, '.3g')}" if lr is not None else ""))


def _steps_of(entries) -> list[int]:
    steps = []
    for entry in entries or []:
        step = entry.get("step") if isinstance(entry, dict) else entry
        if isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step):
            steps.append(int(step))
    return steps


# -- figures ---------------------------------------------------------------------------------

def _layer_order(rows: list[dict], num_layers) -> list[str]:
    """The labels to plot: every transformer layer of the model when its depth is known, so a
    run that trained two layers shows where they sit; the other rows keep their places."""
    labels = [str(r.get("layer")) for r in rows]
    numbered = [lab for lab in labels if re.fullmatch(r"L\d+", lab)]
    if not isinstance(num_layers, int) or num_layers <= 0 or num_layers > 512 or not numbered:
        return labels
    if any(int(lab[1:]) >= num_layers for lab in numbered):
        return labels
    before = [lab for lab in labels[: labels.index(numbered[0])] if not re.fullmatch(r"L\d+", lab)]
    after = [lab for lab in labels if lab not in before and not re.fullmatch(r"L\d+", lab)]
    return before + [f"L{i}" for i in range(num_layers)] + after


def layer_figure(run: dict, view: str = "effective") -> str:
    rows = [r for r in ((run.get("layers") or {}).get(view) or []) if isinstance(r, dict)]
    if not rows:
        return ""
    labels = _layer_order(rows, (run.get("model") or {}).get("num_layers"))
    by_label = {str(r.get("layer")): r for r in rows}
    positions = range(len(labels))
    longest = max((len(lab) for lab in labels), default=2)
    fig = _new_figure(max(7.0, min(11.0, 2.5 + 0.3 * len(labels))), 3.6,
                      bottom=min(0.42, 0.09 + 0.018 * longest), left=0.08, top=0.78)
    axes = fig.subplots(1, 2)
    panels = (("mean_abs", "mean |Δ|", "#3b6fb6"), ("rel_change", "relative change ‖Δ‖/‖W‖", "#d07a1f"))
    nonfinite_layers: set[str] = set()
    for ax, (key, label, colour) in zip(axes, panels):
        values = [_float(by_label[lab].get(key)) if lab in by_label else math.nan for lab in labels]
        heights = [v if math.isfinite(v) else 0.0 for v in values]
        ax.bar(positions, heights, color=colour, width=0.8)
        bad = [i for i, lab in enumerate(labels)
               if lab in by_label and (not math.isfinite(values[i]) or _float(by_label[lab].get("nonfinite")) > 0)]
        if bad:
            ax.plot(bad, [0.0] * len(bad), "x", color="#b00020", markersize=8, mew=2,
                    transform=ax.get_xaxis_transform(), clip_on=False)
            nonfinite_layers.update(labels[i] for i in bad)
        ax.set_title(label, fontsize=9)
        ax.set_xticks(list(positions))
        ax.set_xticklabels(labels, rotation=90, fontsize=8)
        for tick, lab in zip(ax.get_xticklabels(), labels):
            if lab not in by_label:
                tick.set_color("#9aa3ab")
            elif lab in nonfinite_layers:
                tick.set_color("#b00020")
        ax.tick_params(axis="y", labelsize=7)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        ax.yaxis.get_offset_text().set_fontsize(7)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xlim(-0.7, len(labels) - 0.3)
    fig.suptitle("weight change across layers" + (" (adapter A/B tensors)" if view == "adapter" else "")
                 + f"\n{_run_title(run)}", fontsize=10)
    notes = []
    if len(labels) > len(rows):
        notes.append("grey labels: layers this run did not change")
    if nonfinite_layers:
        notes.append("red ×: non-finite values in " + ", ".join(lab for lab in labels if lab in nonfinite_layers))
    return _figure_html(fig, f"weight change across layers, {view} view, {_run_title(run)}", "; ".join(notes) or None)


def curves_figure(run: dict) -> str:
    trace = run.get("trace") or {}
    loss = [_float(v) for v in trace.get("loss") or []]
    grad = [_float(v) for v in trace.get("grad_norm") or []]
    if not loss and not grad:
        return ""
    nonfinite = sorted(set(_steps_of(trace.get("nonfinite"))))
    skipped = sorted(set(_steps_of(trace.get("skipped_steps"))))
    halted = trace.get("halted_at")
    halted = int(halted) if isinstance(halted, (int, float)) and not isinstance(halted, bool) else None
    fig = _new_figure(9.0, 2.9, bottom=0.17, left=0.07)
    axes = fig.subplots(1, 2)
    for ax, (values, label, colour) in zip(axes, ((loss, "loss", "#3b6fb6"), (grad, "grad norm (before clipping)", "#2e8b57"))):
        steps = list(range(len(values)))
        ax.plot(steps, values, "-o", color=colour, markersize=2.5, linewidth=1.2, label=label)
        bad = sorted(set(nonfinite) | {i for i, v in enumerate(values) if not math.isfinite(v)})
        if bad:
            ax.plot(bad, [0.04] * len(bad), "x", color="#b00020", markersize=8, mew=2,
                    transform=ax.get_xaxis_transform(), clip_on=False, label="non-finite")
        for j, step in enumerate(skipped):
            ax.axvline(step, color="#8a8f95", linestyle=":", linewidth=1.2, label="skipped step" if j == 0 else None)
        if halted is not None:
            ax.axvline(halted, color="#b00020", linestyle="--", linewidth=1.4, label=f"halted at {halted}")
        finite = [v for v in values if math.isfinite(v)]
        if label.startswith("grad") and finite and min(finite) > 0 and max(finite) / min(finite) > 100:
            ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(steps) <= 1:
            ax.set_xlim(-1, max(1, len(steps)))
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"loss and grad norm — {_run_title(run)}", fontsize=10)
    parts = []
    if nonfinite:
        parts.append(f"non-finite at step(s) {', '.join(map(str, nonfinite[:20]))}{' …' if len(nonfinite) > 20 else ''}")
    if skipped:
        parts.append(f"{len(skipped)} skipped step(s)")
    if halted is not None:
        parts.append(f"halted at step {halted}: {trace.get('halt_reason') or ''}")
    return _figure_html(fig, f"loss and grad norm curves, {_run_title(run)}", "; ".join(parts) or None)


def reliability_figure(calibration: dict, title: str = "") -> str:
    panels = [(name, calibration.get(name)) for name in ("base", "adapted") if isinstance(calibration.get(name), dict)]
    if not panels:
        return ""
    fig = _new_figure(3.6 * len(panels) + 0.4, 3.6, left=0.1 if len(panels) > 1 else 0.16, bottom=0.13,
                      top=0.84, wspace=0.3)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, cal) in zip(axes, panels):
        ax.plot([0, 1], [0, 1], "--", color="#777", linewidth=1, label="perfect calibration")
        drew = False
        for b in cal.get("bins") or []:
            lower, upper = _float(b.get("lower")), _float(b.get("upper"))
            acc, conf = _float(b.get("accuracy")), _float(b.get("confidence"))
            if not (math.isfinite(lower) and math.isfinite(upper)) or not math.isfinite(acc):
                continue
            ax.bar(lower, acc, width=upper - lower, align="edge", color="#3b6fb6", edgecolor="#1d3f70",
                   alpha=0.85, label=None if drew else "accuracy")
            if math.isfinite(conf):
                ax.bar(lower, conf - acc, bottom=acc, width=upper - lower, align="edge", color="#e05a5a",
                       alpha=0.35, hatch="//", edgecolor="#b00020", linewidth=0.5, label=None if drew else "gap to confidence")
            drew = True
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
        ece = _fmt(_float(cal.get("ece")), ".3f") if cal.get("ece") is not None else "n/a"
        ax.set_title(f"{name}: ECE {ece} (n={_fmt(cal.get('n'))})", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(f"reliability — {title}", fontsize=10)
    return _figure_html(fig, f"reliability diagram, {title}")


# -- sections --------------------------------------------------------------------------------

def _has(tests: list[dict], key: str) -> bool:
    return any(t.get(key) not in (None, {}, []) for t in tests)


def _expected_outcome(test: dict):
    expected = test.get("expected")
    if isinstance(expected, dict):
        return expected.get("outcome")
    return expected


def _repeats_text(repeats) -> str:
    if not isinstance(repeats, dict):
        return ""
    lines = []
    for name, stats in (repeats.get("metrics") or {}).items():
        if isinstance(stats, dict):
            lines.append(f"{_e(name)}: {_e(_fmt(stats.get('mean')))} ± {_e(_fmt(stats.get('std')))}")
    head = f'<span class="muted">n={_e(_fmt(repeats.get("n")))}</span>'
    return head + ("<br>" + "<br>".join(lines) if lines else "")


def _header(payload: dict) -> str:
    prov = payload.get("provenance") or {}
    model = prov.get("model") or {}
    git = prov.get("git") or {}
    env = prov.get("environment") or {}
    libs = env.get("libraries") or {}
    machine = env.get("machine") or {}
    models = prov.get("models") or []
    stances = prov.get("stances") or []
    command = " ".join(str(a) for a in (prov.get("args") or []))
    items = [
        ("started", f"{_e(payload.get('started'))} &nbsp; finished {_e(payload.get('finished'))}"),
        ("model", f"<code>{_e(model.get('name'))}</code> — id <code>{_e(model.get('id'))}</code>, revision "
                  f"<code>{_e(model.get('revision'))}</code>"
                  + "".join(f", {_e(k)} {_e(_fmt(model.get(k)))}" for k in ("model_type", "num_layers", "dtype", "device")
                            if model.get(k) is not None)),
    ]
    others = [m for m in models if isinstance(m, dict) and m.get("id") != model.get("id")]
    if others:
        items.append(("other models", ", ".join(f"<code>{_e(m.get('id'))}</code>@{_e(m.get('revision'))}" for m in others)))
    if prov.get("model_args"):
        items.append(("model args", f"<code>{_e(json.dumps(prov['model_args'], default=str))}</code>"))
    if stances:
        items.append(("stances", ", ".join(
            f"<code>{_e(s.get('name'))}</code> v{_e(s.get('version'))}" + (f" ({_e(s.get('examples'))} examples)" if s.get("examples") else "")
            for s in stances if isinstance(s, dict))))
    items += [
        ("git", f"<code>{_e(git.get('commit'))}</code>" + (f" on {_e(git.get('branch'))}" if git.get("branch") else "")
                + (' <span class="nonfinite">(dirty)</span>' if git.get("dirty") else "")),
        ("libraries", ", ".join(f"{_e(k)} <code>{_e(v)}</code>" for k, v in libs.items())),
        ("machine", ", ".join(f"{_e(k)} {_e(_fmt(v))}" for k, v in machine.items() if v not in (None, ""))),
        ("command", f"<code>pytest {_e(command)}</code>"),
    ]
    body = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items)
    return (f'<header><p class="muted"><a href="../index.html">all reports</a></p>'
            f"<h1>stance-harness report {_e(report_id_of(payload))}</h1>"
            + _status(payload) + _gate_banner(payload.get("gate"))
            + ('<div class="err">INTERRUPTED: this session was stopped before its end; tests marked '
               '"not run" did not run.</div>' if payload.get("interrupted") else "")
            + f"<dl class=\"prov\">{body}</dl></header>")


def _status(payload: dict) -> str:
    status, reasons = session_status(payload)
    return (f'<p class="status" id="status"><span class="badge s-{status.lower()}">{_e(status)}</span> '
            + _e("; ".join(reasons)) + "</p>")


def _gate_banner(gate) -> str:
    """The gate, above everything but the title: red when it failed, green when it passed."""
    if not isinstance(gate, dict):
        return ""
    passed = bool(gate.get("passed"))
    out = [f'<section id="gate" class="gate gate-{"passed" if passed else "failed"}">'
           f'<h2>{"Gate passed" if passed else "Gate FAILED"}: compared with {_e(baseline_text(gate.get("baseline")))}</h2>']
    if gate.get("error"):
        out.append(f'<p><b>the comparison could not be made:</b> {_e(gate["error"])}</p>')
    else:
        out.append(f"<p><b>{_e(gate.get('summary'))}</b></p>")
    rules = gate_rules(gate)
    out.append("<p>rules:</p><ul>" + "".join(f"<li><code>{_e(spec)}</code>" + (f" — {_e(meaning)}" if meaning else "")
                                             + "</li>" for spec, meaning in rules) + "</ul>" if rules
               else '<p class="muted">no rules: every shared metric is listed, and nothing fails</p>')
    failed = gate_rows(gate, failed_only=True)
    if failed:
        out.append(_table(failed, caption="regressions").replace("<table>", '<table class="regressions">', 1))
    every = gate_rows(gate)
    if every and len(every) > len(failed):
        out.append(f"<details{'' if failed else ' open'}><summary>all {len(every)} comparisons</summary>"
                   + _table(every) + "</details>")
    notes = [f"only in the baseline (missing now): {t}" for t in gate.get("only_baseline") or []]
    notes += [f"only now (no baseline): {t}" for t in gate.get("only_now") or []] + list(gate.get("notes") or [])
    out += [f'<div class="note">{_e(note)}</div>' for note in notes]
    return "".join(out) + "</section>"


def _summary(tests: list[dict], gate=None) -> str:
    counts = Counter(t.get("outcome") or "not run" for t in tests)
    failed_gate = isinstance(gate, dict) and not gate.get("passed")  # beside PASS counts, it is the verdict
    return ('<p>' + " ".join(f"{_badge(o)} {counts[o]}" for o in OUTCOMES if counts.get(o))
            + f' <span class="muted">({len(tests)} tests)</span>'
            + (' <a href="#gate"><span class="badge s-failed">GATE FAILED</span></a>' if failed_gate else "") + "</p>")


def _tests_table(payload: dict, run_anchor: dict) -> str:
    tests = payload.get("tests") or []
    if not tests:
        return '<p class="muted">No test used the harness.</p>'
    runs = payload.get("runs") or {}
    show_expected = _has(tests, "expected") or _has(tests, "verdict")
    show_repeats = _has(tests, "repeats")
    head = ["outcome", "test", "runs", "checks"] + (["expected", "verdict"] if show_expected else []) \
        + (["repeats (mean ± std)"] if show_repeats else []) + ["duration", "message"]
    out = ["<div class=\"wrap\"><table class=\"tests\"><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head)
           + "</tr></thead><tbody>"]
    for i, test in enumerate(tests):
        checks = test.get("checks") or []
        passed = sum(1 for c in checks if c.get("passed"))
        run_links = ", ".join(
            f'<a href="#{_e(run_anchor[r])}">{_e((runs.get(r) or {}).get("method", r))}</a>' if r in run_anchor else _e(r)
            for r in test.get("runs") or []) or "–"
        cells = [f"<td>{_badge(test.get('outcome'))}</td>",
                 f'<td class="mono"><a href="#{_anchor("test", i)}">{_e(test.get("nodeid"))}</a></td>',
                 f"<td>{run_links}</td>",
                 f'<td class="num">{_e(f"{passed}/{len(checks)}" if checks else "–")}</td>']
        if show_expected:
            expected, verdict = _expected_outcome(test), test.get("verdict")
            reason = (test.get("expected") or {}).get("reason") if isinstance(test.get("expected"), dict) else None
            cells.append(f'<td class="v-{_e(expected)}" title="{_e(reason)}">{_e(expected or "–")}</td>')
            agree = ""
            if expected and verdict:
                agree = ' <span class="agree">✓</span>' if expected == verdict else ' <span class="disagree">✗ unexpected</span>'
            cells.append(f'<td class="v-{_e(verdict)}">{_e(verdict or "–")}{agree}</td>')
        if show_repeats:
            cells.append(f"<td>{_repeats_text(test.get('repeats'))}</td>")
        duration = test.get("duration")
        cells.append(f'<td class="num">{_e(_fmt(duration, ".2f"))} s</td>' if isinstance(duration, (int, float))
                     else "<td>–</td>")
        message = test.get("message") or ""
        first = message.splitlines()[0][:160] if message else ""
        cells.append(f'<td class="msg">{_e(first)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _test_section(i: int, test: dict, run_anchor: dict) -> str:
    out = [f'<section class="test" id="{_anchor("test", i)}"><h3>{_badge(test.get("outcome"))} '
           f'<span class="mono">{_e(test.get("nodeid"))}</span></h3>']
    if test.get("runs"):
        out.append("<p>runs: " + ", ".join(
            f'<a href="#{_e(run_anchor[r])}">{_e(r)}</a>' if r in run_anchor else _e(r) for r in test["runs"])
            + f' · {_e(_fmt(test.get("duration"), ".2f"))} s</p>')
    expected = test.get("expected")
    if isinstance(expected, dict) or test.get("verdict"):
        exp = expected if isinstance(expected, dict) else {}
        out.append(f'<p>expected: <span class="v-{_e(exp.get("outcome"))}">{_e(exp.get("outcome") or "–")}</span>'
                   + (f' <span class="muted">— {_e(exp.get("reason"))}</span>' if exp.get("reason") else "")
                   + f'; verdict: <span class="v-{_e(test.get("verdict"))}">{_e(test.get("verdict") or "–")}</span></p>')
    if test.get("message") and test.get("outcome") not in ("passed",):
        out.append(f'<details><summary>message</summary><div class="err">{_e(test["message"])}</div></details>')
    for note in test.get("notes") or []:
        out.append(f'<div class="note">{_e(note)}</div>')
    for check in test.get("checks") or []:
        ok = bool(check.get("passed"))
        out.append(f'<div class="check">{_badge("passed" if ok else "failed")} <code>{_e(check.get("check"))}</code> '
                   f'{_e(check.get("summary"))}</div>')
        if check.get("rows") and not ok:
            headers = check.get("headers") or []
            rows = [dict(zip(headers or [str(j) for j in range(len(r))], r)) if isinstance(r, (list, tuple)) else r
                    for r in check["rows"]]
            out.append(_table([r for r in rows if isinstance(r, dict)]))
    if test.get("metrics"):
        out.append("<h4>metrics</h4>" + _table([{"metric": k, "value": v} for k, v in test["metrics"].items()]))
    repeats = test.get("repeats")
    if isinstance(repeats, dict) and repeats.get("metrics"):
        rows = [{"metric": k, **{s: (v or {}).get(s) for s in ("mean", "std", "min", "max", "n")}}
                for k, v in repeats["metrics"].items()]
        out.append(f"<h4>repeats (n={_e(_fmt(repeats.get('n')))})</h4>" + _table(rows))
    for table in test.get("tables") or []:
        out.append(f"<h4>{_e(table.get('title'))}</h4>" + _table([r for r in table.get("rows") or [] if isinstance(r, dict)]))
    out.append("</section>")
    return "".join(out)


def where_figure(run: dict) -> str:
    """Where the weights changed (each layer's share of the change, 1 − CKA of its hidden
    states, intruders) beside where the behaviour lives (the shift retained keeping that layer alone)."""
    measurements = run.get("measurements") or {}
    geometry = measurements.get("geometry") if isinstance(measurements.get("geometry"), dict) else {}
    localization = measurements.get("localization") if isinstance(measurements.get("localization"), dict) else {}
    layers = [r for r in geometry.get("layers") or [] if isinstance(r, dict)]
    retained = {r.get("set"): _float(r.get("retained")) for r in localization.get("rows") or []
                if isinstance(r, dict) and r.get("by") == "layer"}
    labels = [str(r.get("layer")) for r in layers] or list(retained)
    if not labels:
        return ""
    by_label = {str(r.get("layer")): r for r in layers}
    panels = []
    if layers:
        panels.append(("where the weights changed: share of ΔW", [_float(by_label[lab].get("change_share")) for lab in labels], "#3b6fb6"))
        panels.append(("where the representation moved: 1 − CKA", [1 - _float(by_label[lab].get("cka")) for lab in labels], "#2e8b57"))
        panels.append(("intruder dimensions", [_float(by_label[lab].get("intruders")) for lab in labels], "#8a4fb0"))
    if retained:
        panels.append(("where the behaviour lives: shift retained, this layer alone", [retained.get(lab, math.nan) for lab in labels], "#d07a1f"))
    fig = _new_figure(max(7.0, min(12.0, 2.5 + 0.3 * len(labels))), 1.9 * len(panels) + 0.8, bottom=0.1, top=0.9,
                      hspace=0.55)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (title, values, colour) in zip(axes, panels):
        heights = [v if math.isfinite(v) else 0.0 for v in values]
        ax.bar(range(len(labels)), heights, color=colour, width=0.8)
        if min(heights) >= 0:
            ax.set_ylim(0, max(heights) * 1.08 if max(heights) > 0 else 1.0)  # all zero: say 0, not ±0.04
        ax.set_title(title + (" (none)" if max(map(abs, heights)) == 0 else ""), fontsize=9)
        ax.set_xticks(list(range(len(labels))))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xlim(-0.7, len(labels) - 0.3)
    fig.suptitle(f"where the weights changed, where the behaviour lives — {_run_title(run)}", fontsize=10)
    return _figure_html(fig, f"where the weights changed beside where the behaviour lives, {_run_title(run)}")


def dose_figure(run: dict) -> str:
    """Shift (with its interval) and forgetting against the dose λ that scales the whole change."""
    dose = (run.get("measurements") or {}).get("dose_response")
    rows = [r for r in (dose or {}).get("rows") or [] if isinstance(r, dict)] if isinstance(dose, dict) else []
    if not rows:
        return ""
    x = [_float(r.get("dose")) for r in rows]
    fig = _new_figure(9.0, 3.0, bottom=0.17, left=0.08, wspace=0.28)
    shift_ax, forget_ax = fig.subplots(1, 2)
    shift = [_float(r.get("shift")) for r in rows]
    shift_ax.fill_between(x, [_float(r.get("low")) for r in rows], [_float(r.get("high")) for r in rows],
                          color="#3b6fb6", alpha=0.2, label="95% interval")
    shift_ax.plot(x, shift, "-o", color="#3b6fb6", markersize=3, label="shift (loglik margin)")
    shift_ax.axhline(0, color="#777", linewidth=0.8)
    forget_ax.plot(x, [_float(r.get("forgetting")) for r in rows], "-o", color="#b0413e", markersize=3,
                   label="forgetting (perplexity increase)")
    for ax, title in ((shift_ax, "behaviour shift"), (forget_ax, "forgetting")):
        ax.axvline(1, color="#999", linestyle=":", linewidth=1)
        ax.set_xlabel("dose λ (ΔW scaled; −1: subtracted)", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"dose-response — {_run_title(run)}", fontsize=10)
    return _figure_html(fig, f"dose-response: shift and forgetting against λ, {_run_title(run)}")


def _measurements(run: dict, figures: FigureCache) -> str:
    measurements = run.get("measurements")
    if not isinstance(measurements, dict) or not measurements:
        return ""
    out = [f"<h4>{_e(title)}</h4>" + _table(rows) for title, rows in measurement_tables(measurements)]
    behavior = measurements.get("behavior")
    for metric, m in (behavior.items() if isinstance(behavior, dict) else ()):
        probes = m.get("per_probe") if isinstance(m, dict) else None
        if probes:
            out.append(f"<details><summary>{_e(metric)} per probe ({len(probes)})</summary>"
                       + _table([p for p in probes if isinstance(p, dict)]) + "</details>")
    calibration = measurements.get("calibration")
    if isinstance(calibration, dict) and calibration:
        out.append(figures.get("reliability", [calibration, _run_title(run)],
                               lambda: reliability_figure(calibration, _run_title(run))))
    where = {k: measurements.get(k) for k in ("geometry", "localization")}
    if any(where.values()):
        out.append(figures.get("where", [where, _run_title(run)], lambda: where_figure(run)))
    if measurements.get("dose_response"):
        out.append(figures.get("dose", [measurements["dose_response"], _run_title(run)], lambda: dose_figure(run)))
    known = {"behavior", "calibration", "forgetting", "rank", "localization", "dose_response", "geometry"}
    for key, value in measurements.items():
        if key not in known and value not in (None, {}, []):
            out.append(f"<h4>{_e(key)}</h4><pre class=\"mono\">{_e(json.dumps(value, indent=1, default=str)[:4000])}</pre>")
    return "".join(out)


def _run_section(run_id: str, run: dict, anchor: str, figures: FigureCache) -> str:
    out = [f'<section class="run" id="{_e(anchor)}"><h3>{_e(run_id)}</h3>']
    counts = run.get("counts") or {}
    trace = run.get("trace") or {}
    loss = trace.get("loss") or []
    facts = [
        f"method <code>{_e(run.get('method'))}</code> <code>{_e(json.dumps(run.get('config'), default=str))}</code>",
        f"stance <code>{_e(_stance_name(run))}</code>, {_e(run.get('examples'))} examples",
        f"recipe <code>{_e(json.dumps(run.get('recipe'), default=str))}</code>",
        f"origin: {_e(origin_text(run))}",
    ]
    if counts:
        facts.append(
            f"trainable {_e(_fmt(counts.get('trainable')))} / frozen {_e(_fmt(counts.get('frozen')))} "
            f"({_e(_fmt(counts.get('trainable_pct'), '.3g'))}% trainable); "
            f"{_e(_fmt(counts.get('params_per_example'), '.4g'))} trainable params per example; "
            f"stance storage {_e(_fmt(counts.get('stance_bytes')))} B vs full weights {_e(_fmt(counts.get('full_weights_bytes')))} B")
    facts.append(f"{len(loss)} steps, loss {_e(_fmt(loss[0]) if loss else 'n/a')} → {_e(_fmt(loss[-1]) if loss else 'n/a')}"
                 + (f", trained in {_e(_fmt(run.get('train_seconds'), '.3g'))} s" if run.get("train_seconds") is not None else "")
                 + (f'; <span class="nonfinite">HALTED at step {_e(trace.get("halted_at"))}: {_e(trace.get("halt_reason"))}</span>'
                    if trace.get("halted_at") is not None else ""))
    out.append("<ul>" + "".join(f"<li>{f}</li>" for f in facts) + "</ul>")
    if run.get("analysis_error"):
        out.append(f'<div class="err">analysis failed: {_e(run["analysis_error"])}</div>')
    out.append(figures.get("layers-effective", run, lambda: layer_figure(run, "effective")))
    out.append(figures.get("curves", run, lambda: curves_figure(run)))
    layers = run.get("layers") or {}
    if layers.get("adapter") and layers.get("adapter") != layers.get("effective"):
        out.append(figures.get("layers-adapter", run, lambda: layer_figure(run, "adapter")))
    out.append(_measurements(run, figures))
    instruments = run.get("instruments") or {}
    if instruments:
        flat = {k: v for k, v in instruments.items() if not isinstance(v, (dict, list))}
        out.append('<h4>instruments</h4><p class="kv">' + "".join(
            f'<span>{_e(k.replace("_", " "))} <b class="{"nonfinite" if _is_nonfinite(v) else ""}">{_e(_fmt(v))}</b></span>'
            for k, v in flat.items()) + "</p>")
        if instruments.get("first_nonfinite"):
            out.append(f'<p class="nonfinite">first non-finite value: {_e(json.dumps(instruments["first_nonfinite"], default=str))}</p>')
        if instruments.get("interference_by_epoch"):
            out.append("<details><summary>interference by epoch</summary>"
                       + _table(instruments["interference_by_epoch"]) + "</details>")
    if trace.get("nonfinite"):
        out.append("<details><summary>non-finite events</summary>"
                   + _table([e for e in trace["nonfinite"] if isinstance(e, dict)]) + "</details>")
    for view in ("effective", "adapter"):
        rows = layers.get(view) or []
        if not rows or (view == "adapter" and layers.get("adapter") == layers.get("effective")):
            continue
        title = "per-layer change" + (" (adapter A/B tensors)" if view == "adapter" else "")
        out.append(f"<details><summary>{_e(title)} table</summary>"
                   + _table([{k: r.get(k) for k in LAYER_COLUMNS if k in r} for r in rows if isinstance(r, dict)])
                   + "</details>")
    out.append("</section>")
    return "".join(out)


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            '<link rel="icon" href="data:,">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")


def render_html(payload: dict, figure_cache: Path | None = None) -> str:
    """The whole report of one session as one self-contained HTML page; figures already drawn
    into `figure_cache` (a directory) are reused."""
    figures = FigureCache(figure_cache)
    tests = payload.get("tests") or []
    runs = payload.get("runs") or {}
    run_anchor = {run_id: _anchor("run", f"{i}-{run_id}") for i, run_id in enumerate(runs)}
    body = [_header(payload),
            '<nav><a href="#tests">tests</a><a href="#details">details</a><a href="#runs">runs</a></nav>',
            '<section id="tests"><h2>Tests</h2>', _summary(tests, payload.get("gate")), _tests_table(payload, run_anchor), "</section>",
            '<section id="details"><h2>Test details</h2>']
    shown = 0
    for i, test in enumerate(tests):
        if test.get("checks") or test.get("tables") or test.get("notes") or test.get("metrics") \
                or test.get("repeats") or test.get("expected") or test.get("outcome") in ("failed", "error"):
            body.append(_test_section(i, test, run_anchor))
            shown += 1
    if not shown:
        body.append('<p class="muted">No test added checks, tables, metrics or notes.</p>')
    body.append('</section><section id="runs"><h2>Runs</h2>')
    if runs:
        body.append("<ul>" + "".join(f'<li><a href="#{_e(run_anchor[r])}">{_e(r)}</a> — {_e(_run_title(run))}</li>'
                                     for r, run in runs.items()) + "</ul>")
    else:
        body.append('<p class="muted">No training runs.</p>')
    for run_id, run in runs.items():
        body.append(_run_section(run_id, run or {}, run_anchor[run_id], figures))
    body.append("</section><footer class=\"muted\"><p>Every figure here was measured in the run that wrote this report.</p></footer>")
    status, _ = session_status(payload)
    return _page(f"{status}: stance-harness report {report_id_of(payload) or ''}", "".join(body))


# -- the index of all runs -------------------------------------------------------------------

def _report_summaries(reports_dir: Path) -> list[dict]:
    entries = []
    for folder in Path(reports_dir).iterdir() if Path(reports_dir).is_dir() else []:
        path = folder / "report.json"
        if not folder.is_dir() or not path.is_file():
            continue
        entry = {"name": folder.name, "folder": folder, "payload": None, "error": None}
        try:
            entry["payload"] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
        entries.append(entry)

    def newest(entry):
        started = (entry["payload"] or {}).get("started") if isinstance(entry["payload"], dict) else None
        return (str(started or ""), entry["name"])

    return sorted(entries, key=newest, reverse=True)


def render_index(reports_dir) -> str:
    """A page listing every report under reports_dir, newest first."""
    reports_dir = Path(reports_dir)
    latest_file = reports_dir / "latest"
    latest = latest_file.read_text(encoding="utf-8").strip() if latest_file.is_file() else None
    entries = _report_summaries(reports_dir)
    head = ["report", "started", "model", "tests", "outcomes", "runs", "git"]
    rows = []
    for entry in entries:
        name, folder, payload = entry["name"], entry["folder"], entry["payload"]
        target = next((f for f in ("index.html", "report.md", "report.json") if (folder / f).is_file()), "report.json")
        mark = ' <span class="badge latest">latest</span>' if name == latest else ""
        link = f'<a href="{_e(name)}/{_e(target)}">{_e(name)}</a>{mark}'
        if not isinstance(payload, dict):
            rows.append(f'<tr><td class="mono">{link}</td><td colspan="{len(head) - 1}" class="nonfinite">'
                        f"unreadable report.json: {_e(entry['error'])}</td></tr>")
            continue
        prov = payload.get("provenance") or {}
        model = prov.get("model") or {}
        git = prov.get("git") or {}
        tests = payload.get("tests") or []
        counts = Counter(t.get("outcome") or "not run" for t in tests if isinstance(t, dict))
        outcomes = " ".join(f"{_badge(o)} {counts[o]}" for o in OUTCOMES if counts.get(o)) or "–"
        gate = payload.get("gate")
        if isinstance(gate, dict):  # a failed gate fails the session although its tests passed
            outcomes += (' <span class="badge o-passed">gate passed</span>' if gate.get("passed")
                         else ' <span class="badge s-failed">GATE FAILED</span>')
        commit = (git.get("commit") or "")[:10]
        rows.append("<tr>" + "".join([
            f'<td class="mono">{link}</td>',
            f"<td>{_e(payload.get('started'))}</td>",
            f"<td><code>{_e(model.get('id') or model.get('name'))}</code>"
            + (f" @{_e(str(model.get('revision'))[:12])}" if model.get("revision") else "") + "</td>",
            f'<td class="num">{len(tests)}</td>',
            f"<td>{outcomes}</td>",
            f'<td class="num">{len(payload.get("runs") or {})}</td>',
            f'<td class="mono">{_e(commit)}{" (dirty)" if git.get("dirty") else ""}</td>',
        ]) + "</tr>")
    if rows:
        table = ('<div class="wrap"><table class="runs"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head)
                 + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")
    else:
        table = '<p class="muted">No reports yet.</p>'
    body = (f"<h1>stance-harness reports</h1><p class=\"muted\">{len(entries)} report(s) in "
            f"<code>{_e(reports_dir.name)}/</code>, newest first.</p>{table}")
    return _page("stance-harness reports", body)


def write_html(run_dir, payload: dict) -> Path:
    path = Path(run_dir) / "index.html"
    atomic_write(path, render_html(payload))
    return path


def write_index(reports_dir) -> Path:
    path = Path(reports_dir) / "index.html"
    atomic_write(path, render_index(reports_dir))
    return path
