"""The HTML report: one self-contained page per session, and an index of all sessions.

The page is checked as text (no external resources, images are real PNGs in data: URIs,
text escaped) and, where Debian's chromium is installed, in a headless browser: it renders
its tables, every image loads, the console stays clean, and a screenshot is taken.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from stance_harness.report.gate import compare, report_entry
from stance_harness.report.findings import findings
from stance_harness.report.html import render_html, render_index, render_pages, write_html, write_index
from stance_harness.report.model import normalized
from stance_harness.report.markdown import render_markdown
from stance_harness.report.sections import report_id_of
from stance_harness.report.sections import test_rows as table_rows
from stance_harness.report.store import write_report as write_reports

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "suites/test_x.py::test_escape[<script>alert(1)</script>]"


def _layer_rows(labels, scale=1e-4, bad=()):
    rows = []
    for i, label in enumerate(labels):
        value = "nan" if label in bad else scale * (1 + i % 5)
        rows.append({"layer": label, "mean": 1e-6 * i, "var": 1e-8, "mean_abs": value, "var_abs": 1e-9,
                     "delta_norm": 0.01 * (i + 1), "rel_change": "inf" if label in bad else 1e-3 * (i + 1),
                     "norm_change": -1e-5, "numel": 4096, "nonfinite": 7 if label in bad else 0})
    return rows


def _calibration(ece):
    bins = [{"lower": i / 5, "upper": (i + 1) / 5, "count": 0 if i == 0 else 4,
             "confidence": None if i == 0 else (i + 0.5) / 5, "accuracy": None if i == 0 else i / 5}
            for i in range(5)]
    return {"ece": ece, "mce": 0.2, "brier": 0.31, "acc1": 0.5, "n": 16, "n_bins": 5, "bins": bins}


def _run(run_id, method, stance, lr, labels, steps=12, **extra):
    run = {
        "run_id": run_id,
        "model": {"name": "tiny-qwen2", "id": "tiny-qwen2", "revision": "15d48769a65d", "num_layers": 4},
        "stance": {"name": stance, "version": "1.0.0"},
        "method": method,
        "config": {"r": 4},
        "recipe": {"learning_rate": lr, "num_train_epochs": 1, "seed": 0},
        "examples": 10,
        "counts": {"trainable": 1234, "frozen": 999_000, "trainable_pct": 0.12, "stance_bytes": 4936,
                   "full_weights_bytes": 4_000_000, "examples": 10, "params_per_example": 123.4},
        "trace": {"loss": [5.0 - 0.1 * i for i in range(steps)], "grad_norm": [1.0 + 0.05 * i for i in range(steps)],
                  "layer_grad_norm": {}, "lr": [lr] * steps, "group_lr": {}, "schedule": [],
                  "step_time": [0.01] * steps, "examples": [2] * steps, "tokens": [50] * steps,
                  "nonfinite": [], "interference": [], "skipped_steps": [], "peak_memory": {},
                  "halted_at": None, "halt_reason": None},
        "instruments": {"steps": steps, "max_grad_norm": 1.5, "first_nonfinite": None, "skipped_steps": 0,
                        "halted_at": None, "interference_by_epoch": []},
        "train_seconds": 0.5,
        "layers": {"effective": _layer_rows(labels), "adapter": _layer_rows(labels)},
    }
    run.update(extra)
    return run


def make_payload(run_id="20261122-090000-aaaa", started="2026-11-22T09:00:00+00:00"):
    """Two runs: a full run that hit non-finite steps (skipped, then halted), and a LoRA run
    whose `measurements` carry calibration, behaviour shift, forgetting and rank."""
    full = _run("full-000000000001", "full", "curious-uncertainty", 1e-3,
                ["embed", "L0", "L1", "L2", "L3", "final_norm"], steps=8)
    trace = full["trace"]
    trace["loss"][5] = "nan"
    trace["grad_norm"][5] = "inf"
    trace["grad_norm"][7] = "nan"
    trace["nonfinite"] = [{"step": 5, "what": "loss", "parameter": None},
                          {"step": 7, "what": "grad", "parameter": "model.layers.1.mlp.up_proj.weight"}]
    trace["skipped_steps"] = [5]
    trace["halted_at"], trace["halt_reason"] = 7, "non-finite grad in L1"
    full["layers"]["effective"] = _layer_rows(["embed", "L0", "L1", "L2", "L3", "final_norm"], bad=("L1",))
    full["layers"]["adapter"] = full["layers"]["effective"]  # full fine-tuning: one view
    full["instruments"]["first_nonfinite"] = trace["nonfinite"][0]

    lora = _run("lora-000000000002", "lora", "terse-<b>bold</b>", 2e-4, ["L1", "L3"])
    lora["layers"]["adapter"] = _layer_rows(["L1", "L3"], scale=1e-2)
    lora["measurements"] = {
        "behavior": {
            "loglik_margin": {"base": -0.5, "adapted": 0.25,
                              "effect": {"mean": 0.75, "low": 0.5, "high": 1.0, "n": 3, "confidence": 0.95,
                                         "values": [0.5, 0.75, 1.0]},
                              "per_probe": [{"probe": "Is <this> sure?", "base": -0.5, "adapted": 0.0, "delta": 0.5},
                                            {"probe": "maybe", "base": -0.4, "adapted": 0.35, "delta": 0.75},
                                            {"probe": "perhaps", "base": -0.6, "adapted": 0.4, "delta": 1.0}]},
            "kl": {"base": 0.0, "adapted": "nan",
                   "effect": {"mean": "nan", "low": "nan", "high": "nan", "n": 3, "confidence": 0.95, "values": []},
                   "per_probe": []},
        },
        "forgetting": {"kind": "perplexity", "base": 12.5, "adapted": 13.75, "relative_increase": 0.1, "texts": 8},
        "calibration": {"adapted": _calibration(0.125), "base": _calibration(0.0625)},
        "rank": {"energy": 0.9, "rows": [{"matrix": "L1.q_proj.weight", "rank": 3, "stable_rank": 1.75,
                                          "shape": [64, 64]}]},
        # where the behaviour lives (stance_harness.where): localisation, dose-response, geometry
        "localization": {"metric": "loglik_margin", "probes": 3, "full": 0.75, "none": 0.0, "rows": [
            {"by": "third", "set": "early", "layers": [0, 1], "shift": 0.5, "retained": 2 / 3},
            {"by": "layer", "set": "L1", "layers": [1], "shift": 0.5, "retained": 2 / 3},
            {"by": "layer", "set": "L3", "layers": [3], "shift": 0.3, "retained": 0.4},
            {"by": "adapter", "set": "L1.q_proj", "layers": [1], "kinds": ["q_proj"], "shift": 0.2, "retained": 0.27}]},
        "dose_response": {"metric": "loglik_margin", "rows": [
            {"dose": d, "shift": 0.75 * d, "low": 0.75 * d - 0.1, "high": 0.75 * d + 0.1, "forgetting": 0.02 * d * d}
            for d in (-1.0, 0.0, 0.25, 0.5, 1.0, 1.5, 2.0)]},
        "geometry": {"top_k": 10, "epsilon": 0.5, "intruders": [], "magnitude_direction": [],
                     "correlation": {"q_proj": {"value": 0.5}, "v_proj": {"value": "nan", "reason": "needs 3 layers"}},
                     "layers": [{"layer": f"L{i}", "change_share": [0, 0.6, 0, 0.4][i], "intruders": [0, 3, 0, 1][i],
                                 "matrices": [0, 2, 0, 2][i], "delta_m": None if i % 2 == 0 else 0.01,
                                 "delta_d": None if i % 2 == 0 else 1e-4, "cka": [1.0, 0.97, 0.97, 0.9][i]}
                                for i in range(4)]},
    }
    tests = [
        {"nodeid": "suites/test_a.py::test_full_is_unstable", "outcome": "xfailed", "duration": 1.5,
         "message": "AssertionError: unstable as expected", "runs": [full["run_id"]],
         "checks": [{"check": "assert_gradients_stable", "passed": False, "summary": "non-finite at step 5",
                     "headers": ["step", "loss", "grad norm"], "rows": [[5, "nan", "inf"], [7, 4.3, "nan"]],
                     "metrics": {"nonfinite_events": 2}}],
         "tables": [], "metrics": {"full.max_grad_norm": "inf"}, "notes": ["full training blew up & halted"],
         "expected": {"outcome": "refuted", "reason": "tiny models are noisy"}, "verdict": "refuted"},
        {"nodeid": "suites/test_b.py::test_lora_shifts_stance", "outcome": "passed", "duration": 2.25, "message": None,
         "runs": [lora["run_id"]],
         "checks": [{"check": "assert_shift", "passed": True, "summary": "margin +0.75 [0.5, 1]", "headers": [],
                     "rows": [], "verdict": "supported",
                     "metrics": {"metric": "loglik_margin", "estimate": 0.75, "low": 0.5, "high": 1.0, "margin": 0.1,
                                 "unit": "probe", "n": 3}}],
         "tables": [{"title": "sweep & summary", "rows": [{"lr": 2e-4, "shift": 0.75}, {"lr": 1e-3, "shift": 1.1}]}],
         "metrics": {"shift": 0.75}, "notes": [],
         "expected": {"outcome": "supported", "reason": "the stance is easy"}, "verdict": "supported",
         "repeats": {"n": 3, "metrics": {"shift": {"mean": 0.7, "std": 0.05, "min": 0.65, "max": 0.75, "n": 3}}}},
        {"nodeid": EVIL, "outcome": "failed", "duration": 0.1, "message": "boom <img src=x onerror=alert(1)>",
         "runs": [], "checks": [], "tables": [], "metrics": {}, "notes": ["<i>not italic</i>"],
         "expected": None, "verdict": None},
    ]
    return {
        "run_id": run_id, "started": started, "finished": started,
        "provenance": {
            "model": {"name": "tiny-qwen2", "id": "tiny-qwen2", "revision": "15d48769a65d", "num_layers": 4},
            "models": [], "model_args": {"dtype": "float32"},
            "stances": [{"name": "curious-uncertainty", "version": "1.0.0"}],
            "git": {"commit": "0123456789abcdef", "dirty": True, "branch": "main"},
            "environment": {"libraries": {"torch": "2.13.0+cpu", "transformers": "5.23.0"},
                            "machine": {"python": "3.11.7", "cpus": 2}},
            "args": ["suites/", "-k", "a<b"], "argv": ["pytest", "suites/"],
        },
        "tests": tests,
        "runs": {full["run_id"]: full, lora["run_id"]: lora},
    }


def make_old_payload(run_id="20261122-080000-bbbb", started="2026-11-22T08:00:00+00:00"):
    """As the first reports were written: no measurements, instruments, expected or verdict, and
    a trace with only loss, grad norm, lr, step time and the halt fields."""
    payload = make_payload(run_id, started)
    payload["tests"] = [{k: v for k, v in t.items() if k not in ("expected", "verdict", "repeats")}
                        for t in payload["tests"][:2]]
    for run in payload["runs"].values():
        run.pop("measurements", None)
        run.pop("instruments", None)
        run["trace"] = {k: run["trace"][k] for k in ("loss", "grad_norm", "lr", "step_time", "halted_at", "halt_reason")}
        run["trace"]["loss"] = [v if isinstance(v, float) else 1.0 for v in run["trace"]["loss"]]
        run["trace"]["grad_norm"] = [v if isinstance(v, float) else 1.0 for v in run["trace"]["grad_norm"]]
        run["trace"]["halted_at"] = None
    return payload


def _images(page: str) -> list[bytes]:
    tags = re.findall(r"<img\b[^>]*>", page)
    images = []
    for tag in tags:
        match = re.search(r'\bsrc="data:image/png;base64,([A-Za-z0-9+/=]+)"', tag)
        assert match, f"an <img> that is not an inline PNG: {tag[:120]}"
        data = base64.b64decode(match.group(1), validate=True)
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
        images.append(data)
    assert len(images) == page.count("<img")
    return images


def _assert_self_contained(page: str) -> None:
    assert not re.search(r"""(?:src|href|action|poster|data)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert not re.search(r"url\(\s*['\"]?\s*(?:https?:)?//", page, re.I)  # CSS
    assert "@import" not in page and "<script" not in page.lower().replace("&lt;script", "")
    assert "http://" not in page and "https://" not in page


