"""Plan at collection, train ahead (stance_harness/runs/planning.py): the plan is what the tests then ask
for; worker processes train it into the run store, a dead worker loses only its run, -q shows
the plan's line, and a run trained in a worker has the weights of one trained in the session."""

import json
import re

import peft  # noqa: F401 - at collection: an inline pytester run drops modules first imported during it, and
import pytest  # bitsandbytes (which peft imports) cannot register its torch operators a second time
import torch
from safetensors.torch import load_file

from stance_harness.runs.planning import (EXECUTORS, Plan, PlanProgress, estimate_seconds, format_seconds, last_lines,
                              measured_step_times, worker_slots, xdist_position)
from stance_harness.runs.runstore import RunStore
from stance_harness.core.registry import UnknownNameError
from stance_harness.runs.planning import PlannedRequest

P = ("-p", "no:cacheprovider", "--no-reports")
RECIPE = '{"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5, "seed": 0}'

# Writes what the session planned and what its tests then asked for.
CONFTEST = '''
import json

import crash_method  # noqa: F401 - registers the method that dies in a worker


def pytest_sessionfinish(session):
    from stance_harness.plugin import SESSION_KEY

    harness = session.config.stash[SESSION_KEY]
    plan = harness.ahead_plan
    with open("plan.json", "w") as handle:
        json.dump({"planned": sorted(plan.requests) if plan else [], "trained": sorted(plan.trained) if plan else [],
                   "asked": sorted(k for k in harness._runs if isinstance(k, str)),
                   "failed": plan.failed if plan else {},
                   "origins": {k: run.origin for k, run in harness._runs.items() if isinstance(k, str)}}, handle)
'''

CRASH_METHOD = '''
import multiprocessing
import os

from stance_harness import register_method
from stance_harness.runs.methods.full import FullFineTuning


@register_method
class CrashInWorker(FullFineTuning):
    """Full fine-tuning that kills the training worker process it runs in."""

    name = "crash-in-worker"

    def prepare(self, model, ctx):
        if multiprocessing.current_process().name == "stance-harness-trainer":
            os._exit(3)
        return super().prepare(model, ctx)
'''

FIRST = f'''
RECIPE = {RECIPE}


def test_lora(train):
    assert train("lora", examples=5, recipe=RECIPE, r=2).trace.loss


def test_full_and_lora(train):
    full, lora = train("full", examples=5, recipe=RECIPE), train("lora", examples=5, recipe=RECIPE, r=2)
    assert full.trace.loss and lora.trace.loss


def test_a_request_computed_from_a_run(train):
    first = train("lora", examples=5, recipe=RECIPE, r=2)
    # known only once `first` is trained: not in the plan, trained when asked
    assert train("lora", examples=5, recipe=RECIPE, r=len(first.trace.loss) + 3).trace.loss


def test_without_training():
    assert True
'''

SECOND = f'''
import pytest

RECIPE = {RECIPE}


@pytest.fixture
def pair(train):  # seed 0 is test_first's run; seed 1 is new
    return train("lora", examples=5, recipe=RECIPE, r=2, seeds=2)


def test_seeds_from_a_fixture(pair):
    assert len(pair) == 2
'''

KILLED = f'''
RECIPE = {RECIPE}


def test_survives(train):
    assert train("lora", examples=5, recipe=RECIPE, r=2).trace.loss


def test_dies(train):
    assert train("crash-in-worker", examples=5, recipe=RECIPE).trace.loss
'''


@pytest.fixture
def project(pytester, tmp_path):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(crash_method=CRASH_METHOD)
    pytester.store = tmp_path / "store"
    return pytester


def _plan(pytester) -> dict:
    return json.loads((pytester.path / "plan.json").read_text())


