"""Issue 24's speed work: the quick subset, the main-job benchmark's figures, the base digests'
one walk over the parameters, and the plugin's torch-free start-up."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import main_job  # noqa: E402 - benchmarks/ is not a package


# -- the quick subset ---------------------------------------------------------------------------
def _quick_tests(path: Path) -> list[str]:
    def quick(decorator) -> bool:
        return ast.unparse(decorator) == "pytest.mark.quick"

    return [node.name for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.FunctionDef) and any(quick(d) for d in node.decorator_list)]


def test_every_suite_that_trains_marks_one_quick_hypothesis():
    suites = sorted((ROOT / "suites").glob("test_*.py"))
    marked = {path.name: _quick_tests(path) for path in suites}
    # the adapter gate trains nothing and skips without --adapter: no first look to give
    assert marked.pop("test_adapter_gate.py") == []
    assert marked and all(len(names) == 1 for names in marked.values()), marked


def test_the_quick_marker_is_registered(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.quick
        def test_a():
            pass

        def test_b():
            pass
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "--no-reports", "--strict-markers", "-m", "quick")
    result.assert_outcomes(passed=1, deselected=1)


def test_an_unregistered_marker_still_fails_under_strict_markers(pytester):
    """The check above can fail: a marker nobody registered is refused."""
    pytester.makepyfile("""
        import pytest

        @pytest.mark.quik
        def test_a():
            pass
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "--no-reports", "--strict-markers")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*'quik' not found in `markers` configuration option*"])


# -- benchmarks/main_job.py ---------------------------------------------------------------------
def _report(runs: dict) -> dict:
    return {"runs": runs, "tests": [{"nodeid": "a"}, {"nodeid": "b"}], "exit_code": 0}


def test_main_job_counts_only_trained_runs_and_takes_shares_of_pytest(tmp_path):
    (tmp_path / "tiny-qwen2-x").mkdir()
    (tmp_path / "tiny-qwen2-x" / "stance_harness.json").write_text(json.dumps({"build_seconds": 12.0}))
    (tmp_path / "gguf-y").mkdir()  # a converted GGUF model records no build time
    (tmp_path / "gguf-y" / "stance_harness.json").write_text(json.dumps({"name": "y"}))
    runs = {"r1": {"origin": "trained", "train_seconds": 6.0, "instruments": {"steps": 30}},
            "r2": {"origin": "trained", "train_seconds": 4.0, "instruments": {"steps": 10}},
            "r3": {"origin": "loaded", "train_seconds": 50.0, "instruments": {"steps": 99}}}
    figures = main_job.summarise(_report(runs), tmp_path, {"analyses": 8.0, "reporting": 2.0, "tests": 70.0}, 80.0)
    assert figures["runs_trained"] == 2 and figures["steps"] == 40
    assert figures["steps_per_s"] == pytest.approx(40 / 10.0)
    assert figures["phases_s"] == {"training": 10.0, "model building": 12.0, "analyses": 8.0, "reporting": 2.0}
    assert figures["shares"] == pytest.approx({"training": 0.125, "model building": 0.15, "analyses": 0.1,
                                               "reporting": 0.025})
    assert figures["models_built"] == ["tiny-qwen2-x"] and figures["tests"] == 2