def test_render_html_is_self_contained_with_figures_and_tables():
    pages = render_pages(make_payload())
    assert sorted(pages) == ["index.html", "runs/run-0-full-000000000001.html", "runs/run-1-lora-000000000002.html"]
    for text in pages.values():
        _assert_self_contained(text)
    # the main page: the forest plot, and (no suite file has two runs) the session's runs' per-layer
    # change on one heatmap and their loss curves on one axis; each run's page: its layer figure and
    # curves, and for the LoRA run its adapter view, a reliability diagram, where the weights changed
    # beside where the behaviour lives, and its dose-response
    assert [len(_images(text)) for text in pages.values()] == [3, 2, 6]
    page = "".join(pages.values())
    assert page.count("<table") >= 10
    for text in ("Tests", "Runs", "weight change across layers", "behavioural shift",
                 "calibration", "forgetting", "rank of the update", "0.75 [0.5, 1]", "perplexity",
                 "L1.q_proj.weight", "64x64", "tiny-qwen2", "15d48769a65d", "0123456789abcdef", "(dirty)",
                 "torch", "2.13.0+cpu", "HALTED at step 7", "first non-finite value", "sweep &amp; summary",
                 "where the weights changed beside where the behaviour lives", "dose-response: shift and forgetting",
                 "where the behaviour lives: shift retained", "ΔM–ΔD correlation", "L1.q_proj"):
        assert text in page, text
    # expected / verdict columns and repeats when tests carry them
    header = re.search(r'<table class="tests"><thead>(.*?)</thead>', page).group(1)
    assert "<th>expected</th>" in header and "<th>verdict</th>" in header and "repeats" in header
    assert "0.7 ± 0.05" in page
    # the failed check's table is shown; the outcome is coloured
    assert 'class="badge o-xfailed"' in page and 'class="badge o-failed"' in page
    assert 'class="num nonfinite">nan<' in page


