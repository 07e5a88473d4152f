"""The report's figures: matplotlib drawings of a payload's data, as inline PNGs.

Each figure function takes plain payload data and returns {"src": a data: URI, "alt", "caption"}
or None when there is nothing to draw. `FigureCache` keeps drawn figures on disk keyed by what they
show (the figure's kind and data, and FIGURES_VERSION, bumped when a drawing changes), so a figure
is drawn once: a later report of the same runs, or a rebuilt page, reuses it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import re
from pathlib import Path

from PIL import Image

from stance_harness.core.files import atomic_write

DPI = 90
FIGURES_VERSION = 6  # part of every cache key: bump it when a drawing changes
PNG_COLOURS = 128  # figures are stored as palette PNGs: a third of the bytes, no visible loss
VERDICT_COLOURS = {"supported": "#11612a", "refuted": "#b00020", "inconclusive": "#c98a00"}


def _figure_html(fig, alt: str, caption: str | None = None) -> dict:
    """The figure as an inline PNG (the name is historical: the page's template draws the tag)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    fig.clear()  # a bare Figure is not tracked by pyplot: dropping it frees it
    buffer.seek(0)
    palette = Image.open(buffer).convert("RGB").quantize(PNG_COLOURS, method=Image.Quantize.MEDIANCUT,
                                                         dither=Image.Dither.NONE)
    small = io.BytesIO()
    palette.save(small, format="PNG", optimize=True)
    return {"src": "data:image/png;base64," + base64.b64encode(small.getvalue()).decode("ascii"),
            "alt": alt, "caption": caption}


def png_bytes(figure: dict | None) -> bytes | None:
    """The PNG of a drawn figure (report.md links it as a file)."""
    if not figure:
        return None
    return base64.b64decode(figure["src"].split(",", 1)[1])


class FigureCache:
    """Drawn figures kept on disk by what they show: a run's figure is drawn once, and a later
    report of the same run (a warm re-run) reuses it. Drawing is most of a report's cost: about
    0.4 s a figure."""

    def __init__(self, directory: Path | None):
        self.directory = Path(directory) if directory is not None else None
        self.drawn = self.reused = 0  # what a report cost: the line after it is written says so

    @staticmethod
    def key(kind: str, data) -> str:
        blob = json.dumps([FIGURES_VERSION, kind, data], sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def get(self, kind: str, data, draw) -> dict | None:
        """The figure of `kind` showing `data` (all that `draw` reads): from the cache, or drawn."""
        if self.directory is None:
            self.drawn += 1
            return draw()
        path = self.directory / f"{self.key(kind, data)}.json"
        try:
            figure = json.loads(path.read_text(encoding="utf-8"))["figure"]
            self.reused += 1
            return figure
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self.drawn += 1
        figure = draw()
        try:
            atomic_write(path, json.dumps({"kind": kind, "figure": figure}))
        except OSError:
            pass  # a read-only reports directory only costs drawing again
        return figure


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


def is_nonfinite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


def plain_text(value, floatfmt: str = ".4g") -> str:
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


def _new_figure(width: float, height: float, **margins):
    """A bare Figure (not pyplot's, so nothing global) with fixed margins: constrained layout
    would cost a third of the drawing time, and these figures have known shapes."""
    # why: matplotlib takes about 0.6 s with numpy; pytest's start-up and the CLI import this module
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # its canvas: PNG output, and text measured where a margin depends on it
    fig.subplots_adjust(**{"left": 0.07, "right": 0.98, "bottom": 0.15, "top": 0.82, "wspace": 0.22, **margins})
    return fig


def _lr(run: dict):
    return (run.get("recipe") or {}).get("learning_rate")


def _stance_name(run: dict) -> str:
    stance = run.get("stance") or {}
    name = stance.get("name", "?")
    return f"{name} v{stance['version']}" if stance.get("version") else str(name)


def _run_title(run: dict) -> str:
    if run.get("label"):  # what sets this run apart from the session's others (report/html.py)
        return str(run["label"])
    lr = _lr(run)
    return (f"{run.get('method', '?')} · stance {_stance_name(run)}"
            + (f" · lr {plain_text(lr, '.3g')}" if lr is not None else ""))


def _steps_of(entries) -> list[int]:
    steps = []
    for entry in entries or []:
        step = entry.get("step") if isinstance(entry, dict) else entry
        if isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step):
            steps.append(int(step))
    return steps



def _seeds_of(runs) -> list[dict]:
    """A configuration's seeds (runs differing only in the recipe's seed) from one run or a list."""
    return [r for r in (runs if isinstance(runs, (list, tuple)) else [runs]) if isinstance(r, dict)]


def _seed_name(run: dict, i: int) -> str:
    seed = (run.get("recipe") or {}).get("seed")
    return f"seed {seed if seed is not None else i}"


def _spread(per_seed: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Per position (layer): the mean, min and max over the seeds' finite values (NaN: none)."""
    means, lows, highs = [], [], []
    for values in zip(*per_seed):
        finite = [v for v in values if math.isfinite(v)]
        means.append(sum(finite) / len(finite) if finite else math.nan)
        lows.append(min(finite) if finite else math.nan)
        highs.append(max(finite) if finite else math.nan)
    return means, lows, highs


def _whiskers(ax, positions, means, lows, highs) -> None:
    """The seeds' spread (min to max) around a bar of their mean."""
    shown = [(x, m, lo, hi) for x, m, lo, hi in zip(positions, means, lows, highs) if math.isfinite(m)]
    if shown:
        ax.errorbar([x for x, *_ in shown], [m for _, m, _, _ in shown],
                    yerr=[[max(0.0, m - lo) for _, m, lo, _ in shown], [max(0.0, hi - m) for _, m, _, hi in shown]],
                    fmt="none", ecolor="#1d232a", elinewidth=0.8, capsize=1.5)


def _seeds_note(seeds: list[dict]) -> str:
    return f" (mean of {len(seeds)} seeds, whiskers: min–max)" if len(seeds) > 1 else ""


def _seeds_count(seeds: list, run: dict) -> str:
    """", N seeds" for several seeds, unless the configuration's label already says so."""
    count = f"{len(seeds)} seeds"
    return f", {count}" if len(seeds) > 1 and count not in _run_title(run) else ""



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


def layer_figure(run, view: str = "effective") -> dict | None:
    """Per-layer change (mean |Δ|, relative change) as bars; for a configuration's seeds (a list of
    runs) the bars are their mean, with whiskers from the lowest seed to the highest."""
    seeds = _seeds_of(run)
    per_seed = [{str(r.get("layer")): r for r in ((s.get("layers") or {}).get(view) or []) if isinstance(r, dict)}
                for s in seeds]
    rows = list({label: row for rows in per_seed for label, row in rows.items()}.values())
    if not rows:
        return None
    run = seeds[0]
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
        values = [[_float(s[lab].get(key)) if lab in s else math.nan for lab in labels] for s in per_seed]
        means, lows, highs = _spread(values)
        heights = [v if math.isfinite(v) else 0.0 for v in means]
        ax.bar(positions, heights, color=colour, width=0.8)
        if len(seeds) > 1:
            _whiskers(ax, positions, means, lows, highs)
        bad = [i for i, lab in enumerate(labels)
               if any(lab in s and (not math.isfinite(v[i]) or _float(s[lab].get("nonfinite")) > 0)
                      for s, v in zip(per_seed, values))]
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
                 + _seeds_note(seeds) + f"\n{_run_title(run)}", fontsize=10)
    notes = []
    if len(labels) > len(rows):
        notes.append("grey labels: layers this run did not change" if len(seeds) == 1
                     else "grey labels: layers no seed changed")
    if nonfinite_layers:
        notes.append("red ×: non-finite values in " + ", ".join(lab for lab in labels if lab in nonfinite_layers))
    return _figure_html(fig, f"weight change across layers, {view} view, {_run_title(run)}{_seeds_count(seeds, run)}",
                        "; ".join(notes) or None)


def curves_figure(run) -> dict | None:
    """Loss and grad norm against the step; a configuration's seeds one line each."""
    seeds = _seeds_of(run)
    traces = [s.get("trace") or {} for s in seeds]
    if not any(t.get("loss") or t.get("grad_norm") for t in traces):
        return None
    run = seeds[0]
    several = len(seeds) > 1
    fig = _new_figure(9.0, 2.9, bottom=0.17, left=0.07)
    axes = fig.subplots(1, 2)
    parts = []
    for j, (seed_run, trace) in enumerate(zip(seeds, traces)):
        name = _seed_name(seed_run, j)
        loss = [_float(v) for v in trace.get("loss") or []]
        grad = [_float(v) for v in trace.get("grad_norm") or []]
        nonfinite = sorted(set(_steps_of(trace.get("nonfinite"))))
        skipped = sorted(set(_steps_of(trace.get("skipped_steps"))))
        halted = trace.get("halted_at")
        halted = int(halted) if isinstance(halted, (int, float)) and not isinstance(halted, bool) else None
        for ax, (values, label, colour) in zip(axes, ((loss, "loss", "#3b6fb6"),
                                                      (grad, "grad norm (before clipping)", "#2e8b57"))):
            colour = f"C{j % 10}" if several else colour
            steps = list(range(len(values)))
            ax.plot(steps, values, "-o", color=colour, markersize=1.5 if several else 2.5,
                    linewidth=1.0 if several else 1.2, label=name if several else label)
            bad = sorted(set(nonfinite) | {i for i, v in enumerate(values) if not math.isfinite(v)})
            if bad:
                ax.plot(bad, [0.04] * len(bad), "x", color="#b00020", markersize=8, mew=2,
                        transform=ax.get_xaxis_transform(), clip_on=False,
                        label=f"non-finite ({name})" if several else "non-finite")
            for k, step in enumerate(skipped):
                ax.axvline(step, color="#8a8f95", linestyle=":", linewidth=1.2,
                           label=("skipped step" + (f" ({name})" if several else "")) if k == 0 else None)
            if halted is not None:
                ax.axvline(halted, color="#b00020", linestyle="--", linewidth=1.4,
                           label=f"halted at {halted}" + (f" ({name})" if several else ""))
        prefix = f"{name}: " if several else ""
        if nonfinite:
            parts.append(f"{prefix}non-finite at step(s) {', '.join(map(str, nonfinite[:20]))}"
                         f"{' …' if len(nonfinite) > 20 else ''}")
        if skipped:
            parts.append(f"{prefix}{len(skipped)} skipped step(s)")
        if halted is not None:
            parts.append(f"{prefix}halted at step {halted}: {trace.get('halt_reason') or ''}")
    for ax, key, label in zip(axes, ("loss", "grad_norm"), ("loss", "grad norm (before clipping)")):
        finite = [v for t in traces for v in map(_float, t.get(key) or []) if math.isfinite(v)]
        if key == "grad_norm" and finite and min(finite) > 0 and max(finite) / min(finite) > 100:
            ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        longest = max(len(t.get(key) or []) for t in traces)
        if longest <= 1:
            ax.set_xlim(-1, max(1, longest))
        ax.legend(fontsize=6 if several else 7, loc="best")
    fig.suptitle(f"loss and grad norm{_seeds_count(seeds, run)} — {_run_title(run)}", fontsize=10)
    return _figure_html(fig, f"loss and grad norm curves, {_run_title(run)}{_seeds_count(seeds, run)}",
                        "; ".join(parts) or None)


def reliability_figure(calibration, title: str = "", seeds: list[str] | None = None) -> dict | None:
    """Accuracy against confidence per bin, base and adapted. For a configuration's seeds
    (`calibration` a list, `seeds` their names) each seed is a line, the titles the mean ECE."""
    several = isinstance(calibration, (list, tuple)) and len(calibration) > 1
    cals = [c for c in (calibration if isinstance(calibration, (list, tuple)) else [calibration]) if isinstance(c, dict)]
    if not several and cals:
        return _reliability_one(cals[0], title)
    names = [n for n in ("base", "adapted") if any(isinstance(c.get(n), dict) for c in cals)]
    if not names:
        return None
    seeds = list(seeds or [f"seed {i}" for i in range(len(cals))])
    fig = _new_figure(3.6 * len(names) + 1.4, 3.6, left=0.1 if len(names) > 1 else 0.16, right=0.8, bottom=0.13,
                      top=0.84, wspace=0.3)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        ax.plot([0, 1], [0, 1], "--", color="#777", linewidth=1, label="perfect calibration")
        eces = []
        for j, (seed, cal) in enumerate(zip(seeds, cals)):
            cal = cal.get(name) if isinstance(cal.get(name), dict) else {}
            points = [((_float(b.get("lower")) + _float(b.get("upper"))) / 2, _float(b.get("accuracy")))
                      for b in cal.get("bins") or [] if isinstance(b, dict)]
            points = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], "-o", color=f"C{j % 10}", markersize=2.5,
                        linewidth=1.0, label=seed)
            if math.isfinite(_float(cal.get("ece"))):
                eces.append(_float(cal.get("ece")))
        _reliability_axes(ax, "confidence (bin centre)")
        ece = (f"{sum(eces) / len(eces):.3f} (seeds {min(eces):.3f}–{max(eces):.3f})" if eces else "n/a")
        ax.set_title(f"{name}: ECE {ece}", fontsize=8)
    axes[-1].legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False)
    count = _seeds_count(cals, {"label": title})
    fig.suptitle(f"reliability{count}" + (f" — {title}" if title else ""), fontsize=10)
    return _figure_html(fig, f"reliability diagram, {title}{count}")


