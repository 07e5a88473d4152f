"""A method compared with itself across disjoint seed sets: a calibrated procedure decides nothing.

For each repetition r, one session trains `--seeds` runs of the method with seeds s0..s0+k-1 and
another k with the next k seeds (disjoint), then claims "a > b" and "a < b" for behaviour shift,
forgetting and ECE: six claims, one family, Holm-corrected as a suite file's claims are. Under no
true difference any decisive verdict is a false positive. Prints one line per claim and a summary.

    python benchmarks/self_comparison.py [--model tiny-qwen2] [--method lora] [--seeds 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stance_harness.analysis.paired import correct_claims  # noqa: E402
from stance_harness.checks.comparisons import check_greater, check_less  # noqa: E402
from stance_harness.models import ModelArgs  # noqa: E402
from stance_harness.runs.runset import RunSet  # noqa: E402
from stance_harness.session import HarnessOptions, HarnessSession  # noqa: E402

RECIPE = {"learning_rate": 1e-3, "num_train_epochs": 2, "per_device_train_batch_size": 4}
METRICS = ("behavior_shift", "forgetting", "ece")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen2")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per side")
    parser.add_argument("--repeats", type=int, default=3, help="disjoint seed sets to try")
    parser.add_argument("--examples", type=int, default=10)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    decisive = claims = run_level_decisive = run_level_claims = 0
    with tempfile.TemporaryDirectory() as store:
        session = HarnessSession(HarnessOptions(args.model, ModelArgs(), [], None, Path("."), [],
                                                run_cache=Path(store)))
        for r in range(args.repeats):
            started = time.perf_counter()
            first = 100 * r
            arms = [RunSet(session.train(args.method, examples=args.examples, recipe={**RECIPE, "seed": first + i})
                           for i in range(k, k + args.seeds)) for k in (0, args.seeds)]
            results = {}
            for metric in METRICS:
                for check in (check_greater, check_less):
                    results[f"{check.__name__}:{metric}"] = check(arms[0], arms[1], metric=metric)
            corrected = correct_claims({k: v.metrics["p_value"] for k, v in results.items()},
                                       alpha=next(iter(results.values())).metrics["level"])
            for key, result in results.items():
                held = corrected[key].holds_after
                claims += 1
                decisive += held and result.verdict == "supported"
                print(f"repeat {r} seeds {first}-{first + 2 * args.seeds - 1} {key:28s} {result.verdict:12s} "
                      f"p={result.metrics['p_value']:.3f} holm={corrected[key].p_holm:.3f} "
                      f"est={result.metrics['estimate']:+.4g} [{result.metrics['low']:+.4g}, "
                      f"{result.metrics['high']:+.4g}] {result.metrics['method']}", flush=True)
            # the same claims on one seed per arm (run-level): what a one-seed comparison would have said
            for i in range(args.seeds):
                for metric in METRICS:
                    for check in (check_greater, check_less):
                        found = check(arms[0][i], arms[1][i], metric=metric)
                        run_level_claims += 1
                        run_level_decisive += found.verdict == "supported"
            print(f"repeat {r}: {time.perf_counter() - started:.0f} s", flush=True)
    print(f"{args.method} vs itself on {args.model}, {args.seeds} seeds per side, {args.repeats} disjoint seed sets: "
          f"{decisive} decisive of {claims} claims after the family's Holm correction; one seed per arm (run-level, "
          f"seed i against seed {args.seeds}+i, uncorrected): {run_level_decisive} supported of {run_level_claims}")


if __name__ == "__main__":
    main()
