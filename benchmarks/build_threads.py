"""An embedded model built on one torch thread and on two (issue 24: tiny-qwen2 in at most 30 s).

Each build runs in a fresh process with an empty model cache, so it trains the model from
nothing as a new machine does, on the thread count given. Per build it prints the wall and CPU
seconds, the thread count and a digest of every weight, so the weights can be compared bit for
bit, and the machine's load average before the build (a thread that waits on a busy core costs
far more than it gains). The build itself keeps the one thread the suites' conftest sets.

    python benchmarks/build_threads.py [--model tiny-qwen2] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUILD = """
import hashlib, sys
import torch
from safetensors.torch import load_file
from stance_harness.models.weights import tiny_model_dir
torch.set_num_threads(int(sys.argv[2]))
folder = tiny_model_dir(sys.argv[1])
weights = load_file(str(folder / "model.safetensors"))
digest = hashlib.sha256()
for name in sorted(weights):
    digest.update(name.encode())
    digest.update(weights[name].contiguous().view(torch.uint8).numpy().tobytes())
print(digest.hexdigest()[:16])
"""


def build(model: str, threads: int) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, weights digest) of one build in an empty cache."""
    with tempfile.TemporaryDirectory(prefix="build-threads-") as cache:
        # STANCE_HARNESS_THREADS: the build keeps the thread count this script sets
        env = {**os.environ, "STANCE_HARNESS_CACHE": cache, "STANCE_HARNESS_THREADS": "1"}
        before = os.times()
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", BUILD, model, str(threads)], env=env, check=True,
                             capture_output=True, text=True)
        wall = time.perf_counter() - started
        after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return wall, cpu, out.stdout.strip().splitlines()[-1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-qwen2")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    digests = set()
    for threads in args.threads:
        load = os.getloadavg()[0]
        wall, cpu, digest = build(args.model, threads)
        digests.add(digest)
        print(f"{args.model}: {threads} thread(s): {wall:.1f} s wall, {cpu:.1f} s CPU, weights {digest} "
              f"(load average {load:.2f} before)", flush=True)
    print("the same weights on every thread count" if len(digests) == 1 else "the weights DIFFER between thread counts")


if __name__ == "__main__":
    main()