def _reliability_axes(ax, xlabel: str) -> None:
    """A reliability diagram's square unit axes."""
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("accuracy", fontsize=8)
    ax.tick_params(labelsize=7)


def _reliability_one(calibration: dict, title: str = "") -> dict | None:
    panels = [(name, calibration.get(name)) for name in ("base", "adapted") if isinstance(calibration.get(name), dict)]
    if not panels:
        return None
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
        _reliability_axes(ax, "confidence")
        ece = plain_text(_float(cal.get("ece")), ".3f") if cal.get("ece") is not None else "n/a"
        ax.set_title(f"{name}: ECE {ece} (n={plain_text(cal.get('n'))})", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(f"reliability — {title}", fontsize=10)
    return _figure_html(fig, f"reliability diagram, {title}")


def _where_panels(run: dict) -> tuple[list[str], dict[str, dict[str, float]]]:
    """A run's layers and, per panel of the where figure, its value per layer."""
    measurements = run.get("measurements") or {}
    geometry = measurements.get("geometry") if isinstance(measurements.get("geometry"), dict) else {}
    localization = measurements.get("localization") if isinstance(measurements.get("localization"), dict) else {}
    layers = [r for r in geometry.get("layers") or [] if isinstance(r, dict)]
    retained = {r.get("set"): _float(r.get("retained")) for r in localization.get("rows") or []
                if isinstance(r, dict) and r.get("by") == "layer"}
    labels = [str(r.get("layer")) for r in layers] or list(retained)
    by_label = {str(r.get("layer")): r for r in layers}
    panels: dict[str, dict[str, float]] = {}
    if layers:
        panels["where the weights changed: share of ΔW"] = {lab: _float(by_label[lab].get("change_share")) for lab in labels}
        panels["where the representation moved: 1 − CKA"] = {lab: 1 - _float(by_label[lab].get("cka")) for lab in labels}
        panels["intruder dimensions"] = {lab: _float(by_label[lab].get("intruders")) for lab in labels}
    if retained:
        panels["where the behaviour lives: shift retained, this layer alone"] = {lab: retained.get(lab, math.nan)
                                                                                for lab in labels}
    return labels, panels


WHERE_COLOURS = {"where the weights changed: share of ΔW": "#3b6fb6",
                 "where the representation moved: 1 − CKA": "#2e8b57", "intruder dimensions": "#8a4fb0",
                 "where the behaviour lives: shift retained, this layer alone": "#d07a1f"}


def where_figure(run) -> dict | None:
    """Where the weights changed (each layer's share of the change, 1 − CKA of its hidden
    states, intruders) beside where the behaviour lives (the shift retained keeping that layer alone).
    For a configuration's seeds: the mean per layer, whiskers from the lowest seed to the highest."""
    seeds = _seeds_of(run)
    per_seed = [_where_panels(s) for s in seeds]
    labels = list(dict.fromkeys(lab for lab_list, _ in per_seed for lab in lab_list))
    if not labels:
        return None
    run = seeds[0]
    titles = [t for t in WHERE_COLOURS if any(t in panels for _, panels in per_seed)]
    fig = _new_figure(max(7.0, min(12.0, 2.5 + 0.3 * len(labels))), 1.9 * len(titles) + 0.8, bottom=0.1, top=0.9,
                      hspace=0.55)
    axes = fig.subplots(len(titles), 1, squeeze=False)[:, 0]
    for ax, title in zip(axes, titles):
        values = [[panels.get(title, {}).get(lab, math.nan) for lab in labels] for _, panels in per_seed]
        means, lows, highs = _spread(values)
        heights = [v if math.isfinite(v) else 0.0 for v in means]
        ax.bar(range(len(labels)), heights, color=WHERE_COLOURS[title], width=0.8)
        if len(seeds) > 1:
            _whiskers(ax, range(len(labels)), means, lows, highs)
        top = max([h for h in highs if math.isfinite(h)] + heights)
        if min(heights) >= 0 and not any(lo < 0 for lo in lows if math.isfinite(lo)):
            ax.set_ylim(0, top * 1.08 if top > 0 else 1.0)  # all zero: say 0, not ±0.04
        ax.set_title(title + (" (none)" if max(map(abs, heights)) == 0 else ""), fontsize=9)
        ax.set_xticks(list(range(len(labels))))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xlim(-0.7, len(labels) - 0.3)
    fig.suptitle(f"where the weights changed, where the behaviour lives — {_run_title(run)}"
                 + (f"\n{_seeds_note(seeds).strip()}" if len(seeds) > 1 else ""), fontsize=10)
    return _figure_html(fig, f"where the weights changed beside where the behaviour lives, {_run_title(run)}"
                        f"{_seeds_count(seeds, run)}")


def _dose_rows(run: dict) -> list[dict]:
    dose = (run.get("measurements") or {}).get("dose_response")
    return [r for r in (dose or {}).get("rows") or [] if isinstance(r, dict)] if isinstance(dose, dict) else []


def dose_figure(run) -> dict | None:
    """Shift (with its interval) and forgetting against the dose λ that scales the whole change;
    a configuration's seeds one line (and band) each."""
    seeds = [(s, _dose_rows(s)) for s in _seeds_of(run)]
    seeds = [(s, rows) for s, rows in seeds if rows]
    if not seeds:
        return None
    several = len(seeds) > 1
    run = seeds[0][0]
    fig = _new_figure(9.0, 3.0, bottom=0.17, left=0.08, wspace=0.28)
    shift_ax, forget_ax = fig.subplots(1, 2)
    for j, (seed_run, rows) in enumerate(seeds):
        x = [_float(r.get("dose")) for r in rows]
        name = _seed_name(seed_run, j)
        shift_colour, forget_colour = (f"C{j % 10}", f"C{j % 10}") if several else ("#3b6fb6", "#b0413e")
        shift_ax.fill_between(x, [_float(r.get("low")) for r in rows], [_float(r.get("high")) for r in rows],
                              color=shift_colour, alpha=0.08 if several else 0.2,
                              label=None if several else "95% interval")
        shift_ax.plot(x, [_float(r.get("shift")) for r in rows], "-o", color=shift_colour, markersize=3,
                      label=name if several else "shift (loglik margin)")
        forget_ax.plot(x, [_float(r.get("forgetting")) for r in rows], "-o", color=forget_colour, markersize=3,
                       label=name if several else "forgetting (perplexity increase)")
    shift_ax.axhline(0, color="#777", linewidth=0.8)
    for ax, title in ((shift_ax, "behaviour shift" + (" (bands: 95% intervals)" if several else "")),
                      (forget_ax, "forgetting (perplexity increase)" if several else "forgetting")):
        ax.axvline(1, color="#999", linestyle=":", linewidth=1)
        ax.set_xlabel("dose λ (ΔW scaled; −1: subtracted)", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6 if several else 7, loc="best")
    fig.suptitle(f"dose-response{_seeds_count(seeds, run)} — {_run_title(run)}", fontsize=10)
    return _figure_html(fig, f"dose-response: shift and forgetting against λ, {_run_title(run)}"
                        f"{_seeds_count(seeds, run)}")



def forest_figure(rows: list[dict]) -> dict | None:
    """Every claim's effect with its interval against its margin, coloured by verdict, grouped by
    suite file: the page's one picture of what the session found."""
    rows = [r for r in rows if r.get("estimate") is not None and math.isfinite(r["estimate"])]
    if not rows:
        return None
    suites = list(dict.fromkeys(r["suite"] for r in rows))
    lines: list[tuple[str, dict | None]] = []
    for suite in suites:
        lines.append((suite, None))
        lines += [("", r) for r in rows if r["suite"] == suite]
    height = 0.8 + 0.21 * len(lines)
    fig = _new_figure(11.0, height, left=0.42, right=0.97, bottom=0.45 / height + 0.02, top=1 - 0.32 / height)
    ax = fig.subplots()
    y = len(lines)
    labels, ticks = [], []
    for title, row in lines:
        y -= 1
        ticks.append(y)
        if row is None:
            labels.append(title)
            continue
        name = row["hypothesis"]
        labels.append("   " + (name if len(name) <= 60 else name[:59] + "…"))
        colour = VERDICT_COLOURS.get(row.get("verdict"), "#5b6570")
        low, high = row.get("low"), row.get("high")
        if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
            ax.plot([low, high], [y, y], "-", color=colour, linewidth=2.2, solid_capstyle="butt")
        ax.plot([row["estimate"]], [y], "o", color=colour, markersize=5)
        margin = row.get("margin")
        if margin is not None and math.isfinite(margin):
            ax.plot([margin, margin], [y - 0.38, y + 0.38], "-", color="#1d232a", linewidth=1.6)
    ax.axvline(0, color="#999", linewidth=0.8, linestyle=":")
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=8)
    for tick, (_title, row) in zip(ax.get_yticklabels(), lines):
        if row is None:
            tick.set_fontweight("bold")
    ax.set_ylim(-0.7, len(lines) - 0.3)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel("effect (each claim in its own metric's units); bar: interval, |: margin", fontsize=8)
    for verdict, colour in VERDICT_COLOURS.items():
        ax.plot([], [], "o-", color=colour, label=verdict)
    ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, frameon=False, borderaxespad=0.2)
    return _figure_html(fig, "forest plot: every claim's effect and interval against its margin, by verdict",
                        "one row per claim; the unit and the number of units are in the findings table")