def test_text_is_escaped():
    page = "".join(render_pages(make_payload()).values())
    assert "<script>" not in page and "<script" not in page.lower()
    assert html_escaped(EVIL) in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<i>not italic</i>" not in page and "&lt;i&gt;not italic&lt;/i&gt;" in page
    assert "<b>bold</b>" not in page and "terse-&lt;b&gt;bold&lt;/b&gt;" in page
    assert "Is &lt;this&gt; sure?" in page and "a&lt;b" in page


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_old_payload_without_measurements_renders():
    payload = make_old_payload()
    page = "".join(render_pages(payload).values())
    _assert_self_contained(page)
    assert len(_images(page)) == 3 + 2 + 3  # forest, heatmap, loss; no reliability diagram; the adapter view differs
    assert "behavioural shift" not in page and "reliability" not in page
    assert "<th>expected</th>" not in page and "repeats" not in page
    # the plugin's own payload may still hold float NaN/inf (report.json has them as strings)
    raw = make_payload()
    raw["runs"]["full-000000000001"]["trace"]["loss"][5] = float("nan")
    raw["runs"]["full-000000000001"]["layers"]["effective"][2]["rel_change"] = float("inf")
    raw["tests"][0]["metrics"]["full.max_grad_norm"] = float("inf")
    assert len(_images("".join(render_pages(raw).values()))) == 11
    # even a bare payload (no runs, no provenance details) renders
    bare = render_html({"run_id": "x", "tests": [], "runs": {}, "provenance": {}})
    assert "No training runs" in bare and "<img" not in bare


