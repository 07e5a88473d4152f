"""reports/<report-id>/index.html, the page of one session; runs/<run>.html, each run's detail;
and reports/index.html, the list of every report.

The pages are Jinja2 templates (stance_harness/report/templates/) with autoescaping on: every value
from the payload goes through it, and this module only shapes data (no markup). The CSS is a
file inlined into each page; figures are PNGs in `data:` URIs (report/figures.py); there is no
JavaScript and nothing outside the page is fetched.

The session's page opens with the findings (below the status and the gate's banner): one row per
claim, the forest plot, what changed since the previous report. Every run's figures and tables
are on its own page, linked from a collapsed summary (its replies and general ability included),
so the page stays a few screens long however many runs a session trained.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

import jinja2

from stance_harness.core.files import atomic_write
from stance_harness.report import figures as figs
from stance_harness.report.findings import corrected_text, findings, fmt_number, interval_text, suite_of, units_text
from stance_harness.report.model import normalized
from stance_harness.report.sections import (LAYER_COLUMNS, OUTCOME_MARK, baseline_text, clean_message, configuration_labels,
                       configurations, gate_rows, gate_rules, human, measurement_tables, origin_text, reply_order,
                       report_id_of, run_labels, seedless, session_status)

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "not run")
TEMPLATES = Path(__file__).with_name("templates")
REPLIES_SHOWN = 5  # replies open in a run's summary; the rest are collapsed
REPLY_CHARS = 240  # a reply longer than this is cut, its length said
HYPOTHESIS_CHARS = 150  # a finding's hypothesis shown in the table; the whole in its tooltip
COMPARE_WIDTH = 6.2  # inches: two comparative figures side by side across the page

# the figure functions, here as well for callers (and tests) that know them by this module
layer_figure, curves_figure, reliability_figure = figs.layer_figure, figs.curves_figure, figs.reliability_figure
where_figure, dose_figure, FigureCache = figs.where_figure, figs.dose_figure, figs.FigureCache


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = figs.plain_text
    env.filters["slug"] = _slug
    env.globals["OUTCOME_MARK"] = OUTCOME_MARK
    return env


# -- values as text (figs.plain_text and figs.is_nonfinite serve the page and the figures alike) ---

def _slug(value) -> str:
    return re.sub(r"[^a-z]+", "-", str(value or "not run").lower()).strip("-")


def _anchor(prefix: str, name) -> str:
    return prefix + "-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip("-")


def table(rows, caption: str | None = None, css: str = "") -> dict:
    """A table from dicts (columns: the union of keys, first seen first), each cell as
    {text, cls}: numbers right-aligned, non-finite values red, sizes and times in human units."""
    rows = [r for r in rows or [] if isinstance(r, dict)]
    columns: list[str] = []
    for row in rows:
        columns += [str(k) for k in row if str(k) not in columns]
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            shown = human(value, column)
            cls = "num nonfinite" if figs.is_nonfinite(value) else (
                "num" if isinstance(value, (int, float)) and not isinstance(value, bool) else "")
            cells.append({"text": figs.plain_text(shown), "cls": cls})
        body.append(cells)
    return {"columns": columns, "rows": body, "caption": caption, "css": css}


# -- the session's page ----------------------------------------------------------------------

def _header(payload: dict) -> dict:
    prov = payload["provenance"]
    model = prov.get("model") or {}
    git = prov.get("git") or {}
    env = prov.get("environment") or {}
    items = [("started", f"{payload.get('started')}, finished {payload.get('finished')}"),
             ("model", f"{model.get('name')} — id {model.get('id')}, revision {model.get('revision')}"
                       + "".join(f", {k} {figs.plain_text(model.get(k))}" for k in ("model_type", "num_layers", "dtype", "device")
                                 if model.get(k) is not None))]
    others = [m for m in prov.get("models") or [] if isinstance(m, dict) and m.get("id") != model.get("id")]
    if others:
        items.append(("other models", ", ".join(f"{m.get('id')}@{m.get('revision')}" for m in others)))
    if prov.get("model_args"):
        items.append(("model args", json.dumps(prov["model_args"], default=str)))
    if prov.get("stances"):
        items.append(("stances", ", ".join(f"{s.get('name')} v{s.get('version')}" + (
            f" ({s.get('examples')} examples)" if s.get("examples") else "") for s in prov["stances"] if isinstance(s, dict))))
    items += [("git", f"{git.get('commit')}" + (f" on {git.get('branch')}" if git.get("branch") else "")
                      + (" (dirty)" if git.get("dirty") else "")),
              ("libraries", ", ".join(f"{k} {v}" for k, v in (env.get("libraries") or {}).items())),
              ("machine", ", ".join(f"{k} {figs.plain_text(v)}" for k, v in (env.get("machine") or {}).items() if v not in (None, ""))),
              ("command", "pytest " + " ".join(str(a) for a in prov.get("args") or []))]
    return {"items": items}


def _gate(gate) -> dict | None:
    if not isinstance(gate, dict):
        return None
    failed = gate_rows(gate, failed_only=True)
    every = gate_rows(gate)
    notes = [f"only in the baseline (missing now): {t}" for t in gate.get("only_baseline") or []]
    notes += [f"only now (no baseline): {t}" for t in gate.get("only_now") or []] + list(gate.get("notes") or [])
    return {"passed": bool(gate.get("passed")), "baseline": baseline_text(gate.get("baseline")),
            "error": gate.get("error"), "summary": gate.get("summary"), "rules": gate_rules(gate),
            "regressions": table(failed, "regressions", "regressions") if failed else None,
            "every": table(every) if every and len(every) > len(failed) else None, "n_every": len(every),
            "notes": notes}


def _finding_rows(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        hypothesis = row["hypothesis"]
        label = row.get("label")
        out.append({**row, "estimate_text": fmt_number(row["estimate"]), "interval_text": interval_text(row),
                    "margin_text": fmt_number(row["margin"]), "units_text": units_text(row),
                    "corrected_text": corrected_text(row), "anchor": _anchor("test", row["test"]),
                    "hypothesis_short": hypothesis if len(hypothesis) <= HYPOTHESIS_CHARS
                    else hypothesis[: HYPOTHESIS_CHARS - 1].rstrip() + "…",
                    # "run-level (one seed per arm): a claim about two runs, ..." -> "run-level"; whole in the tooltip
                    "label_short": str(label).split(" (", 1)[0].split(":", 1)[0] if label else None})
    return out


FINDINGS_OPEN = 10  # claims open in the findings table, so the forest plot below it is on the first screen


def _split_findings(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(open, folded) in test order. Open: every claim that changed since the last report or whose
    test failed, errored or passed unexpectedly; then, up to FINDINGS_OPEN, the claims not
    supported, then those supported with an effect. Folded: the rest (the forest plot shows every
    claim with an effect), supported claims with no effect to estimate last of all."""
    def rank(row):
        if row.get("change") or row.get("outcome") in ("failed", "error", "xpassed"):
            return 0
        if row["verdict"] != "supported":
            return 1
        return 2 if row["estimate"] is not None else 3
    order = sorted(range(len(rows)), key=lambda i: (rank(rows[i]), i))
    chosen = {i for n, i in enumerate(order) if rank(rows[i]) == 0 or (n < FINDINGS_OPEN and rank(rows[i]) < 3)}
    return [r for i, r in enumerate(rows) if i in chosen], [r for i, r in enumerate(rows) if i not in chosen]


