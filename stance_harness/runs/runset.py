"""Runs that differ only in the training seed, as one arm: what `train(..., seeds=N)` returns.

Torch-free (it holds runs, it never builds one), so the plugin's `train` fixture imports it at load."""

from __future__ import annotations

import math

from stance_harness.core.errors import HarnessError


class RunSet(tuple):
    """Runs that differ only in the training seed (`train(..., seeds=N)`): a sequence of Run.

    Comparative checks take it as one arm, seeds as the unit of replication; single-run checks
    apply to each run (each must pass)."""

    def __new__(cls, runs):
        runs = tuple(runs)
        if not runs:
            raise HarnessError("a RunSet needs at least one run")
        return super().__new__(cls, runs)

    @property
    def label(self) -> str:
        return self[0].label

    @property
    def seeds(self) -> list:
        return [getattr(getattr(r, "recipe", None), "seed", i) for i, r in enumerate(self)]

    def __repr__(self) -> str:
        return f"RunSet({self.label!r}, seeds={self.seeds})"

    def each(self, measure) -> list:
        """`measure(run)` for each seed's run, in seed order."""
        return [measure(run) for run in self]

    def mean(self, measure) -> float:
        """The mean over seeds of `measure(run)` (a number per run): what a table shows for the arm."""
        values = [float(v) for v in self.each(measure)]
        return math.fsum(values) / len(values)


def runset(value) -> RunSet:
    """A RunSet from a RunSet, a list of runs (one per seed) or a single Run (one seed), so code that
    summarises an arm takes either."""
    return value if isinstance(value, RunSet) else RunSet(value if isinstance(value, (list, tuple)) else [value])
