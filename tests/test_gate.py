"""The CI gate through real pytest runs: baselines, --fail-on, --adapter, --repeat, JUnit, expected
outcomes, progress and provenance. Each check shares a subprocess run with others (torch cannot be
re-imported in-process), so the whole file is a handful of runs on the tiny default model."""

import json
import re
from xml.etree import ElementTree

import pytest

from conftest import QUICK

RECIPE = '{"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5}'  # seed: 42

GATE = f'''
from stance_harness import assert_behavior_shift, assert_ece, assert_no_forgetting

def test_gate(train):
    run = train("lora", examples=10, recipe={RECIPE}, r=4)
    assert_behavior_shift(run, "loglik_margin", min_effect=-1e9)
    assert_no_forgetting(run, max_increase=10.0)
    assert_ece(run, max=1.0)
'''

EXPECTED = f'''
import pytest
from stance_harness import assert_behavior_shift, assert_no_forgetting

RECIPE = {RECIPE}

@pytest.mark.expected_outcome("refuted", reason="two steps cannot move it that far", on="embedded")
def test_refuted(train):
    assert_behavior_shift(train("lora", examples=10, recipe=RECIPE, r=4), min_effect=1e6)

@pytest.mark.expected_outcome("refuted", reason="it holds after all", on="embedded")
def test_holds_after_all(train):
    assert_no_forgetting(train("lora", examples=10, recipe=RECIPE, r=4), max_increase=10.0)

@pytest.mark.expected_outcome("refuted", reason="a crash is not a refutation", on="embedded")
def test_crashes(train):
    train("lora", examples=10, recipe=RECIPE, r=4)
    raise RuntimeError("broken measurement")
'''

ADAPTER = f'''
from stance_harness import assert_behavior_shift, assert_no_forgetting

def test_gate_adapter(adapter_run):
    assert_behavior_shift(adapter_run, "kl", min_effect=0.0)
    assert_no_forgetting(adapter_run, max_increase=0.5)

def test_trains(train):
    train("lora", examples=10, recipe={RECIPE}, r=4)
'''

P = ("-p", "no:cacheprovider")


def report_json(pytester) -> dict:
    report_id = (pytester.path / "reports" / "latest").read_text().strip()
    return json.loads((pytester.path / "reports" / report_id / "report.json").read_text())


def by_name(payload) -> dict:
    return {t["nodeid"].split("::")[1]: t for t in payload["tests"]}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # The subprocesses' tiny models train 4x faster on one thread than on two shared, busy cores.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def suite(pytester):
    pytester.makepyfile(test_gate=GATE, test_expected=EXPECTED, test_adapter=ADAPTER)
    return pytester