def test_the_plan_is_what_the_tests_of_two_files_then_ask_for(project):
    project.makepyfile(test_first=FIRST, test_second=SECOND)
    result = project.runpytest_subprocess(*P, "--run-cache", str(project.store), "--train-workers", "1")
    result.assert_outcomes(passed=5)
    seen = _plan(project)
    computed = [run for run in seen["asked"] if run not in seen["planned"]]
    # every request knowable before training was planned and trained ahead; only the computed one was not
    assert len(seen["planned"]) == 3 and seen["trained"] == seen["planned"]  # lora r=2 (seeds 0, 1) and full
    assert len(computed) == 1 and computed[0].startswith("lora-")
    assert set(seen["asked"]) == set(seen["planned"]) | set(computed)
    assert "[stance-harness] plan: runs planned 3, stored 0, trained ahead 3 in " in result.stdout.str()
    # --plan: the store holds every run trained above; the new one's time from the step times it measured
    project.makepyfile(test_third=f"def test_more_full(train):\n    train('full', examples=10, recipe={RECIPE})\n")
    planned = project.runpytest_subprocess(*P, "--run-cache", str(project.store), "--plan", "-q")
    full_step = measured_step_times(RunStore(project.store))[("tiny-qwen2", "full")]
    planned.stdout.fnmatch_lines([f"--plan: 4 distinct training requests checked (each seed of a RunSet is one); in the "
                                  f"run store: 3; to train: 1, estimated {format_seconds(2 * full_step)} in one process "
                                  f"(from the step times the run store measured)"])


def test_a_killed_worker_fails_only_the_tests_that_needed_its_run(project):
    project.makepyfile(test_killed=KILLED)
    result = project.runpytest_subprocess(*P, "--run-cache", str(project.store), "--train-workers", "2", "-q")
    result.assert_outcomes(passed=1, failed=1)
    seen = _plan(project)
    (dead,) = [run for run in seen["planned"] if run.startswith("crash-in-worker-")]
    (alive,) = [run for run in seen["planned"] if run.startswith("lora-")]
    assert seen["trained"] == [alive] and list(seen["failed"]) == [dead]
    assert seen["origins"] == {alive: "trained"}  # loaded from the store, but trained by this session
    out = result.stdout.str()
    assert re.search(rf"\nstance-harness: run {dead} \(crash-in-worker\) failed when "
                     rf"trained ahead in a worker process: the worker process training it died \(exit code 3\)", out), out
    # -q: the plan's one line, and nothing else of the harness's progress
    lines = [line for line in result.stdout.lines if line.startswith("[stance-harness]")]
    assert lines == [f"[stance-harness] plan: runs planned 2, stored 0, trained ahead 1, failed 1 ({dead}) in "
                     + lines[0].rsplit(" in ", 1)[-1]], lines
    # the surviving run was trained in a worker; the same request trained here, serially, has its weights
    _same_weights_as_serial(project.store / alive, alive)


def _same_weights_as_serial(entry, run_id):
    from stance_harness.models import load_model
    from stance_harness.runs.request import TrainingRequest
    from stance_harness.stances import load_stance
    from stance_harness.runs.training import train_run

    loaded, stance = load_model("tiny-qwen2"), load_stance("curious-uncertainty")
    request = TrainingRequest.build(loaded, stance, "lora", examples=5, recipe=json.loads(RECIPE), options={"r": 2})
    assert request.run_id == run_id
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker trained
    try:
        run = train_run(request, loaded, stance)
    finally:
        torch.set_num_threads(threads)
    stored = load_file(str(entry / "tensors.safetensors"))
    model = dict(run.model.named_parameters())
    after = {name.removeprefix("after/"): tensor for name, tensor in stored.items() if name.startswith("after/")}
    assert after and set(after) == set(run.before)
    different = [name for name, tensor in after.items() if not torch.equal(tensor, model[name].detach().cpu())]
    assert not different, f"weights differ from serial training in {different[:3]}"


# -- the pieces, without a model ---------------------------------------------------------------
class _Request:
    def __init__(self, run_id):
        self.model, self.method, self.run_id = {"id": "tiny"}, run_id.split("-")[0], run_id


