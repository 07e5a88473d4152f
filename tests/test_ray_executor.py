"""--executor ray (stance_harness/runs/executors_ray.py): each planned run, and each request a test
body computes, is a Ray task on a local Ray cluster (one for the module, `ray.init` with 2 CPUs,
which the sessions connect to); the runs are trained in Ray worker processes, a failed task fails
only the tests that need its run (naming the node), the weights are those of a local run, a
second session on the store trains nothing, and without --executor ray nothing imports Ray."""

import importlib.util
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stance_harness.core.errors import HarnessError
from stance_harness.models import ModelArgs
from stance_harness.options import HarnessOptions
from stance_harness.runs import executors_ray
from stance_harness.runs.executors_ray import RayExecutor
from stance_harness.runs.planning import cpu_cores, remote_executor

RECIPE = '{"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5, "seed": 0}'
P = ("-p", "no:cacheprovider", "--no-reports")

# Where the session ran, where each run was trained (the plan's and the on-demand tasks'), and
# whether the session imported Ray.
CONFTEST = '''
import json
import os
import sys

import refusing_method

refusing_method.IN_SESSION = True  # a Ray worker imports the module afresh, where it stays False


def pytest_sessionfinish(session):
    from stance_harness.plugin import SESSION_KEY

    harness = session.config.stash[SESSION_KEY]
    plan = harness.ahead_plan
    with open("plan.json", "w") as handle:
        json.dump({"session_pid": os.getpid(), "planned": sorted(plan.requests), "trained": sorted(plan.trained),
                   "stored": sorted(plan.stored), "failed": plan.failed, "plan_trained_on": plan.trained_on,
                   "trained_on": harness.remote.trained_on if harness.remote is not None else {},
                   "ray_imported": "ray" in sys.modules,
                   "origins": {k: run.origin for k, run in harness._runs.items() if isinstance(k, str)}}, handle)
'''

REFUSING_METHOD = '''
import os

from stance_harness import register_method
from stance_harness.runs.methods.full import FullFineTuning

IN_SESSION = False  # the session's conftest sets it


@register_method
class RefuseInRay(FullFineTuning):
    """Full fine-tuning that fails in any process but the session's (a Ray worker's)."""

    name = "refuse-in-ray"

    def prepare(self, model, ctx):
        if not IN_SESSION:
            raise RuntimeError("refused in a Ray worker")
        return super().prepare(model, ctx)


@register_method
class DieInRay(FullFineTuning):
    """Full fine-tuning that kills any process but the session's (a Ray worker)."""

    name = "die-in-ray"

    def prepare(self, model, ctx):
        if not IN_SESSION:
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


# Requests a test body computes: the second run's rank comes from the first run's trace, so no
# plan can know it (planning skips the test where it reads the first run).
ON_DEMAND_SUITE = f'''
RECIPE = {RECIPE}


def test_computed(train):
    first = train("lora", examples=10, recipe=RECIPE, r=2)
    second = train("lora", examples=10, recipe=RECIPE, r=2 * len(first.trace.loss))
    assert second.trace.loss and second.run_id != first.run_id


def test_computed_and_refused(train):
    first = train("lora", examples=10, recipe=RECIPE, r=2)
    assert train("refuse-in-ray", examples=5 * len(first.trace.loss), recipe=RECIPE).trace.loss
