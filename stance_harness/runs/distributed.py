"""Data-parallel training of one run by an existing engine: accelerate (DDP) over N processes.

`launch` (in the test process) writes the request as a launch spec beside the run store and
starts `python -m torch.distributed.run --nproc_per_node N -m stance_harness.runs.distributed SPEC`; each
worker (`main`) rebuilds the same request, checks its key, and trains through the one loop
with an accelerate Accelerator (gloo on the CPU, NCCL on GPUs). Rank 0 writes the finished run
and its trace into the run store; the test process loads it from there. Anything that fills
the store this way can train (`accelerate launch ... -m stance_harness.runs.distributed SPEC` on a
configured multi-GPU node, or past one node); pytest only loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from stance_harness.core.errors import HarnessError
from stance_harness.core.files import atomic_write
from stance_harness.models import ModelArgs, load_model
from stance_harness.runs.request import TrainingRequest
from stance_harness.runs.runstore import RunStore
from stance_harness.runs.training import train_run
from stance_harness.stances import load_stance

LAUNCHERS = ("accelerate",)
SPECS = ".launch"  # the run store's folder of launch specs


def launch_spec(request: TrainingRequest, model: str, model_args: ModelArgs, stance: str, stance_dirs: list,
                store: RunStore) -> dict:
    """Everything a worker needs to rebuild `request` exactly, and where to store the run."""
    return {"key": request.key, "run_id": request.run_id, "model": model, "model_args": asdict(model_args),
            "identity": request.model, "stance": stance, "stance_dirs": list(stance_dirs), "method": request.method,
            "config": request.config.as_dict(), "recipe": request.recipe.as_dict(), "examples": request.examples,
            "task": request.task, "instruments": asdict(request.instruments), "precision": request.precision,
            "processes": request.processes, "store": str(store.root)}


def launch_command(spec_path: Path, processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "stance_harness.runs.distributed", str(spec_path)]


def launch(spec: dict, progress=None) -> None:
    """Train the spec's run in `spec["processes"]` processes; returns when rank 0 has stored it."""
    spec_path = RunStore(spec["store"]).local_dir / SPECS / f"{spec['run_id']}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(spec_path, json.dumps(spec, indent=1))
    command = launch_command(spec_path, spec["processes"])
    if progress:
        progress(f"launching {spec['run_id']} on {spec['processes']} processes: {' '.join(command)}")
    here = str(Path(__file__).resolve().parents[2])  # the workers import this harness
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        # a worker's own error ("[rank1]: stance_harness.core.errors.HarnessError: ..."), else the launcher's last lines
        errors = [line for line in lines if line.startswith("[rank") and "Error: " in line]
        tail = errors[0] if errors else "\n".join(lines[-15:])
        raise HarnessError(f"the data-parallel launch of {spec['run_id']} failed (exit {done.returncode}); "
                           f"its last lines:\n{tail}")


def main(argv: list[str] | None = None) -> None:
    """One worker of a data-parallel launch."""
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    # why: only a worker needs accelerate, whose import pulls its CLI config and botocore into every session
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # a schedule (gradual, hybrid) freezes tensors mid-run: DDP must not wait for their gradients
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if accelerator.num_processes != spec["processes"]:
        raise HarnessError(f"worker: launched as {accelerator.num_processes} processes, the spec asks for "
                           f"{spec['processes']}")
    device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)  # accelerate says cpu:0
    loaded = load_model(spec["model"], replace(ModelArgs(**spec["model_args"]), device=device))
    stance = load_stance(spec["stance"], spec["stance_dirs"])
    request = TrainingRequest.from_spec(spec, loaded, stance, "launcher")
    run = train_run(request, loaded, stance, accelerator=accelerator)
    if accelerator.is_main_process:
        RunStore(spec["store"]).save(run)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
