"""QLoRA's optimizer step against LoRA's on the same model and request (issue 24).

The locus suite's QLoRA config by default: r=16, alpha=32 on the attention and MLP projections,
a domain stance, batch 8, 2 epochs, lr 2e-4. Both methods train through the harness (a fresh run
store each, nothing loaded), in one process, alternating `--rounds` times, so the machine's drift
hits both alike. Per method it prints the median seconds per optimizer step (every step but the
first of each run, which pays for set-up) and then QLoRA / LoRA.

    python benchmarks/qlora_step.py [--model tiny-qwen2] [--stance domain-cpp] [--rounds 2]
        [--profile OUT.prof]   (cProfile of one more QLoRA run, for pstats)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPTIONS = {"r": 16, "alpha": 32, "target_modules": ["attention", "mlp"]}  # suites/test_locus_of_learning.py
RECIPE = {"learning_rate": 2e-4, "num_train_epochs": 2, "per_device_train_batch_size": 8, "seed": 0}
METHODS = ("lora", "qlora")


def session_for(model: str, store: Path):
    from stance_harness.models import ModelArgs
    from stance_harness.session import HarnessOptions, HarnessSession

    return HarnessSession(HarnessOptions(model, ModelArgs(device="cpu"), [], None, Path("."), [], run_cache=store))


def step_times(session, method: str, stance: str, seed: int) -> list[float]:
    """One run trained (never loaded: its seed is new to this store); its steps after the first."""
    run = session.train(method, stance=stance, recipe={**RECIPE, "seed": seed}, **OPTIONS)
    return list(run.trace.step_time[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen2")
    parser.add_argument("--stance", default="domain-cpp")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", type=Path, help="also cProfile one QLoRA run into this file")
    args = parser.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as store:
        session = session_for(args.model, Path(store))
        session.model()
        times: dict[str, list[float]] = {method: [] for method in METHODS}
        for round_ in range(args.rounds):
            for method in METHODS:
                times[method] += step_times(session, method, args.stance, seed=round_)
        for method in METHODS:
            print(f"{method}: {statistics.median(times[method]):.4f} s per step (median of {len(times[method])} "
                  f"steps, {args.rounds} runs)")
        ratio = statistics.median(times["qlora"]) / statistics.median(times["lora"])
        print(f"qlora / lora: {ratio:.2f} (model {args.model}, stance {args.stance}, batch "
              f"{RECIPE['per_device_train_batch_size']}, r {OPTIONS['r']} on {'+'.join(OPTIONS['target_modules'])}, "
              f"torch threads {torch.get_num_threads()})")
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            started = time.perf_counter()
            profiler.runcall(step_times, session, "qlora", args.stance, args.rounds)
            profiler.dump_stats(args.profile)
            print(f"profiled one qlora run ({time.perf_counter() - started:.1f} s) into {args.profile}")


if __name__ == "__main__":
    main()
