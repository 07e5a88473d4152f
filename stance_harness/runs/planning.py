"""Plan at collection, train ahead: every run the tests will ask for, trained before they run.

After collection the session runs each collected test that uses `train` once in plan mode
(`train` returns a PlannedRun that only checks its request, as under --plan), with pytest's
own runner but no reporting. What the tests asked for is the plan: its requests deduplicated by
run key, less those the run store holds. The rest are trained up front by an executor and put
in the run store; the tests then run as usual and load them. A test whose planning raises, or
a request computed from a run's results (not knowable before training), trains on demand, as
without planning (in the session's process, or under a remote executor as one task of it:
`train_on_demand`); so does a data-parallel request (--launcher), which has its own processes.

Executors are a registry (`EXECUTORS`), so others (a cluster's) can be added as entries:
"ray" (stance_harness/runs/executors_ray.py, registered by the plugin) sends each planned run to a Ray
cluster as a task, and is `remote`: built once per session by `for_session(harness)`
(`remote_executor`), it gets every planned run, and every request a test computes on demand.
"local" trains in spawned worker processes on this machine, one per GPU where the model is on
CUDA, else one per core with one torch thread each (`--train-workers N` overrides). Each
worker trains through the one loop (`training.train_run`), measures what the report reads of
the run while its model is in memory (`Run.measure_reported`), and saves it as the session
would. A worker that dies loses only the run it was training: the tests that ask for that run
fail with its name and the error; the executor starts a fresh worker for the rest.
With one worker the runs are trained in the session's own process (no second copy of the base).

Under pytest-xdist each worker collects every test, so each plans them all; each trains ahead
the missing runs, starting at its own place in the list, with its share of the cores (or its one
GPU). Worker processes take a run only when they get the run store's lock for it without
waiting (a run another process holds is left to it; a test that needs it waits on the lock and
loads it); training in the xdist worker's own process waits on that lock, then loads. This was
chosen over training in the controller because the controller collects nothing (and should not
hold a copy of the base); only the first worker (gw0) draws the progress, on its stderr.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
import time
import traceback
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable

from stance_harness.core.devices import count_gpus, resolve_device
from stance_harness.core.registry import HarnessError, Registry
from stance_harness.runs.residency import TRAINING_FOOTPRINT, free_memory

EXECUTORS: Registry = Registry("executor")
DEFAULT_EXECUTOR = "local"
LOGS = ".train-logs"  # the run store's folder of worker outputs (on this machine: RunStore.local_dir)
REDRAW_SECONDS = 0.5  # the progress line is redrawn at most this often on a terminal


# -- the plan --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedRequest:
    """A request as a test asked for it: the model and stance named as the session loads them,
    and its number of optimizer steps (what an estimate of its training time multiplies)."""

    request: object  # runs/request.TrainingRequest (not imported: it imports torch)
    model: str
    stance: str
    steps: int


@dataclass
class Plan:
    """The session's training requests as planned: all of them, those already stored, those to train."""

    requests: dict  # run id -> PlannedRequest, in the order the tests asked
    stored: list[str] = field(default_factory=list)
    to_train: list[str] = field(default_factory=list)
    on_demand: list[str] = field(default_factory=list)  # planned, but left to train when asked (data-parallel)
    unplanned: list[str] = field(default_factory=list)  # node ids whose planning raised: they train on demand
    trained: list[str] = field(default_factory=list)
    failed: dict = field(default_factory=dict)  # run id -> error
    elsewhere: list[str] = field(default_factory=list)  # held by another process's lock: left to it
    trained_on: dict = field(default_factory=dict)  # run id -> {node, host, pid} where a remote executor trained it
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [f"runs planned {len(self.requests)}", f"stored {len(self.stored)}", f"trained ahead {len(self.trained)}"]
        if self.failed:
            parts.append(f"failed {len(self.failed)} ({', '.join(self.failed)})")
        if self.elsewhere:
            parts.append(f"trained by another process {len(self.elsewhere)}")
        if self.on_demand:
            parts.append(f"left to train on demand {len(self.on_demand)}")
        took = f" in {format_seconds(self.seconds)}" if self.trained or self.failed else ""
        return f"plan: {', '.join(parts)}{took}"