def _test_runs(run_ids: list, run_links: dict) -> list[dict]:
    """A test's runs as links: a run to its page; the seeds of a configuration as one link to the
    configuration's page, saying which seeds when the test used only some."""
    out: list[dict] = []
    configs: dict[str, dict] = {}
    for run_id in run_ids:
        link = run_links.get(run_id, {"id": run_id, "label": run_id, "href": None})
        config = link.get("config")
        if config is None:
            out.append(link)
        elif config["href"] in configs:
            configs[config["href"]]["seeds"].append(link["seed"])
        else:
            configs[config["href"]] = {"id": config["id"], "href": config["href"], "config": config,
                                       "seeds": [link["seed"]]}
            out.append(configs[config["href"]])
    for item in configs.values():
        config, seeds = item.pop("config"), item["seeds"]
        item["label"] = config["label"] if len(seeds) == len(config["seeds"]) else (
            f"{config['apart']} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(figs.plain_text, seeds))} "
            f"of {len(config['seeds'])})")
    return out


def _test_entry(test: dict, run_links: dict) -> dict:
    checks = []
    for check in test.get("checks") or []:
        headers = check.get("headers") or []
        rows = [dict(zip(headers or [str(j) for j in range(len(r))], r)) if isinstance(r, (list, tuple)) else r
                for r in check.get("rows") or []]
        checks.append({"passed": bool(check.get("passed")), "name": check.get("check"), "summary": check.get("summary"),
                       "verdict": check.get("verdict"), "table": table(rows) if rows else None})
    repeats = test.get("repeats") if isinstance(test.get("repeats"), dict) else None
    expected = test.get("expected") if isinstance(test.get("expected"), dict) else {}
    return {
        "nodeid": test["nodeid"], "anchor": _anchor("test", test["nodeid"]), "outcome": test.get("outcome") or "not run",
        "runs": _test_runs(test.get("runs") or [], run_links), "n_runs": len(test.get("runs") or []),
        "checks_text": (f"{sum(c['passed'] for c in checks)}/{len(checks)}" if checks else "–"),
        "expected": expected.get("outcome"), "reason": expected.get("reason"), "verdict": test.get("verdict"),
        "duration": human(test.get("duration"), "duration") if isinstance(test.get("duration"), (int, float)) else None,
        "message": clean_message(test.get("message")), "notes": test.get("notes") or [], "checks": checks,
        "metrics": table([{"metric": k, "value": v} for k, v in (test.get("metrics") or {}).items()])
        if test.get("metrics") else None,
        "repeats": repeats, "repeats_table": table(
            [{"metric": k, **{s: (v or {}).get(s) for s in ("mean", "std", "min", "max", "n")}}
             for k, v in (repeats or {}).get("metrics", {}).items()]) if repeats and repeats.get("metrics") else None,
        "tables": [{"title": t.get("title"), "table": table(t.get("rows"))} for t in test.get("tables") or []
                   if isinstance(t, dict)],
        "detailed": bool(test.get("checks") or test.get("tables") or test.get("notes") or test.get("metrics")
                         or repeats or test.get("expected") or test.get("outcome") in ("failed", "error")),
    }