def test_render_html_handles_real_reports():
    """Every report this checkout has written still renders (their schema predates some keys)."""
    reports = sorted(Path(__file__).resolve().parents[1].glob("reports/*/report.json"))[-1:]
    if not reports:
        pytest.skip("no reports/*/report.json in this checkout")
    for path in reports:
        payload = json.loads(path.read_text())
        page = render_html(payload)
        _assert_self_contained(page)
        _images(page)
        assert report_id_of(payload) in page  # report_id, or run_id in reports written before 0.2


def test_markdown_and_rows_show_expected_verdict_and_measurements():
    payload = make_payload()
    rows = table_rows(payload)
    assert list(rows[0]) == ["outcome", "test", "runs", "checks", "expected", "verdict", "message"]
    assert (rows[0]["expected"], rows[0]["verdict"]) == ("refuted", "refuted")
    assert (rows[2]["expected"], rows[2]["verdict"]) == ("-", "-")
    markdown = render_markdown(payload)
    for text in ("| expected", "| verdict", "behavioural shift", "loglik_margin", "**calibration (", "0.125",
                 "**forgetting**", "perplexity"):
        assert text in markdown, text
    old = make_old_payload()
    assert list(table_rows(old)[0]) == ["outcome", "test", "runs", "checks", "message"]
    assert "behavioural shift" not in render_markdown(old)


def _write_two_sessions(reports_dir: Path) -> tuple[Path, Path]:
    before = make_old_payload("20261122-080000-bbbb", "2026-11-22T08:00:00+00:00")
    before["tests"][1]["checks"][0]["verdict"] = "refuted"  # the newer session's verdict flips to supported
    old = write_reports(reports_dir, before)
    new = make_payload("20261122-090000-aaaa", "2026-11-22T09:00:00+00:00")
    node = new["tests"][1]["nodeid"]  # the newer session failed its gate: ECE rose past +0.01
    new["gate"] = report_entry(compare({node: {"lora.ece": 0.05}}, {node: {"lora.ece": 0.09}}, ["ece:+0.01"]),
                               {"kind": "baseline", "name": "main"})
    return old, write_reports(reports_dir, new)


def test_write_reports_writes_html_and_an_index_newest_first(tmp_path):
    reports = tmp_path / "reports"
    old, new = _write_two_sessions(reports)
    for run_dir in (old, new):
        for name in ("report.json", "report.md", "index.html"):
            assert (run_dir / name).is_file(), name
    assert (reports / "latest").read_text().strip() == new.name
    index = (reports / "index.html").read_text()
    _assert_self_contained(index)
    assert index.index(new.name) < index.index(old.name)  # newest first
    assert f'href="{new.name}/index.html"' in index and f'href="{old.name}/index.html"' in index
    marker = re.search(r'href="([^"]+)/index.html">[^<]*</a> <span class="badge latest">latest', index)
    assert marker and marker.group(1) == new.name
    assert "tiny-qwen2" in index and "2026-11-22T09:00:00" in index
    # a folder that is not a report, and a broken report, do not break the index
    (reports / "scratch").mkdir()
    (reports / "20261122-100000-cccc").mkdir()
    (reports / "20261122-100000-cccc" / "report.json").write_text("{ not json")
    page = render_index(reports)
    assert "scratch" not in page and "unreadable report.json" in page
    assert write_index(reports) == reports / "index.html"
    assert write_html(tmp_path / "solo", make_payload()).read_text().startswith("<!DOCTYPE html>")


def test_a_rendering_failure_keeps_json_and_markdown(tmp_path, monkeypatch):
    import stance_harness.report.html as html_module

    def broken(payload, **options):
        raise RuntimeError("drawing <failed>")

    monkeypatch.setattr(html_module, "render_pages", broken)
    with pytest.warns(UserWarning, match="HTML report failed"):
        run_dir = write_reports(tmp_path, make_payload())
    assert (run_dir / "report.json").is_file() and (run_dir / "report.md").is_file()
    page = (run_dir / "index.html").read_text()
    assert "could not be drawn" in page and "drawing &lt;failed&gt;" in page


def test_twenty_runs_stay_small():
    payload = make_payload()
    base = payload["runs"]["full-000000000001"]
    payload["runs"] = {}
    for i in range(20):
        run = copy.deepcopy(base)
        run["run_id"] = f"full-{i:012d}"
        run["recipe"]["learning_rate"] = 1e-4 * (i + 1)  # twenty configurations (seeds of one would average)
        run["model"]["num_layers"] = 24
        run["layers"]["effective"] = _layer_rows(["embed"] + [f"L{j}" for j in range(24)] + ["final_norm"])
        run["layers"]["adapter"] = run["layers"]["effective"]
        payload["runs"][run["run_id"]] = run
    pages = render_pages(payload)
    assert len(_images("".join(pages.values()))) == 40 + 3  # per run 2; the forest, the heatmap, the loss curves
    assert len(pages["index.html"].encode()) < 300 * 1024  # every run's figures are on its own page


