"""RSS around each backward pass and optimizer step of one run on the Qwen2-0.5B shape model: where
a run's peak memory is, and what it is made of (issue 30).

It patches `torch.Tensor.backward` and `torch.optim.AdamW.step` to print the process's RSS before and
after each call, and the peak RSS seen so far (sampled every 2 ms), then trains one run of 10
examples in a fresh session, as `run_memory.py` does.

    .venv/bin/python benchmarks/memory_phases.py METHOD [--layers N] [--recipe '{"gradient_checkpointing": true}']
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_memory import RECIPE, PeakSampler, rss, session  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--recipe", type=json.loads, default={}, help="recipe overrides, as JSON")
    args = parser.parse_args()

    import torch

    from shape_model import build, default_dir

    torch.set_num_threads(1)
    model_dir = build(args.model_dir or default_dir(layers=args.layers), args.layers)
    sampler = PeakSampler(0.002)

    def mark(what: str) -> None:
        print(f"{what:18s} RSS {rss() / 2**30:6.2f} GiB   peak so far {sampler.read() / 2**30:6.2f} GiB", flush=True)

    backward, step = torch.Tensor.backward, torch.optim.AdamW.step

    def traced_backward(self, *a, **k):
        mark("before backward")
        done = backward(self, *a, **k)
        mark("after backward")
        return done

    def traced_step(self, *a, **k):
        mark("before step")
        done = step(self, *a, **k)
        mark("after step")
        return done

    torch.Tensor.backward, torch.optim.AdamW.step = traced_backward, traced_step
    with tempfile.TemporaryDirectory() as store:
        s = session(model_dir, Path(store))
        base_bytes = sum(p.numel() * p.element_size() for p in s.model().base.parameters())
        mark("base loaded")
        s.train(args.method, examples=10, recipe={**RECIPE, **args.recipe})
        mark("trained")
        print(f"peak RSS {sampler.read() / 2**30:.2f} GiB = {sampler.read() / base_bytes:.2f} x base bytes")


if __name__ == "__main__":
    main()
