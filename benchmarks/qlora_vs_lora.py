"""QLoRA against LoRA on a model with a real model's shapes (shape_model.py: Qwen2-0.5B's by default,
or Llama-3.2-3B's): step time and peak memory.

Both train r=16 adapters on q, k, v and o with the same recipe and examples, each in a fresh
process (so one run's allocations do not inflate the other's peak), on `--device` (default
auto: a GPU where there is one). Per method it prints one JSON line:
  the shape and its layers, steps, mean step time (the first step, which pays for kernel set-up, apart),
  peak memory while training (CUDA max allocated on a GPU, peak RSS on the CPU),
  the base's bytes as the session holds it, and the bytes of the model the run trains.
The session holds the base in float32 for every method; QLoRA trains on its own 4-bit copy.

    python benchmarks/qlora_vs_lora.py [--shape qwen2-0.5b|llama-3.2-3b] [--layers N] [--model-dir DIR]
        [--examples N] [--device auto]

--layers defaults to the shape's full depth, --model-dir to shape_model's $TMPDIR/<shape>-shape-<layers>
(built there on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shape_model import DEFAULT_SHAPE, SHAPES, build, default_dir, full_depth  # noqa: E402

RECIPE = {"learning_rate": 1e-4, "num_train_epochs": 1, "per_device_train_batch_size": 4, "seed": 0}
OPTIONS = {"r": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
METHODS = ("lora", "qlora")


def measure(model_dir: str, method: str, examples: int, device: str, shape: str, layers: int) -> dict:
    """Train `method` once in this process on the build of `shape` at `layers` in `model_dir` and
    return its figures."""
    import torch

    from stance_harness.models import ModelArgs
    from stance_harness.session import HarnessOptions, HarnessSession

    with tempfile.TemporaryDirectory() as store:
        session = HarnessSession(HarnessOptions(model_dir, ModelArgs(device=device), [], None, Path("."), [],
                                                run_cache=Path(store)))
        loaded = session.model()
        started = time.perf_counter()
        run = session.train(method, examples=examples, recipe=RECIPE, **OPTIONS)
        seconds = time.perf_counter() - started
        steps = run.trace.step_time
        model_bytes = sum(p.numel() * p.element_size() for p in run.model.parameters())
        return {
            "shape": shape, "layers": layers, "method": method, "device": loaded.args.device, "device_name": loaded.provenance()["device_name"],
            "precision": run.request.precision, "examples": examples, "steps": len(steps),
            "first_step_s": steps[0], "mean_step_s": sum(steps[1:]) / len(steps[1:]) if len(steps) > 1 else steps[0],
            "train_s": seconds, "peak_bytes": run.trace.peak_memory["bytes"], "peak_kind": run.trace.peak_memory["kind"],
            "base_bytes": loaded.base_bytes, "trained_model_bytes": model_bytes,
            "trainable": run.counts["trainable"], "torch": torch.__version__,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=DEFAULT_SHAPE)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's full depth)")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: $TMPDIR/<shape>-shape-<layers>")
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    layers = full_depth(args.shape) if args.layers is None else args.layers
    model_dir = args.model_dir or default_dir(args.shape, layers)
    if args.one:
        print(json.dumps(measure(str(model_dir), args.one, args.examples, args.device, args.shape, layers)))
        return
    model_dir = build(model_dir, layers, args.shape)
    for method in METHODS:
        done = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--layers", str(layers),
                               "--model-dir", str(model_dir), "--examples", str(args.examples),
                               "--device", args.device, "--one", method],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(json.dumps({"shape": args.shape, "layers": layers, "method": method,
                              "error": done.stderr.strip().splitlines()[-1:]}), flush=True)
            continue
        print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