def test_save_then_compare_then_regress(suite, monkeypatch):
    # 1. save the baseline, with JUnit XML, progress at default verbosity and expected outcomes
    saved = suite.runpytest_subprocess(*P, "-rs", "--save-baseline", "main", "--junitxml=out.xml")
    saved.assert_outcomes(passed=2, xfailed=1, xpassed=1, failed=1, skipped=1)
    assert saved.ret == pytest.ExitCode.TESTS_FAILED  # the RuntimeError under the marker
    out = saved.stdout.str()
    assert "[stance-harness] training lora on tiny-qwen2 (curious-uncertainty, 10 examples" in out
    saved.stdout.fnmatch_lines_random(["[[]stance-harness[]]   lora [[]*[]] 2/2 loss *",
                                       "*RuntimeError: broken measurement*",
                                       "SKIPPED*no --adapter given: this test gates saved adapters*",
                                       "baseline saved: *main.json"])

    baseline = json.loads((suite.path / "reports" / "baselines" / "main.json").read_text())
    assert baseline["name"] == "main"
    gate = baseline["tests"]["test_gate.py::test_gate"]
    assert gate["outcome"] == "passed"
    assert {"lora.loglik_margin", "lora.behavior_shift", "lora.forgetting", "lora.ece", "lora.acc1"} <= set(gate["metrics"])
    forgetting = gate["metrics"]["lora.forgetting"]

    junit = ElementTree.parse(suite.path / "out.xml")
    case = next(c for c in junit.iter("testcase") if c.get("name") == "test_gate")
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert float(props["lora.forgetting"]) == pytest.approx(forgetting)
    assert "lora.behavior_shift" in props and "lora.ece" in props

    payload = report_json(suite)
    tests = by_name(payload)
    assert tests["test_refuted"]["outcome"] == "xfailed"
    assert tests["test_refuted"]["expected"]["outcome"] == "refuted" and tests["test_refuted"]["verdict"] == "refuted"
    assert tests["test_holds_after_all"]["outcome"] == "xpassed" and tests["test_holds_after_all"]["verdict"] == "supported"
    assert tests["test_crashes"]["outcome"] == "failed" and tests["test_crashes"]["verdict"] is None
    assert "RuntimeError" in tests["test_crashes"]["message"]

    prov = payload["provenance"]
    assert prov["model"]["name"] == "tiny-qwen2" and prov["model"]["id"] and prov["model"]["revision"]
    assert {"torch", "transformers", "peft"} <= {k for k, v in prov["environment"]["libraries"].items() if v}
    assert "commit" in prov["git"] and prov["environment"]["machine"]["python"]
    (run,) = payload["runs"].values()  # every test asked for the same run: trained once
    assert run["model"]["revision"] == prov["model"]["revision"]
    assert run["stance"]["name"] == "curious-uncertainty" and run["stance"]["version"]
    assert run["method"] == "lora" and run["config"]["r"] == 4
    assert run["recipe"]["seed"] == 42 and run["recipe"]["learning_rate"] == 1e-3

    # 2. an identical run passes the gate; -q prints no progress, but the comparison is shown.
    # A baseline gates every test it holds (a gated test missing now fails), so keep test_gate's.
    baseline["tests"] = {k: v for k, v in baseline["tests"].items() if k.startswith("test_gate.py::")}
    (suite.path / "reports" / "baselines" / "main.json").write_text(json.dumps(baseline))
    same = suite.runpytest_subprocess(*P, "-q", "test_gate.py", "--compare-baseline", "main",
                                      "--fail-on", "forgetting:+0.01", "--verdict-json", "-")
    same.assert_outcomes(passed=1)
    assert same.ret == pytest.ExitCode.OK
    verdict = json.loads(next(line for line in same.stdout.lines if line.startswith('{"passed"')))
    assert verdict["passed"] is True and verdict["exit_code"] == 0 and verdict["tests"] == {"total": 1, "passed": 1}
    assert verdict["gate"]["passed"] is True and verdict["gate"]["baseline"] == "main"
    assert verdict["gate"]["failures"] == [] and verdict["gate"]["rules"] == ["forgetting:+0.01"]
    # under -q only the plan's one summary line (issue 24), no progress
    assert [line for line in same.stdout.lines if line.startswith("[stance-harness]")
            and not line.startswith("[stance-harness] plan:")] == []
    same.stdout.fnmatch_lines(["*stance-harness: compared with baseline 'main'*",
                               "*test_gate.py::test_gate*lora.forgetting*ok*",
                               "passed: 1 comparisons, no regression"])
    # the report holds the gate it passed, green above the tests
    payload = report_json(suite)
    assert payload["gate"]["passed"] is True and payload["gate"]["baseline"]["name"] == "main"
    assert [r["verdict"] for r in payload["gate"]["rows"]] == ["ok"] and payload["exit_code"] == 0
    report_dir = suite.path / "reports" / payload["report_id"]
    assert (report_dir / "report.md").read_text().split("\n")[2:5] == [
        "**PASSED**", "", "## ✅ Gate passed: compared with baseline 'main' (" + str(suite.path / "reports" / "baselines"
                                                                                   / "main.json")
        + f"; report {baseline['report_id']}; saved {baseline['saved']})"]
    page = (report_dir / "index.html").read_text()
    assert page.index('class="gate gate-passed"') < page.index('<section id="tests">')

    # 3. a worse metric fails the session although every test passes; --repeat 2 runs seeds 42, 43
    gate["metrics"]["lora.forgetting"] = forgetting - 1.0
    (suite.path / "reports" / "baselines" / "main.json").write_text(json.dumps(baseline))
    # ... and in CI: the GitHub job summary gets both tables appended, and the verdict is one JSON line
    summary = suite.path / "step-summary.md"
    summary.write_text("# an earlier step's summary\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    worse = suite.runpytest_subprocess(*P, "-v", "test_gate.py", "--repeat", "2", "--compare-baseline", "main",
                                       "--fail-on", "forgetting:+0.01", "--verdict-json", "ci/verdict.json")
    worse.assert_outcomes(passed=2)
    assert worse.ret == pytest.ExitCode.TESTS_FAILED
    text = summary.read_text()
    assert text.startswith("# an earlier step's summary\n## stance-harness on `tiny-qwen2`: FAILED (exit code 1)")
    assert len(re.findall(r"^\| PASS\s+\| test_gate.py::test_gate\[repeat[01]\]\s+\| lora ", text, re.M)) == 2
    assert "### Gate: compared with baseline `main`" in text and "**FAILED: 1 of 1 comparisons (1 REGRESSION)**" in text
    gate_rows = [line for line in text.splitlines() if "lora.forgetting" in line]
    assert len(gate_rows) == 1 and "REGRESSION" in gate_rows[0] and gate_rows[0].startswith("| test_gate.py::test_gate")
    lines = (suite.path / "ci" / "verdict.json").read_text().splitlines()
    assert len(lines) == 1
    verdict = json.loads(lines[0])
    assert verdict["passed"] is False and verdict["exit_code"] == 1 and verdict["tests"] == {"total": 2, "passed": 2}
    (failure,) = verdict["gate"]["failures"]
    assert failure["metric"] == "lora.forgetting" and failure["verdict"] == "REGRESSION" and failure["allowed"].startswith("≤")
    worse.stdout.fnmatch_lines(["*test_gate.py::test_gate[[]repeat0[]] PASSED*",
                                "*test_gate.py::test_gate[[]repeat1[]] PASSED*",
                                "*test_gate.py::test_gate*lora.forgetting*REGRESSION*",
                                "FAILED: 1 of 1 comparisons (1 REGRESSION)"])
    payload = report_json(suite)
    # the report says what CI saw: the gate failed, although both tests passed
    gate_entry = payload["gate"]
    assert gate_entry["passed"] is False and gate_entry["baseline"]["name"] == "main" and payload["exit_code"] == 1
    assert [r["spec"] for r in gate_entry["rules"]] == ["forgetting:+0.01"]
    (row,) = gate_entry["rows"]
    assert (row["test"], row["metric"], row["verdict"]) == ("test_gate.py::test_gate", "lora.forgetting", "REGRESSION")
    assert row["baseline"] == pytest.approx(forgetting - 1.0) and row["limit"] == pytest.approx(forgetting - 0.99)
    report_dir = suite.path / "reports" / payload["report_id"]
    markdown = (report_dir / "report.md").read_text()
    assert markdown.split("\n")[2] == ("**FAILED**: the gate against 'main' failed: 1 of 1 comparisons "
                                       "(1 REGRESSION)")
    head = markdown[:markdown.index("## Tests")]
    assert "## ❌ Gate FAILED: compared with baseline 'main'" in head and "`forgetting:+0.01`" in head
    assert re.search(r"^\| test_gate.py::test_gate \| lora\.forgetting \|.*\| REGRESSION \|$", head, re.M)
    page = (report_dir / "index.html").read_text()
    banner = re.search(r'<section id="gate" class="gate gate-failed">.*?</section>', page, re.S)
    assert banner and banner.start() < page.index('<section id="tests">')
    assert "<title>FAILED: " in page and '<span class="badge s-failed">FAILED</span>' in page
    assert "<code>forgetting:+0.01</code>" in banner.group(0) and "baseline &#39;main&#39;" in banner.group(0)
    assert re.search(r'<table class="regressions">.*<td>lora\.forgetting</td>.*<td>REGRESSION</td>', banner.group(0))
    assert sorted(r["recipe"]["seed"] for r in payload["runs"].values()) == [42, 43]
    for test in payload["tests"]:
        repeats = test["repeats"]
        assert repeats["n"] == 2 and repeats["base_nodeid"] == "test_gate.py::test_gate"
        stats = repeats["metrics"]["lora.forgetting"]
        assert stats["n"] == 2 and stats["std"] > 0  # seeds 42 and 43 made different runs
        per_run = [t["metrics"]["lora.forgetting"] for t in payload["tests"]]
        assert stats["mean"] == pytest.approx(sum(per_run) / 2)


