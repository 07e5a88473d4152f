"""The plugin through real pytest runs (pytester, in subprocesses: torch cannot be re-imported in-process)."""

import json
import re

import pytest

HYPOTHESES = '''
from stance_harness import assert_change_concentrated, assert_only_targets_changed

RECIPE = {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5, "seed": 0}


def test_lora_changes_only_adapters(train):
    """LoRA changes its adapters only.

    The report shows this paragraph's first line as the hypothesis."""
    run = train("lora", examples=10, recipe=RECIPE, r=2)  # 2 steps: A moves only once B is non-zero
    assert_only_targets_changed(run)


def test_full_ft_lives_in_one_layer(train):
    run = train("full", examples=10, recipe=RECIPE)
    assert_change_concentrated(run, layers=[13], min_share=0.9)


def test_not_using_the_harness():
    assert True
'''


@pytest.fixture
def hypotheses(pytester):
    pytester.makepyfile(test_hypotheses=HYPOTHESES)
    return pytester


def latest_report(pytester):
    report_id = (pytester.path / "reports" / "latest").read_text().strip()
    return pytester.path / "reports" / report_id


def test_summary_table_and_failure_table_under_plain_pytest(hypotheses):
    result = hypotheses.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "*= stance-harness =*",
        "outcome*test*runs*checks*message*",
        "PASS*test_hypotheses.py::test_lora_changes_only_adapters*lora*1/1*",
        "FAIL*test_hypotheses.py::test_full_ft_lives_in_one_layer*full*0/1*of the change*",
        "report: *report.md*",
    ])
    # the failing helper's table of shares is in the failure output
    result.stdout.fnmatch_lines(["*assert_change_concentrated: *% of the change*< required 90.0%*", "*layer*share*in target*"])
    # a test that never touches the harness is not in its table
    assert "test_not_using_the_harness" not in result.stdout.str().split("stance-harness =")[-1]


def test_report_json_has_full_provenance_and_markdown_tables(hypotheses):
    hypotheses.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2, failed=1)
    folder = latest_report(hypotheses)
    payload = json.loads((folder / "report.json").read_text())
    prov = payload["provenance"]
    assert prov["model"]["name"] == "tiny-qwen2" and prov["model"]["revision"]
    assert prov["stances"][0] == {**prov["stances"][0], "name": "curious-uncertainty", "version": "1.0.0"}
    assert {"torch", "transformers", "peft"} <= set(prov["environment"]["libraries"])
    assert "commit" in prov["git"] and prov["environment"]["machine"]["python"]
    runs = payload["runs"]
    assert {r["method"] for r in runs.values()} == {"lora", "full"}
    lora = next(r for r in runs.values() if r["method"] == "lora")
    assert lora["config"]["r"] == 2 and lora["recipe"]["seed"] == 0
    assert lora["counts"]["trainable"] > 0 and lora["trace"]["loss"]
    assert len([row for row in lora["layers"]["effective"] if row["layer"].startswith("L")]) == 24
    outcomes = {t["nodeid"].split("::")[1]: t["outcome"] for t in payload["tests"]}
    docs = {t["nodeid"].split("::")[1]: t["doc"] for t in payload["tests"]}  # captured for the findings
    assert docs == {"test_lora_changes_only_adapters": "LoRA changes its adapters only.\n\nThe report shows this "
                                                       "paragraph's first line as the hypothesis.",
                    "test_full_ft_lives_in_one_layer": None}
    assert payload["format"] == 2 and len(list((folder / "runs").glob("*.html"))) == 2
    assert outcomes == {"test_lora_changes_only_adapters": "passed", "test_full_ft_lives_in_one_layer": "failed"}
    markdown = (folder / "report.md").read_text()
    assert "| PASS " in markdown and "| FAIL " in markdown
    assert "**per-layer change**" in markdown and "| L13 " in markdown
    assert "adapter A/B tensors" in markdown  # LoRA shows both views


