"""The stance-harness command, run in-process on small synthetic reports directories."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stance_harness import __version__
from stance_harness.cli import main
from stance_harness.report.model import REPORT_FORMAT, normalized

NODE = "suites/test_calibration.py::test_lora_keeps_calibration"
OTHER = "suites/test_stance.py::test_stance_takes"
RUN = "lora-0123456789ab"


def run_entry() -> dict:
    """A training run with every field the report renderers read."""
    layer = {"layer": "L0", "mean": 0.0, "var": 1e-6, "mean_abs": 1e-3, "var_abs": 1e-6, "delta_norm": 0.01,
             "rel_change": 0.002, "norm_change": 0.001, "numel": 1024, "nonfinite": 0}
    return {
        "run_id": RUN, "model": {"name": "tiny-qwen2", "id": "tiny-qwen2", "num_layers": 1},
        "stance": {"name": "curious-uncertainty", "version": "1.0.0", "path": "stances/x.yaml", "examples": 5,
                   "probes": 2},
        "method": "lora", "config": {"r": 8}, "examples": 5,
        "recipe": {"learning_rate": 1e-3, "num_train_epochs": 1, "seed": 0},
        "counts": {"trainable": 43008, "frozen": 956480, "trainable_pct": 4.3, "stance_bytes": 172032,
                   "full_weights_bytes": 3825920, "examples": 5, "params_per_example": 8601.6},
        "trace": {"loss": [5.9, 5.1], "grad_norm": [1.0, 0.8], "lr": [1e-3, 1e-3], "step_time": [0.1, 0.1],
                  "halted_at": None, "halt_reason": None},
        "instruments": {"steps": 2, "max_grad_norm": 1.0, "first_nonfinite": None},
        "layers": {"effective": [layer], "adapter": [layer]},
    }


def make_payload(run_id, metrics=None, outcomes=("passed", "passed"), started=None) -> dict:
    metrics = metrics if metrics is not None else {NODE: {"lora.ece": 0.05, "lora.behavior_shift": 0.5}}
    tests = []
    for nodeid, outcome in zip([NODE, OTHER], outcomes):
        tests.append({"nodeid": nodeid, "outcome": outcome, "duration": 0.5,
                      "message": None if outcome == "passed" else "AssertionError: no",
                      "runs": [RUN], "checks": [{"check": "assert_gradients_stable", "passed": True,
                                                 "summary": "2 steps, all finite", "headers": [], "rows": [],
                                                 "metrics": {"max_grad_norm": 1.0}}],
                      "tables": [], "metrics": metrics.get(nodeid, {}), "notes": []})
    started = started or f"{run_id[:4]}-{run_id[4:6]}-{run_id[6:8]}T00:00:00+00:00"
    return {
        "run_id": run_id, "started": started, "finished": started,
        "provenance": {"model": {"name": "tiny-qwen2", "id": "tiny-qwen2", "revision": "abc"},
                       "models": [{"name": "tiny-qwen2"}],
                       "git": {"commit": "0123456789abcdef", "dirty": False, "branch": "main"},
                       "environment": {"libraries": {"torch": "2.13.0"}, "machine": {"python": "3.11"}},
                       "args": ["suites/", "-q"]},
        "tests": tests, "runs": {RUN: run_entry()},
    }


def write_run(root: Path, payload: dict, latest=True) -> Path:
    run_dir = root / payload["run_id"]
    run_dir.mkdir(parents=True)
    (run_dir / "report.json").write_text(json.dumps(payload))
    if latest:
        (root / "latest").write_text(payload["run_id"] + "\n")
    return run_dir


@pytest.fixture
def reports(tmp_path):
    """Two runs: the older one is the reference, the newer (latest) one has a worse ECE."""
    root = tmp_path / "reports"
    write_run(root, make_payload("20260101-000000-aaaa"))
    write_run(root, make_payload("20260102-000000-bbbb", {NODE: {"lora.ece": 0.0734, "lora.behavior_shift": 0.52}},
                                 outcomes=("passed", "failed")))
    return root


def cli(root, *args):
    return main([*args, "--reports-dir", str(root)])


def assert_one_line_error(err: str, pattern: str):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("stance-harness: error: ")
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]


# -- compare -------------------------------------------------------------------------------
def test_compare_passes_within_tolerance(reports, capsys):
    code = cli(reports, "compare", "20260101-000000-aaaa", "latest", "--fail-on", "ece:+0.05", "behavior_shift:-10%")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "baseline: report 20260101-000000-aaaa" in out and "now:      report 20260102-000000-bbbb" in out
    assert "lora.ece" in out and "≤ 0.1" in out and "passed: 2 comparisons, no regression" in out


def test_compare_regression_exits_1_with_the_table(reports, capsys):
    code = cli(reports, "compare", "20260101-000000-aaaa", "20260102-000000-bbbb", "--fail-on", "ece:+0.01")
    out = capsys.readouterr().out
    assert code == 1
    header, row = [line for line in out.splitlines() if "lora.ece" in line or line.startswith("test ")][:2]
    assert header.split() == ["test", "metric", "baseline", "now", "change", "allowed", "verdict"]
    assert row.split()[-3:] == ["≤", "0.06", "REGRESSION"]
    assert "0.05" in row and "0.0734" in row and "+0.0234" in row
    assert "REGRESSION: lora.ece in " + NODE in out


def test_compare_rules_can_be_repeated_and_write_json(reports, capsys, tmp_path):
    out_json = tmp_path / "cmp.json"
    code = cli(reports, "compare", "20260101-000000-aaaa", "latest", "--fail-on", "ece:+0.01",
               "--fail-on", "behavior_shift:-1%", "--json", str(out_json))
    assert code == 1
    data = json.loads(out_json.read_text())
    assert data["passed"] is False and data["rules"] == ["ece:+0.01", "behavior_shift:-1%"]
    assert {row["metric"]: row["verdict"] for row in data["rows"]} == {"lora.ece": "REGRESSION",
                                                                      "lora.behavior_shift": "improved"}


def test_compare_without_rules_lists_changes_and_passes(reports, capsys):
    assert cli(reports, "compare", "20260101-000000-aaaa", "latest") == 0
    out = capsys.readouterr().out
    assert "changed" in out and "information only" in out


def test_compare_against_a_saved_baseline(reports, capsys):
    assert cli(reports, "save", "main", "20260101-000000-aaaa") == 0
    assert "saved baseline 'main' from report 20260101-000000-aaaa" in capsys.readouterr().out
    assert (reports / "baselines" / "main.json").is_file()
    assert cli(reports, "compare", "main", "latest", "--fail-on", "ece:+0.01") == 1
    out = capsys.readouterr().out
    assert "baseline: baseline main (report 20260101-000000-aaaa" in out and "REGRESSION" in out


def test_compare_write_report_puts_the_gate_into_report_b(reports, capsys, tmp_path):
    run_dir = reports / "20260102-000000-bbbb"
    before = json.loads((run_dir / "report.json").read_text())
    assert cli(reports, "save", "main", "20260101-000000-aaaa") == 0
    code = cli(reports, "compare", "main", "latest", "--fail-on", "ece:+0.01", "behavior_shift:-10%", "--write-report")
    assert code == 1
    assert f"gate written into {run_dir} (report.json, report.md, index.html)" in capsys.readouterr().out
    payload = json.loads((run_dir / "report.json").read_text())
    gate = payload.pop("gate")
    assert {**payload, "gate": None} == normalized(before)  # the report gained its gate; the rest is the same report, migrated
    assert payload["format"] == REPORT_FORMAT and payload["migrated_from"] == 1
    assert gate["passed"] is False and gate["summary"] == "FAILED: 1 of 2 comparisons (1 REGRESSION)"
    assert {k: gate["baseline"][k] for k in ("kind", "name", "report_id")} == {
        "kind": "baseline", "name": "main", "report_id": "20260101-000000-aaaa"}
    assert gate["baseline"]["path"] == str(reports / "baselines" / "main.json")
    assert [r["spec"] for r in gate["rules"]] == ["ece:+0.01", "behavior_shift:-10%"]
    assert {r["metric"]: r["verdict"] for r in gate["rows"]} == {"lora.ece": "REGRESSION", "lora.behavior_shift": "ok"}
    markdown = (run_dir / "report.md").read_text()
    assert markdown.startswith("# stance-harness report 20260102-000000-bbbb\n\n**FAILED**: the gate against 'main' "
                               "failed: 1 of 2 comparisons (1 REGRESSION); 1 of 2 tests failed\n")
    assert markdown.index("## ❌ Gate FAILED: compared with baseline 'main'") < markdown.index("## Tests")
    assert re.search(r"^\| " + re.escape(NODE) + r" \| lora\.ece .*\| REGRESSION \|$", markdown, re.M)
    page = (run_dir / "index.html").read_text()
    assert page.index('class="gate gate-failed"') < page.index('<section id="tests">')
    assert "GATE FAILED" in (reports / "index.html").read_text()
    assert "gate" not in json.loads((reports / "20260101-000000-aaaa" / "report.json").read_text())

    # the same report under rules it meets: the gate it holds is replaced, and green
    assert cli(reports, "compare", "main", "latest", "--fail-on", "ece:+0.05", "--write-report") == 0
    gate = json.loads((run_dir / "report.json").read_text())["gate"]
    assert gate["passed"] is True and [r["spec"] for r in gate["rules"]] == ["ece:+0.05"]
    assert 'class="gate gate-passed"' in (run_dir / "index.html").read_text()
    assert "## ✅ Gate passed: compared with baseline 'main'" in (run_dir / "report.md").read_text()

    # a report outside the reports directory: its files get the gate; no index is written beside it
    elsewhere = tmp_path / "elsewhere" / "copy"
    shutil.copytree(run_dir, elsewhere)
    assert cli(reports, "compare", "20260101-000000-aaaa", str(elsewhere), "--fail-on", "ece:+0.01",
               "--write-report") == 1
    gate = json.loads((elsewhere / "report.json").read_text())["gate"]
    assert gate["passed"] is False and gate["baseline"]["kind"] == "report"
    assert gate["baseline"]["name"] == "20260101-000000-aaaa"
    assert sorted(p.name for p in elsewhere.parent.iterdir()) == ["copy"]  # no index, no figure cache beside it


def test_compare_write_report_needs_a_report_as_b(reports, capsys):
    assert cli(reports, "save", "main", "latest") == 0
    before = (reports / "baselines" / "main.json").read_text()
    capsys.readouterr()
    assert cli(reports, "compare", "latest", "main", "--fail-on", "ece:+0.01", "--write-report") == 2
    assert_one_line_error(capsys.readouterr().err, r"--write-report writes the gate into report B, but 'main' is a "
                                                   r"baseline \(metrics only\); name a report")
    assert (reports / "baselines" / "main.json").read_text() == before
    # a report the renderers cannot read (a newer version's) is left as it was
    broken = write_run(reports, {"run_id": "20260106-000000-ffff", "tests": [], "format": REPORT_FORMAT + 1},
                       latest=False) / "report.json"
    text = broken.read_text()
    assert cli(reports, "compare", "latest", "20260106-000000-ffff", "--write-report") == 2
    assert_one_line_error(capsys.readouterr().err, rf"report format {REPORT_FORMAT + 1} is newer than this "
                                                   r"stance-harness reads.*the gate was not written into it")
    assert broken.read_text() == text and sorted(p.name for p in broken.parent.iterdir()) == ["report.json"]


def test_compare_unknown_run_exits_2(reports, capsys):
    code = cli(reports, "compare", "20260101-000000-aaab", "latest", "--fail-on", "ece:+0.01")
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert_one_line_error(captured.err, r"no report, baseline or file '20260101-000000-aaab'.*Did you mean: "
                                        r"20260101-000000-aaaa")


@pytest.mark.parametrize("rule, pattern", [
    ("ece:-0.01", r"ece is better when lower; a regression is an increase: write ece:\+0\.01"),
    ("ece", r"expected METRIC:\[\+\|-\]TOLERANCE\[%\]"),
    ("ecee:0.01", r"unknown metric 'ecee'.*Did you mean: ece"),
])
def test_compare_bad_rule_exits_2(reports, capsys, rule, pattern):
    code = cli(reports, "compare", "20260101-000000-aaaa", "latest", "--fail-on", rule)
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert_one_line_error(captured.err, pattern)


def test_usage_errors_are_one_line(reports, capsys):
    assert main(["compare", "only-one"]) == 2
    assert_one_line_error(capsys.readouterr().err, r"required: B .*stance-harness compare --help")
    assert main(["frobnicate"]) == 2
    assert_one_line_error(capsys.readouterr().err, r"invalid choice: 'frobnicate'")
    assert main([]) == 2  # no subcommand: the help, on stderr
    assert "compare" in capsys.readouterr().err


# -- save ----------------------------------------------------------------------------------
def test_save_bad_name_exits_2(reports, capsys):
    assert cli(reports, "save", "../evil") == 2
    assert_one_line_error(capsys.readouterr().err, "bad baseline name '../evil'")
    assert not (reports.parent / "evil.json").exists()


# -- list ----------------------------------------------------------------------------------
def test_list_shows_runs_newest_first_then_baselines(reports, capsys):
    assert cli(reports, "save", "main", "20260101-000000-aaaa") == 0
    (reports / "20260103-000000-cccc").mkdir()  # an interrupted session: no report.json, not listed
    capsys.readouterr()
    assert cli(reports, "list") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    newer = next(line for line in lines if line.startswith("20260102-000000-bbbb"))
    older = next(line for line in lines if line.startswith("20260101-000000-aaaa"))
    assert lines.index(newer) < lines.index(older)
    assert newer.split()[:2] == ["20260102-000000-bbbb", "*"]  # the latest mark
    assert newer.split()[-5:] == ["tiny-qwen2", "2", "1", "1", "0"]  # tests, passed, failed, other
    assert older.split()[-4:] == ["2", "2", "0", "0"] and "*" not in older
    assert "20260103-000000-cccc" not in out and "baselines" not in newer
    base = next(line for line in lines if line.startswith("main "))
    assert base.split()[-2:] == ["20260101-000000-aaaa", "2"]
    assert out.index("reports in") < out.index("baselines in")


def test_list_empty_and_missing_dirs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli(tmp_path / "empty", "list") == 0
    out = capsys.readouterr().out
    assert "no reports in" in out and "no baselines in" in out
    assert cli(tmp_path / "missing", "list") == 2
    assert_one_line_error(capsys.readouterr().err, "no reports directory")


def test_list_survives_an_unreadable_report(reports, capsys):
    (reports / "20260104-000000-dddd").mkdir()
    (reports / "20260104-000000-dddd" / "report.json").write_text("{half")
    assert cli(reports, "list") == 0
    assert "(unreadable" in capsys.readouterr().out


# -- report --------------------------------------------------------------------------------
def test_report_rebuilds_the_pages_from_report_json_alone(reports, capsys):
    run_dir = reports / "20260101-000000-aaaa"
    for name in ("report.md", "index.html"):
        (run_dir / name).unlink(missing_ok=True)
    assert cli(reports, "report", "20260101-000000-aaaa") == 0
    markdown = (run_dir / "report.md").read_text()
    assert markdown.startswith("# stance-harness report 20260101-000000-aaaa") and NODE in markdown
    page = (run_dir / "index.html").read_text()
    assert "20260101-000000-aaaa" in page and NODE in page and 'id="findings"' in page
    out = capsys.readouterr().out
    assert f"writing {run_dir / 'report.md'}, {run_dir / 'index.html'}" in out  # said before it is done
    assert re.search(r"wrote them in [0-9.]+s \([1-9][0-9]* figure\(s\) drawn, [0-9]+ reused from the figure cache\)", out), out
    assert "migrated from report format 1" in out  # written without `format`: an old report
    assert cli(reports, "report", "20260101-000000-aaaa") == 0  # again: every figure is in the cache
    assert re.search(r"\(0 figure\(s\) drawn, [1-9][0-9]* reused from the figure cache\)", capsys.readouterr().out)
    index = (reports / "index.html").read_text()
    assert "20260101-000000-aaaa" in index and "20260102-000000-bbbb" in index


def test_report_latest(reports, capsys):
    assert cli(reports, "report", "latest") == 0
    assert f"writing {reports / '20260102-000000-bbbb' / 'report.md'}" in capsys.readouterr().out


def test_report_errors_exit_2(reports, capsys):
    assert cli(reports, "report", "20260105-000000-eeee") == 2
    assert_one_line_error(capsys.readouterr().err, "no report, baseline or file '20260105-000000-eeee'")
    assert cli(reports, "save", "main", "latest") == 0
    capsys.readouterr()
    assert cli(reports, "report", "main") == 2
    assert_one_line_error(capsys.readouterr().err, "'main' is a baseline, not a report")
    write_run(reports, {"run_id": "20260106-000000-ffff", "tests": [], "format": "two"}, latest=False)
    assert cli(reports, "report", "20260106-000000-ffff") == 2
    assert_one_line_error(capsys.readouterr().err, r"report field 'format' is 'two': allowed values are 1 to \d")
    assert not (reports / "20260106-000000-ffff" / "index.html").exists()


# -- the installed command -----------------------------------------------------------------
def test_version_in_process(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"stance-harness {__version__}"


def test_console_script_runs(tmp_path):
    script = Path(sys.executable).parent / "stance-harness"
    script = str(script) if script.exists() else shutil.which("stance-harness")
    assert script, "the stance-harness console script is not installed: pip install -e ."
    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == f"stance-harness {__version__}", done.stderr
    done = subprocess.run([script, "compare", "a", "b", "--reports-dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("stance-harness: error: no report, baseline or file 'a'")
