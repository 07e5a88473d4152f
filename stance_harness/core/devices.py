"""Where a run executes: what `device=auto` resolves to, the precision a recipe's bf16 / fp16
resolve to on that device, and which GPU each pytest-xdist worker sees.

torch is imported only inside functions because pytest's start-up imports this module (the
plugin calls `assign_worker_gpu` in each xdist worker; the session and the model registry
resolve devices) and must stay free of torch to stay fast. Importing torch would not initialise
CUDA by itself (that happens at its first CUDA call), so it is start-up time, not correctness,
that keeps it out; `assign_worker_gpu` refuses where CUDA is already initialised.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Callable, Mapping

from stance_harness.core.errors import HarnessError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"
PRECISIONS = ("fp32", "bf16", "fp16")  # what a run trains in: autocast off, or to bfloat16 / float16


def _torch():
    """torch, imported at first use (see the module's docstring)."""
    import torch  # why: see the module's docstring

    return torch


def check_device_name(name: str) -> None:
    """`name` is one of auto, cpu, cuda, cuda:N (N a non-negative integer)."""
    index = name.split(":", 1)[1] if name.startswith("cuda:") else "0"
    if not (name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and index.isdigit())):
        raise HarnessError(f"--model-args device={name!r} is not allowed; use {DEVICE_CHOICES}")


def resolve_device(name: str) -> str:
    """The concrete device: auto is the first CUDA device where there is one, else the CPU;
    cuda means cuda:0."""
    if name == "auto":
        torch = _torch()
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return "cuda:0" if name == "cuda" else name


def device_description(device: str) -> str:
    """What the device is, for provenance: the GPU's name, or the CPU."""
    if device.startswith("cuda"):
        torch = _torch()
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def resolve_precision(bf16, fp16: bool, device: str) -> str:
    """fp32, bf16 or fp16 for a recipe's `bf16` (True, False or "auto") and `fp16` on `device`,
    with Hugging Face TrainingArguments' meaning: autocast to that dtype, fp32 master weights
    (whatever the base's dtype). bf16="auto" is on where the device supports bfloat16 and off on the CPU."""
    torch = _torch()
    cuda = device.startswith("cuda")
    if fp16 and bf16 is True:
        raise HarnessError("recipe: bf16=True and fp16=True are both set; choose one")
    if fp16:
        if not cuda:
            raise HarnessError(f"recipe: fp16=True on the CPU (device {device}): float16 autocast with a grad scaler "
                               f"is for CUDA; on the CPU use bf16=True, or neither")
        # a float16 base is fine: what trains is float32 (runs/master_weights.py), so the scaler unscales float32
        return "fp16"
    if bf16 == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if bf16:
        if cuda and not torch.cuda.is_bf16_supported():
            raise HarnessError(f"recipe: bf16=True, but {device} does not support bfloat16; use fp16=True there")
        if not cuda and not torch.amp.is_autocast_available("cpu"):
            raise HarnessError(f"recipe: bf16=True on the CPU, but torch {torch.__version__} has no CPU autocast")
        return "bf16"
    return "fp32"


def autocast_dtype(precision: str):
    """The torch dtype autocast runs in for `precision`; None for fp32 (autocast off)."""
    torch = _torch()
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# -- one GPU per xdist worker --------------------------------------------------------------
def count_gpus() -> int:
    """GPUs on the machine, counted by `nvidia-smi -L` so that the parent never initialises CUDA
    (a CUDA context made before the workers fork would pin every worker to the same state)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0


def worker_visible_devices(worker: str | None, visible: str | None, count: Callable[[], int]) -> str | None:
    """The CUDA_VISIBLE_DEVICES an xdist worker should have, or None to leave it as it is.

    Worker gwK gets the K-th device, round-robin, of the user's CUDA_VISIBLE_DEVICES where it is
    set (its entries, indices or UUIDs, are kept as written), else of the `count()` GPUs there are.
    Not a worker, or no device to pick from: None."""
    if not worker or not worker.startswith("gw") or not worker[2:].isdigit():
        return None
    if visible is not None:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
        if not devices or devices[0] == "-1":  # the user hid every GPU
            return None
    else:
        devices = [str(i) for i in range(count())]
    if not devices:
        return None
    return devices[int(worker[2:]) % len(devices)]


def assign_worker_gpu(environ: "os._Environ | dict" = os.environ, count: Callable[[], int] = count_gpus,
                      modules: Mapping = sys.modules) -> str | None:
    """Set CUDA_VISIBLE_DEVICES in an xdist worker to its own GPU; returns what was set, or None.

    Calling it again in the same worker keeps the same device (its list then has one entry).
    Refuses when CUDA is already initialised in this process: the setting would not take."""
    chosen = worker_visible_devices(environ.get("PYTEST_XDIST_WORKER"), environ.get("CUDA_VISIBLE_DEVICES"), count)
    if chosen is None or chosen == environ.get("CUDA_VISIBLE_DEVICES"):
        return chosen
    torch = modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise HarnessError(f"xdist worker {environ.get('PYTEST_XDIST_WORKER')}: CUDA was initialised before the "
                           f"harness could give this worker its GPU ({chosen}); a conftest or plugin touched CUDA "
                           f"at import time")
    environ["CUDA_VISIBLE_DEVICES"] = chosen
    return chosen
