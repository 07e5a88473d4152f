"""What a training worker does with a planned run's spec: a spawned process of the local executor
(`planning.worker_main`) or a Ray task (`executors_ray.train_task`). It imports the training side
(torch), so the planning modules, which pytest's start-up reads, reach it only inside a worker."""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, replace

import torch

from stance_harness.core.devices import resolve_device
from stance_harness.models import ModelArgs, load_model
from stance_harness.runs.methods import METHODS
from stance_harness.runs.request import TrainingRequest
from stance_harness.runs.runstore import RunStore
from stance_harness.runs.services import RunServices
from stance_harness.runs.training import train_run
from stance_harness.stances import load_stance


def set_up(on_gpu: bool) -> None:
    """A worker off the GPU computes on one core: the workers together use the machine, and each
    does the same arithmetic as any other."""
    if not on_gpu:
        torch.set_num_threads(1)


def train_spec(spec: dict, models: dict, progress) -> float:
    """Train one spec in this process and store the run; returns its training seconds."""
    if spec["method"] not in METHODS:  # a method registered by a test module or conftest
        importlib.import_module(spec["module"])
    args = ModelArgs(**spec["model_args"])
    if resolve_device(args.device).startswith("cuda"):
        args = replace(args, device="cuda:0")  # this worker sees only its own GPU
    key = (spec["model"], json.dumps(asdict(args), sort_keys=True))
    if key not in models:
        models[key] = load_model(spec["model"], args)
    loaded, stance = models[key], load_stance(spec["stance"], spec["stance_dirs"])
    run = train_run(TrainingRequest.from_spec(spec, loaded, stance, "session"), loaded, stance, progress)
    # while its model is here, under the session's --analysis-timeout: the report then reads them from the store
    run.attach(RunServices(analysis_timeout=spec.get("analysis_timeout"))).measure_reported()
    RunStore(spec["store"]).save(run)  # a path or a URL
    return run.train_seconds
