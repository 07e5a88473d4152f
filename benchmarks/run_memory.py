"""Memory of one session that trains six runs on a model with Qwen2-0.5B's shapes.

It builds the model itself (random weights; nothing downloaded), loads it as the harness does
(float32), and in one HarnessSession trains lora r8, full, selective (13, 15), l2sp, lora r16 and
gradual, 10 examples each (2 steps). A sampler thread reads the process's RSS every 5 ms. Per
run it prints:
  retained / base RSS   how much RSS the run left behind, over the RSS the base took to load
  peak / base bytes     the highest RSS while that run trained, over the base's parameter bytes
and the session's peak against the largest single run's peak, where each heavy run (full, l2sp)
is also trained alone, in a fresh process, for that reference.

    .venv/bin/python benchmarks/run_memory.py [--model-dir DIR] [--layers N] [--skip-alone]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

RECIPE = {"learning_rate": 1e-4, "num_train_epochs": 1, "per_device_train_batch_size": 5, "seed": 0}
RUNS = [
    ("lora r8", "lora", {"r": 8}),
    ("full", "full", {}),
    ("selective 13,15", "selective", {"layers": [13, 15]}),  # of 24; mapped by relative depth on a shallower build
    ("l2sp", "l2sp", {}),
    ("lora r16", "lora", {"r": 16}),
    ("gradual", "gradual", {"every_steps": 1, "start_layers": 8, "layers_per_stage": 8}),
]
HEAVY = ["full", "l2sp"]


def _on(anatomy, options: dict) -> dict:
    """Layer options are Qwen2-0.5B's (24 layers): map them to this build's depth."""
    if "layers" in options:
        return {**options, "layers": anatomy.analog(options["layers"], depth=24)}
    if "start_layers" in options:
        third = max(1, round(anatomy.num_layers / 3))
        return {**options, "start_layers": third, "layers_per_stage": third}
    return options


def rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """The highest RSS seen since the last `reset`, sampled on a thread."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, rss())

    def reset(self) -> None:
        self.peak = rss()

    def read(self) -> int:
        return max(self.peak, rss())


def session(model_dir: Path, store: Path):
    from harness.models import ModelArgs
    from harness.session import HarnessOptions, HarnessSession

    return HarnessSession(HarnessOptions(str(model_dir), ModelArgs(), [], None, Path("."), [], run_cache=store))


def train_alone(model_dir: Path, label: str) -> int:
    """The peak RSS of one run trained in a fresh process (the reference for the session's peak)."""
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import run_memory as m; "
            f"print(json.dumps(m.alone({str(model_dir)!r}, {label!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def alone(model_dir: str, label: str) -> int:
    method, options = next((m, o) for name, m, o in RUNS if name == label)
    sampler = PeakSampler()
    with tempfile.TemporaryDirectory() as store:
        s = session(Path(model_dir), Path(store))
        s.train(method, examples=10, recipe=RECIPE, **_on(s.model().anatomy, options))
        return sampler.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "qwen2-0.5b-shape")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--skip-alone", action="store_true", help="skip the single-run reference processes")
    args = parser.parse_args()

    import torch

    from shape_model import build

    torch.set_num_threads(os.cpu_count() or 1)
    model_dir = build(args.model_dir, args.layers)
    sampler = PeakSampler()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as store:
        s = session(model_dir, Path(store))
        before_base = rss()
        loaded = s.model()
        base_rss = rss() - before_base
        base_bytes = sum(p.numel() * p.element_size() for p in loaded.base.parameters())
        print(f"model {model_dir}: {sum(p.numel() for p in loaded.base.parameters()) / 1e6:.0f}M parameters, "
              f"{base_bytes / 2**30:.2f} GiB as float32; the base took {base_rss / 2**30:.2f} GiB of RSS; "
              f"run memory budget {s.resident.budget / 2**30:.1f} GiB; {torch.get_num_threads()} threads")
        rows, session_peak, previous = [], 0, rss()
        for label, method, options in RUNS:
            options = _on(loaded.anatomy, options)
            sampler.reset()
            t = time.perf_counter()
            run = s.train(method, examples=10, recipe=RECIPE, **options)
            gc.collect()
            peak, now = sampler.read(), rss()
            session_peak = max(session_peak, peak)
            rows.append({"run": label, "trainable": run.counts["trainable"], "seconds": time.perf_counter() - t,
                         "retained_over_base_rss": (now - previous) / base_rss, "peak_over_base_bytes": peak / base_bytes,
                         "held_models_GiB": s.resident.held_bytes() / 2**30})
            previous = now
            print(f"  {label:16s} trainable {run.counts['trainable'] / 1e6:8.2f}M  {rows[-1]['seconds']:6.1f}s  "
                  f"retained {rows[-1]['retained_over_base_rss']:+.3f} x base RSS  "
                  f"peak {rows[-1]['peak_over_base_bytes']:.2f} x base bytes  "
                  f"(models held {rows[-1]['held_models_GiB']:.2f} GiB, released so far {s.resident.released})",
                  flush=True)
    print(f"session: {time.perf_counter() - started:.0f}s, peak RSS {session_peak / 2**30:.2f} GiB "
          f"= {session_peak / base_bytes:.2f} x base bytes")
    if not args.skip_alone:
        alone_peaks = {label: train_alone(model_dir, label) for label in HEAVY}
        largest = max(alone_peaks.values())
        for label, peak in alone_peaks.items():
            print(f"  {label} alone, fresh process: peak RSS {peak / 2**30:.2f} GiB")
        print(f"session peak / largest single run's peak = {session_peak / largest:.3f}")
    print(json.dumps({"rows": rows, "session_peak": session_peak, "base_bytes": base_bytes, "base_rss": base_rss}))


if __name__ == "__main__":
    main()
