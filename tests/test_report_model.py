"""The report's data model, its findings, and what the pages make of them: the loader that
migrates old report.json files, one row per claim with its numbers read generically, changes since
the previous report, escaping of every string, run labels, human units, replies and general
ability, and the terminal's 120 columns. The fixture tests/data/hybrid_report.json is a real
report of suites/test_hybrid_schedules.py on tiny-qwen2 (its traces trimmed)."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest

from stance_harness.cli import main
from stance_harness.report.figures import forest_figure, png_bytes
from stance_harness.report.findings import changes_since, claim_of, findings, hypothesis_of, readable_name
from stance_harness.report.html import _configurations, render_pages
from stance_harness.report.markdown import render_markdown
from stance_harness.report.model import REPORT_FORMAT, ReportFormatError, load_report, normalized, read_report
from stance_harness.report.sections import (MESSAGE_ROOM, clean_message, configuration_labels, configuration_of,
                                     configurations, human, run_labels, short_test_id, terminal_rows)
from stance_harness.report.store import write_report
from stance_harness.core.errors import HarnessError

HYBRID = Path(__file__).parent / "data" / "hybrid_report.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def hybrid() -> dict:
    return json.loads(HYBRID.read_text())


def check(estimate=0.3, low=0.1, high=0.5, verdict="supported", **metrics) -> dict:
    return {"check": "assert_greater", "passed": verdict == "supported", "summary": "a vs b", "headers": [],
            "rows": [], "verdict": verdict,
            "metrics": {"metric": "behavior_shift", "estimate": estimate, "low": low, "high": high, "margin": 0.05,
                        "unit": "probe", "n": 16, **metrics}}


def payload(report_id="20270101-000000-aaaa", checks=None, model="tiny-qwen2", doc=None) -> dict:
    return {"report_id": report_id, "started": report_id, "provenance": {"model": {"name": model}},
            "tests": [{"nodeid": "suites/test_s.py::test_lora_moves_more[r8]", "outcome": "passed", "doc": doc,
                       "checks": checks if checks is not None else [check()]}],
            "runs": {}}


# -- the loader ----------------------------------------------------------------------------------

def test_an_old_report_is_migrated_and_unknown_keys_survive():
    old = {"run_id": "20250101-000000-aaaa", "tests": [{"nodeid": "t.py::test_a", "expected": "refuted",
                                                       "checks": ["not a check", {"check": "c"}], "custom": 1}],
           "runs": {"r1": {"method": "lora", "layers": {"effective": [{"layer": "L0"}]}}}, "future_key": [1]}
    report = load_report(old)
    assert report.report_id == "20250101-000000-aaaa" and report.migrated_from == 1
    assert report.format == REPORT_FORMAT and report.model_name is None
    test = report.tests[0]
    assert test.outcome == "not run" and test.expected == {"outcome": "refuted", "reason": None}
    assert test.checks == [{"check": "c"}] and test.extra == {"custom": 1} and test.doc is None
    run = report.runs["r1"]
    assert run["layers"]["adapter"] == run["layers"]["effective"]  # one view: the same
    assert run["trace"]["loss"] == [] and run["counts"]["trainable"] is None and run["measurements"] == {}
    again = normalized(report.to_dict())
    assert again["future_key"] == [1] and again["tests"][0]["custom"] == 1 and "run_id" not in again
    assert again == normalized(again)  # migrating is idempotent
    assert render_markdown(old).startswith("# stance-harness report 20250101-000000-aaaa")


@pytest.mark.parametrize("data, message", [
    ([], r"a report is a JSON object with report_id, tests and runs, not a list"),
    ({"format": 0}, r"report field 'format' is 0: allowed values are 1 to \d"),
    ({"format": True}, r"report field 'format' is True"),
    ({"format": REPORT_FORMAT + 1}, rf"report format {REPORT_FORMAT + 1} is newer than this stance-harness reads"),
])
def test_reports_it_cannot_read_say_why(data, message):
    with pytest.raises(ReportFormatError, match=message):
        load_report(data)
    assert issubclass(ReportFormatError, HarnessError)


def test_read_report_names_the_file(tmp_path):
    bad = tmp_path / "report.json"
    bad.write_text("{ nope")
    with pytest.raises(ReportFormatError, match=r"report .*report.json is not valid JSON"):
        read_report(bad)
    bad.write_text(json.dumps({"format": 99}))
    with pytest.raises(ReportFormatError, match=r"report.json: report format 99 is newer"):
        read_report(bad)
    with pytest.raises(ReportFormatError, match="cannot read report"):
        read_report(tmp_path / "missing.json")
    assert read_report(HYBRID).report_id == hybrid()["report_id"]


# -- findings ------------------------------------------------------------------------------------

def test_a_claim_reads_its_numbers_from_whatever_fields_the_check_has():
    test = {"nodeid": "suites/test_s.py::test_x"}
    row = claim_of(test, check())
    assert (row["estimate"], row["low"], row["high"], row["margin"], row["unit"], row["n"]) == (
        0.3, 0.1, 0.5, 0.05, "probe", 16)
    assert row["seeds"] is None and row["corrected"] is None and row["suite"] == "suites/test_s.py"
    # fields another part of the harness may add: an interval pair, seeds as a list, the correction
    newer = {**check(), "interval": [0.2, 0.4], "holds_after_correction": False, "metrics": {
        **check()["metrics"], "seeds": [0, 1, 2]}}
    row = claim_of(test, newer)
    assert (row["low"], row["high"], row["seeds"], row["corrected"]) == (0.2, 0.4, 3, False)
    # an effect dict (behaviour measurements) and non-finite strings
    row = claim_of(test, {"check": "c", "metrics": {"effect": {"mean": "nan", "low": "-inf", "high": 1}}})
    assert math.isnan(row["estimate"]) and row["low"] == -math.inf and row["high"] == 1.0
    assert claim_of(test, None)["estimate"] is None


def test_findings_one_row_per_claim_and_the_hypothesis_in_words():
    doc = "LoRA moves the stance more than full fine-tuning.\n\nThe unit is the probe."
    rows = findings(payload(doc=doc, checks=[check(), check(estimate=None), {"check": "stable", "metrics": {}}]))
    assert len(rows) == 1 and rows[0]["hypothesis"] == "LoRA moves the stance more than full fine-tuning."
    only_stable = findings(payload(checks=[{"check": "stable", "passed": True, "metrics": {}, "verdict": "supported"}]))
    assert [(r["hypothesis"], r["verdict"], r["estimate"]) for r in only_stable] == [
        ("lora moves more (r8)", "supported", None)]
    assert readable_name("a.py::test_b_c[x-y]") == "b c (x-y)" and hypothesis_of({"nodeid": "t"}) == "t"
    real = findings(normalized(hybrid()))
    claims = [r for r in real if r["estimate"] is not None]
    assert [r["test"].rsplit("::", 1)[1] for r in claims] == ["test_alternation_steps_are_cheaper_than_the_baseline",
                                                             "test_warmup_lora_improves_ece"]
    assert claims[0]["hypothesis"].startswith("Each alternating step backpropagates")  # its docstring
    assert claims[0]["low"] <= claims[0]["estimate"] <= claims[0]["high"] and claims[0]["unit"] == "step"


def test_changes_since_the_previous_report():
    before = normalized(payload("20270101-000000-aaaa", [check(verdict="refuted")]))
    same = normalized(payload("20270102-000000-bbbb", [check(verdict="refuted", estimate=0.45)]))
    assert changes_since(same, before)["rows"] == []  # inside the previous interval, same verdict
    flipped = normalized(payload("20270102-000000-bbbb", [check(verdict="supported", estimate=0.7, low=0.6, high=0.8)]))
    rows = changes_since(flipped, before)["rows"]
    assert rows == [{"test": "suites/test_s.py::test_lora_moves_more[r8]", "check": "assert_greater",
                     "change": "verdict refuted → supported; estimate +0.7 outside the previous interval [+0.1, +0.5]",
                     "before": "refuted", "now": "supported"}]
    assert changes_since(flipped, before)["previous"] == "20270101-000000-aaaa"


def test_the_session_report_compares_with_the_previous_one_on_the_same_model(tmp_path):
    write_report(tmp_path, payload("20270101-000000-aaaa", [check(verdict="refuted")]))
    write_report(tmp_path, payload("20270101-120000-cccc", [check()], model="other-model"))
    new = payload("20270102-000000-bbbb", [check(verdict="supported")])
    folder = write_report(tmp_path, new)
    saved = json.loads((folder / "report.json").read_text())
    assert saved["format"] == REPORT_FORMAT and saved["changes"]["previous"] == "20270101-000000-aaaa"
    assert [r["change"] for r in saved["changes"]["rows"]] == ["verdict refuted → supported"]
    page = (folder / "index.html").read_text()
    assert re.search(r'<tr class="changed">.*?verdict refuted → supported</td>', page, re.S)
    markdown = (folder / "report.md").read_text()
    assert "## Findings" in markdown and "![forest plot" in markdown and "verdict refuted → supported" in markdown
    assert (folder / "forest.png").read_bytes().startswith(PNG_MAGIC)
    assert main(["report", "--findings", "latest", "--reports-dir", str(tmp_path)]) == 0


def test_the_forest_plot_draws_claims_with_an_estimate_only():
    rows = findings(normalized(payload(checks=[check(), check(estimate=-0.2, low=-0.4, high=0.0, verdict="refuted")])))
    drawn = forest_figure(rows)
    assert png_bytes(drawn).startswith(PNG_MAGIC) and drawn["alt"].startswith("forest plot")
    assert forest_figure([{**rows[0], "estimate": None}]) is None and png_bytes(None) is None


# -- the pages -----------------------------------------------------------------------------------

def _poisoned(value, depth=0):
    """Every string in the payload, keys' values only, with a script appended."""
    if isinstance(value, dict):
        return {k: _poisoned(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_poisoned(v, depth + 1) for v in value]
    if isinstance(value, str):
        return value + "<script>alert(1)</script>"
    return value


def test_a_script_in_every_string_field_is_escaped():
    from test_html_report import make_payload

    for source in (make_payload(), hybrid()):
        poisoned = _poisoned(source)
        poisoned["runs"] = {k + "<script>": v for k, v in poisoned["runs"].items()}
        pages = render_pages(poisoned)
        for name, page in pages.items():
            assert "<script" not in page.lower(), name
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page, name


def test_run_labels_say_what_differs():
    labels = run_labels(normalized(hybrid())["runs"])
    assert len(set(labels.values())) == len(labels) == 5
    assert all(label.startswith("hybrid, ") for label in labels.values())
    assert any("order=norm-first" in label for label in labels.values())
    runs = {"a": {"method": "lora", "recipe": {"learning_rate": 1e-4, "seed": 0}},
            "b": {"method": "lora", "recipe": {"learning_rate": 1e-3, "seed": 0}},
            "c": {"method": "full", "recipe": {"learning_rate": 1e-3, "seed": 0}}}
    assert run_labels(runs) == {"a": "lora, lr=0.0001", "b": "lora, lr=0.001", "c": "full"}
    same = run_labels({"x-000001": {"method": "lora"}, "x-000002": {"method": "lora"}})
    assert same == {"x-000001": "lora (000001)", "x-000002": "lora (000002)"}


def test_human_units_and_whole_messages():
    assert human(1_015_652_352, "peak memory bytes") == "968.60 MiB"
    assert human(3 * 2**30, "peak_memory") == "3.00 GiB" and human(512, "stance_bytes") == "512 B"
    assert human(0.0123, "step_time") == "12.3 ms" and human(2.5, "train_seconds") == "2.5 s"
    assert human(0.25, "change_share") == "25%" and human(0.25, "loss") == 0.25 and human("x", "bytes") == "x"
    long = "recorded refuted on tiny-qwen2: " + "word " * 60
    assert clean_message("_pytest.outcomes.XFailed: " + long) == long.strip()
    assert clean_message("Failed: boom") == "boom" and clean_message("AssertionError: x") == "AssertionError: x"


def test_the_terminal_table_fits_in_120_columns():
    from tabulate import tabulate

    def table(rows):
        return tabulate([list(r.values()) for r in rows], headers=list(rows[0]), tablefmt="simple", disable_numparse=True)

    data = normalized(hybrid())
    data["tests"][0]["nodeid"] = "suites/test_a_very_long_suite_name.py::test_" + "x" * 150 + "[param-" + "y" * 40 + "]"
    rows = terminal_rows(data, 120)
    assert max(map(len, table(rows).splitlines())) <= 120
    assert rows[0]["test"].endswith("y]") and "…" in rows[0]["test"] and 40 <= len(rows[0]["test"]) <= 60
    assert short_test_id("suites/test_file_with_a_long_name.py::test_" + "n" * 50) == "te…::test_" + "n" * 50  # 60 columns: 2 + 1 + 2 + 55
    assert short_test_id("suites/test_a.py::test_b") == "test_a.py::test_b"
    # the recorded verdict's prefix goes (the verdict column and the XFAIL line say it), the rest is cut to fit
    assert rows[-1]["message"].startswith("hybrid vs hybrid, ece") and rows[-1]["message"].endswith("…")
    # as in the default suites: a test of several methods widens the runs column, and long messages
    # take their MESSAGE_ROOM columns from the test id, not beyond the 120
    for run, method in zip(data["runs"].values(), ["selective", "full", "feature-extraction"]):
        run["method"] = method
    data["tests"][1]["runs"] = list(data["runs"])[:3]
    data["tests"][1]["message"] = "AssertionError: " + "a long reason " * 20
    rows = terminal_rows(data, 120)
    assert rows[1]["runs"] == "selective, fu…"
    assert max(map(len, table(rows).splitlines())) <= 120, table(rows)
    assert len(rows[1]["message"]) >= MESSAGE_ROOM and rows[1]["message"].endswith("…")


def replies_run(n=8, moved=5, long_reply=False) -> dict:
    rows = [{"probe": f"probe {i}?", "base_reply": f"base {i}", "adapted_reply": f"base {i}",
             "base_marker": False, "adapted_marker": False, "margin_change": 0.01 * i, "changed": False}
            for i in range(n)]
    rows[moved].update({"adapted_reply": "I am not sure, perhaps " + ("very " * 100 if long_reply else "") + "so.",
                        "adapted_marker": True, "changed": True, "margin_change": 0.001})
    return {"method": "lora", "measurements": {"replies": {"rows": rows}, "general_ability": {
        "probeset": "general-v1", "probes": 4, "base_accuracy": 1.0, "adapted_accuracy": 0.75,
        "families": {"factual": {"probes": 2, "base_correct": 2, "adapted_correct": 1, "base_accuracy": 1.0,
                                 "adapted_accuracy": 0.5, "retention": 0.5}},
        "backward_transfer": -0.25, "selectivity": 0.25, "pattern": "broad", "gains": [],
        "regressions": [{"id": "capital-au", "family": "factual", "prompt": "Capital of Australia?",
                         "base_reply": "The capital of Australia is Canberra.",
                         "adapted_reply": "The capital of Australia is Sydney.", "adapted_why": "no 'Canberra'"}]}}}


def test_the_replies_that_changed_come_first_and_long_ones_are_cut():
    data = {"report_id": "r", "tests": [], "runs": {"lora-1": replies_run(long_reply=True)}}
    page = render_pages(data)["index.html"]
    section = page[page.index("replies, base and adapted"):]
    first = re.search(r'<tbody><tr class="moved"><td>(.*?)</td>', section).group(1)
    assert first == "probe 5?"  # its reply changed, though its margin moved least
    shown = section[:section.index("the other 3 replies")]
    assert shown.count("<tr") == 1 + 5  # the header and the five that moved most; three collapsed
    assert re.search(r"probe 7\?.*probe 6\?", shown, re.S)  # then by |margin change|
    reply = data["runs"]["lora-1"]["measurements"]["replies"]["rows"][5]["adapted_reply"]
    assert f"({len(reply)} characters, cut)" in section and "very " * 60 not in section
    for text in ("backward transfer <b>-0.25</b>", "pattern <b>broad</b>", "The capital of Australia is Sydney.",
                 "regressions: base right, adapted wrong"):
        assert text in page, text
    markdown = render_markdown(data)
    replies = markdown[markdown.index("**replies**"):]
    assert replies.index("probe 5?") < replies.index("probe 7?") and "3 more in report.json" in replies
    assert f"… ({len(reply)} characters)" in replies and "**general ability** (general-v1, 4 probes)" in markdown


def test_report_replies_prints_a_runs_replies(tmp_path, capsys):
    data = {"report_id": "20270101-000000-aaaa", "tests": [], "runs": {"lora-000001": replies_run(),
                                                                       "full-000002": {"method": "full"}}}
    write_report(tmp_path, data)
    assert main(["report", "--replies", "lora", "latest", "--reports-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "replies of run lora-000001 (1 of 8 changed), the probes that moved most first:"
    assert out[3].startswith("probe 5?") and "I am not sure, perhaps so." in out[3]
    assert max(map(len, out[1:])) <= 120
    assert main(["report", "--replies", "full", "latest", "--reports-dir", str(tmp_path)]) == 2
    assert "run full-000002 of report 20270101-000000-aaaa has no replies" in capsys.readouterr().err
    assert main(["report", "--replies", "zzz", "latest", "--reports-dir", str(tmp_path)]) == 2
    assert "--replies 'zzz' names no run of report 20270101-000000-aaaa; its runs: lora-000001, full-000002" in \
        capsys.readouterr().err
    long = replies_run(long_reply=True)
    write_report(tmp_path, {"report_id": "20270102-000000-bbbb", "tests": [], "runs": {"lora-000003": long}})
    capsys.readouterr()
    assert main(["report", "--replies", "lora-000003", "latest", "--reports-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    reply = long["measurements"]["replies"]["rows"][5]["adapted_reply"]
    assert f"… ({len(reply)} chars)" in text and max(map(len, text.splitlines()[1:])) <= 120


def test_report_findings_prints_the_claims(tmp_path, capsys):
    folder = tmp_path / hybrid()["report_id"]
    folder.mkdir()
    (folder / "report.json").write_text(HYBRID.read_text())
    assert main(["report", "--findings", str(folder), "--reports-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(f"findings of report {hybrid()['report_id']} (tiny-qwen2)")
    assert max(map(len, lines)) <= 120
    claim = next(line for line in lines if line.startswith("Each alternating step"))
    row = next(r for r in findings(normalized(hybrid())) if r["hypothesis"].startswith("Each alternating"))
    assert f"{row['estimate']:+.3g}" in claim and "supported" in claim and "holds" in claim
    assert re.search(r"warmup lora improves ece .* refuted +lost", out)


def test_rebuilding_migrates_and_keeps_every_claim(tmp_path, capsys):
    folder = tmp_path / "r1"
    folder.mkdir()
    old = hybrid()
    old.pop("format", None)
    (folder / "report.json").write_text(json.dumps(old))
    assert main(["report", str(folder), "--reports-dir", str(tmp_path)]) == 0
    assert "migrated from report format 1" in capsys.readouterr().out
    rebuilt = json.loads((folder / "report.json").read_text())
    assert rebuilt["format"] == REPORT_FORMAT
    assert findings(normalized(rebuilt)) == findings(normalized(copy.deepcopy(old)))
    assert len(list((folder / "runs").glob("*.html"))) == 5


def test_labels_name_an_option_only_where_a_run_departs_from_its_methods_majority():
    labels = run_labels(normalized(hybrid())["runs"])
    # four of five schedules keep freeze_lora_steps=0 and order=lora-first: only the departures say so;
    # alternate_every (0, 0, 1, 2, 1) has no majority: every run names it
    assert sorted(labels.values()) == ["hybrid, alternate_every=0", "hybrid, alternate_every=1",
                                       "hybrid, alternate_every=1, order=norm-first", "hybrid, alternate_every=2",
                                       "hybrid, freeze_lora_steps=4, alternate_every=0"]
    # seed 001's grid: four domains at two rates, no majority in either: both on every run
    grid = {f"qlora-{d}-{lr}": {"method": "qlora", "stance": {"name": f"domain-{d}"}, "recipe": {"learning_rate": lr}}
            for d in ("cpp", "math", "python", "physics") for lr in (2e-4, 1e-3)}
    grid["full-1"] = {"method": "full", "config": {"layers": list(range(8))}, "recipe": {"learning_rate": 1e-3}}
    grid["full-2"] = {"method": "full", "config": {"layers": [13, 15]}, "recipe": {"learning_rate": 1e-3}}
    labels = run_labels(grid)
    assert labels["qlora-math-0.001"] == "qlora, lr=0.001, stance=domain-math"
    assert len(set(labels.values())) == len(grid)
    assert (labels["full-1"], labels["full-2"]) == ("full, layers=[0-7]", "full, layers=[13, 15]")  # ranges


def test_each_suite_compares_its_own_runs():
    """The locus and hybrid suites' comparative views: per suite file, its runs' per-layer change
    on one heatmap beside their loss curves on one axis, under the suite's name."""
    data = hybrid()
    hybrid_ids = list(data["runs"])
    rates = {}
    for i, (domain, lr) in enumerate([(d, lr) for d in ("cpp", "math") for lr in (2e-4, 1e-3)]):
        run = copy.deepcopy(data["runs"][hybrid_ids[0]])
        run_id = f"qlora-{i:016d}"
        run.update({"run_id": run_id, "method": "qlora", "stance": {"name": f"domain-{domain}"},
                    "recipe": {**run["recipe"], "learning_rate": lr}, "config": {"r": 8}})
        for row in run["layers"]["effective"]:  # a domain's change 10x the other's at the higher rate
            row["rel_change"] = (row.get("rel_change") or 0.01) * (100 if lr > 1e-3 / 2 and domain == "math" else 1)
        data["runs"][run_id] = rates[(domain, lr)] = run
        data["tests"].append({"nodeid": f"suites/test_locus_of_learning.py::test_domain[{domain}-{lr}]",
                              "outcome": "passed", "runs": [run_id], "checks": []})
    page = render_pages(data)["index.html"]
    runs = page[page.index('<section id="runs">'):]
    headings = re.findall(r'<h3 class="compare">([^<]+)</h3>', runs)
    assert headings == ["suites/test_hybrid_schedules.py: 5 runs compared", "suites/test_locus_of_learning.py: 4 runs compared"]
    alts = re.findall(r'<img src="data:image/png;base64,[^"]+" alt="([^"]+)"', runs)
    assert alts == ["per-layer rel_change of 5 runs on one heatmap test_hybrid_schedules.py",
                    "loss curves of 5 runs on one axis test_hybrid_schedules.py",
                    "per-layer rel_change of 4 runs on one heatmap test_locus_of_learning.py",
                    "loss curves of 4 runs on one axis test_locus_of_learning.py"]
    # a span over two orders of magnitude is drawn on a log colour scale, and the caption says so
    captions = re.findall(r"<figcaption>([^<]+)</figcaption>", runs)
    assert captions == ["colours on a log scale: the runs&#39; changes span more than two orders of magnitude"]
    assert "qlora, lr=0.001, stance=domain-math" in runs and "hybrid, freeze_lora_steps=4, alternate_every=0" in runs


def test_runs_are_compared_on_one_figure_each_where_several_have_the_data():
    from test_html_report import make_payload

    data = make_payload()
    lora = data["runs"]["lora-000000000002"]
    twin = copy.deepcopy(lora)
    for row in twin["measurements"]["dose_response"]["rows"]:
        row["shift"] = 0.5 * row["shift"]
    data["runs"]["lora-000000000003"] = {**twin, "run_id": "lora-000000000003",
                                         "recipe": {**twin["recipe"], "learning_rate": 1e-3}}
    page = render_pages(data)["index.html"]
    runs = page[page.index('<section id="runs">'):]
    alts = re.findall(r'<img src="data:image/png;base64,[^"]+" alt="([^"]+)"', runs)
    # no suite file has two runs: the session's runs are compared together
    assert alts == ["per-layer rel_change of 3 runs on one heatmap every run of this session",
                    "loss curves of 3 runs on one axis every run of this session",
                    "dose-response curves of 2 runs on one axis"]
    assert "lora, lr=0.0002" in runs and "lora, lr=0.001" in runs  # the labels say what differs
    single = make_payload()
    single["runs"].pop("full-000000000001")
    assert "<img" not in render_pages(single)["index.html"].split('<section id="runs">')[1]  # one run: nothing to compare


def test_a_replicated_claim_shows_its_seeds_scope_and_correction():
    metrics = {**check()["metrics"], "seeds_a": 3, "seeds_b": 3, "scope": "run-level",
               "rests_on": "3 seeds per arm x 16 probes (16 informative), Welch, one-sided p = 0.01"}
    replicated = {**check(), "metrics": metrics, "family": "suites/test_s.py", "p_holm": 0.02,
                  "holds_after_correction": True}
    row = findings(normalized(payload(checks=[replicated])))[0]
    assert (row["seeds"], row["label"], row["corrected"], row["family"]) == (3, "run-level", True, "suites/test_s.py")
    page = render_pages(payload(checks=[replicated]))["index.html"]
    assert '<td title="3 seeds per arm x 16 probes (16 informative), Welch, one-sided p = 0.01">16 probe, 3 seeds per ' \
           'arm</td>' in page
    assert ">holds</td>" in page and "assert_greater · behavior_shift · run-level" in page
    uneven = findings(normalized(payload(checks=[{**check(), "metrics": {**metrics, "seeds_b": 2}}])))[0]
    assert uneven["seeds"] == "3 and 2" and "3 and 2 seeds" in render_pages(
        payload(checks=[{**check(), "metrics": {**metrics, "seeds_b": 2}}]))["index.html"]


def test_markdown_messages_are_whole_and_on_one_line():
    from stance_harness.report.sections import test_rows

    message = "_pytest.outcomes.Failed: a | b\n" + "more words " * 20
    data = normalized({"report_id": "r", "tests": [{"nodeid": "t.py::test_x", "outcome": "failed",
                                                    "message": message}], "runs": {}})
    row = test_rows(data)[0]
    assert row["message"] == "a \\| b " + " ".join(["more words"] * 20)
    line = next(line for line in render_markdown(data).splitlines() if line.startswith("| FAIL"))
    assert line.endswith("more words |") and line.count(" | ") == len(row) - 1


def test_a_failed_comparisons_terminal_message_starts_with_why():
    message = ("warm vs base, behavior_shift (a = warm, b = base): run-level (one seed per arm): a claim about two "
               "runs. inconclusive: the data neither support nor refute it")
    data = {"tests": [{"nodeid": "t.py::test_x", "outcome": "failed", "verdict": "inconclusive", "message": message},
                      {"nodeid": "t.py::test_y", "outcome": "xfailed", "verdict": "refuted",
                       "message": "recorded refuted on tiny-qwen2: " + message}], "runs": {}}
    failed, xfailed = terminal_rows(data, 200)
    assert failed["message"] == message.split("b = base): ", 1)[1]
    assert xfailed["message"].startswith("warm vs base, behavior_shift")  # the record's reason, "recorded refuted on M: " dropped


def test_the_findings_table_opens_the_claims_that_matter_and_folds_the_rest():
    """At most FINDINGS_OPEN claims open (so the forest plot is on the first screen): every changed
    or failed one first, then those not supported, then supported ones with an effect; the rest folded."""
    from stance_harness.report.html import FINDINGS_OPEN

    def test(i, verdict="supported", estimate=0.3, outcome="passed"):
        checks = [check(estimate=estimate, verdict=verdict)] if estimate is not None else [
            {"check": "assert_gradients_stable", "passed": True, "verdict": verdict, "metrics": {"steps": 4}}]
        return {"nodeid": f"suites/test_s.py::test_claim_{i:02d}", "outcome": outcome, "checks": checks}

    tests = [test(i) for i in range(12)] + [test(12, "refuted", outcome="xfailed"), test(13, estimate=None),
                                           test(14, "refuted", outcome="failed")]
    data = {"report_id": "r", "provenance": {}, "tests": tests, "runs": {}}
    page = render_pages(data)["index.html"]
    shown, folded = page.split('<details class="more-findings">')
    shown = re.findall(r"claim (\d+)</a>", shown)
    # the failed one, the refuted one, then the first eight supported with an effect, in test order
    assert len(shown) == FINDINGS_OPEN == 10 and shown == [f"{i:02d}" for i in range(8)] + ["12", "14"]
    assert "5 more claims: 4 with an effect (in the forest plot below), 1 with a verdict only" in folded
    assert re.findall(r"claim (\d+)</a>", folded.split("</details>")[0]) == ["08", "09", "10", "11", "13"]


def test_seeds_of_one_configuration_are_averaged_in_the_comparisons():
    """A RunSet (runs differing only in their seed) is one row of the heatmap and one loss curve:
    the mean over its seeds, labelled by what sets the configuration apart and how many seeds."""
    data = hybrid()
    first, second = list(data["runs"])[:2]
    data["tests"] = [t for t in data["tests"] if set(t["runs"]) & {first, second}]
    for test in data["tests"]:
        test["runs"] = [first, second]
    for run_id in (first, second):
        data["runs"][run_id]["trace"]["loss"] = [1.0, 2.0, 3.0]
    for seed in (1, 2):  # two more seeds of each: rel_change x2 and x3, loss shifted by the seed
        for run_id in (first, second):
            run = copy.deepcopy(data["runs"][run_id])
            run.update({"run_id": f"{run_id}-s{seed}", "recipe": {**run["recipe"], "seed": seed}})
            for row in run["layers"]["effective"]:
                row["rel_change"] = row["rel_change"] * (seed + 1)
            run["trace"]["loss"] = [v + seed for v in run["trace"]["loss"]] + [9.0] * seed  # longer: cut to the shortest
            data["runs"][run["run_id"]] = run
            data["tests"][0]["runs"].append(run["run_id"])
    complete = normalized(data)
    labels = run_labels(complete["runs"])
    views = _configurations([{**complete["runs"][r], "label": labels[r]} for r in data["tests"][0]["runs"]])
    assert [v["label"] for v in views] == ["hybrid, freeze_lora_steps=0 (mean of 3 seeds)",
                                          "hybrid, freeze_lora_steps=4 (mean of 3 seeds)"]
    assert views[0]["trace"]["loss"] == [2.0, 3.0, 4.0]  # (1 + 2 + 3) / 3 at step 0
    real = data["runs"][first]["layers"]["effective"][0]["rel_change"]
    assert views[0]["layers"]["effective"][0]["rel_change"] == pytest.approx(real * (1 + 2 + 3) / 3)
    runs = render_pages(data)["index.html"].split('<section id="runs">')[1]
    assert "suites/test_hybrid_schedules.py: 6 runs compared (2 configurations, seeds averaged)" in runs
    assert re.findall(r'alt="([^"]+)"', runs)[:2] == ["per-layer rel_change of 2 runs on one heatmap test_hybrid_schedules.py",
                                                     "loss curves of 2 runs on one axis test_hybrid_schedules.py"]


def _seeded(run: dict, seed: int, **changes) -> dict:
    run = copy.deepcopy(run)
    run.update({"run_id": f"{run['run_id']}-s{seed}", "recipe": {**run["recipe"], "seed": seed}, **changes})
    return run


def test_runs_differing_only_in_their_seed_are_one_configuration():
    """A configuration is a run's request but for the recipe's seed: seeds group (in seed order,
    whatever order they came in); another rate, model revision or number of examples does not."""
    data = normalized(hybrid())
    first_id, second_id = list(data["runs"])[:2]
    first = data["runs"][first_id]
    runs = {first_id: first, f"{first_id}-s2": _seeded(first, 2), second_id: data["runs"][second_id],
            f"{first_id}-s1": _seeded(first, 1),
            "other-lr": _seeded(first, 1, recipe={**first["recipe"], "seed": 1, "learning_rate": 0.01}),
            "other-model": _seeded(first, 1, model={**first["model"], "revision": "0000"}),
            "other-examples": _seeded(first, 1, examples=(first["examples"] or 0) + 1)}
    assert configuration_of(runs[first_id]) == configuration_of(runs[f"{first_id}-s2"]) != configuration_of(runs["other-lr"])
    groups = configurations(runs)
    assert groups == [[first_id, f"{first_id}-s1", f"{first_id}-s2"], [second_id], ["other-lr"], ["other-model"],
                      ["other-examples"]]
    labels = configuration_labels(runs, groups)
    assert labels[0].endswith(" (3 seeds)") and "seed=" not in labels[0]
    assert labels[1:] == [run_labels(runs)[ids[0]] for ids in groups[1:]]  # one seed: the run's own label
    assert "lr=0.01" in labels[2]


def test_report_md_has_a_section_per_configuration_with_its_seeds():
    """report.md: a configuration of several seeds is one section (its seeds' table, the per-layer
    change as the seeds' mean, min and max, each measurement table with a seed column); a
    one-seed configuration keeps its run's section."""
    data = hybrid()
    first_id = list(data["runs"])[0]
    first = data["runs"][first_id]
    for seed in (1, 2):
        run = _seeded(first, seed)
        for row in run["layers"]["effective"]:
            row["rel_change"] *= 1 + seed
        data["runs"][run["run_id"]] = run
    text = render_markdown(data)
    label = configuration_labels(normalized(data)["runs"], configurations(normalized(data)["runs"]))[0]
    assert text.count(f"### {label}\n") == 1 and label.endswith("(3 seeds)")
    section = text.split(f"### {label}\n")[1].split("\n### ")[0]
    assert "seeds 0, 1, 2" in section and f"{first_id}-s2" in section
    layer = first["layers"]["effective"][0]
    row = re.search(rf"^\| {re.escape(str(layer['layer']))} +\|(.*)$", section.split("relative change over the 3 seeds")[1],
                    re.M).group(1)
    seeds, mean, low, high = (float(cell) for cell in row.strip(" |").split("|"))
    real = layer["rel_change"]
    assert (seeds, mean, low, high) == (3, pytest.approx(2 * real, rel=1e-3), pytest.approx(real, rel=1e-3),
                                        pytest.approx(3 * real, rel=1e-3))
    calibration = section.split("**calibration (")[1]
    assert re.search(r"^\| +seed +\| +model +\| +ece", calibration, re.M)
    models = [m for m in ("base", "adapted") if isinstance(first["measurements"]["calibration"].get(m), dict)]
    assert len(re.findall(r"^\| +[012] +\| (base|adapted) ", calibration.split("\n\n**")[0], re.M)) == 3 * len(models)
    other = list(data["runs"])[1]  # one seed: its own section, as before seeds
    assert f"({other})\n" in text
    assert text.count("\n### ") - text.count("\n### suites/") == len(data["runs"]) - 3 + 1  # a section per configuration