def plan_items(harness, items: list, runtest: Callable) -> list[str]:
    """Run each item that uses `train` in plan mode, to gather its requests into
    `stance_harness.plan_requests`; the session's records and --plan list are left as they were.
    Returns the node ids whose planning raised something other than a skip or a failure."""
    chosen = [item for item in items if "train" in getattr(item, "fixturenames", ())]
    records, planned = dict(harness.records), list(harness.planned)
    unplanned = []
    harness.planning = True
    try:
        for index, item in enumerate(chosen):
            following = chosen[index + 1] if index + 1 < len(chosen) else None
            try:
                runtest(item, following)
            except Exception:  # noqa: BLE001 - a test that cannot be planned trains on demand
                unplanned.append(item.nodeid)
    finally:
        harness.planning = False
        harness.records.clear()
        harness.records.update(records)
        harness.planned[:] = planned
    return unplanned


def make_plan(harness) -> Plan:
    """Split the gathered requests: stored (a complete store entry; under --retrain none is),
    left on demand (data-parallel launches), and to train."""
    plan = Plan(dict(harness.plan_requests))
    for run_id, planned in plan.requests.items():
        if planned.request.processes > 1:
            plan.on_demand.append(run_id)
        elif not harness.options.retrain and harness.store.problem(run_id) is None:
            plan.stored.append(run_id)
        else:
            plan.to_train.append(run_id)
    return plan


