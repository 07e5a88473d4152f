"""--executor ray (stance_harness/runs/executors_ray.py): each planned run is a Ray task on a local Ray the
session starts; the runs are trained in Ray worker processes, a failed task fails only the
tests that need its run (naming the node), the weights are those of a local run, and without
--executor ray nothing imports Ray."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

RECIPE = '{"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5, "seed": 0}'
P = ("-p", "no:cacheprovider", "--no-reports")

# Where the session ran and where the plan says each run was trained.
CONFTEST = '''
import importlib.util
import json
import os

import refusing_method  # noqa: F401 - registers the method that fails in a Ray worker

os.environ["SESSION_PID"] = str(os.getpid())  # the local Ray started later inherits it


def pytest_sessionfinish(session):
    from stance_harness.plugin import SESSION_KEY

    harness = session.config.stash[SESSION_KEY]
    plan = harness.ahead_plan
    with open("plan.json", "w") as handle:
        json.dump({"session_pid": os.getpid(), "planned": sorted(plan.requests), "trained": sorted(plan.trained),
                   "failed": plan.failed, "trained_on": plan.trained_on,
                   "origins": {k: run.origin for k, run in harness._runs.items() if isinstance(k, str)}}, handle)
'''

REFUSING_METHOD = '''
import os

from stance_harness import register_method
from stance_harness.runs.methods.full import FullFineTuning


@register_method
class RefuseInRay(FullFineTuning):
    """Full fine-tuning that fails in any process but the session's (a Ray worker's)."""

    name = "refuse-in-ray"

    def prepare(self, model, ctx):
        if str(os.getpid()) != os.environ.get("SESSION_PID"):
            raise RuntimeError("refused in a Ray worker")
        return super().prepare(model, ctx)


@register_method
class DieInRay(FullFineTuning):
    """Full fine-tuning that kills any process but the session's (a Ray worker)."""

    name = "die-in-ray"

    def prepare(self, model, ctx):
        if str(os.getpid()) != os.environ.get("SESSION_PID"):
            os._exit(3)
        return super().prepare(model, ctx)
'''

SUITE = f'''
RECIPE = {RECIPE}


def test_lora(train):
    assert train("lora", examples=10, recipe=RECIPE, r=2).trace.loss


def test_full(train):
    assert train("full", examples=10, recipe=RECIPE).trace.loss


def test_refused(train):
    assert train("refuse-in-ray", examples=10, recipe=RECIPE).trace.loss


def test_died(train):
    assert train("die-in-ray", examples=10, recipe=RECIPE).trace.loss
'''


@pytest.fixture(scope="module")
def local_weights(tiny_qwen2, stance):
    """The two requests trained here as a local worker trains them (one thread): run id -> trained tensors.
    A module fixture, so before pytester snapshots sys.modules: its teardown would drop the modules
    training imports (peft, bitsandbytes), which torch cannot register twice for a later test."""
    if importlib.util.find_spec("ray") is None:  # not imported here: this process never needs Ray
        pytest.skip("Ray is the optional extra `ray` (~200 MB), not in `test`: pip install 'stance-harness[ray]' "
                    "to run this test")
    from stance_harness.runs.request import TrainingRequest
    from stance_harness.runs.training import train_run

    found = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method, options in (("lora", {"r": 2}), ("full", {})):
            request = TrainingRequest.build(tiny_qwen2, stance, method, examples=10, recipe=json.loads(RECIPE),
                                            options=options)
            run = train_run(request, tiny_qwen2, stance)
            found[request.run_id] = {name: tensor.detach().cpu().clone() for name, tensor in run.model.named_parameters()
                                     if name in run.before}
    finally:
        torch.set_num_threads(threads)
    return found


def test_planned_runs_train_as_ray_tasks_with_the_weights_of_a_local_run(local_weights, pytester, tmp_path,
                                                                          monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(refusing_method=REFUSING_METHOD, test_suite=SUITE)
    # the Ray workers import the suite's method module as the session does
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(pytester.path), os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local Ray, started by the session
    store = tmp_path / "store"
    result = pytester.runpytest_subprocess(*P, "--run-cache", str(store), "--executor", "ray", "-q")
    result.assert_outcomes(passed=2, failed=2)
    seen = json.loads((pytester.path / "plan.json").read_text())
    (refused,) = [run for run in seen["planned"] if run.startswith("refuse-in-ray-")]
    (died,) = [run for run in seen["planned"] if run.startswith("die-in-ray-")]
    good = sorted(run for run in seen["planned"] if run not in (refused, died))
    assert len(good) == 2 and seen["trained"] == good and sorted(seen["failed"]) == sorted([refused, died])
    # every run that finished was trained in a Ray worker process, none in the session's
    assert set(seen["trained_on"]) == {*good, refused}
    assert all(where["pid"] != seen["session_pid"] and where["node"] for where in seen["trained_on"].values())
    assert seen["origins"] == dict.fromkeys(good, "trained")  # loaded from the store, trained by this session
    node = seen["trained_on"][refused]["node"]
    out = result.stdout.str()
    # each failed run fails only its test, with the task's error (and the node, where the task could say)
    assert re.search(rf"stance-harness: run {refused} \(refuse-in-ray\) failed when trained ahead in a worker "
                     rf"process: RuntimeError: refused in a Ray worker \(at refusing_method.py:\d+\), on Ray node "
                     rf"{node} \(", out), out
    assert re.search(rf"stance-harness: run {died} \(die-in-ray\) failed when trained ahead in a worker "
                     rf"process: its Ray task failed: \w+", out), out
    assert "[stance-harness] plan: runs planned 4, stored 0, trained ahead 2, failed 2" in out
    assert sorted(local_weights) == good  # the same requests, the same run ids
    for run_id in good:
        stored = load_file(str(store / run_id / "tensors.safetensors"))
        after = {name.removeprefix("after/"): tensor for name, tensor in stored.items() if name.startswith("after/")}
        assert after and set(after) == set(local_weights[run_id])
        different = [name for name, tensor in after.items() if not torch.equal(tensor, local_weights[run_id][name])]
        assert not different, f"{run_id}: weights differ from a local run in {different[:3]}"


STARTUP = '''
import sys

import pytest

code = pytest.main(["-p", "no:cacheprovider", "--collect-only", "-q", sys.argv[1]])
assert code == 0 and "stance_harness.plugin" in sys.modules and "stance_harness.runs.planning" in sys.modules
assert "stance_harness.runs.executors_ray" in sys.modules  # registered, without Ray
print("RAY_IMPORTED" if any(name == "ray" or name.startswith("ray.") for name in sys.modules) else "NO_RAY")
'''


def test_without_executor_ray_nothing_imports_ray(tmp_path):
    (tmp_path / "test_x.py").write_text("def test_x(train):\n    pass\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", STARTUP, str(tmp_path / "test_x.py")], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert done.stdout.strip().endswith("NO_RAY"), done.stdout + done.stderr
    assert "1 test collected" in done.stdout, done.stdout


def test_ray_options_are_checked_before_collection(pytester, monkeypatch):
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--ray-address", "auto")
    result.stderr.fnmatch_lines(["*stance-harness: --ray-address is for --executor ray, not local*"])
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find(name, *a))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--executor", "ray")
    assert ("stance-harness: --executor ray needs Ray, which is not installed: pip install 'stance-harness[ray]' "
            "(or pip install ray)") in result.stderr.str()

