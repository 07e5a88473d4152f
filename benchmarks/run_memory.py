"""Memory of one session that trains six runs on a model with Qwen2-0.5B's shapes (or, with
--shape llama-3.2-3b, Llama-3.2-3B's).

It builds the model itself (shape_model.py: random weights; nothing downloaded), loads it as the harness does
(float32), and in one HarnessSession trains lora r8, full, selective (13, 15), l2sp, lora r16 and
gradual, 10 examples each (2 steps). A sampler thread reads the process's RSS every 5 ms. Per
run it prints:
  retained / base RSS   how much RSS the run left behind, over the RSS the base took to load
  peak / base bytes     the highest RSS while that run trained, over the base's parameter bytes
and the session's peak against the largest single run's peak, where each heavy run (full, l2sp)
is also trained alone, in a fresh process, for that reference. On CUDA (--device, default auto)
the same figures are also taken of GPU memory: torch.cuda's max allocated while the run trained,
and what stays allocated after it.

    .venv/bin/python benchmarks/run_memory.py [--shape qwen2-0.5b] [--layers N] [--model-dir DIR] [--skip-alone]
        [--device auto]
        [--runs "lora r8;full;full, checkpointed;full, adamw_8bit"] [--alone "lora r8;qlora r8"] [--run-memory 1GiB]

Labels beyond the six: "full, checkpointed" (recipe gradient_checkpointing=True), "full, adamw_8bit"
(recipe optim="adamw_8bit"), "qlora r8", and "lora r8, checkpointed" and "qlora r8, checkpointed".
It prints whether full and l2sp peak within 5.5 x the base's bytes, whether the checkpointed and
8-bit full fine-tunes peak lower than full, and with --runs "" --alone "lora r8;qlora r8" a
QLoRA-only session's peak against a LoRA-only one's, each alone in a fresh process (a QLoRA-only
session never loads the full-precision base), as RSS and as anonymous RSS (RSS less the mapped
files' resident pages: the safetensors pages a load reads count in RSS until the file is closed). With --run-memory (the session's budget, as the
pytest option) each row also says how often the full-precision base was released and whether it is
loaded: --runs "lora r8;qlora r8" --run-memory 1GiB --layers 2 releases it before QLoRA trains.
"models held" counts the base while it is loaded, as the budget does. --layers defaults to the shape's
full depth and --model-dir to shape_model's $TMPDIR/<shape>-shape-<layers>; the last line, the
figures as JSON, names the shape and its layers.
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

from shape_model import DEFAULT_SHAPE, SHAPES, build, default_dir, full_depth  # noqa: E402

RECIPE = {"learning_rate": 1e-4, "num_train_epochs": 1, "per_device_train_batch_size": 5, "seed": 0}
RUNS = [
    ("lora r8", "lora", {"r": 8}),
    ("full", "full", {}),
    ("selective 13,15", "selective", {"layers": [13, 15]}),  # of 24; mapped by relative depth on a shallower build
    ("l2sp", "l2sp", {}),
    ("lora r16", "lora", {"r": 16}),
    ("gradual", "gradual", {"every_steps": 1, "start_layers": 8, "layers_per_stage": 8}),
    ("full, checkpointed", "full", {"recipe": {"gradient_checkpointing": True}}),
    ("full, adamw_8bit", "full", {"recipe": {"optim": "adamw_8bit"}}),
    ("qlora r8", "qlora", {"r": 8}),
    ("lora r8, checkpointed", "lora", {"r": 8, "recipe": {"gradient_checkpointing": True}}),
    ("qlora r8, checkpointed", "qlora", {"r": 8, "recipe": {"gradient_checkpointing": True}}),
]
DEFAULT_RUNS = RUNS[:6]  # the six the session has always trained
HEAVY = ["full", "l2sp"]
FLOOR = 5.5  # issue 30: full fine-tuning with AdamW at most this many times the base's bytes at peak


def _labels(text: str) -> list[str]:
    """Labels joined by ';' (or by ',' where there is no ';', as gpu_check.sh's MEMORY_RUNS was)."""
    return [r.strip() for r in text.split(";" if ";" in text else ",") if r.strip()]


def _split(options: dict) -> tuple[dict, dict]:
    """(the recipe with a run's overrides, the method's options)."""
    return {**RECIPE, **options.get("recipe", {})}, {k: v for k, v in options.items() if k != "recipe"}


def _on(anatomy, options: dict) -> dict:
    """Layer options are written for Qwen2-0.5B's 24 layers: map them by relative depth to this build's."""
    if "layers" in options and options["layers"] is not None:
        return {**options, "layers": anatomy.analog(options["layers"], depth=24)}
    if "start_layers" in options:
        third = max(1, round(anatomy.num_layers / 3))
        return {**options, "start_layers": third, "layers_per_stage": third}
    return options


def _statm() -> list[int]:
    with open("/proc/self/statm") as handle:
        return [int(field) * os.sysconf("SC_PAGE_SIZE") for field in handle.read().split()]


def rss() -> int:
    return _statm()[1]


def rss_and_anon() -> tuple[int, int]:
    """RSS, and the resident bytes not backed by a file (RSS less the resident pages of mapped
    files: a memory-mapped safetensors file's pages count in RSS while the loader reads it, but
    they are page cache the kernel can reclaim, not memory the process allocated), from one read."""
    fields = _statm()
    return fields[1], fields[1] - fields[2]


class PeakSampler:
    """The highest RSS, and the highest anonymous RSS, seen since the last `reset`, sampled on a thread."""

    def __init__(self, every: float = 0.005):
        self.every, self._stop = every, threading.Event()
        self.reset()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.every):
            self._sample()

    def _sample(self) -> None:
        resident, anonymous = rss_and_anon()
        self.peak, self.anon_peak = max(self.peak, resident), max(self.anon_peak, anonymous)

    def reset(self) -> None:
        self.peak, self.anon_peak = rss_and_anon()

    def read(self) -> int:
        return max(self.peak, rss_and_anon()[0])

    def read_anon(self) -> int:
        return max(self.anon_peak, rss_and_anon()[1])