def layers_comparison_figure(runs: list[dict], key: str = "rel_change", width: float | None = None,
                             title: str = "") -> dict | None:
    """Per-layer change of several runs on one figure: a heatmap of runs × layers (seed 001's
    comparative view; full fine-tuning beside LoRA, domain beside domain, rate beside rate). The
    colour scale is logarithmic when the values span more than two orders of magnitude (full
    fine-tuning moves each weight far less than an adapter's merged change)."""
    drawn = []
    for run in runs:
        rows = [r for r in (run.get("layers") or {}).get("effective") or [] if isinstance(r, dict)]
        if rows:
            drawn.append((run, {str(r.get("layer")): _float(r.get(key)) for r in rows}))
    if len(drawn) < 2:
        return None
    labels: list[str] = []
    for run, values in drawn:
        for label in _layer_order([{"layer": k} for k in values], (run.get("model") or {}).get("num_layers")):
            if label not in labels:
                labels.append(label)
    grid = [[values.get(label, math.nan) for label in labels] for _, values in drawn]
    height = 1.3 + 0.24 * len(drawn)
    width = width or max(7.0, min(12.0, 3.5 + 0.3 * len(labels)))
    fig = _new_figure(width, height, left=0.3, right=0.9,
                      bottom=0.55 / height + 0.05, top=1 - 0.45 / height)
    ax = fig.subplots()
    # why: as in _new_figure
    import numpy as np
    from matplotlib.colors import LogNorm

    data = np.ma.masked_invalid(np.array(grid, dtype=float))
    positive = data[data > 0].compressed() if data.count() else np.array([])
    logarithmic = positive.size > 0 and positive.max() / positive.min() > 100 and not (data < 0).any()
    if logarithmic:
        data = np.ma.masked_less_equal(data, 0)
    image = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest",
                      norm=LogNorm() if logarithmic else None)
    ax.set_yticks(range(len(drawn)))
    ax.set_yticklabels([_run_title(run) for run, _ in drawn], fontsize=7)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=6 if len(labels) > 20 else 7)
    renderer = fig.canvas.get_renderer()  # the run labels' real width sets the left margin
    widest = max(t.get_window_extent(renderer).width for t in ax.get_yticklabels()) / fig.dpi
    fig.subplots_adjust(left=min(0.6, (1.12 * widest + 0.15) / width))  # hinting at DPI draws text wider
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.01)
    bar.ax.tick_params(labelsize=7)
    what = "relative change ‖Δ‖/‖W‖" if key == "rel_change" else key
    fig.suptitle(f"per-layer change across runs{' — ' + title if title else ''}\n({what}"
                 f"{', log colour scale' if logarithmic else ''}; blank: not changed)", fontsize=9)
    return _figure_html(fig, f"per-layer {key} of {len(drawn)} runs on one heatmap {title}".strip(),
                        "colours on a log scale: the runs' changes span more than two orders of magnitude"
                        if logarithmic else None)