def _cut(text, limit: int = REPLY_CHARS) -> dict:
    text = "" if text is None else str(text).strip()  # a reply's leading newlines would show as blank lines
    return {"text": text if len(text) <= limit else text[:limit] + "…", "cut": len(text) > limit,
            "length": len(text)}


def replies_view(run: dict) -> dict | None:
    """A run's replies, the probes that moved most first (issue 31): shown and collapsed rows."""
    replies = (run.get("measurements") or {}).get("replies")
    rows = replies.get("rows") if isinstance(replies, dict) else replies
    rows = [r for r in rows or [] if isinstance(r, dict)]
    if not rows:
        return None
    ordered = reply_order(rows)
    shaped = [{"probe": _cut(r.get("probe"), 160), "base": _cut(r.get("base_reply")),
               "adapted": _cut(r.get("adapted_reply")), "base_marker": r.get("base_marker"),
               "adapted_marker": r.get("adapted_marker"), "margin_change": fmt_number(r.get("margin_change")),
               "changed": bool(r.get("changed"))} for r in ordered]
    return {"shown": shaped[:REPLIES_SHOWN], "rest": shaped[REPLIES_SHOWN:], "n": len(shaped),
            "changed": sum(1 for r in shaped if r["changed"])}


def ability_view(run: dict) -> dict | None:
    """A run's general-ability summary: families, backward transfer, pattern, regressions."""
    ability = (run.get("measurements") or {}).get("general_ability")
    if not isinstance(ability, dict) or not ability:
        return None
    families = [{"family": name, "probes": f.get("probes"), "base": human(f.get("base_accuracy"), "accuracy"),
                 "adapted": human(f.get("adapted_accuracy"), "accuracy"),
                 "retention": human(f.get("retention"), "retention")}
                for name, f in (ability.get("families") or {}).items() if isinstance(f, dict)]
    regressions = [{"id": r.get("id"), "family": r.get("family"), "prompt": _cut(r.get("prompt"), 160),
                    "base": _cut(r.get("base_reply")), "adapted": _cut(r.get("adapted_reply")),
                    "why": r.get("adapted_why")} for r in ability.get("regressions") or [] if isinstance(r, dict)]
    return {"probeset": ability.get("probeset"), "probes": ability.get("probes"),
            "base": human(ability.get("base_accuracy"), "accuracy"),
            "adapted": human(ability.get("adapted_accuracy"), "accuracy"),
            "backward_transfer": fmt_number(ability.get("backward_transfer")),
            "selectivity": fmt_number(ability.get("selectivity")), "pattern": ability.get("pattern"),
            "families": table(families), "regressions": regressions, "gains": len(ability.get("gains") or [])}