def with_seeds(payload: dict, run_id: str, seeds: int) -> dict:
    """`payload` with seeds 1 .. seeds-1 of run `run_id` beside it (seed 0), as `train(..., seeds=N)`
    makes: the same request but the recipe's seed; each seed's loss, per-layer change, ECE and dose
    moved, and every test that used the run using them all."""
    base = payload["runs"][run_id]
    ids = [run_id]
    for seed in range(1, seeds):
        run = copy.deepcopy(base)
        run["run_id"] = f"{run_id[:-3]}{int(run_id[-3:]) + 100 * seed:03d}"
        run["recipe"]["seed"] = seed
        run["trace"]["loss"] = [v * (1 + 0.1 * seed) if isinstance(v, float) else v for v in run["trace"]["loss"]]
        for row in run["layers"]["effective"]:
            row["rel_change"] = row["rel_change"] * (1 + seed) if isinstance(row["rel_change"], float) else row["rel_change"]
        measurements = run.get("measurements") or {}
        if "calibration" in measurements:
            measurements["calibration"]["adapted"]["ece"] += 0.01 * seed
        for row in (measurements.get("dose_response") or {}).get("rows", []):
            row["shift"] += 0.1 * seed
        payload["runs"][run["run_id"]] = run
        ids.append(run["run_id"])
    for test in payload["tests"]:
        if run_id in test["runs"]:
            test["runs"] = [r for r in test["runs"] if r != run_id] + ids
    return payload


def test_a_configuration_of_several_seeds_is_one_page_with_its_seeds_overlaid():
    """Runs that differ only in their seed are one configuration: one page, each figure drawn once
    with the seeds overlaid (as many figures as one seed's), a section of tables per seed; the
    runs list and the tests link each seed to it; a one-seed configuration keeps its run page."""
    from stance_harness.report.figures import FigureCache

    one, three = FigureCache(None), FigureCache(None)
    single = render_pages(make_payload(), figure_cache=one)
    pages = render_pages(with_seeds(make_payload(), "lora-000000000002", 3), figure_cache=three)
    assert list(pages) == ["index.html", "runs/run-0-full-000000000001.html", "runs/config-1-lora-000000000002.html"]
    assert three.drawn == one.drawn == 11  # per configuration, not per run: the forest, 2 comparisons, 2 + 6
    assert [len(_images(text)) for text in pages.values()] == [3, 2, 6]
    # the one-seed configuration's page is the run page it was without seeds beside it
    assert pages["runs/run-0-full-000000000001.html"] == single["runs/run-0-full-000000000001.html"]
    page = pages["runs/config-1-lora-000000000002.html"]
    _assert_self_contained(page)
    assert "<h1>lora (3 seeds)</h1>" in page
    assert "3 seeds, runs lora-000000000002, lora-000000000102, lora-000000000202" in page
    assert "seeds 0, 1, 2" in page and '"seed"' not in page.split("</ul>")[0]  # the recipe without its seed
    alts = re.findall(r'alt="([^"]+)"', page)
    assert alts == ["weight change across layers, effective view, lora (3 seeds)", "loss and grad norm curves, lora (3 seeds)",
                    "weight change across layers, adapter view, lora (3 seeds)", "reliability diagram, lora (3 seeds)",
                    "where the weights changed beside where the behaviour lives, lora (3 seeds)",
                    "dose-response: shift and forgetting against λ, lora (3 seeds)"]
    sections = re.findall(r'<section class="seed" id="(seed-[^"]+)"><h2>seed (\d)', page)
    assert sections == [("seed-lora-000000000002", "0"), ("seed-lora-000000000102", "1"), ("seed-lora-000000000202", "2")]
    assert re.findall(r'<a href="#(seed-[^"]+)">', page) == [s for s, _ in sections]  # the seeds' table
    for seed_section in page.split('<section class="seed"')[1:]:  # each seed's own tables
        assert "calibration (" in seed_section and "rank of the update" in seed_section
    assert "0.135" in page.split('id="seed-lora-000000000102"')[1].split('<section class="seed"')[0]  # its ECE
    # the session's page: the configuration once in the runs list, each seed linked to its section
    index = pages["index.html"]
    assert "every run (4 in 2 configurations)" in index
    assert "every figure and table of these 3 seeds" in index
    assert re.findall(r'<td class="mono"><a href="([^"]+)">', index.split('<section id="runs">')[1]) == [
        f"runs/config-1-lora-000000000002.html#{s}" for s, _ in sections]
    # a test's runs: one link to the configuration, saying which seeds when not all
    row = re.search(r"test_lora_shifts_stance</a></td>\s*<td>(.*?)</td>", index).group(1)
    assert row == '<a href="runs/config-1-lora-000000000002.html">lora (3 seeds)</a>'
    subset = with_seeds(make_payload(), "lora-000000000002", 3)
    subset["tests"][1]["runs"] = ["lora-000000000002", "lora-000000000202"]
    row = re.search(r"test_lora_shifts_stance</a></td>\s*<td>(.*?)</td>", render_html(subset)).group(1)
    assert row == '<a href="runs/config-1-lora-000000000002.html">lora (seeds 0, 2 of 3)</a>'