def loss_comparison_figure(runs: list[dict], title: str = "", width: float = 9.0) -> dict | None:
    """The loss curves of several runs on one axis (seed 004's schedules side by side)."""
    curves = [(run, [_float(v) for v in (run.get("trace") or {}).get("loss") or []]) for run in runs]
    curves = [(run, loss) for run, loss in curves if loss]
    if len(curves) < 2:
        return None
    columns = 2 if width >= 8 or max(len(_run_title(run)) for run, _ in curves) <= 36 else 1
    rows = (len(curves) + columns - 1) // columns  # the legend below the axis
    height = 3.0 + 0.16 * rows
    fig = _new_figure(width, height, bottom=(0.75 + 0.16 * rows) / height, left=0.09, right=0.98,
                      top=1 - 0.4 / height)
    ax = fig.subplots()
    for run, loss in curves:
        ax.plot(range(len(loss)), loss, "-", linewidth=1.2, label=_run_title(run))
    ax.set_xlabel("optimizer step", fontsize=8)
    ax.set_ylabel("loss", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.45 / (height - 1.2)), ncol=columns,
              frameon=False)
    fig.suptitle(f"loss curves on one axis{' — ' + title if title else ''}", fontsize=10)
    return _figure_html(fig, f"loss curves of {len(curves)} runs on one axis {title}".strip())