def _run_facts(run: dict) -> list[str]:
    counts, trace = run["counts"], run["trace"]
    loss = trace.get("loss") or []
    facts = [f"method {run.get('method')} {json.dumps(run.get('config'), default=str)}",
             f"stance {figs._stance_name(run)}, {run.get('examples')} examples",
             f"recipe {json.dumps(run.get('recipe'), default=str)}", f"origin: {origin_text(run)}"]
    if counts.get("trainable") is not None:
        facts.append(f"trainable {figs.plain_text(counts.get('trainable'))} / frozen {figs.plain_text(counts.get('frozen'))} "
                     f"({figs.plain_text(counts.get('trainable_pct'), '.3g')}% trainable); "
                     f"{figs.plain_text(counts.get('params_per_example'), '.4g')} trainable params per example; stance storage "
                     f"{human(counts.get('stance_bytes'), 'bytes')} vs full weights "
                     f"{human(counts.get('full_weights_bytes'), 'bytes')}")
    facts.append(f"{len(loss)} steps, loss {figs.plain_text(loss[0]) if loss else 'n/a'} → {figs.plain_text(loss[-1]) if loss else 'n/a'}"
                 + (f", trained in {human(run.get('train_seconds'), 'seconds')}" if run.get("train_seconds") is not None else ""))
    return facts


def _figures(seeds: list[dict], cache: figs.FigureCache) -> list[dict]:
    """A configuration's figures: each run figure once, its seeds overlaid (one seed: the run's own
    figures, as before seeds). Each is keyed by what it draws, not the whole runs: runs loaded from
    the store (another origin, their timings) reuse what the session that trained them drew."""
    run = seeds[0]
    several = len(seeds) > 1
    suffix = "-seeds" if several else ""

    def of(value):  # the cache's data: one seed's as before seeds, else every seed's in seed order
        return [value(s) for s in seeds] if several else value(run)

    def layers_of(view):
        return lambda s: s["layers"].get(view)

    measures = [s.get("measurements") or {} for s in seeds]
    two_views = any(bool(s["layers"].get("adapter")) and s["layers"].get("adapter") != s["layers"].get("effective")
                    for s in seeds)
    title = figs._run_title(run)
    depth = (run.get("model") or {}).get("num_layers")
    target = seeds if several else run
    figures = [cache.get("layers-effective" + suffix, [of(layers_of("effective")), depth, title],
                         lambda: figs.layer_figure(target, "effective")),
               cache.get("curves" + suffix, [of(lambda s: {k: s["trace"].get(k) for k in (
                   "loss", "grad_norm", "nonfinite", "skipped_steps", "halted_at", "halt_reason")}), title]
                   + ([[s.get("recipe", {}).get("seed") for s in seeds]] if several else []),
                   lambda: figs.curves_figure(target))]
    if two_views:
        figures.append(cache.get("layers-adapter" + suffix, [of(layers_of("adapter")), depth, title],
                                 lambda: figs.layer_figure(target, "adapter")))
    calibrations = [m.get("calibration") if isinstance(m.get("calibration"), dict) else {} for m in measures]
    if any(calibrations):
        names = [figs._seed_name(s, i) for i, s in enumerate(seeds)]
        figures.append(cache.get("reliability" + suffix, [calibrations if several else calibrations[0], title]
                                 + ([names] if several else []),
                                 lambda: figs.reliability_figure(calibrations if several else calibrations[0], title,
                                                                 names)))
    if any(m.get(k) for m in measures for k in ("geometry", "localization")):
        figures.append(cache.get("where" + suffix, [of(lambda s: {k: (s.get("measurements") or {}).get(k)
                                                                  for k in ("geometry", "localization")}), title],
                                 lambda: figs.where_figure(target)))
    if any(m.get("dose_response") for m in measures):
        figures.append(cache.get("dose" + suffix, [of(lambda s: (s.get("measurements") or {}).get("dose_response")),
                                                   title], lambda: figs.dose_figure(target)))
    return [f for f in figures if f]