# -- estimates -------------------------------------------------------------------------------
def measured_step_times(store) -> dict:
    """Mean seconds per optimizer step of the stored runs, by (model id, method) and by model id."""
    sums: dict = {}
    if store.remote is not None or not store.root.is_dir():
        return {}  # a remote store's records cost a request each: the estimates start from this session's runs
    for entry in store.root.iterdir():
        try:
            record = json.loads((entry / "run.json").read_text())
            times = record["trace"]["step_time"]
            model_id, method = record["request"]["model"].get("id"), record["request"]["method"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if times:
            for key in ((model_id, method), model_id):
                total, count = sums.get(key, (0.0, 0))
                sums[key] = (total + math.fsum(times), count + len(times))
    return {key: total / count for key, (total, count) in sums.items()}


def estimate_seconds(plan: Plan, run_ids: list[str], step_times: dict, workers: int = 1) -> float | None:
    """Seconds to train `run_ids` on `workers` in parallel, from the store's measured step times
    (same model and method, else same model); None when a run has nothing to estimate from."""
    total = 0.0
    for run_id in run_ids:
        request = plan.requests[run_id].request
        model_id = request.model.get("id") if isinstance(request.model, dict) else None
        per_step = step_times.get((model_id, request.method), step_times.get(model_id))
        if per_step is None:
            return None
        total += per_step * plan.requests[run_id].steps
    return total / max(1, min(workers, len(run_ids)))


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def plan_only_line(harness) -> str:
    """What --plan prints about the runs: how many, how many stored, and the time to train the rest."""
    plan = make_plan(harness)
    step_times = measured_step_times(harness.store)
    rest = plan.to_train + plan.on_demand
    eta = estimate_seconds(plan, rest, step_times)
    basis = "from the step times the run store measured" if eta is not None else "no stored run of this model to time"
    return (f"in the run store: {len(plan.stored)}; to train: {len(rest)}"
            + (f", estimated {format_seconds(eta)} in one process ({basis})" if rest else ""))


# -- progress --------------------------------------------------------------------------------
class PlanProgress:
    """Runs done of total, the runs in training with their steps, and an ETA from the step times
    measured so far (before any, from the run store's). `draw(text, when)` shows the line (when: step, event or final)."""

    def __init__(self, plan: Plan, workers: int, draw: Callable[[str, str], None], step_times: dict | None = None,
                 clock: Callable[[], float] = time.monotonic, label: str = "plan"):
        self.plan, self.workers, self.draw, self.clock, self.label = plan, max(1, workers), draw, clock, label
        self.total = len(plan.to_train)
        self.done = 0
        self.current: dict[str, tuple[int, int]] = {}  # run id -> (step, total steps)
        self.step_seconds: list[float] = []
        self.prior = estimate_seconds(plan, plan.to_train, step_times or {}, workers)
        self.started = clock()
        self._drawn = -math.inf

    def remaining_steps(self) -> int:
        finished = set(self.plan.trained) | set(self.plan.failed) | set(self.plan.elsewhere)
        steps = 0
        for run_id in self.plan.to_train:
            if run_id in finished:
                continue
            step, total = self.current.get(run_id, (0, self.plan.requests[run_id].steps))
            steps += max(0, total - step)
        return steps

    def eta(self) -> float | None:
        if self.step_seconds:
            per_step = math.fsum(self.step_seconds) / len(self.step_seconds)
            return self.remaining_steps() * per_step / min(self.workers, max(1, self.total - self.done))
        return self.prior

    def line(self) -> str:
        running = ", ".join(f"{run_id} {step}/{total}" for run_id, (step, total) in self.current.items())
        failed = f", {len(self.plan.failed)} failed" if self.plan.failed else ""
        return (f"[stance-harness] {self.label}: {self.done}/{self.total} runs trained{failed}"
                + (f"; training {running}" if running else "") + f"; ETA {format_seconds(self.eta())}")

    def _show(self, force: bool = False) -> None:
        now = self.clock()
        if force or now - self._drawn >= REDRAW_SECONDS:
            self._drawn = now
            self.draw(self.line(), "event" if force else "step")

    def start(self, run_id: str) -> None:
        self.current[run_id] = (0, self.plan.requests[run_id].steps)
        self._show(force=True)

    def step(self, run_id: str, step: int, total: int, seconds: float) -> None:
        self.current[run_id] = (step, total)
        self.step_seconds.append(seconds)
        self._show()

    def finish(self, run_id: str, error: str | None = None) -> None:
        self.current.pop(run_id, None)
        self.done += 1
        if error is None:
            self.plan.trained.append(run_id)
        else:
            self.plan.failed[run_id] = error
        self._show(force=True)

    def close(self) -> None:
        self.plan.seconds = self.clock() - self.started
        self.draw(f"[stance-harness] {self.plan.summary()}", "final")


# -- where the workers run -------------------------------------------------------------------
def xdist_position(environ=os.environ) -> tuple[int, int]:
    """(this xdist worker's index, the number of workers); (0, 1) outside xdist."""
    worker = environ.get("PYTEST_XDIST_WORKER", "")
    count = environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and worker[2:].isdigit() and count.isdigit():
        return int(worker[2:]), max(1, int(count))
    return 0, 1


def visible_gpus(environ=os.environ, count: Callable[[], int] = count_gpus) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (an xdist worker has its one)."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
        return [] if not devices or devices[0] == "-1" else devices
    return [str(i) for i in range(count())]


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_slots(requested: int | None, device: str, runs: int, base_bytes: int, environ=os.environ,
                 gpus: list[str] | None = None, cores: int | None = None, available: int | None = None) -> list[str | None]:
    """One entry per worker: the CUDA_VISIBLE_DEVICES it gets, or None on the CPU. By default one
    worker per GPU when `device` is CUDA, else one per core (this xdist worker's share of them),
    as many as memory holds a training copy of the base for; never more than there are runs."""
    if runs < 1:
        return []
    if device.startswith("cuda"):
        gpus = visible_gpus(environ) if gpus is None else gpus
        if gpus:
            count = len(gpus) if requested is None else requested
            return [gpus[i % len(gpus)] for i in range(min(count, runs))]
    if requested is None:
        _, workers = xdist_position(environ)
        cores = cpu_cores() if cores is None else cores
        available = free_memory("cpu") if available is None else available
        fits = max(1, available // max(1, (TRAINING_FOOTPRINT + 1) * base_bytes))
        requested = max(1, min(cores // workers, fits))
    return [None] * min(requested, runs)


def spec_of(planned, options, store_root: Path | str) -> dict:
    """Everything a worker process needs to rebuild the request exactly, and where to store the run."""
    from stance_harness.runs.methods import METHODS  # why: torch; pytest's start-up imports this module (EXECUTORS)

    request = planned.request
    method = type(METHODS.get(request.method))
    return {"key": request.key, "run_id": request.run_id, "model": planned.model,
            "model_args": asdict(options.model_args), "identity": request.model, "stance": planned.stance,
            "stance_dirs": list(options.stance_dirs), "method": request.method, "config": request.config.as_dict(),
            "recipe": request.recipe.as_dict(), "examples": request.examples, "task": request.task,
            "instruments": asdict(request.instruments), "precision": request.precision,
            "chat_template": "none" if request.framing.get("kind") == "plain" else "auto",
            "module": method.__module__, "steps": planned.steps, "store": str(store_root),
            "analysis_timeout": options.analysis_timeout}


# -- the local executor ------------------------------------------------------------------------
class LocalExecutor:
    """Spawned worker processes on this machine (spawn, not fork: torch), each loading the base
    once and training the runs it is handed, one at a time."""

    name = "local"

    def __init__(self, slots: list[str | None], logs: Path, start_method: str = "spawn"):
        self.slots, self.logs = slots, Path(logs)
        self.context = multiprocessing.get_context(start_method)
        self.log_of: dict[int, Path] = {}  # slot -> its current worker's output

    def _start(self, slot_index: int):
        slot = self.slots[slot_index]
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"worker-{os.getpid()}-{slot_index}-{time.time_ns()}.log"
        self.log_of[slot_index] = log
        parent, child = self.context.Pipe()
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        if slot is not None:  # the child reads its environment as it starts
            os.environ["CUDA_VISIBLE_DEVICES"] = slot
        try:
            process = self.context.Process(target=worker_main, args=(child, slot is not None, str(log)), daemon=True,
                                           name="stance-harness-trainer")
            process.start()
        finally:
            if slot is not None:
                if saved is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = saved
        child.close()
        return process, parent

    def run(self, specs: list[dict], progress: PlanProgress, claim: Callable[[str], bool],
            release: Callable[[str], None]) -> None:
        """Train `specs`, each once `claim(run_id)` says this session may; progress reports each event."""
        pending = list(specs)
        idle = list(range(len(self.slots)))
        workers: dict[int, tuple] = {}  # slot -> (process, connection)
        busy: dict[int, dict] = {}  # slot -> the spec it trains
        try:
            while pending or busy:
                while idle and pending:
                    spec = pending.pop(0)
                    if not claim(spec["run_id"]):
                        continue
                    slot = idle.pop(0)
                    if slot not in workers:
                        workers[slot] = self._start(slot)
                    workers[slot][1].send(spec)
                    busy[slot] = spec
                    progress.start(spec["run_id"])
                if not busy:
                    break
                waiting = {workers[s][1]: s for s in busy} | {workers[s][0].sentinel: s for s in busy}
                for slot in {waiting[ready] for ready in wait(list(waiting))}:
                    process, connection = workers[slot]
                    for kind, run_id, *data in _messages(connection):
                        if kind == "step":
                            progress.step(run_id, *data)
                        else:  # done or failed
                            busy.pop(slot, None)
                            idle.append(slot)
                            release(run_id)
                            progress.finish(run_id, None if kind == "done" else data[0])
                    if slot in busy and not process.is_alive():  # it died mid-run: only its run is lost
                        process.join()
                        spec = busy.pop(slot)
                        workers.pop(slot)
                        connection.close()
                        idle.append(slot)
                        release(spec["run_id"])
                        progress.finish(spec["run_id"], f"the worker process training it died (exit code "
                                                        f"{process.exitcode}){last_lines(self.log_of[slot])}")
        finally:
            for _process, connection in workers.values():
                try:
                    connection.send(None)
                except (OSError, ValueError):
                    pass
            for slot, (process, connection) in workers.items():
                process.join(timeout=10)
                if process.is_alive():
                    process.kill()
                    process.join()
                connection.close()
                if process.exitcode == 0:  # a dead worker's output stays, named in its run's error
                    self.log_of[slot].unlink(missing_ok=True)


EXECUTORS.register("local", LocalExecutor)


def last_lines(log: Path, count: int = 5) -> str:
    """The end of a dead worker's output, for the error that names its run."""
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return f"; its last output ({log}):\n" + "\n".join(lines[-count:]) if lines else f"; no output ({log})"


def _messages(connection) -> list:
    """Every message waiting on `connection`; none once it is closed (its worker died)."""
    found = []
    try:
        while connection.poll():
            found.append(connection.recv())
    except (EOFError, OSError):
        pass
    return found


class _StepSender:
    """The worker's progress: every optimizer step goes to the session with its duration."""

    def __init__(self, connection, run_id: str):
        self.connection, self.run_id, self.last = connection, run_id, time.perf_counter()

    def __call__(self, _message: str) -> None:
        pass

    def step(self, _label: str, step: int, total: int, _loss: float) -> None:
        now = time.perf_counter()
        self.connection.send(("step", self.run_id, step, total, now - self.last))
        self.last = now


def worker_main(connection, on_gpu: bool, log: str) -> None:
    """A training worker: specs in, one at a time, until None; events out. Its output (library
    warnings, a crash's last words) goes to `log`, not over the session's terminal."""
    handle = open(log, "ab", buffering=0)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(handle.fileno(), 1)
    os.dup2(handle.fileno(), 2)
    # why: torch, after the redirect so its import-time warnings go to the log; and pytest's start-up
    # imports this module (EXECUTORS), which must stay free of torch
    import stance_harness.runs.workers as workers

    workers.set_up(on_gpu)
    models: dict = {}
    while True:
        spec = connection.recv()
        if spec is None:
            return
        try:
            seconds = workers.train_spec(spec, models, _StepSender(connection, spec["run_id"]))
            connection.send(("done", spec["run_id"], seconds))
        except Exception as exc:  # noqa: BLE001 - reported to the session, which names the run
            last = traceback.extract_tb(exc.__traceback__)[-1:] or [None]
            where = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last[0] is not None else ""
            connection.send(("failed", spec["run_id"], f"{type(exc).__name__}: {exc}{where}"))


# -- the whole step --------------------------------------------------------------------------
def train_ahead(harness, items: list, runtest: Callable, draw: Callable[[str, str], None],
                workers: int | None = None) -> Plan:
    """Plan `items`, then train what the run store lacks before the tests run (see the module's doc),
    with the session's executor (--executor)."""
    unplanned = plan_items(harness, items, runtest)
    plan = make_plan(harness)
    plan.unplanned = unplanned
    harness.ahead_plan = plan
    if not plan.to_train:
        if plan.requests:
            draw(f"[stance-harness] {plan.summary()}", "final")
        return plan
    remote = remote_executor(harness)
    if remote is not None:  # a cluster's: the session loads no base; it schedules
        progress = PlanProgress(plan, len(plan.to_train), draw, measured_step_times(harness.store))
        try:
            _train_in_workers(harness, plan, list(plan.to_train), progress, remote)
        finally:
            remote.close()  # a local Ray's workers and their bases go before the tests run
        progress.close()
        return plan
    loaded = harness.model(plan.requests[plan.to_train[0]].model)
    slots = worker_slots(workers, resolve_device(harness.options.model_args.device), len(plan.to_train),
                         loaded.base_bytes)
    index, count = xdist_position()
    order = plan.to_train[index * len(plan.to_train) // count:] + plan.to_train[:index * len(plan.to_train) // count]
    progress = PlanProgress(plan, len(slots), draw, measured_step_times(harness.store))
    if len(slots) <= 1 or loaded.sharded:
        _train_here(harness, plan, order, progress)
    else:
        executor = EXECUTORS.get(harness.options.executor)(slots, harness.store.local_dir / LOGS)
        _train_in_workers(harness, plan, order, progress, executor)
    progress.close()
    return plan


def _train_here(harness, plan: Plan, order: list[str], progress: PlanProgress) -> None:
    """One worker: the session's own process trains each run as a test would ask for it. Its
    errors are left for the test that asks (it trains again and fails as without planning)."""
    for run_id in order:
        planned = plan.requests[run_id]
        progress.start(run_id)
        try:
            run = harness.train_request(planned.request, planned.model, planned.stance)
        except Exception:  # noqa: BLE001 - the test that asks for the run meets it again
            progress.current.pop(run_id, None)
            progress.done += 1
            continue
        if run.origin == "loaded":  # another process (an xdist worker) stored it while this one waited
            plan.stored.append(run_id)
            progress.current.pop(run_id, None)
            progress.done += 1
            continue
        harness.trained_ahead.add(run_id)
        progress.finish(run_id)


def _train_in_workers(harness, plan: Plan, order: list[str], progress: PlanProgress, executor) -> None:
    locks: dict[str, ExitStack] = {}

    def claim(run_id: str) -> bool:
        stack = ExitStack()
        try:
            stack.enter_context(harness.store.lock(run_id, timeout=0))
        except HarnessError:  # another process trains it: its tests wait on the lock and load
            plan.elsewhere.append(run_id)
            progress.done += 1
            return False
        if not harness.options.retrain and harness.store.problem(run_id) is None:
            stack.close()  # stored meanwhile
            plan.stored.append(run_id)
            progress.done += 1
            return False
        locks[run_id] = stack
        return True

    def release(run_id: str) -> None:
        stack = locks.pop(run_id, None)
        if stack is not None:
            stack.close()

    specs = [spec_of(plan.requests[run_id], harness.options, harness.store.root) for run_id in order]
    try:
        executor.run(specs, progress, claim, release)
    finally:
        for run_id in list(locks):
            release(run_id)
        harness.trained_ahead.update(plan.trained)
        harness.ahead_failures.update(plan.failed)


def stderr_draw(text: str, when: str) -> None:
    """Where an xdist worker draws: its stderr, which the controller's terminal shows (a line
    per finished run, not per step)."""
    if when != "step":
        print(text, file=sys.__stderr__, flush=True)


# -- on demand: a request no plan knew, on the session's remote executor -----------------------
def remote_executor(harness):
    """The session's remote executor (--executor ray), built once and kept on the session; None
    when its executor trains on this machine (then the session's process trains on demand)."""
    entry = EXECUTORS.get(harness.options.executor)
    if not getattr(entry, "remote", False):
        return None
    if harness.remote is None:
        harness.remote = entry.for_session(harness)
    return harness.remote


def close_remote(harness) -> None:
    """At the session's end: disconnect its remote executor, if one connected."""
    if harness.remote is not None:
        harness.remote.close()


def train_on_demand(harness, executor, planned, loaded, stance):
    """A request no plan knew (a test computed it), trained as one task of the remote `executor`
    (with the resources, into the store, of a planned one) and loaded from the run store. The
    caller holds the run's store lock. A failed task raises, naming the run, the task's error and
    where it ran. `planned`: a PlannedRequest."""
    request = planned.request
    plan = Plan({request.run_id: planned}, to_train=[request.run_id])
    draw = _on_demand_draw(harness)
    progress = PlanProgress(plan, 1, draw, measured_step_times(harness.store), label="on demand")
    # the caller holds the lock, so the claim is granted and nothing is released
    executor.run([spec_of(planned, harness.options, harness.store.root)], progress, lambda _run_id: True,
                 lambda _run_id: None)
    if request.run_id in plan.failed:
        draw(f"[stance-harness] on demand: {request.run_id} failed", "final")
        raise HarnessError(f"run {request.run_id} ({request.method}) failed when trained on demand as a "
                           f"{executor.name} task: {plan.failed[request.run_id]}")
    run = harness.store.load(request, loaded, stance)
    if run is None:
        raise HarnessError(f"the {executor.name} task that trained {request.run_id} on demand finished but stored "
                           f"no run in {harness.store.root}")
    run.origin = "trained"  # by this session, in a task
    where = executor.trained_on.get(request.run_id, {})
    draw(f"[stance-harness] on demand: {request.run_id} trained as a {executor.name} task in "
         f"{format_seconds(progress.clock() - progress.started)}"
         + (f" (on {where['host']}, pid {where['pid']})" if where else ""), "final")
    return run


def _on_demand_draw(harness) -> Callable[[str, str], None]:
    """Where an on-demand request's progress goes: the session's plan line; an xdist worker's
    stderr (every worker's: the request is its own); a plain progress callable gets the last line."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return stderr_draw
    plan_line = getattr(harness.progress, "plan", None)
    if plan_line is not None:
        return plan_line

    def draw(text: str, when: str) -> None:
        if when == "final":
            harness.progress(text)

    return draw
