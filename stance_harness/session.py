"""The session's provision: the models and stances the tests use, the training requests they make,
and the runs (trained here or by a launcher, loaded from the run store, or a saved adapter), each
wired to the session's time limit, run store and memory budget.

`HarnessSession` is this and `outcome.SessionOutcome` (the records, and at the end the reports,
the gate and the terminal table). The pytest plugin only wires hooks and fixtures to it, as
pytest-benchmark's plugin does to its BenchmarkSession. Nothing here imports pytest, nor torch
at import: the plugin builds the session at start-up. What needs torch (requests, training, the
run store, adapters) is runs/provision.py, imported once, where a run is first asked for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from stance_harness.core.devices import resolve_device
from stance_harness.core.errors import HarnessError
from stance_harness.models import LoadedModel, load_model, resolve_model
# re-exported: code builds HarnessSession(HarnessOptions(...)) from here
from stance_harness.options import HarnessOptions  # noqa: F401
from stance_harness.outcome import SessionOutcome
from stance_harness.runs.adapter_spec import parse_adapter_spec
from stance_harness.runs.planning import PlannedRequest, plan_only_line
from stance_harness.runs.residency import DEFAULT_SHARE, ResidentModels, free_memory
from stance_harness.runs.services import RunServices
from stance_harness.stances import Stance, load_stance

if TYPE_CHECKING:
    from stance_harness.runs.request import TrainingRequest
    from stance_harness.runs.runstore import RunStore


def _provision():
    """runs/provision.py: the torch half of the provision, imported where a run is first asked for."""
    # why: it imports torch, and the plugin builds this session at pytest's start-up, before any run is asked for
    from stance_harness.runs import provision

    return provision


@dataclass
class HarnessSession(SessionOutcome):
    """A pytest session's harness: what it provides to the tests (here) and what it makes of
    their records (SessionOutcome)."""

    _models: dict[str, LoadedModel] = field(default_factory=dict)
    _runs: dict = field(default_factory=dict)
    _stances: dict[str, Stance] = field(default_factory=dict)
    planned: list[str] = field(default_factory=list)  # run ids --plan checked
    plan_requests: dict = field(default_factory=dict)  # run id -> PlannedRequest, as check_request built it
    planning: bool = False  # the tests run once before the session to gather their requests (planning.py)
    ahead_plan: object = None  # planning.Plan: what was trained ahead, what was stored, what failed
    trained_ahead: set = field(default_factory=set)  # run ids trained ahead this session (loaded even under --retrain)
    ahead_failures: dict = field(default_factory=dict)  # run id -> why training it ahead in a worker failed
    remote: object = None  # the remote executor (--executor ray), once one is asked for: planning.remote_executor

    @cached_property
    def store(self) -> RunStore:
        return _provision().open_store(self)

    @cached_property
    def resident(self) -> ResidentModels:
        """The memory budget for adapted models; "auto" asks torch whether there is a GPU, so on first use."""
        budget = self.options.run_memory
        if budget is None:
            budget = int(DEFAULT_SHARE * free_memory(resolve_device(self.options.model_args.device)))
        return ResidentModels(budget)

    # -- models and stances ---------------------------------------------------------------
    def model(self, name: str | None = None) -> LoadedModel:
        name = name or self.options.model
        if name not in self._models:
            started = time.perf_counter()
            self._models[name] = load_model(name, self.options.model_args, self.progress)
            self.progress(f"loaded model {name} in {time.perf_counter() - started:.1f}s")
        return self._models[name]

    def use_model(self, loaded: LoadedModel) -> None:
        """Use an already loaded model under its name (tests share one across sessions)."""
        self._models[loaded.name] = loaded

    def stance(self, name: str) -> Stance:
        if name not in self._stances:
            self._stances[name] = load_stance(name, self.options.stance_dirs)
        return self._stances[name]

    def model_is_embedded(self) -> bool:
        return resolve_model(self.options.model, self.options.model_args.gguf_file).source == "embedded"

    # -- runs ---------------------------------------------------------------------------------
    def request(self, method: str = "full", *, stance: str = "curious-uncertainty", model: str | None = None,
                examples: int | None = None, recipe=None, instruments=None, task: str | None = None,
                repeat: int = 0, chat_template: str | None = None, processes: int = 1,
                **options) -> TrainingRequest:
        """The validated request for these arguments; `task` None is tasks.DEFAULT_TASK;
        `repeat` (from --repeat) offsets the seed; `chat_template` (auto or none) overrides
        --chat-template for this run."""
        return _provision().build_request(self, method, stance=stance, model=model, examples=examples, recipe=recipe,
                                          instruments=instruments, task=task, repeat=repeat,
                                          chat_template=chat_template, processes=processes, options=options)

    def processes(self, launcher: str | None, num_processes: int | None) -> int:
        """How many data-parallel processes train a run: a call's launcher= / num_processes=, else
        --launcher / --num-processes; without a launcher, 1."""
        return _provision().process_count(self, launcher, num_processes)

    def planned_steps(self, method: str = "full", *, stance: str = "curious-uncertainty", model: str | None = None,
                      launcher: str | None = None, num_processes: int | None = None, **arguments) -> int:
        """How many optimizer steps this run will take (before training it): what a suite scales
        its schedules by, so a warm-up of 200 of a seed's 1,955 steps keeps its share of any run."""
        return self._planned(method, stance, model, launcher, num_processes, arguments)[1].total_steps

    def check_request(self, method: str = "full", *, stance: str = "curious-uncertainty", model: str | None = None,
                      launcher: str | None = None, num_processes: int | None = None, **arguments) -> TrainingRequest:
        """Build and check a request as training would (task, method, layers, schedule lengths),
        without building a model: what --plan does instead of training."""
        request, ctx = self._planned(method, stance, model, launcher, num_processes, arguments)
        if request.run_id not in self.planned:
            self.planned.append(request.run_id)  # what --plan would train: one request per seed
            self.plan_requests[request.run_id] = PlannedRequest(request, model or self.options.model, stance,
                                                                ctx.total_steps)
        return request

    def _planned(self, method, stance, model, launcher, num_processes, arguments):
        """The request for these arguments and the training loop's plan of it (its context)."""
        request = self.request(method, stance=stance, model=model, processes=self.processes(launcher, num_processes),
                               **arguments)
        return request, _provision().plan_request(self, request, model, stance)

    def train(self, method: str = "full", *, stance: str = "curious-uncertainty", model: str | None = None,
              launcher: str | None = None, num_processes: int | None = None, **arguments):
        """Train once per identical request; later identical requests get the same Run. With a
        launcher and several processes the run trains data-parallel in worker processes, which
        store it; it is loaded from the store."""
        processes = self.processes(launcher, num_processes)
        request = self.request(method, stance=stance, model=model, processes=processes, **arguments)
        return self.train_request(request, model, stance)

    def train_request(self, request: TrainingRequest, model: str | None, stance: str):
        """`train`'s work for a built request: the run already handed out, else the stored one,
        else trained here (or by the launcher, or as a task of a remote executor) and stored. A run
        that failed when trained ahead in a worker process fails here, naming it and the worker's error."""
        if request.run_id not in self._runs:
            if request.run_id in self.ahead_failures:
                raise HarnessError(f"run {request.run_id} ({request.method}) failed when trained ahead in a worker "
                                   f"process: {self.ahead_failures[request.run_id]}")
            self._runs[request.run_id] = self._attach(_provision().obtain_run(self, request, model, stance))
        return self._runs[request.run_id]

    def _attach(self, run):
        """Hand a run this session's services: its time limit, its store entry, the memory budget, progress."""
        run.attach(RunServices(store=self.store, residency=self.resident, progress=self.progress,
                               analysis_timeout=self.options.analysis_timeout, sinks=run.sinks))
        self.resident.track(run)  # its model, or its "before" side, may hold the base the budget releases
        if run.model_resident:
            self.resident.touch(run)
        return run

    def adapter_run(self, path: str):
        """A saved adapter or fine-tuned checkpoint (`[NAME=]PATH`) on the --model base, as a Run
        named NAME (loaded once per argument)."""
        spec = parse_adapter_spec(path)
        key = ("adapter", spec.name, str(spec.path.resolve()))
        if key not in self._runs:
            self.progress(f"loading {spec.name} ({spec.path}) onto {self.options.model}")
            self._runs[key] = self._attach(_provision().adapter_run(self, spec))
        return self._runs[key]

    def adopt(self, run) -> None:
        """A run made outside this session (run_from_model, StanceCallback): reported with its base and stance."""
        self._models.setdefault(run.loaded.name, run.loaded)
        self._stances.setdefault(run.stance.name, run.stance)
        self._runs[run.run_id] = self._attach(run)

    def runs(self) -> list:
        return list(self._runs.values())

    def inputs_provenance(self) -> tuple[list[dict], list[dict]]:
        return [m.provenance() for m in self._models.values()], [s.provenance() for s in self._stances.values()]

    def plan_summary(self) -> str | None:
        if not self.options.plan_only:
            return None
        return (f"--plan: {len(self.planned)} distinct training requests checked (each seed of a RunSet is one); "
                + plan_only_line(self))