def _run_tables(run: dict) -> dict:
    """Everything about one run but its figures: measurement tables, collapsed tables, instruments."""
    measurements = run.get("measurements") or {}
    layers = run["layers"]
    two_views = bool(layers.get("adapter")) and layers.get("adapter") != layers.get("effective")
    tables = [{"title": t, "table": table(rows)} for t, rows in measurement_tables(measurements)]
    collapsed = []
    behavior = measurements.get("behavior")
    for metric, m in (behavior.items() if isinstance(behavior, dict) else ()):
        probes = m.get("per_probe") if isinstance(m, dict) else None
        if probes:
            collapsed.append({"title": f"{metric} per probe ({len(probes)})", "table": table(probes)})
    trace, instruments = run["trace"], run.get("instruments") or {}
    if instruments.get("interference_by_epoch"):
        collapsed.append({"title": "interference by epoch", "table": table(instruments["interference_by_epoch"])})
    if trace.get("nonfinite"):
        collapsed.append({"title": "non-finite events", "table": table(trace["nonfinite"])})
    for view in ("effective", "adapter") if two_views else ("effective",):
        if layers.get(view):
            collapsed.append({"title": "per-layer change" + (" (adapter A/B tensors)" if view == "adapter" else "")
                              + " table", "table": table([{k: r.get(k) for k in LAYER_COLUMNS if k in r}
                                                          for r in layers[view] if isinstance(r, dict)])})
    known = {"behavior", "calibration", "forgetting", "rank", "localization", "dose_response", "geometry", "replies",
             "general_ability"}
    other = [{"title": k, "text": json.dumps(v, indent=1, default=str)[:4000]} for k, v in measurements.items()
             if k not in known and v not in (None, {}, [])]
    return {"tables": tables, "collapsed": collapsed, "other": other,
            "instruments": [{"name": k.replace("_", " "), "text": figs.plain_text(human(v, k)), "bad": figs.is_nonfinite(v)}
                            for k, v in instruments.items() if not isinstance(v, (dict, list))],
            "first_nonfinite": instruments.get("first_nonfinite")}


def _run_entry(run_id: str, run: dict, index: int) -> dict:
    trace = run["trace"]
    return {"id": run_id, "label": run.get("label") or run_id, "anchor": _anchor("run", f"{index}-{run_id}"),
            "href": f"runs/{_anchor('run', f'{index}-{run_id}')}.html", "facts": _run_facts(run),
            "halted": trace.get("halted_at"), "halt_reason": trace.get("halt_reason"),
            "analysis_error": run.get("analysis_error"), "replies": replies_view(run), "ability": ability_view(run)}


def _config_entries(runs: dict) -> list[dict]:
    """One entry per configuration (runs differing only in their seed, sections.configurations):
    a configuration of one seed is the run's entry as before seeds (its page runs/run-<i>-<id>.html);
    one of several seeds has its page runs/config-<i>-<first id>.html, its seeds as entries in it."""
    groups = configurations(runs)
    labels = configuration_labels(runs, groups)
    apart = run_labels({str(i): seedless(runs[ids[0]]) for i, ids in enumerate(groups)})
    out = []
    for i, ids in enumerate(groups):
        if len(ids) == 1:
            out.append({**_run_entry(ids[0], runs[ids[0]], i), "seeds": []})
            continue
        first = runs[ids[0]]
        anchor = _anchor("config", f"{i}-{ids[0]}")
        href = f"runs/{anchor}.html"
        seeds = []
        for run_id in ids:
            run = runs[run_id]
            loss = run["trace"].get("loss") or []
            entry = _run_entry(run_id, run, i)
            ability, replies = entry["ability"], entry["replies"]
            seeds.append({**entry, "seed": (run.get("recipe") or {}).get("seed"), "anchor": _anchor("seed", run_id),
                          "href": f"{href}#{_anchor('seed', run_id)}", "origin": origin_text(run),
                          "steps": len(loss), "loss": (f"{figs.plain_text(loss[0])} → {figs.plain_text(loss[-1])}"
                                                       if loss else "n/a"),
                          "trained_in": figs.plain_text(human(run.get("train_seconds"), "seconds")),
                          "replies_changed": f"{replies['changed']} of {replies['n']}" if replies else "–",
                          "accuracy": f"{ability['base']} → {ability['adapted']}" if ability else "–"})
        facts = _run_facts(seedless(first))[:-1]  # steps and loss are each seed's: the seeds' table
        facts[2] += f"; seeds {', '.join(figs.plain_text(s['seed']) for s in seeds)}"
        facts[3] = "origin: " + ", ".join(f"{text} ({n})" for text, n in Counter(s["origin"] for s in seeds).items())
        out.append({"id": ids[0], "ids": ids, "label": labels[i], "apart": apart[str(i)], "anchor": anchor,
                    "href": href, "facts": facts, "seeds": seeds,
                    "halted": sum(1 for s in seeds if s["halted"] is not None) or None,
                    "analysis_error": "; ".join(f"seed {figs.plain_text(s['seed'])}: {s['analysis_error']}"
                                                for s in seeds if s["analysis_error"]) or None})
    return out