def measure(fn, sampler: PeakSampler):
    """(fn's value, its seconds, the peak RSS it added over what was resident when it began)."""
    gc.collect()
    start = rss()
    sampler.reset()
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t, max(0, sampler.read() - start)


def session(model_dir: Path, store: Path, device: str = "auto", run_memory: int | None = None):
    from stance_harness.models import ModelArgs
    from stance_harness.session import HarnessOptions, HarnessSession

    return HarnessSession(HarnessOptions(str(model_dir), ModelArgs(device=device), [], None, Path("."), [],
                                         run_cache=store, run_memory=run_memory))


def cuda_reset(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def cuda_figures(device: str) -> dict:
    """GPU memory: max allocated since the last reset, and allocated now (empty on the CPU)."""
    if not device.startswith("cuda"):
        return {}
    import torch

    return {"cuda_peak": torch.cuda.max_memory_allocated(device), "cuda_allocated": torch.cuda.memory_allocated(device)}


def train_alone(model_dir: Path, label: str, device: str = "auto") -> dict:
    """The peak RSS (and GPU peak) of one run trained in a fresh process (the reference for the session's)."""
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import run_memory as m; "
            f"print(json.dumps(m.alone({str(model_dir)!r}, {label!r}, {device!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def alone(model_dir: str, label: str, device: str = "auto") -> dict:
    method, options = next((m, o) for name, m, o in RUNS if name == label)
    sampler = PeakSampler()
    with tempfile.TemporaryDirectory() as store:
        s = session(Path(model_dir), Path(store), device)
        recipe, options = _split(options)
        s.train(method, examples=10, recipe=recipe, **_on(s.model().anatomy, options))
        return {"rss": sampler.read(), "anon": sampler.read_anon(), "base_loaded": s.model().base_loaded,
                **cuda_figures(s.model().args.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=DEFAULT_SHAPE)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's full depth)")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: $TMPDIR/<shape>-shape-<layers>")
    parser.add_argument("--skip-alone", action="store_true", help="skip the single-run reference processes")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (1 on a shared machine)")
    parser.add_argument("--device", default="auto", help="auto (a GPU where there is one), cpu, cuda, cuda:N")
    parser.add_argument("--runs", default=None, help="labels of RUNS to train, joined by ';' (or ','; default: the first six)")
    parser.add_argument("--run-memory", default=None, metavar="SIZE",
                        help="the session's memory budget, as --run-memory (default: half of what is free)")
    parser.add_argument("--alone", default=";".join(HEAVY),
                        help="labels to train alone in fresh processes, joined by ';' (with 'lora r8' and 'qlora r8' "
                             "it compares a QLoRA-only session with a LoRA-only one)")
    args = parser.parse_args()
    labels = [label for label, _, _ in RUNS]
    chosen = [r[0] for r in DEFAULT_RUNS] if args.runs is None else _labels(args.runs)
    alone_labels = [] if args.skip_alone else _labels(args.alone)
    unknown = [r for r in chosen + alone_labels if r not in labels]
    if unknown:
        parser.error(f"--runs/--alone: {', '.join(unknown)} not among {'; '.join(labels)}")

    import torch

    from stance_harness.runs.residency import parse_bytes

    budget = parse_bytes(args.run_memory) if args.run_memory else None
    torch.set_num_threads(args.threads)
    layers = full_depth(args.shape) if args.layers is None else args.layers
    model_dir = build(args.model_dir or default_dir(args.shape, layers), layers, args.shape)
    figures = session_figures(model_dir, chosen, args.device, budget) if chosen else {}
    alone_peaks = {label: train_alone(model_dir, label, args.device) for label in alone_labels}
    for label, peak in alone_peaks.items():
        print(f"  {label} alone, fresh process: peak RSS {peak['rss'] / 2**30:.2f} GiB "
              f"(anonymous {peak['anon'] / 2**30:.2f} GiB)"
              + (f", GPU peak {peak['cuda_peak'] / 2**30:.2f} GiB" if "cuda_peak" in peak else "")
              + f"; full-precision base loaded: {'yes' if peak['base_loaded'] else 'no'}")
    heavy = [p for label, p in alone_peaks.items() if label in chosen]
    if heavy:
        session_peak, session_cuda_peak = figures["session_peak"], figures["session_cuda_peak"]
        print(f"session peak / largest single run's peak = {session_peak / max(p['rss'] for p in heavy):.3f} (RSS)"
              + (f", {session_cuda_peak / max(p['cuda_peak'] for p in heavy):.3f} (GPU)" if session_cuda_peak else ""))
    for lora, qlora in (("lora r8", "qlora r8"), ("lora r8", "qlora r8, checkpointed"),
                        ("lora r8, checkpointed", "qlora r8, checkpointed")):
        if lora in alone_peaks and qlora in alone_peaks:
            print(f"a QLoRA-only session's peak ({qlora}) / a LoRA-only session's ({lora}) = "
                  f"{alone_peaks[qlora]['rss'] / alone_peaks[lora]['rss']:.3f} (RSS), "
                  f"{alone_peaks[qlora]['anon'] / alone_peaks[lora]['anon']:.3f} (anonymous); issue 30 asks <= 0.6")
    print(json.dumps({"shape": args.shape, "layers": layers, **figures, "alone": alone_peaks}))


def session_figures(model_dir: Path, chosen: list[str], device: str, run_memory: int | None = None) -> dict:
    """Train the `chosen` runs in one session here, print their figures and return them. The base
    is loaded first (it loads on first use), so each run's figures are over what it took."""
    import torch

    sampler = PeakSampler()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as store:
        s = session(model_dir, Path(store), device, run_memory)
        before_base = rss()
        loaded = s.model()
        base_bytes = sum(p.numel() * p.element_size() for p in loaded.base.parameters())  # loads it here
        device = loaded.args.device
        base_rss = rss() - before_base
        print(f"model {model_dir}: {sum(p.numel() for p in loaded.base.parameters()) / 1e6:.0f}M parameters, "
              f"{base_bytes / 2**30:.2f} GiB as float32; the base took {base_rss / 2**30:.2f} GiB of RSS; "
              f"run memory budget {s.resident.budget / 2**30:.1f} GiB; {torch.get_num_threads()} threads; "
              f"device {device} ({loaded.provenance()['device_name']})")
        cuda_base = cuda_figures(device).get("cuda_allocated")
        rows, session_peak, previous, session_cuda_peak = [], 0, rss(), 0
        for label, method, options in [r for r in RUNS if r[0] in chosen]:
            recipe, options = _split(options)
            options = _on(loaded.anatomy, options)
            sampler.reset()
            cuda_reset(device)
            t = time.perf_counter()
            run = s.train(method, examples=10, recipe=recipe, **options)
            gc.collect()
            peak, now = sampler.read(), rss()
            session_peak = max(session_peak, peak)
            rows.append({"run": label, "trainable": run.counts["trainable"], "seconds": time.perf_counter() - t,
                         "retained_over_base_rss": (now - previous) / base_rss, "peak_over_base_bytes": peak / base_bytes,
                         "held_models_GiB": s.resident.held_bytes() / 2**30,
                         "base_released": s.resident.base_released, "base_loaded": loaded.base_loaded})
            cuda = cuda_figures(device)
            if cuda:
                rows[-1].update({"cuda_peak_over_base_bytes": cuda["cuda_peak"] / base_bytes,
                                 "cuda_retained_over_base_bytes": (cuda["cuda_allocated"] - cuda_base) / base_bytes})
                session_cuda_peak = max(session_cuda_peak, cuda["cuda_peak"])
            previous = now
            print(f"  {label:16s} trainable {run.counts['trainable'] / 1e6:8.2f}M  {rows[-1]['seconds']:6.1f}s  "
                  f"retained {rows[-1]['retained_over_base_rss']:+.3f} x base RSS  "
                  f"peak {rows[-1]['peak_over_base_bytes']:.2f} x base bytes  "
                  f"(models held {rows[-1]['held_models_GiB']:.2f} GiB, released so far {s.resident.released}; "
                  f"base released {s.resident.base_released}, loaded {'yes' if loaded.base_loaded else 'no'})"
                  + (f"  GPU peak {rows[-1]['cuda_peak_over_base_bytes']:.2f} x base bytes, retained "
                     f"{rows[-1]['cuda_retained_over_base_bytes']:+.3f} x" if cuda else ""),
                  flush=True)
    print(f"session: {time.perf_counter() - started:.0f}s, peak RSS {session_peak / 2**30:.2f} GiB "
          f"= {session_peak / base_bytes:.2f} x base bytes"
          + (f"; GPU peak {session_cuda_peak / 2**30:.2f} GiB" if session_cuda_peak else ""))
    peaks = {row["run"]: row["peak_over_base_bytes"] for row in rows}
    for label in ("full", "l2sp"):
        if label in peaks:
            print(f"{label}: peak {peaks[label]:.2f} x base bytes ({'within' if peaks[label] <= FLOOR else 'over'} "
                  f"the {FLOOR} x bound)")
    for label in ("full, checkpointed", "full, adamw_8bit"):
        if label in peaks and "full" in peaks:
            print(f"{label}: peak {peaks[label]:.2f} x base bytes against full's {peaks['full']:.2f} x "
                  f"({'lower' if peaks[label] < peaks['full'] else 'NOT lower'})")
    return {"rows": rows, "session_peak": session_peak, "session_cuda_peak": session_cuda_peak or None,
            "base_bytes": base_bytes, "base_rss": base_rss, "device": device}


if __name__ == "__main__":
    main()