@pytest.mark.parametrize("args, message", [
    (("--compare-baseline", "nope"), "*stance-harness: no baseline 'nope' in *baselines*there are no baselines yet*"),
    (("--compare-baseline", "main", "--fail-on", "ece:-0.01"),
     "*rule 'ece:-0.01': ece is better when lower; a regression is an increase: write ece:+0.01*"),
])
def test_bad_gate_options_stop_at_start(suite, args, message):
    result = suite.runpytest_subprocess(*P, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "[stance-harness]" not in result.stdout.str()  # nothing was loaded or trained


@pytest.fixture
def one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_adapter_gates_saved_adapters_without_training(harness, pytester, one_torch_thread):
    from stance_harness.runs.adapters import save_adapter

    # under the pytester dir, which is the subprocess's rootdir (so reports/ lands there too)
    adapters = pytester.path / "adapters"
    qwen = save_adapter(harness.train("lora", examples=10, recipe=QUICK, r=4), adapters / "qwen-adapter")
    phi = save_adapter(harness.train("lora", model="tiny-phi", examples=10, recipe=QUICK, r=4), adapters / "phi-adapter")
    pytester.makepyfile(test_adapter=ADAPTER)

    result = pytester.runpytest_subprocess(*P, "-rs", "-v", "--model", "tiny-phi",
                                           "--adapter", str(phi), "--adapter", str(qwen))
    # one test per adapter: the wrong base fails in the fixture (an error); the training test skips
    result.assert_outcomes(passed=1, errors=1, skipped=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines_random([
        "*test_gate_adapter[[]phi-adapter[]] PASSED*",
        "*test_gate_adapter[[]qwen-adapter[]] ERROR*",
        "*stance-harness: --adapter *qwen-adapter was trained for base tiny-qwen2 (*), not for --model tiny-phi*",
        "SKIPPED*--adapter given: gating saved adapters, so tests that train are skipped*",
    ])
    payload = report_json(pytester)
    (run,) = payload["runs"].values()  # nothing trained: the one run is the loaded adapter
    assert run["name"] == "phi-adapter" and run["examples"] == 0 and run["model"]["name"] == "tiny-phi"
    gated = by_name(payload)["test_gate_adapter[phi-adapter]"]
    assert {"phi-adapter.kl", "phi-adapter.forgetting"} <= set(gated["metrics"])
    assert "phi-adapter.behavior_shift" not in gated["metrics"]  # only the log-likelihood margin is that
    report_md = (pytester.path / "reports" / payload["report_id"] / "report.md").read_text()
    assert "no training examples (a saved adapter)" in report_md