SESSION_GROUP = "every run of this session"


def _suite_groups(runs: dict, tests: list[dict]) -> list[tuple[str, list[str]]]:
    """(suite file, its runs in first-use order) for each suite of two configurations or more (seeds
    of one configuration are averaged, sections.configurations); when no suite has two, every run
    of the session as one group (runs spread one per file still compare)."""
    groups: dict[str, list[str]] = {}
    for test in tests:
        suite = suite_of(test.get("nodeid", ""))
        for run_id in test.get("runs") or []:
            if run_id in runs and run_id not in groups.setdefault(suite, []):
                groups[suite].append(run_id)
    several = [(suite, ids) for suite, ids in groups.items() if len(configurations({i: runs[i] for i in ids})) > 1]
    return several or ([(SESSION_GROUP, list(runs))] if len(configurations(runs)) > 1 else [])


def _mean(values: list) -> float:
    numbers = [figs._float(v) for v in values]
    return sum(numbers) / len(numbers) if numbers and all(math.isfinite(v) for v in numbers) else math.nan


def _configurations(views: list[dict]) -> list[dict]:
    """Runs that differ only in their seed (a RunSet) as one configuration: labelled by what sets
    it apart from the suite's other configurations, its per-layer change and its loss curve the
    mean over its seeds (a step or layer some seed lacks, or one non-finite, is left blank)."""
    members = [[views[int(i)] for i in ids] for ids in configurations({str(i): v for i, v in enumerate(views)})]
    firsts = {str(i): seedless(group[0]) for i, group in enumerate(members)}
    labels = run_labels(firsts)  # within the suite: what sets each configuration apart from the others
    out = []
    for i, group in enumerate(members):
        label = labels[str(i)]
        if len(group) == 1:
            out.append({"label": label, "task": group[0].get("task"), "run_id": group[0].get("run_id"),
                        "layers": {"effective": group[0]["layers"].get("effective")},
                        "model": {"num_layers": (group[0].get("model") or {}).get("num_layers")},
                        "trace": {"loss": (group[0].get("trace") or {}).get("loss")}})
            continue
        by_layer: dict[str, list] = {}
        for run in group:
            for row in run["layers"].get("effective") or []:
                if isinstance(row, dict):
                    by_layer.setdefault(str(row.get("layer")), []).append(row.get("rel_change"))
        losses = [(run.get("trace") or {}).get("loss") or [] for run in group]
        steps = min(len(loss) for loss in losses)
        out.append({"label": f"{label} (mean of {len(group)} seeds)", "task": group[0].get("task"),
                    "run_id": group[0].get("run_id"),
                    "layers": {"effective": [{"layer": layer, "rel_change": _mean(values) if len(values) == len(group)
                                              else math.nan} for layer, values in by_layer.items()]},
                    "model": {"num_layers": (group[0].get("model") or {}).get("num_layers")},
                    "trace": {"loss": [_mean([loss[j] for loss in losses]) for j in range(steps)]}})
    return out


