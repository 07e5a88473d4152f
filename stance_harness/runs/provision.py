"""The half of the session's provision that needs torch: training requests built and checked,
runs loaded from the run store or trained (here, or data-parallel by a launcher) and stored, and
saved adapters loaded as runs.

`session.HarnessSession` keeps the public methods and what it has handed out; it imports this
module once, where a run is first asked for, so building the session at pytest's start-up
imports no torch. Each function takes the session as `harness` and uses only its public side:
its options, models, stances, run store, memory budget and progress.
"""

from __future__ import annotations

from stance_harness.core.errors import HarnessError
from stance_harness.runs import distributed, training
from stance_harness.runs.adapter_spec import AdapterSpec
from stance_harness.runs.distributed import LAUNCHERS
from stance_harness.runs.methods import METHODS, Method
from stance_harness.runs.planning import PlannedRequest, remote_executor, train_on_demand
from stance_harness.runs.request import TrainingRequest
from stance_harness.runs.residency import TRAINING_FOOTPRINT
from stance_harness.runs.run import Run
from stance_harness.runs.runstore import RunStore
from stance_harness.runs.tasks import DEFAULT_TASK


def open_store(harness) -> RunStore:
    """The run store at --run-cache (a directory, or a URL of an object store)."""
    return RunStore(harness.options.run_cache)


def build_request(harness, method: str, *, stance: str, model: str | None, examples: int | None, recipe,
                  instruments, task: str | None, repeat: int, chat_template: str | None, processes: int,
                  options: dict) -> TrainingRequest:
    """The validated request (HarnessSession.request documents the arguments)."""
    return TrainingRequest.build(harness.model(model), harness.stance(stance), method, examples=examples,
                                 recipe=recipe, instruments=instruments,
                                 task=DEFAULT_TASK if task is None else task, seed_offset=repeat,
                                 options=options, chat_template=chat_template or harness.options.chat_template,
                                 processes=processes)


def process_count(harness, launcher: str | None, num_processes: int | None) -> int:
    """How many data-parallel processes train a run (HarnessSession.processes)."""
    launcher = launcher if launcher is not None else harness.options.launcher
    if launcher is None:
        if num_processes not in (None, 1):
            raise HarnessError(f"num_processes={num_processes} needs launcher='accelerate'")
        return 1
    if launcher not in LAUNCHERS:
        raise HarnessError(f"launcher={launcher!r} is not one of {', '.join(LAUNCHERS)}")
    return num_processes if num_processes is not None else harness.options.num_processes


def plan_request(harness, request: TrainingRequest, model: str | None, stance: str):
    """The training loop's plan of `request` (its context: steps, data), made without building a model."""
    return training.plan(request, harness.model(model), harness.stance(stance))[0]


def obtain_run(harness, request: TrainingRequest, model: str | None, stance: str) -> Run:
    """The stored run for `request`, else trained here (or by the launcher, or as one task of a
    remote executor) and stored."""
    method = request.method
    loaded, stance_obj = harness.model(model), harness.stance(stance)
    # one process trains a request; others asking for it meanwhile wait here, then load it
    with harness.store.lock(request.run_id):
        retrain = harness.options.retrain and request.run_id not in harness.trained_ahead
        run = None if retrain else harness.store.load(request, loaded, stance_obj)
        if run is None:
            # a method on the shared base reads it at once, so the budget keeps it; QLoRA loads its own model
            reads_base = type(METHODS.get(method)).load is Method.load
            harness.resident.make_room(TRAINING_FOOTPRINT * loaded.base_bytes, keep=loaded if reads_base else None)
            harness.progress(f"training {method} on {loaded.name} ({stance}, {request.examples} examples, "
                             f"task {request.task}) -> {request.run_id}")
            if request.processes > 1:
                spec = distributed.launch_spec(request, model or harness.options.model, harness.options.model_args,
                                               stance, harness.options.stance_dirs, harness.store)
                distributed.launch(spec, harness.progress)
                run = harness.store.load(request, loaded, stance_obj)
                if run is None:
                    raise HarnessError(f"the data-parallel launch of {request.run_id} finished but stored "
                                       f"no run in {harness.store.root}")
            elif (executor := remote_executor(harness)) is not None:  # one task of it, then loaded
                steps = training.plan(request, loaded, stance_obj)[0].total_steps
                run = train_on_demand(harness, executor, PlannedRequest(request, model or harness.options.model,
                                                                        stance, steps), loaded, stance_obj)
            else:
                run = training.train_run(request, loaded, stance_obj, harness.progress)
                harness.store.save(run)
        elif request.run_id in harness.trained_ahead:
            run.origin = "trained"  # by this session, ahead of its tests, in a worker process
            harness.progress(f"loaded {request.run_id}, trained ahead, from the run store ({harness.store.root})")
        else:
            harness.progress(f"loaded {request.run_id} from the run store ({harness.store.root})")
    return run


def adapter_run(harness, spec: AdapterSpec) -> Run:
    """A saved adapter or fine-tuned checkpoint on the --model base, as a Run named by the spec."""
    # why: adapters imports peft, which imports bitsandbytes (seconds, and output on stderr); only --adapter needs it
    from stance_harness.runs.adapters import load_adapter_run

    return load_adapter_run(harness.model(), spec, harness.stance, harness.options.chat_template,
                            harness.options.stance)