'''


def needs_ray() -> None:
    if importlib.util.find_spec("ray") is None:  # not imported here: the check itself needs no Ray
        pytest.skip("Ray is not installed (the extra `ray`, also in `test`): pip install 'stance-harness[ray]' "
                    "to run this test")


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray cluster with 2 CPUs for the module's sessions to connect to (one start, not one per
    session), shut down after them. Its token travels in $RAY_AUTH_TOKEN: pytester moves $HOME, where
    Ray would otherwise look for it. Module-scoped, so Ray is imported before pytester snapshots sys.modules."""
    needs_ray()
    import ray  # why: only where Ray is installed (see needs_ray)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        patch.delenv("RAY_ADDRESS", raising=False)
        context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield context.address_info["address"]
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def local_weights(tiny_qwen2, stance):
    """The requests trained here as a local worker trains them (one thread): run id -> trained tensors.
    A module fixture, so before pytester snapshots sys.modules: its teardown would drop the modules
    training imports (peft, bitsandbytes), which torch cannot register twice for a later test."""
    needs_ray()
    from stance_harness.runs.request import TrainingRequest
    from stance_harness.runs.training import train_run

    found = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method, options in (("lora", {"r": 2}), ("full", {}), ("lora", {"r": 4})):  # r=4: test_computed's
            request = TrainingRequest.build(tiny_qwen2, stance, method, examples=10, recipe=json.loads(RECIPE),
                                            options=options)
            run = train_run(request, tiny_qwen2, stance)
            found[request.run_id] = {name: tensor.detach().cpu().clone() for name, tensor in run.model.named_parameters()
                                     if name in run.before}
    finally:
        torch.set_num_threads(threads)
    return found


def assert_weights_of_a_local_run(store, run_ids, local_weights) -> None:
    for run_id in run_ids:
        stored = load_file(str(store / run_id / "tensors.safetensors"))
        after = {name.removeprefix("after/"): tensor for name, tensor in stored.items() if name.startswith("after/")}
        assert after and set(after) == set(local_weights[run_id])
        different = [name for name, tensor in after.items() if not torch.equal(tensor, local_weights[run_id][name])]
        assert not different, f"{run_id}: weights differ from a local run in {different[:3]}"


def test_planned_runs_train_as_ray_tasks_with_the_weights_of_a_local_run(ray_address, local_weights, pytester,
                                                                          tmp_path, monkeypatch):
    pytester.makeconftest(CONFTEST)
    # the Ray workers import the suite's method module from the session's directory (Ray puts the
    # driver's working directory on its workers' sys.path)
    pytester.makepyfile(refusing_method=REFUSING_METHOD, test_suite=SUITE)
    monkeypatch.setenv("RAY_ADDRESS", ray_address)  # the module's cluster, as $RAY_ADDRESS names it
    store = tmp_path / "store"
    result = pytester.runpytest_subprocess(*P, "--run-cache", str(store), "--executor", "ray", "-q")
    result.assert_outcomes(passed=2, failed=2)
    seen = json.loads((pytester.path / "plan.json").read_text())
    (refused,) = [run for run in seen["planned"] if run.startswith("refuse-in-ray-")]
    (died,) = [run for run in seen["planned"] if run.startswith("die-in-ray-")]
    good = sorted(run for run in seen["planned"] if run not in (refused, died))
    assert len(good) == 2 and seen["trained"] == good and sorted(seen["failed"]) == sorted([refused, died])
    # every run that finished was trained in a Ray worker process, none in the session's
    assert set(seen["trained_on"]) == {*good, refused} and seen["plan_trained_on"] == seen["trained_on"]
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
    assert set(good) <= set(local_weights)  # the same requests, the same run ids
    assert_weights_of_a_local_run(store, good, local_weights)


def test_requests_computed_in_test_bodies_train_as_ray_tasks_on_demand(ray_address, local_weights, pytester,
                                                                        tmp_path):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(refusing_method=REFUSING_METHOD, test_suite=ON_DEMAND_SUITE)
    store = tmp_path / "store"
    result = pytester.runpytest_subprocess(*P, "--run-cache", str(store), "--executor", "ray",
                                           "--ray-address", ray_address, "-q")
    result.assert_outcomes(passed=1, failed=1)
    seen = json.loads((pytester.path / "plan.json").read_text())
    (first,) = seen["planned"]  # the plan knew only the first run
    (second,) = [run for run in seen["trained_on"] if run.startswith("lora-") and run != first]
    (refused,) = [run for run in seen["trained_on"] if run.startswith("refuse-in-ray-")]
    assert seen["trained"] == [first] and set(seen["trained_on"]) == {first, second, refused}
    # the computed run was trained in a Ray worker process, stored, and loaded by the session
    assert seen["trained_on"][second]["pid"] != seen["session_pid"] and seen["trained_on"][second]["node"]
    assert seen["origins"] == {first: "trained", second: "trained"}
    assert_weights_of_a_local_run(store, [second], local_weights)
    out = result.stdout.str()
    assert re.search(rf"\[stance-harness\] on demand: {second} trained as a ray task in \d+s \(on \S+, pid "
                     rf"{seen['trained_on'][second]['pid']}\)", out), out
    # the failed task fails only its test, with its error and the node it ran on
    where = seen["trained_on"][refused]
    assert re.search(rf"stance-harness: run {refused} \(refuse-in-ray\) failed when trained on demand as a ray "
                     rf"task: RuntimeError: refused in a Ray worker \(at refusing_method.py:\d+\), on Ray node "
                     rf"{where['node']} \({re.escape(where['host'])}, pid {where['pid']}\)", out), out
    assert "test_computed_and_refused FAILED" in out or "FAILED test_suite.py::test_computed_and_refused" in out

    # a second session on the same store trains nothing, and does not even import Ray
    again = pytester.runpytest_subprocess(*P, "--run-cache", str(store), "--executor", "ray",
                                          "--ray-address", ray_address, "-q", "-k", "test_computed and not refused")
    again.assert_outcomes(passed=1, deselected=1)
    seen = json.loads((pytester.path / "plan.json").read_text())
    assert seen["planned"] == seen["stored"] == [first] and seen["trained"] == [] and seen["trained_on"] == {}
    assert seen["origins"] == {first: "loaded", second: "loaded"} and not seen["ray_imported"]


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


class FakeRay:
    """What RayExecutor asks of Ray to connect and disconnect, recorded."""

    def __init__(self, initialized: bool = False):
        self.initialized, self.calls = initialized, []

    def is_initialized(self) -> bool:
        return self.initialized

    def init(self, **arguments) -> None:
        self.calls.append(("init", arguments))
        self.initialized = True

    def shutdown(self) -> None:
        self.calls.append(("shutdown", {}))
        self.initialized = False


def test_the_executor_connects_once_and_disconnects_only_what_it_connected(monkeypatch):
    fake = FakeRay()
    monkeypatch.setattr(executors_ray, "_ray", lambda: fake)
    executor = RayExecutor(None, on_gpu=False)
    executor._connect()
    executor._connect()  # connected: no second ray.init (an on-demand task after another)
    assert fake.calls == [("init", {"num_cpus": cpu_cores(), "include_dashboard": False, "log_to_driver": False})]
    executor.close()
    executor.close()
    assert fake.calls[1:] == [("shutdown", {})] and not executor.connected
    executor._connect()  # a later on-demand request connects again
    assert fake.calls[2] == ("init", {"num_cpus": cpu_cores(), "include_dashboard": False, "log_to_driver": False})

    fake = FakeRay()
    monkeypatch.setattr(executors_ray, "_ray", lambda: fake)
    RayExecutor("ray://head:10001", on_gpu=False)._connect()
    assert fake.calls == [("init", {"address": "ray://head:10001", "log_to_driver": False})]

    fake = FakeRay(initialized=True)  # the caller's own ray.init: used, and left connected
    monkeypatch.setattr(executors_ray, "_ray", lambda: fake)
    executor = RayExecutor(None, on_gpu=False)
    executor._connect()
    executor.close()
    assert fake.calls == [] and fake.initialized


def test_only_a_remote_executor_is_kept_on_the_session(monkeypatch):
    from stance_harness.session import HarnessSession

    def session(**options):
        return HarnessSession(HarnessOptions("tiny-qwen2", ModelArgs(), [], None, Path("."), [], **options))

    local = session()
    assert remote_executor(local) is None and local.remote is None  # the session's process trains on demand
    monkeypatch.setattr(RayExecutor, "check", staticmethod(lambda: None))  # Ray need not be installed here
    ray_session = session(executor="ray", ray_address="auto")
    made = remote_executor(ray_session)
    assert isinstance(made, RayExecutor) and made.address == "auto" and not made.connected
    assert remote_executor(ray_session) is made and ray_session.remote is made  # one per session
    with pytest.raises(HarnessError, match="slurm"):
        remote_executor(session(executor="slurm"))


class InProcessExecutor:
    """A remote executor's interface with no Ray: `run` trains each spec in this process as a task
    does (workers.train_spec, into the store), or fails it, or stores nothing, as told."""

    name = "stand-in"
    remote = True
    def __init__(self):
        self.trained_on, self.runs, self.closed = {}, [], 0
        self.outcome = "trains"  # or "fails", or "stores nothing"

    @classmethod
    def for_session(cls, _harness):
        return cls()

    def run(self, specs, progress, claim, release):
        from stance_harness.runs.executors_ray import _Quiet
        from stance_harness.runs.workers import train_spec

        for spec in specs:
            assert claim(spec["run_id"])
            progress.start(spec["run_id"])
            self.runs.append(spec["run_id"])
            if self.outcome == "fails":
                progress.finish(spec["run_id"], "RuntimeError: no room, on node n1 (host-a, pid 7)")
                continue
            if self.outcome == "trains":
                train_spec(spec, {}, _Quiet())
            self.trained_on[spec["run_id"]] = {"node": "n1", "host": "host-a", "pid": 7}
            release(spec["run_id"])
            progress.finish(spec["run_id"])

    def close(self):
        self.closed += 1


@pytest.fixture
def in_process_executor():
    from stance_harness.runs.planning import EXECUTORS

    EXECUTORS.register(InProcessExecutor.name, InProcessExecutor)
    yield
    EXECUTORS.unregister(InProcessExecutor.name)


def test_a_request_no_plan_knew_trains_as_one_task_of_the_remote_executor(in_process_executor, tiny_qwen2,
                                                                          tmp_path, monkeypatch):
    from stance_harness.runs.planning import close_remote
    from stance_harness.session import HarnessSession

    lines = []
    session = HarnessSession(HarnessOptions("tiny-qwen2", ModelArgs(), [], None, Path("."), [],
                                            run_cache=str(tmp_path / "store"), executor="stand-in"),
                             progress=lines.append)
    session.use_model(tiny_qwen2)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # a plain progress callable gets the last line
    recipe = json.loads(RECIPE)  # full fine-tuning: no peft, which an earlier pytester run may have dropped
    run = session.train("full", examples=10, recipe=recipe)
    assert session.remote.runs == [run.run_id] and run.origin == "trained"  # one task, then loaded from the store
    assert (tmp_path / "store" / run.run_id).is_dir() and run.trace.loss
    assert re.fullmatch(rf"\[stance-harness\] on demand: {run.run_id} trained as a stand-in task in \d+s \(on "
                        rf"host-a, pid 7\)", lines[-1]), lines
    assert session.train("full", examples=10, recipe=recipe) is run and session.remote.runs == [run.run_id]
    close_remote(session)
    assert session.remote.closed == 1

    session.remote.outcome = "fails"
    with pytest.raises(HarnessError, match=re.escape("(full) failed when trained on demand as a stand-in task: "
                                                     "RuntimeError: no room, on node n1 (host-a, pid 7)")):
        session.train("full", examples=10, recipe={**recipe, "seed": 1})
    assert lines[-1].endswith("failed")
    session.remote.outcome = "stores nothing"
    with pytest.raises(HarnessError, match=r"the stand-in task that trained full-\S+ on demand finished but "
                                           r"stored no run in "):
        session.train("full", examples=10, recipe={**recipe, "seed": 2})


def test_ray_options_are_checked_before_collection(pytester, monkeypatch):
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--ray-address", "auto")
    result.stderr.fnmatch_lines(["*stance-harness: --ray-address is for --executor ray, not local*"])
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find(name, *a))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--executor", "ray")
    assert ("stance-harness: --executor ray needs Ray, which is not installed: pip install 'stance-harness[ray]' "
            "(or pip install ray)") in result.stderr.str()

