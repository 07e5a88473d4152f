"""The "ray" executor (`--executor ray`): each planned run is a Ray task.

A task runs the local workers' own function (`workers.train_spec`: the request rebuilt and its
key checked, the one training loop, the run saved into the run store by its path or URL), with
one CPU, and one GPU where the session's model is on CUDA. The session connects to
`--ray-address`, else $RAY_ADDRESS, else starts a local Ray with this machine's cores; it
disconnects (a local Ray stops) after the planned runs, and after the tests when a request
computed in a test body was sent on demand (planning.train_on_demand). Only this module imports
Ray, and only when it trains (the plugin imports the module to register the name; Ray is the
optional extra `ray`).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import traceback
from pathlib import Path

from stance_harness.core.devices import resolve_device
from stance_harness.core.errors import HarnessError
from stance_harness.runs.planning import EXECUTORS, REDRAW_SECONDS, cpu_cores

_MODELS: dict = {}  # a Ray worker process keeps the bases it loaded for the next task it is given


class _Quiet:
    """A task's progress: none goes back to the session (it sees each run start and finish)."""

    def __call__(self, _message: str) -> None:
        pass

    def step(self, *_args) -> None:
        pass


def _ray():
    """Ray, imported once it trains: it is the optional extra `ray`, and the plugin imports this
    module at start-up to register the executor's name."""
    import ray  # why: see the docstring

    return ray


def train_task(spec: dict, on_gpu: bool) -> dict:
    """In a Ray worker: train one spec into the run store; say where, and what failed if it did."""
    import stance_harness.runs.workers as workers  # why: torch, in the Ray task only (see _ray)

    where = {"node": _ray().get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid()}
    workers.set_up(on_gpu)  # as a local worker
    try:
        return {**where, "seconds": workers.train_spec(spec, _MODELS, _Quiet())}
    except Exception as exc:  # noqa: BLE001 - reported to the session, which names the run
        last = traceback.extract_tb(exc.__traceback__)[-1:] or [None]
        at = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last[0] is not None else ""
        return {**where, "error": f"{type(exc).__name__}: {exc}{at}"}


class RayExecutor:
    """Planned runs as Ray tasks on a cluster (or a local Ray started for the session)."""

    name = "ray"
    remote = True  # planning.train_ahead sends every planned run here, whatever this machine's cores

    def __init__(self, address: str | None, on_gpu: bool):
        self.address, self.on_gpu = address, on_gpu
        self.trained_on: dict[str, dict] = {}  # run id -> node, host and pid of the task that trained it
        self.connected = False  # this executor called ray.init, so close() calls ray.shutdown

    @staticmethod
    def check() -> None:
        """Before collection: Ray must be installed."""
        if importlib.util.find_spec("ray") is None:
            raise HarnessError("--executor ray needs Ray, which is not installed: pip install 'stance-harness[ray]' "
                               "(or pip install ray)")

    @classmethod
    def for_session(cls, harness) -> "RayExecutor":
        cls.check()
        return cls(harness.options.ray_address or os.environ.get("RAY_ADDRESS") or None,
                   resolve_device(harness.options.model_args.device).startswith("cuda"))

    def _connect(self) -> None:
        """Connect (or start a local Ray), unless connected; a caller's own ray.init is used as it is."""
        ray = _ray()
        if ray.is_initialized():
            return
        if self.address:
            ray.init(address=self.address, log_to_driver=False)
        else:
            ray.init(num_cpus=cpu_cores(), include_dashboard=False, log_to_driver=False)
        self.connected = True

    def close(self) -> None:
        """Disconnect (a local Ray started for the session stops); a later run connects again."""
        if self.connected:
            self.connected = False
            _ray().shutdown()

    def run(self, specs: list[dict], progress, claim, release) -> None:
        """Train `specs` as tasks, each once `claim(run_id)` says this session may; stays connected (see close)."""
        ray = _ray()
        self._connect()
        try:
            task = ray.remote(train_task).options(num_cpus=1, num_gpus=1 if self.on_gpu else 0, max_retries=0)
            waiting: dict = {}  # object ref -> run id
            for spec in specs:
                if claim(spec["run_id"]):
                    waiting[task.remote(spec, self.on_gpu)] = spec["run_id"]
                    progress.start(spec["run_id"])
            while waiting:
                ready, _ = ray.wait(list(waiting), num_returns=1, timeout=REDRAW_SECONDS)
                for ref in ready:
                    run_id = waiting.pop(ref)
                    release(run_id)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - the task's process died: only its run is lost
                        progress.finish(run_id, f"its Ray task failed: {type(exc).__name__}: {exc} (its node is not "
                                                f"known: the task returned nothing; its output is in that node's "
                                                f"Ray logs)")
                        continue
                    self.trained_on[run_id] = {k: result[k] for k in ("node", "host", "pid")}
                    where = f"Ray node {result['node']} ({result['host']}, pid {result['pid']})"
                    error = result.get("error")
                    progress.finish(run_id, None if error is None else f"{error}, on {where}")
        finally:
            progress.plan.trained_on.update(self.trained_on)


EXECUTORS.register("ray", RayExecutor)
