"""A gate's result in the report: report.json's `gate` entry, and report.md and index.html that
open with it (a red banner when it failed, a green one when it passed), built from real
comparisons of synthetic metrics. No model loads here; tests/test_gate.py runs the real session."""

import json
import re
import types

import pytest

from stance_harness.core.errors import HarnessError
from stance_harness.report.gate import compare, parse_rules, report_entry
from stance_harness.report.html import render_html, render_index
from stance_harness.report.markdown import render_markdown
from stance_harness.report.sections import session_status
from stance_harness.report.store import write_report
from stance_harness.session import HarnessSession
from test_cli import NODE, make_payload

BASELINE = {"kind": "baseline", "name": "main", "path": "reports/baselines/main.json",
            "report_id": "20260101-000000-aaaa", "saved": "2026-01-01T00:00:00+00:00"}
BEFORE = {NODE: {"lora.ece": 0.05, "lora.behavior_shift": 0.5}}
# ECE got worse by 0.0234 (past +0.01); the shift fell by 20% (past -10%)
AFTER = {NODE: {"lora.ece": 0.0734, "lora.behavior_shift": 0.4}}
RULES = ["ece:+0.01", "behavior_shift:-10%"]


def gated(rules=RULES, after=AFTER, outcomes=("passed", "passed")) -> dict:
    payload = make_payload("20260102-000000-bbbb", after, outcomes=outcomes)
    payload["gate"] = json.loads(json.dumps(report_entry(compare(BEFORE, after, rules), BASELINE)))  # as report.json
    return payload


def test_entry_holds_the_baseline_the_rules_and_every_row():
    entry = report_entry(compare(BEFORE, AFTER, RULES), BASELINE)
    assert entry["baseline"] == BASELINE
    assert (entry["passed"], entry["failed"], entry["regressions"]) == (False, True, 2)
    assert entry["summary"] == "FAILED: 2 of 2 comparisons (2 REGRESSION)"
    assert [r["spec"] for r in entry["rules"]] == RULES
    ece, shift = entry["rules"]
    assert (ece["metric"], ece["tolerance"], ece["relative"], ece["direction"]) == ("ece", 0.01, False, "lower")
    assert (shift["metric"], shift["tolerance"], shift["relative"], shift["direction"]) == (
        "behavior_shift", 0.1, True, "higher")
    rows = {r["metric"]: r for r in entry["rows"]}
    assert set(rows) == {"lora.ece", "lora.behavior_shift"}
    assert rows["lora.ece"]["limit"] == pytest.approx(0.06) and rows["lora.ece"]["delta"] == pytest.approx(0.0234)
    assert rows["lora.behavior_shift"]["limit"] == pytest.approx(0.45)  # 0.5 less 10% of 0.5
    for row in rows.values():
        assert row["test"] == NODE and row["verdict"] == "REGRESSION" and row["failed"] is True
    assert (rows["lora.ece"]["baseline_text"], rows["lora.ece"]["now_text"]) == ("0.05", "0.0734")
    json.dumps(entry)  # what report.json holds

    passing = report_entry(compare(BEFORE, AFTER, ["ece:+0.05", "behavior_shift:-30%"]), BASELINE)
    assert (passing["passed"], passing["failed"], passing["regressions"]) == (True, False, 0)
    assert {r["verdict"] for r in passing["rows"]} == {"ok"}


def test_a_failed_gate_opens_the_markdown():
    markdown = render_markdown(gated())
    head = markdown[:markdown.index("## Tests")]
    assert head.startswith("# stance-harness report 20260102-000000-bbbb\n\n**FAILED**: the gate against 'main' "
                           "failed: 2 of 2 comparisons (2 REGRESSION)\n")
    assert "PASSED" not in markdown
    assert ("## ❌ Gate FAILED: compared with baseline 'main' (reports/baselines/main.json; report "
            "20260101-000000-aaaa; saved 2026-01-01T00:00:00+00:00)") in head
    assert "`ece:+0.01` (ece: fail on an increase of more than 0.01)" in head
    assert "`behavior_shift:-10%` (behavior_shift: fail on a decrease of more than 10% of the baseline)" in head
    regressions = head[head.index("regressions:"):]
    rows = [line for line in regressions.splitlines() if line.startswith(f"| {NODE}")]
    assert len(rows) == 2
    cells = [c.strip() for c in rows[1].strip("|").split("|")]
    assert cells == [NODE, "lora.ece", "0.05", "0.0734", "+0.0234 (+46.8%)", "≤ 0.06", "REGRESSION"]
    assert head.index("Gate FAILED") < head.index("- started:")  # above the provenance too


def test_a_failed_gate_is_a_red_banner_at_the_top_of_the_page():
    page = render_html(gated())
    assert re.search(r"<title>FAILED: stance-harness report 20260102-000000-bbbb</title>", page)
    banner = re.search(r'<section id="gate" class="gate gate-failed">(.*?)</section>', page, re.S)
    assert banner and 'class="gate gate-passed"' not in page
    assert page.index('id="status"') < banner.start() < page.index('<section id="tests">')
    status = re.search(r'<p class="status" id="status">(.*?)</p>', page).group(1)
    assert '<span class="badge s-failed">FAILED</span>' in status and "the gate against &#39;main&#39; failed" in status
    text = banner.group(1)
    assert "Gate FAILED: compared with baseline &#39;main&#39; (reports/baselines/main.json;" in text
    assert "FAILED: 2 of 2 comparisons (2 REGRESSION)" in text
    assert "<code>ece:+0.01</code>" in text and "<code>behavior_shift:-10%</code>" in text
    regressions = re.search(r'<table class="regressions">.*?</table>', text, re.S).group(0)
    cells = re.findall(r"<tr>(.*?)</tr>", regressions)[-1]
    assert re.findall(r"<td>(.*?)</td>", cells) == [NODE, "lora.ece", "0.05", "0.0734", "+0.0234 (+46.8%)",
                                                     "≤ 0.06", "REGRESSION"]
    tests = page[page.index('<section id="tests">'):]
    assert '<a href="#gate"><span class="badge s-failed">GATE FAILED</span></a>' in tests[:tests.index("</p>")]