def _dose_curves(runs: dict) -> list[dict]:
    """A dose-response curve per configuration: a run's own, or its seeds' mean shift and
    forgetting at each dose (without a band: their intervals are each seed's, not the mean's)."""
    groups = configurations(runs)
    curves = []
    for ids, label in zip(groups, configuration_labels(runs, groups)):
        doses = [(runs[i].get("measurements") or {}).get("dose_response") for i in ids]
        doses = [d for d in doses if d]
        if len(doses) == 1:
            curves.append({"label": runs[ids[0]].get("label") if len(ids) == 1 else label,
                           "measurements": {"dose_response": doses[0]}})
        elif doses:
            rows = [[r for r in (d.get("rows") or []) if isinstance(r, dict)] if isinstance(d, dict) else [] for d in doses]
            mean = [{"dose": seeds[0].get("dose"), **{k: _mean([r.get(k) for r in seeds]) for k in ("shift", "forgetting")}}
                    for seeds in zip(*rows)]
            curves.append({"label": f"{label}, mean", "measurements": {"dose_response": {"rows": mean}}})
    return curves


def _comparisons(runs: dict, tests: list[dict], cache: figs.FigureCache) -> dict:
    """Comparative figures across runs, per suite (as the seeds draw them): the suite's
    configurations' per-layer change on one heatmap (seed 001's domains x rates) beside their loss
    curves on one axis (seed 004's schedules), one axis per task, seeds of one configuration
    averaged; and the dose-response curves of the session's runs together."""
    suites = []
    for suite, ids in _suite_groups(runs, tests):
        views = _configurations([runs[run_id] for run_id in ids])
        name = suite.rsplit("/", 1)[-1]
        layers = [{k: v for k, v in view.items() if k not in ("trace", "task")} for view in views]
        figures = [cache.get("compare-layers", [layers, name, COMPARE_WIDTH],
                             lambda d=layers, n=name: figs.layers_comparison_figure(d, width=COMPARE_WIDTH, title=n))]
        by_task: dict[str, list[dict]] = {}
        for view in views:
            by_task.setdefault(str(view.get("task") or ""), []).append({"label": view["label"], "trace": view["trace"]})
        for task, group in by_task.items():
            title = name + (f", task {task}" if len(by_task) > 1 and task else "")
            figures.append(cache.get("compare-loss", [group, title, COMPARE_WIDTH],
                                     lambda g=group, t=title: figs.loss_comparison_figure(g, t, width=COMPARE_WIDTH)))
        figures = [f for f in figures if f]
        if figures:
            suites.append({"suite": suite, "runs": len(ids), "configurations": len(views), "figures": figures})
    doses = _dose_curves(runs)
    dose = cache.get("compare-dose", doses, lambda: figs.dose_comparison_figure(doses)) if len(doses) > 1 else None
    return {"suites": suites, "dose": dose}


def _suite_sections(entries: list[dict]) -> list[dict]:
    """The tests by suite file, each a collapsed section (open when one of its tests failed)."""
    groups: dict[str, list[dict]] = {}
    for entry in entries:
        groups.setdefault(suite_of(entry["nodeid"]), []).append(entry)
    sections = []
    for suite, tests in groups.items():
        counts = Counter(t["outcome"] for t in tests)
        sections.append({"suite": suite, "anchor": _anchor("suite", suite), "tests": tests,
                         "counts": [(o, counts[o]) for o in OUTCOMES if counts.get(o)],
                         "open": any(t["outcome"] in ("failed", "error") for t in tests)})
    return sections