def test_progress_lines_by_default_and_quiet_under_q(hypotheses):
    loud = hypotheses.runpytest_subprocess("-p", "no:cacheprovider", "-k", "lora")
    out = loud.stdout.str()
    assert "[stance-harness] training lora on tiny-qwen2 (curious-uncertainty, 10 examples, task stance-lm)" in out
    assert re.search(r"\[stance-harness\]   lora \[#{24}\] 2/2 loss \d", out)  # the bar, complete
    quiet = hypotheses.runpytest_subprocess("-p", "no:cacheprovider", "-k", "lora", "-q")
    # under -q only the plan's one line (stance_harness/runs/planning.py)
    assert [line for line in quiet.stdout.lines if "[stance-harness]" in line] == [
        "[stance-harness] plan: runs planned 1, stored 1, trained ahead 0"]


def test_no_reports_writes_nothing(hypotheses):
    hypotheses.runpytest_subprocess("-p", "no:cacheprovider", "--no-reports", "-k", "lora").assert_outcomes(passed=1)
    assert not (hypotheses.path / "reports").exists()


def test_earlier_reports_survive_a_later_run(hypotheses):
    hypotheses.runpytest_subprocess("-p", "no:cacheprovider", "-k", "lora")
    first = latest_report(hypotheses)
    hypotheses.runpytest_subprocess("-p", "no:cacheprovider", "-k", "lora")
    second = latest_report(hypotheses)
    assert first != second and json.loads((first / "report.json").read_text())["report_id"] == first.name


def test_unknown_model_is_a_usage_error_with_suggestions(hypotheses):
    result = hypotheses.runpytest_subprocess("-p", "no:cacheprovider", "--model", "tiny-qwen")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--model 'tiny-qwen' is not a known alias*Did you mean: tiny-qwen2*"])


def test_uncached_hub_model_stops_the_run_with_the_download_command(hypotheses):
    result = hypotheses.runpytest_subprocess("-p", "no:cacheprovider", "--model", "qwen2-0.5b")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the weights of Qwen/Qwen2-0.5B (--model qwen2-0.5b) are not in the local HF cache*",
                                 "*hf download Qwen/Qwen2-0.5B*"])
    assert result.duration < 30  # a start-up check, not a hang


def test_bad_method_fails_the_test_with_a_short_message(pytester):
    pytester.makepyfile('def test_x(train):\n    train("lorra")\n')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*stance-harness: unknown method 'lorra'. Did you mean: lora*"])


def test_local_directory_as_model(pytester, tiny_qwen2):
    pytester.makepyfile('''
        def test_trains_on_a_directory(train, base_model):
            run = train("lora", examples=5, recipe={"num_train_epochs": 1}, r=2)
            assert base_model.spec.source == "local"
            assert run.counts["trainable"] > 0
    ''')
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "--model", str(tiny_qwen2.path)).assert_outcomes(passed=1)


def test_tiny_phi_maps_the_seed_layers_and_concentrates_surgical_lora(pytester):
    pytester.makepyfile('''
        from stance_harness import assert_change_concentrated

        def test_phi(train, anatomy):
            layers = anatomy.analog([13, 15], depth=24)
            assert (anatomy.model_type, anatomy.num_layers, layers) == ("phi", 32, [17, 20])
            run = train("lora", examples=5, recipe={"num_train_epochs": 1}, r=2, layers=layers,
                        target_modules=["q_proj", "v_proj"])
            assert_change_concentrated(run, layers=layers, min_share=0.999)
    ''')
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "--model", "tiny-phi").assert_outcomes(passed=1)