def test_the_dose_comparison_draws_a_curve_per_configuration():
    """Seeds of one configuration are one dose-response curve in the session's comparison, their
    mean shift at each dose (no band: their intervals are each seed's); a one-seed run its own."""
    from stance_harness.report.html import _dose_curves

    payload = normalized(with_seeds(make_payload(), "lora-000000000002", 3))
    other = copy.deepcopy(payload["runs"]["full-000000000001"])
    other["measurements"] = {"dose_response": payload["runs"]["lora-000000000002"]["measurements"]["dose_response"]}
    payload["runs"]["full-000000000001"] = {**other, "label": "full"}
    curves = _dose_curves(payload["runs"])
    assert [c["label"] for c in curves] == ["full", "lora (3 seeds), mean"]
    assert curves[0]["measurements"]["dose_response"] is other["measurements"]["dose_response"]
    rows = curves[1]["measurements"]["dose_response"]["rows"]
    shifts = [[r["shift"] for r in payload["runs"][run_id]["measurements"]["dose_response"]["rows"]]
              for run_id in ("lora-000000000002", "lora-000000000102", "lora-000000000202")]
    assert [r["shift"] for r in rows] == pytest.approx([sum(column) / 3 for column in zip(*shifts)])
    assert rows[0]["shift"] == pytest.approx((-0.75 - 0.65 - 0.55) / 3) and "low" not in rows[0]


def test_a_seeds_figure_draws_their_mean_and_spread():
    """The bars of a configuration's per-layer figures are the seeds' mean, the whiskers their
    lowest and highest: checked against numpy, a seed lacking a layer or non-finite there left out."""
    import numpy as np

    from stance_harness.report.figures import _spread

    values = [[1.0, 2.0, float("nan"), 4.0], [3.0, float("nan"), float("nan"), 5.0], [8.0, 2.5, float("nan"), 6.0]]
    means, lows, highs = _spread(values)
    grid = np.array(values)
    assert means[:2] + means[3:] == pytest.approx(list(np.nanmean(grid[:, [0, 1, 3]], axis=0)))
    assert lows[:2] + lows[3:] == list(np.nanmin(grid[:, [0, 1, 3]], axis=0))
    assert highs[:2] + highs[3:] == list(np.nanmax(grid[:, [0, 1, 3]], axis=0))
    assert all(np.isnan(v[2]) for v in (means, lows, highs))  # no seed has it: nothing drawn
    from stance_harness.report.figures import layer_figure

    payload = with_seeds(make_payload(), "lora-000000000002", 3)
    seeds = [payload["runs"][r] for r in ("lora-000000000002", "lora-000000000102", "lora-000000000202")]
    # one value in every seed: its float mean (0.1 + 0.1 + 0.1) / 3 lies above the max; no negative whisker
    assert _spread([[0.1]] * 3)[0][0] > 0.1
    assert layer_figure([{**r, "layers": {"effective": [{"layer": "L0", "rel_change": 0.1, "mean_abs": 0.1}]}}
                         for r in seeds])
    drawn = layer_figure(seeds)
    assert drawn["alt"] == "weight change across layers, effective view, lora · stance terse-<b>bold</b> v1.0.0 · lr 0.0002, 3 seeds"


# -- in a real browser --------------------------------------------------------------------------

def _browser_or_skip():
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright not installed: pip install -e '.[test]' (its driver is in the wheel)")
    return executable, sync_playwright


SCREEN = {"width": 1280, "height": 1080}


def _launch(playwright, executable):
    try:
        return playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
    except Exception as exc:  # an old or broken chromium: say why instead of failing obscurely
        pytest.skip(f"chromium at {executable} would not start under playwright: {exc}")


def _watch(page, problems: list[str]) -> None:
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
            if msg.type in ("error", "warning") else None)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url}"))


def _on_first_screen(page, selector: str) -> dict:
    box = page.locator(selector).first.bounding_box()
    assert box is not None, f"{selector} is not shown"
    assert 0 <= box["y"] < SCREEN["height"], (selector, box)
    return box