def test_a_passed_gate_is_green_and_the_session_passes():
    payload = gated(["ece:+0.05", "behavior_shift:-30%"])
    assert session_status(payload) == ("PASSED", [])
    page = render_html(payload).split("</style>")[1]  # the body: the CSS names every class
    assert '<section id="gate" class="gate gate-passed"><h2>Gate passed: compared with baseline' in page
    assert "gate-failed" not in page and "regressions" not in page and "s-failed" not in page
    assert '<span class="badge s-passed">PASSED</span>' in page
    assert "<details open><summary>all 2 comparisons</summary>" in page  # every row, though none failed
    markdown = render_markdown(payload)
    assert markdown.split("\n")[2] == "**PASSED**"
    assert "## ✅ Gate passed: compared with baseline 'main'" in markdown and "passed: 2 comparisons, no regression" in markdown
    assert "FAILED" not in markdown and "regressions:" not in markdown


def test_the_status_says_why_a_session_failed():
    assert session_status(make_payload("r")) == ("PASSED", [])
    assert session_status(make_payload("r", outcomes=("passed", "failed"))) == ("FAILED", ["1 of 2 tests failed"])
    assert session_status({**make_payload("r"), "exit_code": 3}) == ("FAILED", ["pytest exited with code 3"])
    assert session_status({**make_payload("r"), "interrupted": True}) == (
        "INTERRUPTED", ["the session was stopped before its end"])
    both = session_status(gated(outcomes=("passed", "error")))
    assert both == ("FAILED", ["the gate against 'main' failed: 2 of 2 comparisons (2 REGRESSION)",
                               "1 of 2 tests failed"])
    # a report without a gate or without a status (written before) keeps its test counts only
    page = render_html(make_payload("r", outcomes=("passed", "failed")))
    assert 'id="gate"' not in page and '<span class="badge s-failed">FAILED</span> 1 of 2 tests failed' in page


def test_values_keep_the_digits_that_tell_them_apart():
    before, after = {NODE: {"lora.ece": 0.0612345}}, {NODE: {"lora.ece": 0.0612349}}
    comparison = compare(before, after, ["ece:0"])
    payload = make_payload("r", after)
    payload["gate"] = report_entry(comparison, BASELINE)
    row = next(line for line in render_markdown(payload).splitlines() if "REGRESSION |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:4] == ["0.061234", "0.061235"]  # as the terminal printed them, not .4g's 0.06123 twice
    assert re.search(r"lora\.ece\s+0\.061234\s+0\.061235\s", comparison.render())


def test_gate_text_is_escaped():
    evil = "suites/t.py::test_x[<script>alert(1)</script>]"
    payload = make_payload("r")
    payload["gate"] = report_entry(compare({evil: {"lora.ece": 0.0}}, {evil: {"lora.ece": 1.0}}, ["ece:0.1"]),
                                   {**BASELINE, "name": "<b>main</b>"})
    page = render_html(payload)
    assert "<script>" not in page and "<b>main</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;main&lt;/b&gt;" in page


def test_a_baseline_that_could_not_be_loaded_fails_the_gate_in_the_report():
    # what HarnessSession.finish records when the baseline vanished after the session started
    session = types.SimpleNamespace(baseline_info=None, comparison=None,
                                    options=types.SimpleNamespace(compare_baseline="main",
                                                                  fail_on=parse_rules(["ece:+0.01"])))
    entry = HarnessSession.gate_entry(session, HarnessError("no baseline 'main' in reports/baselines"))
    assert entry["passed"] is False and entry["error"] == "no baseline 'main' in reports/baselines"
    assert entry["baseline"] == {"kind": "baseline", "name": "main"} and entry["rules"][0]["spec"] == "ece:+0.01"
    payload = {**make_payload("r"), "gate": entry}
    assert session_status(payload) == ("FAILED", ["the gate against 'main' failed: no baseline 'main' in "
                                                  "reports/baselines"])
    assert "**the comparison could not be made:** no baseline 'main' in reports/baselines" in render_markdown(payload)
    assert "gate-failed" in render_html(payload)


def test_the_index_of_reports_marks_a_failed_gate(tmp_path):
    write_report(tmp_path, gated())
    write_report(tmp_path, {**gated(["ece:+0.05"]), "report_id": "20260103-000000-cccc"})
    index = render_index(tmp_path)
    rows = {re.search(r'href="([^"/]+)/', row).group(1): row for row in re.findall(r"<tr>.*?</tr>", index)
            if "href" in row}
    assert 'badge s-failed">GATE FAILED' in rows["20260102-000000-bbbb"]
    assert "GATE FAILED" not in rows["20260103-000000-cccc"] and "gate passed" in rows["20260103-000000-cccc"]
