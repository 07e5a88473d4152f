"""Adapted models held in memory under a byte budget: the least recently used is released first.

A run's model costs what it does not share with the base (its trained tensors, or QLoRA's own
4-bit copy). A released model is rebuilt from base + stored tensors when a test asks for it;
a run's small data (trace, tables, measurements) always stays.
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


class ResidentModels:
    """Runs whose models are in memory, in order of last use."""

    def __init__(self, budget: int):
        self.budget = budget
        self._runs: OrderedDict = OrderedDict()
        self.released = 0  # how many times a model was released

    def touch(self, run) -> None:
        """`run`'s model was just used: it is the most recent; release the oldest past the budget."""
        self._runs[id(run)] = run
        self._runs.move_to_end(id(run))
        held = sum(r.resident_bytes() for r in self._runs.values())
        for key in list(self._runs):
            if held <= self.budget:
                break
            other = self._runs[key]
            if other is run or other.rebuild is None:
                continue
            held -= other.release_model()
            del self._runs[key]
            self.released += 1

    def make_room(self, need: int) -> None:
        """Release the least recently used models until `need` more bytes fit in the budget (all of
        them if it never fits): training a run needs the memory more than idle models do."""
        held = self.held_bytes()
        for key in list(self._runs):
            if held + need <= self.budget:
                break
            run = self._runs[key]
            if run.rebuild is None:
                continue
            held -= run.release_model()
            del self._runs[key]
            self.released += 1

    def held_bytes(self) -> int:
        return sum(r.resident_bytes() for r in self._runs.values())
