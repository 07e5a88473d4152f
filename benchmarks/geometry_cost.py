"""Cost of a run's full geometry report (Run.geometry: intruder dimensions of every changed
block matrix, DoRA's ΔM/ΔD per matrix and their correlation, linear CKA per layer on held-out
text) after a full fine-tune and after a LoRA run on a model with Qwen2-0.5B's shapes (built by
shape_model.py; random weights, nothing downloaded).

For each run it prints the time of the geometry report and of its intruder part alone, and the
report's peak extra RSS against the bytes of the run's trained tensors (and the largest matrix).

    .venv/bin/python benchmarks/geometry_cost.py [--model-dir DIR] [--layers N] [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_memory import RECIPE, PeakSampler, measure, session  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="default: shape_model.default_dir for --layers")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (1 on a shared machine: spinning BLAS threads slow SVDs many-fold)")
    parser.add_argument("--runs", default="lora r8;full", help="which of 'lora r8' and 'full', joined by ';'")
    args = parser.parse_args()

    import torch

    from shape_model import build, default_dir

    torch.set_num_threads(args.threads)
    model_dir = build(args.model_dir or default_dir(layers=args.layers), args.layers)
    sampler = PeakSampler()
    with tempfile.TemporaryDirectory() as store:
        s = session(model_dir, Path(store))
        loaded = s.model()
        largest = max(p.numel() * p.element_size() for p in loaded.base.parameters())
        print(f"{args.layers} layers; largest matrix {largest / 2**20:.0f} MiB; {torch.get_num_threads()} threads")
        runs = [("lora r8", "lora", {"r": 8}), ("full", "full", {})]
        for label, method, options in [r for r in runs if r[0] in [x.strip() for x in args.runs.split(";")]]:
            t = time.perf_counter()
            run = s.train(method, examples=10, recipe=RECIPE, **options)
            trained = sum(t_.numel() * t_.element_size() for t_ in run.before.values())
            largest_trained = max(t_.numel() * t_.element_size() for t_ in run.before.values())
            print(f"{label}: trained in {time.perf_counter() - t:.1f}s; trained tensors {trained / 2**20:.1f} MiB")
            model = run.model
            found, t_intruders, m_intruders = measure(
                lambda run=run, model=model: list(run.method.intruders(model, run.before, run.anatomy)), sampler)
            print(f"{label}: intruder pass peak extra RSS {m_intruders / 2**20:.0f} MiB = "
                  f"{m_intruders / largest_trained:.3f} x the largest trained matrix ({largest_trained / 2**20:.0f} MiB; "
                  f"issue 30 asks <= 0.5 x)", flush=True)
            geometry, t_geometry, m_geometry = measure(run.geometry, sampler)
            print(f"{label}: intruders of {len(found)} matrices {t_intruders:.1f}s, peak extra RSS "
                  f"{m_intruders / 2**20:.0f} MiB; whole geometry report {t_geometry:.1f}s, peak extra RSS "
                  f"{m_geometry / 2**20:.0f} MiB = {m_geometry / trained:.3f} x trained tensors = "
                  f"{m_geometry / largest:.3f} x largest matrix; {sum(r['count'] for r in geometry['intruders'])} "
                  f"intruders; CKA on {geometry['cka_tokens']} tokens", flush=True)
            run.release_model()
            gc.collect()


if __name__ == "__main__":
    main()