def render_pages(payload: dict, figure_cache: Path | figs.FigureCache | None = None) -> dict[str, str]:
    """The session's pages by path relative to its report folder: index.html, and runs/<run>.html
    per run. Figures already drawn into `figure_cache` (a directory, or a FigureCache that then
    counts what was drawn and what reused) are reused."""
    payload = normalized(payload)
    cache = figure_cache if isinstance(figure_cache, figs.FigureCache) else figs.FigureCache(figure_cache)
    labels = run_labels(payload["runs"])
    runs = {run_id: {**run, "label": labels[run_id]} for run_id, run in payload["runs"].items()}
    entries = _config_entries(runs)
    links = {e["id"]: e for e in entries if not e["seeds"]}  # each run links to its configuration's page
    links.update({s["id"]: {**s, "label": runs[s["id"]]["label"], "config": e} for e in entries for s in e["seeds"]})
    tests = payload["tests"]
    rows = findings(payload)
    status, reasons = session_status(payload)
    changes = payload.get("changes") if isinstance(payload.get("changes"), dict) else None
    env = environment()
    css = (TEMPLATES / "style.css").read_text(encoding="utf-8")
    counts = Counter(t.get("outcome") or "not run" for t in tests)
    context = {
        "css": css, "report_id": report_id_of(payload), "status": status, "reasons": reasons,
        "gate": _gate(payload.get("gate")), "interrupted": payload.get("interrupted"),
        "header": _header(payload), "findings": _finding_rows(rows), "changes": changes,
        # open: claims with an effect, and any not supported or changed; folded: the rest (verdicts only)
        "findings_shown": _split_findings(_finding_rows(rows))[0],
        "findings_folded": _split_findings(_finding_rows(rows))[1],
        "folded_effects": sum(1 for r in _split_findings(rows)[1] if r["estimate"] is not None),
        "forest": cache.get("forest", rows, lambda: figs.forest_figure(rows)),
        "counts": [(o, counts[o]) for o in OUTCOMES if counts.get(o)], "n_tests": len(tests),
        "show_expected": any(t.get("expected") is not None or t.get("verdict") is not None for t in tests),
        "show_repeats": any(t.get("repeats") for t in tests),
        "suites": _suite_sections([_test_entry(t, links) for t in tests]), "runs": entries, "n_runs": len(runs),
        "comparisons": _comparisons(runs, tests, cache) if runs else {"suites": [], "dose": None},
        "multiplicity": table(payload.get("multiplicity")) if payload.get("multiplicity") else None,
    }
    pages = {"index.html": env.get_template("report.html.j2").render(title=f"{status}: stance-harness report "
                                                                            f"{report_id_of(payload) or ''}", **context)}
    page = env.get_template("run.html.j2")
    for entry in entries:
        seeds = [runs[s["id"]] for s in entry["seeds"]] or [runs[entry["id"]]]
        labelled = [{**run, "label": entry["label"]} for run in seeds] if entry["seeds"] else seeds
        pages[entry["href"]] = page.render(
            title=f"{'configuration' if entry['seeds'] else 'run'} {entry['label']} — report {report_id_of(payload)}",
            css=css, report_id=report_id_of(payload), run=entry, figures=_figures(labelled, cache),
            detail=None if entry["seeds"] else _run_tables(seeds[0]),
            details=[_run_tables(run) for run in seeds] if entry["seeds"] else [])
    return pages


def render_html(payload: dict, figure_cache: Path | None = None) -> str:
    """The session's main page (index.html); see render_pages for the run pages beside it."""
    return render_pages(payload, figure_cache)["index.html"]


# -- the index of all reports -------------------------------------------------------------------

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
    rows = []
    for entry in _report_summaries(reports_dir):
        name, folder, payload = entry["name"], entry["folder"], entry["payload"]
        target = next((f for f in ("index.html", "report.md", "report.json") if (folder / f).is_file()), "report.json")
        row = {"name": name, "href": f"{name}/{target}", "latest": name == latest, "error": entry["error"]}
        if not isinstance(payload, dict):
            row["error"] = row["error"] or f"a JSON {type(payload).__name__}"
            rows.append(row)
            continue
        prov = payload.get("provenance") or {}
        model = prov.get("model") or {}
        git = prov.get("git") or {}
        tests = [t for t in payload.get("tests") or [] if isinstance(t, dict)]
        counts = Counter(t.get("outcome") or "not run" for t in tests)
        gate = payload.get("gate")
        row.update({"started": payload.get("started"), "model": model.get("id") or model.get("name"),
                    "revision": str(model.get("revision"))[:12] if model.get("revision") else None,
                    "tests": len(tests), "counts": [(o, counts[o]) for o in OUTCOMES if counts.get(o)],
                    "gate": None if not isinstance(gate, dict) else bool(gate.get("passed")),
                    "runs": len(payload.get("runs") or {}), "commit": (git.get("commit") or "")[:10],
                    "dirty": git.get("dirty")})
        rows.append(row)
    css = (TEMPLATES / "style.css").read_text(encoding="utf-8")
    return environment().get_template("index.html.j2").render(title="stance-harness reports", css=css, rows=rows,
                                                              folder=reports_dir.name)


def write_html(run_dir, payload: dict, figure_cache: Path | None = None) -> Path:
    """index.html and runs/*.html of one report in run_dir; returns index.html's path."""
    run_dir = Path(run_dir)
    for name, text in render_pages(payload, figure_cache).items():
        atomic_write(run_dir / name, text)
    return run_dir / "index.html"


def write_index(reports_dir) -> Path:
    path = Path(reports_dir) / "index.html"
    atomic_write(path, render_index(reports_dir))
    return path
