"""Comparisons between runs on any paired metric: greater, less, not worse (non-inferiority) and
equivalent (TOST), paired by unit id, with seeds as the unit of replication.
"""

from __future__ import annotations

import statistics

from stance_harness.analysis import replication
from stance_harness.analysis.calibration import ece_of_items
from stance_harness.checks.common import _arm, _names, _runs, asserting, conclude, takes_runs
from stance_harness.core.metrics import HIGHER, direction_of
from stance_harness.core.registry import HarnessError
from stance_harness.core.results import CheckResult


_KIND = {"acc1": "binary", "step_time": "series"}  # how a metric's units are decided (see replication)
# With seeds, these compare one statistic per seed: ECE is a statistic of all predictions, and a
# seed's steps are not crossed with another seed's (other batches, another moment of a shared machine)
_PER_SEED_STATISTIC = {"ece": ece_of_items, "step_time": statistics.median}


def _compare(check: str, claim: str, a, b, metric: str, margin: float, confidence: float,
             better: str | None, factor: float = 1.0) -> CheckResult:
    """Decide `claim` about a − factor·b of `metric`, paired by unit id: one run per arm is a
    run-level claim; several seeds per arm, a claim about the methods (see analysis.replication)."""
    runs_a, runs_b = _runs(a), _runs(b)
    if not runs_a or not runs_b:
        raise HarnessError(f"{check}: give a run or a RunSet on each side; got {len(runs_a)} and {len(runs_b)} runs")
    name_a, name_b = _names(runs_a, runs_b)
    unit, ids, rows_a = _arm(runs_a, metric, name_a)
    _, ids_b, rows_b = _arm(runs_b, metric, name_b)
    where = replication.match_ids(ids, ids_b, name_a, name_b, unit)  # pairing by unit id, not position
    rows_b = [[row[j] for j in where] for row in rows_b]
    per_seed = _PER_SEED_STATISTIC.get(metric)
    if per_seed is not None and (len(runs_a) > 1 or len(runs_b) > 1):  # each seed's statistic is one unit
        found = replication.compare_statistics(name_a, [per_seed(r) for r in rows_a], name_b,
                                               [per_seed(r) for r in rows_b], claim=claim, margin=margin,
                                               better=better, factor=factor, confidence=confidence)
    elif metric == "ece":  # a statistic of all predictions, not a mean of per-prediction values
        found = replication.compare_paired_statistic(name_a, rows_a[0], name_b, rows_b[0], ece_of_items,
                                                     claim=claim, margin=margin, better=better, unit=unit,
                                                     confidence=confidence)
    else:
        found = replication.compare(replication.arm(name_a, rows_a, ids), replication.arm(name_b, rows_b, ids),
                                    claim=claim, margin=margin, better=better, factor=factor, unit=unit,
                                    kind=_KIND.get(metric, "continuous"), confidence=confidence)
    summary = f"{name_a} vs {name_b}, {metric} (a = {name_a}, b = {name_b}): {found.explanation}"
    if len(runs_a) == 1 and len(runs_b) == 1 and metric != "ece":
        rows = [[i, x, y, d] for i, (x, y, d) in enumerate(zip(rows_a[0], rows_b[0], found.differences))][:16]
    else:
        rows = [[f"{found.unit} {i}", "", "", d] for i, d in enumerate(found.differences)][:16]
    return conclude(runs_a + runs_b, CheckResult(
        check, found.outcome == "supported", summary, [unit, name_a, name_b, "a - b"], rows,
        {"metric": metric, "claim": claim, "margin": margin, "factor": factor, "estimate": found.estimate,
         "low": found.low, "high": found.high, "confidence": confidence, "n": found.units, "unit": found.unit,
         "informative": found.informative, "seeds_a": found.seeds_a, "seeds_b": found.seeds_b,
         "scope": found.scope, "method": found.method, "df": found.df, "p_value": found.p_value,
         "level": found.level, "rests_on": found.rests_on(), "note": found.note},
        verdict=found.outcome))


@takes_runs("a", "b", lists=True, paired=True)
def check_greater(a, b, metric: str = "behavior_shift", margin: float = 0.0, confidence: float = 0.95,
                  factor: float = 1.0) -> CheckResult:
    """`a`'s metric exceeds `factor` times `b`'s by more than `margin` (a − factor·b > margin, per
    unit), paired by unit id over the units both were measured on (probes, windows, predictions,
    steps; see Run.unit_values). `a`, `b`: a Run (a run-level claim: about two runs, not the
    methods) or a RunSet / list of runs, one per seed (a claim about the methods: seeds crossed
    with units). The verdict, p-value and interval come from one test (see docs/statistics.md)."""
    return _compare("assert_greater", "greater", a, b, metric, margin, confidence, None, factor)


@takes_runs("a", "b", lists=True, paired=True)
def check_less(a, b, metric: str = "forgetting", margin: float = 0.0, confidence: float = 0.95,
               factor: float = 1.0) -> CheckResult:
    """`a`'s metric falls below `factor` times `b`'s by more than `margin` (a − factor·b < −margin),
    paired as in check_greater."""
    return _compare("assert_less", "less", a, b, metric, margin, confidence, None, factor)


@takes_runs("a", "than", lists=True, paired=True)
def check_not_worse(a, than, metric: str = "ece", margin: float | None = None, confidence: float = 0.95) -> CheckResult:
    """Non-inferiority: `a` is worse than `than` by less than `margin` (> 0, declared), "worse" in
    the metric's own direction (a higher ECE, a lower behaviour shift), paired as in check_greater."""
    if margin is None:
        raise replication.ClaimError("assert_not_worse needs margin=: the largest loss you accept (> 0); "
                                     "with margin 0 it would be a superiority test")
    better = "higher" if direction_of(metric) == HIGHER else "lower"
    return _compare("assert_not_worse", "not_worse", a, than, metric, margin, confidence, better)


@takes_runs("a", "b", lists=True, paired=True)
def check_equivalent(a, b, metric: str = "behavior_shift", margin: float | None = None,
                     confidence: float = 0.95) -> CheckResult:
    """No shift: |a − b| < `margin` (> 0, declared), by two one-sided tests (TOST), paired as in
    check_greater. An interval that merely contains 0 is no evidence of "no shift"."""
    if margin is None:
        raise replication.ClaimError("assert_equivalent needs margin=: the largest difference that counts as none (> 0)")
    return _compare("assert_equivalent", "equivalent", a, b, metric, margin, confidence, None)


assert_greater = asserting(check_greater)
assert_less = asserting(check_less)
assert_not_worse = asserting(check_not_worse)
assert_equivalent = asserting(check_equivalent)