def test_main_job_counts_only_the_models_built_in_its_run(tmp_path):
    for name, seconds in (("old", 30.0), ("new", 7.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "stance_harness.json").write_text(json.dumps({"build_seconds": seconds}))
    figures = main_job.summarise(_report({}), tmp_path, {}, 10.0, present_before=frozenset({"old"}))
    assert figures["models_built"] == ["new"] and figures["phases_s"]["model building"] == 7.0


def test_main_job_with_nothing_trained_has_no_rate(tmp_path):
    figures = main_job.summarise(_report({"r": {"origin": "loaded", "train_seconds": 5.0}}), tmp_path, {}, 3.0)
    assert figures["runs_trained"] == 0 and figures["steps_per_s"] is None
    assert figures["phases_s"]["analyses"] == 0.0


def test_main_job_refuses_a_missing_environment_for_no_setup(tmp_path):
    with pytest.raises(main_job.MainJobError, match=r"--no-setup: .*nowhere/bin/python does not exist; name an "
                                                    r"environment with --venv"):
        main_job.main(["--no-setup", "--venv", str(tmp_path / "nowhere")])


def test_main_job_says_when_pytest_wrote_no_report(tmp_path):
    with pytest.raises(main_job.MainJobError, match=r"pytest wrote no report: .*reports/latest is missing"):
        main_job.latest_report(tmp_path)


def test_main_job_timer_counts_nested_stages_once():
    import main_job_timer

    calls = []

    def stage(name, fn, timeout):
        calls.append(name)
        return fn()

    timed = main_job_timer._timed_stage(stage)
    before = main_job_timer.TIMINGS["analyses"]
    assert timed("outer", lambda: timed("inner", lambda: 7, None), None) == 7
    assert calls == ["outer", "inner"]
    assert main_job_timer.TIMINGS["analyses"] > before and main_job_timer._depth == [0]


# -- the base's digests -------------------------------------------------------------------------
def test_base_digest_walks_the_base_parameters_once(tiny_qwen2, monkeypatch):
    from stance_harness.analysis.digest import tensor_digest

    walks = []
    parameters = type(tiny_qwen2.base).parameters

    def counted(module, *args, **kwargs):
        walks.append(1)
        return parameters(module, *args, **kwargs)

    tiny_qwen2._digests.pop("owners", None)
    monkeypatch.setattr(type(tiny_qwen2.base), "parameters", counted)
    tensors = list(tiny_qwen2.base.named_parameters())[:5]
    walks.clear()
    digests = [tiny_qwen2.base_digest(p) for _, p in tensors]
    assert len(walks) == 1, f"{len(walks)} walks over the base's parameters for {len(tensors)} digests"
    assert digests == [tensor_digest(p) for _, p in tensors]


# -- the plugin's start-up -----------------------------------------------------------------------
START_UP = """
import sys
import pytest
code = pytest.main(["--co", "-q", "-p", "no:cacheprovider", sys.argv[1]])
heavy = sorted(m for m in ("torch", "scipy", "numpy", "transformers", "peft") if m in sys.modules)
print("heavy:", ",".join(heavy) or "none", "exit:", int(code))
"""


def test_the_plugin_starts_without_torch_scipy_or_numpy(tmp_path):
    """`pytest --co` on an empty folder loads the plugin and builds its session without the heavy
    libraries (DESIGN: imported lazily, so the plugin loads fast); the first run or test imports them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", START_UP, str(tmp_path)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    line = [x for x in done.stdout.splitlines() if x.startswith("heavy:")]
    assert line, done.stdout[-2000:] + done.stderr[-2000:]
    assert line[-1] == "heavy: none exit: 5", line[-1]  # 5: no tests collected


def test_the_start_up_check_sees_a_heavy_import(tmp_path):
    """The check above can fail: a conftest that imports numpy is seen."""
    (tmp_path / "conftest.py").write_text("import numpy\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", START_UP, str(tmp_path)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert "heavy: numpy exit: 5" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


def test_main_job_prints_each_phase_with_its_share_and_the_rate(tmp_path):
    figures = main_job.summarise(_report({"r": {"origin": "trained", "train_seconds": 5.0,
                                               "instruments": {"steps": 20}}}), tmp_path, {"reporting": 1.0}, 50.0)
    figures.update(setup_s=12.5, pytest_exit_code=0, peak_rss_bytes=2**30)
    text = main_job.render(figures, main_job.argparse.Namespace(venv=tmp_path))
    assert text.splitlines()[:3] == ["set-up: 12.5 s", "pytest: 50.0 s wall, exit code 0, 2 tests, peak RSS 1.00 GiB",
                                     "  training: 5.0 s (10.0% of pytest)"]
    assert "  reporting: 1.0 s (2.0% of pytest)" in text and "runs trained: 1, 20 optimizer steps, 4.00 steps/s" in text