def dose_comparison_figure(runs: list[dict]) -> dict | None:
    """The dose-response curves (shift against λ, with intervals) of several runs on one axis."""
    curves = []
    for run in runs:
        dose = (run.get("measurements") or {}).get("dose_response")
        rows = [r for r in (dose or {}).get("rows") or [] if isinstance(r, dict)] if isinstance(dose, dict) else []
        if rows:
            curves.append((run, rows))
    if len(curves) < 2:
        return None
    fig = _new_figure(9.0, 3.4, bottom=0.15, left=0.08, right=0.7)
    ax = fig.subplots()
    for run, rows in curves:
        x = [_float(r.get("dose")) for r in rows]
        line, = ax.plot(x, [_float(r.get("shift")) for r in rows], "-o", markersize=3, label=_run_title(run))
        ax.fill_between(x, [_float(r.get("low")) for r in rows], [_float(r.get("high")) for r in rows],
                        color=line.get_color(), alpha=0.12)
    ax.axhline(0, color="#777", linewidth=0.8)
    ax.axvline(1, color="#999", linestyle=":", linewidth=1)
    ax.set_xlabel("dose λ (ΔW scaled; −1: subtracted)", fontsize=8)
    ax.set_ylabel("behaviour shift", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
    fig.suptitle("dose-response of several runs on one axis (bands: 95% intervals)", fontsize=10)
    return _figure_html(fig, f"dose-response curves of {len(curves)} runs on one axis")