def test_report_renders_in_headless_chromium(tmp_path):
    executable, sync_playwright = _browser_or_skip()
    reports = tmp_path / "reports"
    old, new = _write_two_sessions(reports)
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = _launch(playwright, executable)
        try:
            page = browser.new_page(viewport=SCREEN)
            _watch(page, problems)

            # the index of runs: newest first, and its link opens that run's page
            page.goto((reports / "index.html").as_uri(), wait_until="load")
            links = page.eval_on_selector_all("table.runs td:first-child a", "els => els.map(e => e.textContent)")
            assert links == [new.name, old.name]
            page.click(f"text={new.name}")
            page.wait_for_load_state("load")
            assert page.url == (new / "index.html").as_uri()

            # the failed gate first, a red banner; then the findings and the forest plot, all on the first screen
            gate = _on_first_screen(page, "#gate")
            findings = _on_first_screen(page, "table.findings")
            forest = _on_first_screen(page, "#findings figure img")
            assert gate["y"] + gate["height"] <= findings["y"] < forest["y"]
            assert page.locator("#gate h2").inner_text().startswith("Gate FAILED: compared with baseline 'main'")
            assert page.eval_on_selector("#gate", "e => getComputedStyle(e).borderTopColor") == "rgb(176, 0, 32)"
            assert page.locator("#status").inner_text().startswith("FAILED")
            # the verdict that flipped since the previous report on this model shows as changed
            changed = page.eval_on_selector_all("table.findings tr.changed td.change", "els => els.map(e => e.innerText)")
            assert changed == ["verdict refuted → supported", "new claim"], changed  # EVIL is new since then
            rows = page.eval_on_selector_all("table.tests tbody tr", "els => els.map(e => e.innerText)")
            assert len(rows) == 3 and any(EVIL in r for r in rows)  # shown as text, not run
            images = page.eval_on_selector_all(
                "img", "els => els.map(i => ({ok: i.complete, w: i.naturalWidth, h: i.naturalHeight}))")
            assert len(images) == 3 and all(i["ok"] and i["w"] > 0 and i["h"] > 0 for i in images), images
            assert page.evaluate("() => document.querySelectorAll('script').length") == 0
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)

            # a run's page, from its collapsed summary: every figure loads
            page.click("#runs details.runs > summary")  # every run, collapsed: the page stays short
            page.click("#runs section.run-summary summary >> nth=1")
            page.click("text=every figure and table of this run >> nth=1")
            page.wait_for_load_state("load")
            assert page.url.endswith(".html") and "/runs/" in page.url
            assert page.evaluate("() => document.images.length") == 6
            assert page.evaluate("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
            tables = page.eval_on_selector_all("table", "els => els.map(t => t.rows.length)")
            assert len(tables) >= 8 and all(n >= 2 for n in tables)

            # an old-style report renders too
            page.goto((old / "index.html").as_uri(), wait_until="load")
            assert page.evaluate("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
            page.screenshot(path=str(tmp_path / "old.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    for path in (shot, tmp_path / "old.png"):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    keep = os.environ.get("STANCE_HARNESS_SCREENSHOTS")  # a folder to copy screenshots to, for a person
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "report.png")
        shutil.copy(tmp_path / "old.png", Path(keep) / "old.png")


def test_drawn_figures_are_reused_by_a_later_report_of_the_same_runs(tmp_path, monkeypatch):
    import stance_harness.report.figures as figures_module

    first = render_pages(make_payload(), figure_cache=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 3 + 2 + 6  # forest, heatmap, loss curves; each run's figures
    for name in ("layer_figure", "curves_figure", "reliability_figure", "where_figure", "dose_figure",
                 "forest_figure", "layers_comparison_figure", "loss_comparison_figure"):
        monkeypatch.setattr(figures_module, name, lambda *a, **k: pytest.fail("drew a figure it had"))
    assert render_pages(make_payload(), figure_cache=tmp_path) == first
    # a later session that loaded the same runs from the store (their origin and timings differ):
    # nothing a figure shows changed, so none is drawn again
    loaded = make_payload()
    for run in loaded["runs"].values():
        run.update({"origin": "loaded", "origins": ["loaded"], "train_seconds": 99.0})
    render_pages(loaded, figure_cache=tmp_path)
    changed = make_payload()
    next(iter(changed["runs"].values()))["trace"]["loss"][0] += 1.0  # another run's curves: drawn anew
    with pytest.raises(pytest.fail.Exception, match="drew a figure"):
        render_pages(changed, figure_cache=tmp_path)


HYBRID = Path(__file__).parent / "data" / "hybrid_report.json"


LONG_REASON = ("recorded refuted on tiny-qwen2: hybrid[freeze_lora_steps=4] vs hybrid[freeze_lora_steps=0], ece "
               "(a = hybrid[freeze_lora_steps=4], b = hybrid[freeze_lora_steps=0]): run-level (one seed per arm): a "
               "claim about two runs, not about the methods. refuted: the 95% interval [+0.00626, +0.05] over 32 "
               "predictions lies at or above 0 (claim a - b < 0); 1 seed per arm x 32 predictions (32 informative), "
               "paired-swap randomization, 1999 swaps, one-sided p = 0.994")


def default_suites_sized(copies: int = 8, seeds: int = 1) -> dict:
    """The real hybrid-schedules report (tests/data) shaped like the default suites' session (8
    files, about 40 configurations and 70 tests), as the real one measured 12,360 px before it was
    folded: each copy a distinct file, configurations (its own learning rate) and tests; every test
    with a docstring of a real one's length; two XFAILs a file with whole recorded reasons; five
    claims with an effect a file (40 in the findings table and the forest plot, the real session had
    30). `seeds`: runs per configuration, differing only in the recipe's seed (the shipped suites
    train five), each seed's loss and per-layer change moved a little so the seeds' figures differ."""
    real = json.loads(HYBRID.read_text())
    payload = copy.deepcopy(real)
    payload["runs"], payload["tests"] = {}, []
    measured = next(c for t in real["tests"] for c in t["checks"] if c.get("verdict") == "refuted")
    for i in range(copies):
        renamed: dict[str, list[str]] = {}
        for run_id, run in real["runs"].items():
            for seed in range(seeds):
                seeded = copy.deepcopy(run)
                seeded["recipe"]["learning_rate"] = run["recipe"]["learning_rate"] * (1 + i / 10)  # the labels say so
                seeded["recipe"]["seed"] = seed
                seeded["trace"]["loss"] = [v * (1 + 0.03 * seed) if isinstance(v, float) else v
                                           for v in run["trace"]["loss"]]
                for row in seeded["layers"]["effective"]:
                    if isinstance(row.get("rel_change"), float):
                        row["rel_change"] *= 1 + 0.1 * seed
                new_id = f"{run_id}-{i}" + (f"-s{seed}" if seeds > 1 else "")
                renamed.setdefault(run_id, []).append(new_id)
                payload["runs"][new_id] = {**seeded, "run_id": new_id}
        for j, test in enumerate(real["tests"]):
            test = copy.deepcopy(test)
            test["nodeid"] = test["nodeid"].replace(".py::", f"_{i}.py::")
            test["runs"] = [new for r in test["runs"] for new in renamed.get(r, [r])]
            test["doc"] = (f"Claim {j} of file {i}: each schedule trains the stance-classification head and its "
                           "LoRA and norm layers with finite gradients, and the loss falls; the step time, "
                           "throughput and peak memory are measured side by side, paired step by step.\n\nMore.")
            if 1 <= j <= 3:  # three more claims with an effect, as the strategy and locus suites have
                test["checks"].append({**copy.deepcopy(measured), "verdict": "supported", "passed": True,
                                       "metrics": {**measured["metrics"], "estimate": -0.01 * (i + j)}})
            if j == 7:  # a second XFAIL, inconclusive, per file
                test.update({"outcome": "xfailed", "verdict": "inconclusive",
                             "message": "_pytest.outcomes.XFailed: " + LONG_REASON.replace("refuted", "inconclusive")})
            if j == 8:
                test["message"] = "_pytest.outcomes.XFailed: " + LONG_REASON
            payload["tests"].append(test)
    return payload


def test_a_default_sized_report_fits_and_is_written_quickly(tmp_path):
    """At the default suites' size, five seeds a configuration (200 runs in 40 configurations), the
    page is at most 10 screens tall before any click and at most 1.5 MB; the findings table and the
    forest plot are on the first screen; figures are drawn per configuration, not per run (as many
    as for one seed); a warm rewrite (every figure cached) takes at most 5 s."""
    import time

    executable, sync_playwright = _browser_or_skip()
    reports = tmp_path / "reports"
    payload = default_suites_sized(seeds=5)
    assert len(payload["runs"]) == 200 and len(payload["tests"]) == 72
    assert len([r for r in findings(normalized(payload)) if r["estimate"] is not None]) == 40
    said: list[str] = []
    started = time.perf_counter()
    folder = write_reports(reports, copy.deepcopy(payload), progress=said.append)
    cold = time.perf_counter() - started
    # the forest plot; per file its configurations' heatmap and loss curves; per configuration
    # (a hybrid run's figures) both per-layer views, the curves and the reliability diagram
    drawn = int(re.search(r"\((\d+) figure\(s\) drawn", said[1]).group(1))
    assert drawn == 1 + 8 * 2 + 40 * 4, said
    said.clear()
    started = time.perf_counter()
    write_reports(reports, copy.deepcopy(payload), progress=said.append)
    warm = time.perf_counter() - started
    print(f"report of 200 runs (40 configurations) / 72 tests written in {cold:.2f} s cold ({drawn} figures), "
          f"{warm:.2f} s warm")
    # the time is printed, not asserted: a timed test fails on a loaded machine (benchmarks/ hold the figures)
    # a line says what is being written before it is; the one after: nothing was drawn again
    assert said[0] == (f"writing the report to {folder}/: report.json, report.md, index.html and 200 run page(s) "
                       "for 72 test(s)"), said
    assert said[1].endswith(f"(0 figure(s) drawn, {drawn + 1} reused from the figure cache)"), said  # + report.md's forest
    page_bytes = (folder / "index.html").stat().st_size
    assert page_bytes <= 1.5 * 1024 * 1024, page_bytes
    assert len(list((folder / "runs").glob("config-*.html"))) == 40 and len(list((folder / "runs").glob("*.html"))) == 40
    with sync_playwright() as playwright:
        browser = _launch(playwright, executable)
        try:
            page = browser.new_page(viewport=SCREEN)
            problems: list[str] = []
            _watch(page, problems)
            page.goto((folder / "index.html").as_uri(), wait_until="load")
            height = page.evaluate("() => document.documentElement.scrollHeight")
            print(f"page height {height} px ({height / SCREEN['height']:.2f} screens), {page_bytes:,} bytes")
            assert height <= 10 * SCREEN["height"], height
            _on_first_screen(page, "table.findings")
            _on_first_screen(page, "#findings figure img")
            # each file's runs compared: a heatmap of their per-layer change beside their loss curves
            compared = page.eval_on_selector_all("h3.compare", "els => els.map(e => e.textContent)")
            assert compared == [f"suites/test_hybrid_schedules_{i}.py: 25 runs compared (5 configurations, seeds averaged)"
                                for i in range(8)]
            assert page.locator(".figrow figure img").count() == 16
            assert page.evaluate("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
            keep = os.environ.get("STANCE_HARNESS_SCREENSHOTS")  # the docs' screenshots: the first two screens
            if keep:
                Path(keep).mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(Path(keep) / "report-screen-1.png"))
                page.evaluate(f"() => window.scrollTo(0, {SCREEN['height']})")
                page.screenshot(path=str(Path(keep) / "report-screen-2.png"))
            # a configuration's page, from the runs list: its figures once, its five seeds' sections
            page.click("#runs details.runs > summary")
            page.click("#runs section.run-summary summary >> nth=0")
            page.click("text=every figure and table of these 5 seeds >> nth=0")
            page.wait_for_load_state("load")
            assert "/runs/config-0-" in page.url
            assert page.evaluate("() => [...document.images].map(i => i.complete && i.naturalWidth > 0)") == [True] * 4
            assert page.locator("section.seed h2").all_inner_texts()[:2] == [
                "seed 0 hybrid-a50103d7f8632330-0-s0", "seed 1 hybrid-a50103d7f8632330-0-s1"]
            assert page.locator("section.seed").count() == 5
            assert problems == []
        finally:
            browser.close()