def _plan_of(steps: dict) -> Plan:
    return Plan({run: PlannedRequest(_Request(run), "tiny", "s", n) for run, n in steps.items()}, to_train=list(steps))


def test_estimates_come_from_measured_step_times_by_model_and_method():
    plan = _plan_of({"lora-a": 10, "full-b": 20})
    assert estimate_seconds(plan, ["lora-a", "full-b"], {("tiny", "lora"): 0.5, "tiny": 2.0}) == 10 * 0.5 + 20 * 2.0
    assert estimate_seconds(plan, ["lora-a", "full-b"], {("tiny", "lora"): 0.5, "tiny": 2.0}, workers=2) == 22.5
    assert estimate_seconds(plan, ["lora-a"], {("other", "lora"): 0.5}) is None  # nothing of this model
    assert [format_seconds(s) for s in (None, 4.4, 59.6, 61, 3600)] == ["unknown", "4s", "1m00s", "1m01s", "60m00s"]


def test_step_times_are_measured_from_the_stored_runs(tmp_path):
    for name, model, method, times in [("lora-1", "tiny", "lora", [1.0, 3.0]), ("full-2", "tiny", "full", [5.0]),
                                       ("lora-3", "big", "lora", [10.0, 20.0, 30.0])]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps(
            {"request": {"model": {"id": model}, "method": method}, "trace": {"step_time": times}}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text("{not json")
    (tmp_path / ".locks").mkdir()
    assert measured_step_times(RunStore(tmp_path)) == {("tiny", "lora"): 2.0, ("tiny", "full"): 5.0, "tiny": 3.0,
                                                       ("big", "lora"): 20.0, "big": 20.0}
    assert measured_step_times(RunStore(tmp_path / "absent")) == {}


def test_progress_counts_runs_and_its_eta_follows_the_measured_steps():
    drawn, now = [], [0.0]
    plan = _plan_of({"lora-a": 4, "full-b": 4})
    progress = PlanProgress(plan, 2, lambda text, when: drawn.append((when, text)), {"tiny": 1.0},
                            clock=lambda: now[0])
    assert progress.eta() == 4.0  # before any step: 8 steps of 1 s from the store, on 2 workers
    progress.start("lora-a")
    now[0] = 1.0  # past the redraw interval: the step draws
    progress.step("lora-a", 1, 4, 3.0)  # measured: 3 s a step
    assert progress.eta() == (3 + 4) * 3.0 / 2
    assert progress.line() == "[stance-harness] plan: 0/2 runs trained; training lora-a 1/4; ETA 10s"
    progress.finish("lora-a")
    progress.start("full-b")
    now[0] = 30.0
    progress.finish("full-b", "the worker died")
    progress.close()
    assert plan.trained == ["lora-a"] and plan.failed == {"full-b": "the worker died"}
    assert drawn[-1] == ("final", "[stance-harness] plan: runs planned 2, stored 0, trained ahead 1, failed 1 "
                                  "(full-b) in 30s")
    assert {when for when, _ in drawn} == {"event", "step", "final"}


def test_workers_one_per_gpu_else_per_core_within_memory_and_runs():
    gib = 2**30
    assert worker_slots(None, "cuda:0", 5, gib, environ={}, gpus=["0", "1"]) == ["0", "1"]
    assert worker_slots(None, "cuda:0", 1, gib, environ={}, gpus=["0", "1"]) == ["0"]  # no more than the runs
    assert worker_slots(3, "cuda:0", 5, gib, environ={}, gpus=["0", "1"]) == ["0", "1", "0"]
    assert worker_slots(None, "cpu", 9, gib, environ={}, cores=4, available=100 * gib) == [None] * 4
    assert worker_slots(None, "cpu", 9, gib, environ={}, cores=4, available=15 * gib) == [None] * 2  # 7 GiB each
    xdist = {"PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": "2"}
    assert worker_slots(None, "cpu", 9, gib, environ=xdist, cores=4, available=100 * gib) == [None] * 2
    assert worker_slots(5, "cpu", 2, gib, environ={}, cores=1, available=gib) == [None] * 2  # asked: as asked
    assert xdist_position(xdist) == (1, 2) and xdist_position({}) == (0, 1)


def test_a_dead_workers_last_output_is_quoted(tmp_path):
    log = tmp_path / "worker.log"
    log.write_text("loading\n\nSegmentation fault\n")
    assert last_lines(log, 1) == f"; its last output ({log}):\nSegmentation fault"
    assert last_lines(tmp_path / "none.log") == ""


def test_options_refuse_bad_worker_counts_and_unknown_executors(pytester, monkeypatch):
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--train-workers", "-1")
    result.stderr.fnmatch_lines(["*stance-harness: --train-workers must be >= 0 (0: no training ahead), got -1*"])
    monkeypatch.setenv("STANCE_HARNESS_TRAIN_WORKERS", "two")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.stderr.fnmatch_lines(["*stance-harness: $STANCE_HARNESS_TRAIN_WORKERS='two' is not a whole number*"])
    monkeypatch.delenv("STANCE_HARNESS_TRAIN_WORKERS")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--executor", "locl")
    result.stderr.fnmatch_lines(["*unknown executor 'locl'. Did you mean: local?*"])
    with pytest.raises(UnknownNameError, match="Known executors: local, ray"):
        EXECUTORS.get("slurm")


BROKEN_EXECUTOR = '''
from stance_harness.runs.planning import EXECUTORS


class Unreachable:
    """An executor whose cluster is down: it fails before training anything."""

    def __init__(self, slots, logs):
        pass

    def run(self, specs, progress, claim, release):
        raise ConnectionError("no cluster at ray://nowhere:10001")


EXECUTORS.register("unreachable", Unreachable)
'''


def test_an_executor_that_fails_leaves_the_runs_to_train_on_demand(pytester, tmp_path):
    pytester.makeconftest(BROKEN_EXECUTOR)
    pytester.makepyfile(test_two=f'''
RECIPE = {RECIPE}


def test_lora(train):
    assert train("lora", examples=5, recipe=RECIPE, r=2).origin == "trained"


def test_full(train):
    assert train("full", examples=5, recipe=RECIPE).origin == "trained"
''')
    result = pytester.runpytest_subprocess(*P, "--run-cache", str(tmp_path / "store"), "--train-workers", "2",
                                           "--executor", "unreachable", "-q")
    result.assert_outcomes(passed=2)  # trained when asked, in the session, as without planning
    assert ("[stance-harness] plan: training ahead stopped (ConnectionError: no cluster at ray://nowhere:10001); "
            "the runs not stored train when a test asks for them") in result.stdout.lines


def test_workers_take_only_the_runs_whose_lock_they_get_and_that_are_not_stored(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from stance_harness.runs import planning
    from stance_harness.core.files import file_digest

    store = RunStore(tmp_path)
    entry = tmp_path / "full-b"  # stored meanwhile: a complete entry, its manifest checking out
    entry.mkdir()
    files = {}
    for name in ("tensors.safetensors", "run.json"):
        (entry / name).write_text(name)
        files[name] = {"sha256": file_digest(entry / name), "bytes": len(name)}
    (entry / "manifest.json").write_text(json.dumps({"format": 1, "files": files}))
    assert store.problem("full-b") is None
    plan = _plan_of({"lora-a": 2, "full-b": 2, "lora-c": 2})
    harness = SimpleNamespace(store=store, options=SimpleNamespace(retrain=False), trained_ahead=set(),
                              ahead_failures={})
    handed = []

    class Recorder:
        def run(self, specs, progress, claim, release):
            for spec in specs:
                if claim(spec["run_id"]):
                    handed.append(spec["run_id"])
                    progress.start(spec["run_id"])
                    progress.finish(spec["run_id"])
                    release(spec["run_id"])

    monkeypatch.setattr(planning, "spec_of", lambda planned, options, root: {"run_id": planned.request.run_id})
    progress = PlanProgress(plan, 2, lambda *_: None)
    with store.lock("lora-a"):  # another process trains lora-a
        planning._train_in_workers(harness, plan, ["lora-a", "full-b", "lora-c"], progress, Recorder())
    assert handed == ["lora-c"] and plan.elsewhere == ["lora-a"] and plan.stored == ["full-b"]
    assert harness.trained_ahead == {"lora-c"} and progress.done == 3
    with store.lock("lora-c", timeout=0):  # released once its run was done
        pass


def _stored_by_a_worker(tmp_path, tiny_qwen2, stance, measured: bool, analysis_timeout: float | None = None):
    """A LoRA run (its effective change needs the model: scale * B @ A on the base) trained and
    stored as a plan-ahead worker does (workers.train_spec, here in-process), or stored straight
    after training without the worker's measurements; then loaded as the session loads it."""
    import dataclasses
    from pathlib import Path

    from stance_harness.models import ModelArgs
    from stance_harness.runs import planning, workers
    from stance_harness.runs.request import TrainingRequest
    from stance_harness.runs.services import RunServices
    from stance_harness.runs.training import train_run
    from stance_harness.session import HarnessOptions

    store = RunStore(tmp_path / "store")
    request = TrainingRequest.build(tiny_qwen2, stance, "lora", examples=10, recipe=json.loads(RECIPE), options={"r": 2})
    if measured:
        options = HarnessOptions("tiny-qwen2", ModelArgs(), [], None, Path("."), [], run_cache=store.root,
                                 analysis_timeout=analysis_timeout)
        spec = planning.spec_of(PlannedRequest(request, "tiny-qwen2", "curious-uncertainty", steps=2), options,
                                store.root)
        models = {("tiny-qwen2", json.dumps(dataclasses.asdict(ModelArgs()), sort_keys=True)): tiny_qwen2}
        workers.train_spec(spec, models, lambda _message: None)
    else:
        store.save(train_run(request, tiny_qwen2, stance))
    return store.load(request, tiny_qwen2, stance).attach(RunServices(store=store))  # as the session holds it


REPORTED = {"counts", "deltas:effective", "deltas:adapter"}  # what Run.summary reads of a run


def test_a_worker_stores_what_the_report_reads(tmp_path, tiny_qwen2, stance):
    run = _stored_by_a_worker(tmp_path, tiny_qwen2, stance, measured=True)
    stored = {key: run.measurements[key] for key in REPORTED}  # read from the store, not measured here
    summary = run.summary()
    assert {key: run.measurements[key] for key in REPORTED} == stored
    assert run.__dict__.get("_model") is None  # the report never rebuilt the model
    assert summary["counts"]["trainable"] > 0 and summary["layers"]["effective"] and summary["layers"]["adapter"]
    assert "analysis_error" not in summary


def test_a_run_stored_without_them_is_rebuilt_for_the_report(tmp_path, tiny_qwen2, stance):
    run = _stored_by_a_worker(tmp_path, tiny_qwen2, stance, measured=False)
    assert not {"deltas:effective", "deltas:adapter"} & set(run.measurements)
    summary = run.summary()
    assert REPORTED <= set(run.measurements) and summary["layers"]["effective"]
    assert run.__dict__.get("_model") is not None  # LoRA's effective change: scale * B @ A on the rebuilt model


def test_the_worker_measures_under_the_sessions_analysis_timeout(tmp_path, tiny_qwen2, stance):
    run = _stored_by_a_worker(tmp_path, tiny_qwen2, stance, measured=True, analysis_timeout=1e-6)
    assert not {"deltas:effective", "deltas:adapter"} & set(run.measurements)  # over the limit: left to the session
    assert run.summary()["layers"]["effective"]  # which measures them