def test_xdist_workers_merge_into_one_report(hypotheses):
    pytest.importorskip("xdist")
    result = hypotheses.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=2, failed=1)
    payload = json.loads((latest_report(hypotheses) / "report.json").read_text())
    assert len(payload["tests"]) == 2 and len(payload["runs"]) == 2
    assert payload["provenance"]["model"]["name"] == "tiny-qwen2" and payload["provenance"]["model"]["revision"]
    assert [s["name"] for s in payload["provenance"]["stances"]] == ["curious-uncertainty"]
    result.stdout.fnmatch_lines(["*= stance-harness =*"])


def test_a_stuck_analysis_fails_naming_its_stage_and_the_session_ends(pytester):
    pytester.makepyfile('''
        import threading

        from stance_harness import assert_change_concentrated
        from stance_harness.runs.methods import METHODS
        from stance_harness.runs.methods.base import register_method
        from stance_harness.runs.methods.full import FullFineTuning

        @register_method
        class StuckAnalysis(FullFineTuning):
            name = "stuck-analysis"

            def effective_deltas(self, model, before, anatomy):
                threading.Event().wait()  # never returns

        def test_stuck(train):
            run = train("stuck-analysis", examples=5, recipe={"num_train_epochs": 1})
            assert_change_concentrated(run, layers=[0], min_share=0.0)

        def test_after_it(train):
            run = train("full", examples=5, recipe={"num_train_epochs": 1})
            assert run.trace.loss
    ''')
    # A stage left running would hang the session for ever; pytester's timeout turns that into a
    # failure. (A wall-clock bound near the normal ~30 s failed on a loaded machine.)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--analysis-timeout", "2", timeout=300)
    result.assert_outcomes(passed=1, failed=1)
    # one harness line naming the test's line, as every harness error is: no traceback through harness frames
    result.stdout.fnmatch_lines(["*stance-harness: analysis stage 'effective_deltas' did not finish within 2s and was "
                                 "stopped (raise --analysis-timeout*) (test_a_stuck_analysis_*.py:17)"])
    assert "stages.py" not in result.stdout.str() and "StageTimeout" not in result.stdout.str()
    report = json.loads((latest_report(pytester) / "report.json").read_text())
    stuck = next(r for r in report["runs"].values() if r["method"] == "stuck-analysis")
    assert "effective_deltas" in stuck["analysis_error"]  # the report says so too


def test_a_misused_helper_fails_its_test_with_one_harness_line_before_any_training(pytester):
    pytester.makepyfile(test_misuse="""
        from stance_harness import assert_ece, assert_less

        def test_forgot_to_call_train(train):
            assert_ece(train, max=0.1)

        def test_misspelt_metric(train):
            assert_less(object(), object(), metric="forgeting")
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rf")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*stance-harness: assert_ece: `run` must be a Run (what train(...) returns), or a RunSet (train(..., seeds=N)) "
        "or list of Runs, one per seed, got the `train` fixture itself "
        "(a function); call it: run = train('lora', ...) (test_misuse.py:4)",
        "*stance-harness: assert_less: no metric 'forgeting' to compare. Did you mean: forgetting? *(test_misuse.py:7)",
    ])
    output = result.stdout.str()
    assert "stance_harness/checks/" not in output and "HarnessError" not in output and "training " not in output


def test_under_plan_a_run_compared_with_itself_is_caught_and_a_sound_comparison_skips(pytester):
    pytester.makepyfile(test_planned="""
        from stance_harness import assert_less

        def test_itself(train):
            assert_less(train("lora", examples=5), train("lora", examples=5))

        def test_two_runs(train):
            assert_less(train("lora", examples=5), train("full", examples=5))
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--plan", "-rs")
    result.assert_outcomes(failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*stance-harness: assert_less: `a` and `b` are the same run (lora-*) (test_planned.py:4)",
                                 "SKIPPED*--plan: lora-* checked, not trained*"])


def test_negative_analysis_timeout_is_a_usage_error(hypotheses):
    result = hypotheses.runpytest_subprocess("-p", "no:cacheprovider", "--analysis-timeout", "-1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--analysis-timeout must be >= 0*"])
