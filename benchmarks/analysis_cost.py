"""Cost of a run's analyses at real size, after a full fine-tune and after a LoRA run on a model
with Qwen2-0.5B's shapes (built by shape_model.py; random weights, nothing downloaded).

For each run it measures, one analysis at a time, in this process:
  - the weight deltas (effective and adapter views: chunked float64 moments, non-finite counts,
    norms) and the frozen-weight digest check: their peak extra RSS over the largest matrix's
    bytes (goal <= 0.2), and their time over one chunked float64 read pass of the same tensors
    (goal <= 2);
  - the rank analysis (one float32 SVD per block matrix; for LoRA from the factors): its time and
    peak extra RSS, reported beside, since an SVD costs more than a read by nature.

    .venv/bin/python benchmarks/analysis_cost.py [--model-dir DIR] [--layers N]
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


def read_pass(pairs) -> float:
    """Seconds for the least any float64 analysis does: every element of both sides once, chunked."""
    import torch

    from stance_harness.analysis.chunks import CHUNK_BYTES, iter_chunks, load, workspace

    started = time.perf_counter()
    for _, before, after in pairs:
        n = CHUNK_BYTES // 16
        a_buf, b_buf = workspace(before.numel(), n, torch.float64, "cpu"), workspace(before.numel(), n, torch.float64, "cpu")
        for b, a in iter_chunks(before, after, chunk_elements=n):
            load(b_buf, b), load(a_buf, a)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="default: shape_model.default_dir for --layers")
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()

    import torch

    from stance_harness.analysis.deltas import delta_table, raw_delta_pairs
    from stance_harness.analysis.digest import tensor_digest
    from shape_model import build, default_dir

    torch.set_num_threads(os.cpu_count() or 1)
    model_dir = build(args.model_dir or default_dir(layers=args.layers), args.layers)
    sampler = PeakSampler()
    with tempfile.TemporaryDirectory() as store:
        s = session(model_dir, Path(store))
        loaded = s.model()
        largest = max(p.numel() * p.element_size() for p in loaded.base.parameters())
        print(f"largest matrix {largest / 2**20:.0f} MiB; {torch.get_num_threads()} threads")
        for label, method, options in [("full", "full", {}), ("lora r8", "lora", {"r": 8})]:
            run = s.train(method, examples=10, recipe=RECIPE, **options)
            model, before, anatomy = run.model, run.before, run.anatomy
            params = dict(model.named_parameters())

            def deltas():
                effective = delta_table(run.method.effective_deltas(model, before, anatomy), anatomy)
                adapter = delta_table(raw_delta_pairs(model, before), anatomy)
                return len(effective) + len(adapter)

            def digests():
                return sum(tensor_digest(params[n]) != d for n, d in run.frozen_digests.items())

            _, t_deltas, m_deltas = measure(deltas, sampler)
            _, t_digest, m_digest = measure(digests, sampler)
            reference = read_pass(list(run.method.effective_deltas(model, before, anatomy))) \
                + read_pass(raw_delta_pairs(model, before))
            frozen = [params[n] for n in run.frozen_digests]
            t0 = time.perf_counter()
            for p in frozen:
                p.detach().view(-1).view(torch.uint8).numpy().sum(dtype="uint64") if p.numel() else None
            reference_digest = time.perf_counter() - t0
            run.measurements.pop("rank:0.9", None)
            _, t_rank, m_rank = measure(lambda: run.rank(0.9), sampler)
            print(f"{label}: deltas {t_deltas:.2f}s (read pass {reference:.2f}s: x{t_deltas / reference:.2f}), "
                  f"peak extra RSS {m_deltas / 2**20:.0f} MiB = {m_deltas / largest:.3f} x largest matrix")
            if frozen:
                print(f"{label}: frozen digests of {len(frozen)} tensors {t_digest:.2f}s (a byte read of them "
                      f"{reference_digest:.2f}s: x{t_digest / max(reference_digest, 1e-9):.2f}), peak extra RSS "
                      f"{m_digest / 2**20:.0f} MiB = {m_digest / largest:.3f} x largest matrix")
            print(f"{label}: rank of {len(run.rank(0.9)['rows'])} block matrices {t_rank:.1f}s, peak extra RSS "
                  f"{m_rank / 2**20:.0f} MiB = {m_rank / largest:.3f} x largest matrix", flush=True)
            run.release_model()
            model = params = frozen = None  # rebound, not deleted: the closures above name them
            gc.collect()


if __name__ == "__main__":
    main()
