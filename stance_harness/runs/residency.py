"""Adapted models, and the full-precision base they share, held in memory under a byte budget:
the least recently used is released first.

A run's model costs what it does not share with the base (its trained tensors, or QLoRA's own
4-bit copy); a loaded base costs its bytes. A released model is rebuilt from base + stored
tensors when a test asks for it, a released base loads again from its files when something reads
it; a run's small data (trace, tables, measurements) always stays.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict

from stance_harness.core.devices import _torch  # torch at first use (pytest's start-up imports this module)
from stance_harness.core.errors import HarnessError

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DEFAULT_SHARE = 0.5  # of the memory free at start, when --run-memory is not given
# What training may need beyond the base, as a multiple of the base's bytes: a full fine-tune
# holds a trained copy, its gradients and two AdamW moments (4x), and activations on top.
TRAINING_FOOTPRINT = 6


def parse_bytes(text: str, option: str = "--run-memory") -> int:
    """`8GiB`, `500MB`, `1e9`, `0`: a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match[2].lower() not in _UNITS:
        raise HarnessError(f"{option} {text!r} is not a size: use bytes or a unit, e.g. 8GiB, 500MB, 0")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def free_memory(device: str = "cpu") -> int:
    """Bytes free now: on a CUDA device its free memory, else the machine's available RAM."""
    if str(device).startswith("cuda"):
        torch = _torch()  # only to ask a GPU
        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _in_memory(run):
    """The run's model if it is in memory, else None: Run's own slot (`.model` would rebuild a
    released model and count as a use; run.py is measuring code, so it is read from here)."""
    return run.__dict__.get("_model")


def shares_base(run) -> bool:
    """Whether the run's model in memory is built over its base's storage (the base cannot go before it)."""
    model = _in_memory(run)
    return model is not None and run.loaded.shares_base(model.parameters())


def holds_base(run) -> bool:
    """Whether anything the run keeps shares its base's storage: its model, or its "before" side
    (a full fine-tune's starting weights are the base's own tensors)."""
    return shares_base(run) or run.loaded.shares_base(run.before.values())


class ResidentModels:
    """Runs whose models are in memory, and the full-precision bases they are built on, in order of
    last use.

    A base is an entry too: when a run built over it is used, the base moves just after it, so the
    runs sharing it are released first. It is released (and loads again on its next read) only
    when no run of the session holds its storage and nothing else does (LoadedModel.release_base);
    a QLoRA run's own 4-bit model does not hold it."""

    def __init__(self, budget: int):
        self.budget = budget
        self._entries: OrderedDict = OrderedDict()  # id(run) -> run; ("base", id(loaded)) -> loaded
        self._runs: dict = {}  # every run of the session, resident or not: what may hold a base
        self.released = 0  # how many times a run's model was released
        self.base_released = 0  # how many times a base was released
        self._collected: dict = {}  # id(loaded) -> `released` when a release of its base last failed

    def track(self, run) -> None:
        """A run of the session: its base becomes an entry the budget may release."""
        self._runs[id(run)] = run
        key = ("base", id(run.loaded))
        if key not in self._entries:
            self._entries[key] = run.loaded
            self._entries.move_to_end(key, last=False)  # used by no run yet: the least recent

    def touch(self, run) -> None:
        """`run`'s model was just used: it is the most recent; release the oldest past the budget."""
        self.track(run)
        self._entries[id(run)] = run
        self._entries.move_to_end(id(run))
        if shares_base(run):
            self._entries.move_to_end(("base", id(run.loaded)))
        self._release(lambda held: held <= self.budget, keep=run)

    def make_room(self, need: int, keep=None) -> None:
        """Release the least recently used models until `need` more bytes fit in the budget (all of
        them if it never fits): training a run needs the memory more than idle models do. `keep`: a
        base (LoadedModel) the training about to start reads, which stays."""
        self._release(lambda held: held + need <= self.budget, keep=keep)

    def _release(self, fits, keep=None) -> None:
        held = self.held_bytes()
        for key in list(self._entries):
            if fits(held):
                break
            entry = self._entries[key]
            if entry is keep:
                continue
            if isinstance(key, tuple):
                freed = self._release_base(entry)
                if freed:
                    held -= freed
                    self.base_released += 1
                continue  # the entry stays: the base may load again
            if entry.rebuild is None:
                continue
            held -= entry.release_model()
            del self._entries[key]
            self.released += 1

    def _release_base(self, loaded) -> int:
        """Release `loaded`'s base if no run holds it (cheap, asked first) and nothing else does; the bytes freed."""
        if not loaded.base_loaded or any(holds_base(r) for r in self._runs.values() if r.loaded is loaded):
            return 0
        size = loaded.base_bytes
        # a garbage collection (tenths of a second) once per model released, not at every use past the budget
        if loaded.release_base(collect=self._collected.get(id(loaded)) != self.released):
            return size
        self._collected[id(loaded)] = self.released
        return 0

    def held_bytes(self) -> int:
        """Bytes of the models in memory: each run's own tensors, and each loaded base."""
        return sum((entry.base_bytes if entry.base_loaded else 0) if isinstance(key, tuple) else entry.resident_bytes()
                   for key, entry in self._entries.items())
