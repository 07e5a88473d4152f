"""The dtype a base model loads in: what `--model-args dtype=` says, else the device's default.

Torch-free (pytest's start-up reads `loading`, which uses it): dtypes are named by their torch
attribute names, as config.json and `--model-args` spell them.
"""

from __future__ import annotations

import json
from pathlib import Path

from stance_harness.core.errors import HarnessError

LOADABLE = ("float32", "bfloat16", "float16")  # what a base may load in
DTYPES = (*LOADABLE, "auto")  # what --model-args dtype= takes; auto: the checkpoint's own
MASTER = "float32"  # every tensor a run trains, and its optimizer state (master weights)


def checkpoint_dtype(path: Path) -> str | None:
    """The dtype a saved model's config.json records (`dtype`, or the older `torch_dtype`), or None
    when it records none or has no readable config.json."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(config, dict):
        return None
    recorded = config.get("dtype") or config.get("torch_dtype")
    return str(recorded).removeprefix("torch.") if recorded else None


def resolve_dtype(given: str | None, device: str, checkpoint: str | None, what: str = "the checkpoint") -> str:
    """The dtype the base loads in on `device` (a resolved one: cpu, cuda:N).

    `given` (float32, bfloat16, float16) always wins; auto is the checkpoint's own on any device;
    None (nothing given) is the checkpoint's own on CUDA, as the GPU wants it, and float32 on the
    CPU. A checkpoint that records no dtype is float32 (as transformers reads it). `checkpoint` is
    what its config.json records (`checkpoint_dtype`); `what` names it in errors."""
    if given is not None and given not in DTYPES:
        raise HarnessError(f"--model-args dtype={given!r} is not allowed; use one of {', '.join(DTYPES)}")
    cuda = device.startswith("cuda")
    if given in LOADABLE:
        resolved = given
    elif given is None and not cuda:
        return "float32"  # the CPU default, whatever the checkpoint records
    else:
        resolved = checkpoint or "float32"
        if resolved not in LOADABLE:
            raise HarnessError(
                f"{what} records dtype {resolved!r}, which the harness does not load "
                f"({'--model-args dtype=auto' if given else f'the default on {device}'} takes the checkpoint's own); "
                f"pass --model-args dtype= one of {', '.join(LOADABLE)}")
    if resolved == "float16" and not cuda:
        source = "" if given == "float16" else f" ({what}'s own, from dtype={given or 'the default'})"
        raise HarnessError(f"--model-args dtype=float16{source} on the CPU: float16 does not train on the CPU (its "
                           f"first step overflows to non-finite values); use dtype=float32 or bfloat16 there")
    return resolved
