"""Comparative claims over paired measurements: intervals, verdicts, power, multiplicity, rank agreement.

a and b are measured on the same units (probes, windows, examples); the difference is always
a − b, per unit. Intervals are scipy.stats.bootstrap BCa intervals of the mean difference
(percentile where BCa is non-finite, with the reason in `note`); p-values are sign-flip
permutation tests (scipy.stats.permutation_test, permutation_type="samples").

Claims and margins. `margin` is always a magnitude >= 0 in the metric's units; the claim gives
the sign. Each claim is a side of a boundary value of a − b:

    claim                          claim holds when     boundary   supported      refuted
    "greater"                      a − b > +margin      +margin    low  > +m      high <= +m
    "less"                         a − b < −margin      −margin    high < −m      low  >= −m
    "not_worse", better="higher"   a − b > −margin      −margin    low  > −m      high <= −m
    "not_worse", better="lower"    a − b < +margin      +margin    high < +m      low  >= +m

(low, high) is the two-sided `confidence` interval of a − b. Supported: the whole interval is
on the claim's side of the boundary. Refuted: the whole interval is on the other side, the
boundary included (a claim is strict, so an interval sitting on the boundary refutes it).
Anything else (the interval contains the boundary and reaches the claim's side) is inconclusive.
Worked examples:

    greater, margin 0.02 (a beats b by more than 0.02):
        [0.03, 0.09] supported; [-0.05, 0.01] refuted; [0.00, 0.06] inconclusive.
    less, margin 0.02 (a falls short of b by more than 0.02):
        [-0.09, -0.03] supported; [-0.01, 0.05] refuted; [-0.06, 0.00] inconclusive.
    not_worse, better="higher", margin 0.01 (accuracy: a loses at most 0.01 against b):
        [-0.005, 0.02] supported; [-0.04, -0.02] refuted; [-0.03, 0.01] inconclusive.
    not_worse, better="lower", margin 0.5 (perplexity: a is at most 0.5 above b):
        [-0.2, 0.3] supported; [0.6, 1.1] refuted; [0.1, 0.9] inconclusive.

With margin 0, not_worse is the same claim as greater (higher-better) or less (lower-better).
Swapping a and b turns "greater" into "less" at the same margin.

Degenerate data. When every unit difference equals v (one unit, or all equal), each resample
gives v, so the interval is exactly [v, v] (method "constant") and the rule above reads it as
it stands: all-zero differences refute "greater" at margin 0, since the data put a − b at 0,
which is not above 0. No verdict comes from fewer than `min_units` units: the smallest n with
2**-n <= (1 − confidence) / 2 (6 at 95%). Below that even the exact sign-flip test cannot reach
the level, and bootstrap intervals over so few units are too narrow; such verdicts are
inconclusive and say so.

Power. The verdict reads one end of the two-sided interval, so each claim is tested one-sided at
level (1 − confidence) / 2, and the power formulas use z_{1−α/2}, α = 1 − confidence, even for
one-sided claims: MDE = (z_{1−α/2} + z_{power}) · sd / √n is the smallest distance of the true
difference from the boundary detected with that power (normal approximation, sd of the unit
differences with ddof=1). It is reported as a figure only: no verdict message predicts how many
units "would settle it" from the same noisy estimate (post-hoc power); plan with
`stance_harness.analysis.replication.plan_claim` from a pilot instead.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

_MAX_DRAWS = 1 << 22  # resample-matrix elements per bootstrap batch (32 MiB of int64)
CLAIMS = ("greater", "less", "not_worse")
OUTCOMES = ("supported", "refuted", "inconclusive")


# -- bootstrap core --------------------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    """A bootstrap interval and how it was obtained."""

    low: float
    high: float
    method: str  # "bca", "percentile" or "constant"
    note: str = ""


def _check_args(confidence: float, resamples: int) -> None:
    if not (0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be an integer >= 1, got {resamples!r}")


def _vector(values, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} are empty: give at least one value")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return x


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def _bootstrap(data: tuple, statistic, *, paired: bool, confidence: float, resamples: int,
               seed: int) -> Interval:
    """BCa interval of `statistic` over `data`; percentile where BCa is non-finite.

    Resamples whose statistic is NaN (undefined, e.g. a rank correlation of a constant resample)
    are left out, and the interval is computed from the rest.
    """
    n = len(data[0])
    kwargs = dict(paired=paired, confidence_level=confidence, batch=max(1, _MAX_DRAWS // n))
    notes = []
    with warnings.catch_warnings():
        # a degenerate BCa warns (DegenerateDataWarning, 0/0); it is handled below by the fallback
        warnings.simplefilter("ignore")
        res = stats.bootstrap(data, statistic, n_resamples=resamples, method="BCa",
                              rng=np.random.default_rng(seed), **kwargs)
        dist = np.asarray(res.bootstrap_distribution)
        finite = np.isfinite(dist)
        if not finite.all():
            kept = int(finite.sum())
            if kept == 0:
                raise ValueError("the statistic is undefined on every bootstrap resample")
            notes.append(f"{dist.size - kept} of {dist.size} resamples left out: the statistic is undefined on them")
            res = stats.bootstrap(data, statistic, n_resamples=0, method="BCa", bootstrap_result=_Dist(dist[finite]),
                                  **kwargs)
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        method = "bca"
        if not (math.isfinite(low) and math.isfinite(high)):
            # BCa needs a finite bias correction and acceleration; tiny or tied samples can make
            # its jackknife constant (0/0) or put every resample on one side of the estimate
            notes.append("BCa interval is undefined for this sample (constant jackknife or one-sided "
                         "bootstrap distribution); percentile interval of the same resamples")
            res = stats.bootstrap(data, statistic, n_resamples=0, method="percentile",
                                  bootstrap_result=_Dist(dist[finite]), **kwargs)
            low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
            method = "percentile"
    return Interval(low, high, method, "; ".join(notes))


@dataclass
class _Dist:
    """A bootstrap distribution handed back to scipy.stats.bootstrap (its `bootstrap_result`)."""

    bootstrap_distribution: np.ndarray


def mean_interval(values, *, confidence: float = 0.95, resamples: int = 9999, seed: int = 0) -> Interval:
    """Bootstrap interval of the mean of `values`: BCa, percentile where BCa is non-finite.

    The same seed gives the same interval. One value, or all values equal, gives exactly (v, v).
    """
    _check_args(confidence, resamples)
    x = _vector(values, "values")
    if (x == x[0]).all():
        # every resample mean is v; return it exactly rather than v ± rounding
        v = float(x[0])
        return Interval(v, v, "constant", "all values are equal: every resample gives the same mean")
    return _bootstrap((x,), _mean, paired=False, confidence=confidence, resamples=resamples, seed=seed)


def _sign_flip_p(d: np.ndarray, alternative: str, resamples: int, seed: int) -> float:
    if d.size < 2:
        return 1.0  # a single unit carries no test
    if (d == 0).all():
        return 1.0  # every sign flip gives the observed 0
    res = stats.permutation_test((d,), _mean, permutation_type="samples", alternative=alternative,
                                 n_resamples=resamples, rng=np.random.default_rng(seed))
    return float(res.pvalue)


# -- paired differences ----------------------------------------------------------------------

@dataclass(frozen=True)
class PairedEffect:
    """Mean difference a − b over units, with its bootstrap interval and a sign-flip p-value.

    `differences` are the per-unit differences the interval resamples: per pair, or per cluster
    (the mean over its pairs) when clustered. `p_value` is two-sided, for H0 "the unit
    differences are symmetric about 0". `resamples` and `seed` are kept for `decide`.
    """

    estimate: float
    low: float
    high: float
    confidence: float
    n: int
    unit: str
    method: str
    p_value: float
    differences: tuple[float, ...]
    pairs: int
    cluster_ids: tuple | None
    resamples: int
    seed: int
    note: str = ""

    def as_dict(self) -> dict:
        out = asdict(self)
        out["differences"] = list(self.differences)
        if self.cluster_ids is not None:
            out["cluster_ids"] = [c if isinstance(c, (str, int, float, bool)) else str(c) for c in self.cluster_ids]
        return out


def _effect_of_units(d: np.ndarray, *, unit: str, pairs: int, cluster_ids, note: str, confidence: float,
                     resamples: int, seed: int) -> PairedEffect:
    if (d == d[0]).all():
        v = float(d[0])
        low = high = estimate = v
        method = "constant"
        note = "; ".join(filter(None, [note, f"every {unit} difference is {v:g}: the interval is [{v:g}, {v:g}]"]))
    else:
        iv = _bootstrap((d,), _mean, paired=False, confidence=confidence, resamples=resamples, seed=seed)
        estimate, low, high, method = float(np.mean(d)), iv.low, iv.high, iv.method
        note = "; ".join(filter(None, [note, iv.note]))
    return PairedEffect(
        estimate=estimate, low=low, high=high, confidence=confidence, n=int(d.size), unit=unit, method=method,
        p_value=_sign_flip_p(d, "two-sided", resamples, seed), differences=tuple(d.tolist()), pairs=pairs,
        cluster_ids=cluster_ids, resamples=resamples, seed=seed, note=note,
    )


def paired_difference(a, b, *, clusters: Sequence[Hashable] | None = None, unit: str = "pair",
                      cluster_unit: str = "cluster", confidence: float = 0.95, resamples: int = 9999,
                      seed: int = 0) -> PairedEffect:
    """Mean of a − b over paired units, with a bootstrap interval and a sign-flip p-value.

    Without `clusters` each pair is a unit (named `unit`, e.g. "probe"). With `clusters` (one id
    per pair, e.g. the seed under --repeat), clusters are the units (named `cluster_unit`): each
    contributes the mean of its pair differences, every cluster weighs the same, and n is the
    number of clusters. With one cluster there is no between-cluster spread to resample, so the
    pairs within it are the units, and `note` says so.
    """
    _check_args(confidence, resamples)
    x, y = _vector(a, "a"), _vector(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must be paired: same length, got {x.size} and {y.size}")
    d = x - y
    if clusters is None:
        return _effect_of_units(d, unit=unit, pairs=d.size, cluster_ids=None, note="", confidence=confidence,
                                resamples=resamples, seed=seed)
    ids = list(clusters)
    if len(ids) != d.size:
        raise ValueError(f"clusters must give one id per pair: {d.size} pairs, {len(ids)} ids")
    order = list(dict.fromkeys(ids))  # first appearance, so the result does not depend on hashing
    if len(order) < 2:
        note = (f"one {cluster_unit} ({order[0]!r}): {unit}s within it are the unit, "
                f"so the interval leaves out {cluster_unit}-to-{cluster_unit} variation")
        return _effect_of_units(d, unit=unit, pairs=d.size, cluster_ids=None, note=note, confidence=confidence,
                                resamples=resamples, seed=seed)
    index = {c: i for i, c in enumerate(order)}
    where = np.array([index[c] for c in ids])
    means = np.array([d[where == i].mean() for i in range(len(order))])
    return _effect_of_units(means, unit=cluster_unit, pairs=d.size, cluster_ids=tuple(order), note="",
                            confidence=confidence, resamples=resamples, seed=seed)


def paired_runs(runs_a: Sequence, runs_b: Sequence, *, unit: str = "probe", run_unit: str = "seed",
                confidence: float = 0.95, resamples: int = 9999, seed: int = 0) -> PairedEffect:
    """`paired_difference` over two groups of runs, runs as the clusters.

    runs_a[i] and runs_b[i] are per-unit values of run i (the same seed) on the same units;
    different runs may have different numbers of units.
    """
    if len(runs_a) != len(runs_b):
        raise ValueError(f"runs_a and runs_b must pair run by run, got {len(runs_a)} and {len(runs_b)} runs")
    if not runs_a:
        raise ValueError("runs are empty: give at least one run")
    a, b, ids = [], [], []
    for i, (ra, rb) in enumerate(zip(runs_a, runs_b)):
        ra, rb = _vector(ra, f"runs_a[{i}]"), _vector(rb, f"runs_b[{i}]")
        if ra.shape != rb.shape:
            raise ValueError(f"run {i}: a and b must be measured on the same units, got {ra.size} and {rb.size}")
        a.append(ra)
        b.append(rb)
        ids.extend([i] * ra.size)
    return paired_difference(np.concatenate(a), np.concatenate(b), clusters=ids, unit=unit, cluster_unit=run_unit,
                             confidence=confidence, resamples=resamples, seed=seed)


# -- verdicts --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """What the interval says about one claim (see the module docstring for the conventions).

    `p_value` is one-sided, for the claim against its boundary (sign flips of the differences
    minus the boundary); compare it with `level` = (1 − confidence) / 2, the level the interval
    verdict has. `mde` is the smallest detectable distance from the boundary (None with one
    unit), a figure of the data, not a plan.
    """

    outcome: str
    claim: str
    margin: float
    better: str | None
    boundary: float
    effect: PairedEffect
    p_value: float
    level: float
    power: float
    sd: float | None
    mde: float | None
    min_units: int
    explanation: str

    def as_dict(self) -> dict:
        out = asdict(self)
        out["effect"] = self.effect.as_dict()
        return out


def min_units(confidence: float) -> int:
    """Fewest units whose exact sign-flip test can reach one-sided level (1 − confidence) / 2."""
    level = (1 - confidence) / 2
    n = 1
    while 0.5 ** n > level * (1 + 1e-12):  # 1e-12: 2**-n equal to the level counts as reaching it
        n += 1
    return n


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"


def decide(effect: PairedEffect, *, claim: str, margin: float = 0.0, better: str | None = None,
           power: float = 0.8) -> Verdict:
    """Verdict on `claim` about a − b: "supported", "refuted" or "inconclusive".

    claim: "greater" (a − b > margin), "less" (a − b < −margin), or "not_worse" with
    better="higher" (a − b > −margin) or better="lower" (a − b < margin); margin >= 0.
    """
    if claim not in CLAIMS:
        raise ValueError(f"claim must be one of {', '.join(CLAIMS)}, got {claim!r}")
    if isinstance(margin, bool) or not (isinstance(margin, numbers.Real) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0 (the claim gives the sign), got {margin!r}")
    if claim == "not_worse":
        if better not in ("higher", "lower"):
            raise ValueError(f"not_worse needs better='higher' or better='lower', got {better!r}")
    elif better is not None:
        raise ValueError(f"better applies to not_worse only; {claim!r} already gives the direction")
    if not (0 < power < 1):
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    margin = float(margin)
    above = claim == "greater" or (claim == "not_worse" and better == "higher")
    boundary = margin if claim == "greater" or (claim == "not_worse" and better == "lower") else -margin
    boundary = boundary + 0.0  # -0.0 → 0.0, so the boundary prints as 0
    e = effect
    if above:
        side = "supported" if e.low > boundary else "refuted" if e.high <= boundary else "inconclusive"
    else:
        side = "supported" if e.high < boundary else "refuted" if e.low >= boundary else "inconclusive"

    d = np.asarray(e.differences, dtype=np.float64)
    p = _sign_flip_p(d - boundary, "greater" if above else "less", e.resamples, e.seed)
    alpha = 1 - e.confidence
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    sd = float(np.std(d, ddof=1)) if d.size >= 2 else None
    mde = z * sd / math.sqrt(d.size) if sd is not None else None
    need_units = min_units(e.confidence)
    too_few = e.n < need_units
    outcome = "inconclusive" if too_few else side


    pct = f"{e.confidence * 100:g}%"
    interval = f"the {pct} interval [{e.low:.3g}, {e.high:.3g}]"
    sign = ">" if above else "<"
    claim_text = f"a - b {sign} {boundary:g}"
    units = _plural(e.n, e.unit)
    if outcome == "supported":
        where = "above" if above else "below"
        text = f"supported: {interval} over {units} lies {where} {boundary:g} (claim {claim_text})"
    elif outcome == "refuted":
        where = "at or below" if above else "at or above"
        text = f"refuted: {interval} over {units} lies {where} {boundary:g} (claim {claim_text})"
    else:
        if too_few:
            reading = {"supported": "would support it", "refuted": "would refute it",
                       "inconclusive": "straddles the boundary"}[side]
            verb = "is" if e.n == 1 else "are"
            parts = [f"inconclusive: {units} {verb} too few for a verdict at {pct} (at least {need_units} needed); "
                     f"{interval} {reading} (claim {claim_text})"]
        else:
            parts = [f"inconclusive: {interval} straddles {boundary:g}, the boundary of the claim {claim_text}"]
        text = "; ".join(parts)
    return Verdict(outcome=outcome, claim=claim, margin=margin, better=better, boundary=boundary, effect=e,
                   p_value=p, level=alpha / 2, power=power, sd=sd, mde=mde,
                   min_units=need_units, explanation=text)


# -- statistics that are not a mean of unit differences ---------------------------------------

def _jackknife_pseudo_values(statistic, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """n·θ − (n − 1)·θ₋ᵢ per paired item, θ = statistic(a) − statistic(b): their mean estimates θ,
    and their spread gives the standard error, so `decide` can plan with them like differences."""
    n = len(a)
    theta = statistic(a) - statistic(b)
    keep = np.ones(n, dtype=bool)
    out = np.empty(n)
    for i in range(n):
        keep[i] = False
        out[i] = n * theta - (n - 1) * (statistic(a[keep]) - statistic(b[keep]))
        keep[i] = True
    return out


def paired_statistic_difference(a, b, statistic, *, unit: str = "item", confidence: float = 0.95,
                                resamples: int = 9999, seed: int = 0) -> PairedEffect:
    """statistic(a) − statistic(b) over paired items (rows of `a` and `b`, e.g. one prediction's
    confidence and correctness), for a statistic that is not a mean of per-item values (ECE).

    The interval is a BCa bootstrap that resamples items in pairs; `differences` are jackknife
    pseudo-values (their mean is the estimate to first order), which `p_value` (a sign-flip test)
    and `decide` (its p-value and power figures) read as the per-item differences."""
    _check_args(confidence, resamples)
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim < 1 or len(x) == 0:
        raise ValueError(f"a and b must be paired items of one shape, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("a and b must be finite (no NaN or inf)")
    n = len(x)
    estimate = float(statistic(x) - statistic(y))
    index = np.arange(n)

    def difference(i, axis=-1):
        i = np.asarray(i, dtype=int)
        return statistic(x[i]) - statistic(y[i])

    pseudo = _jackknife_pseudo_values(statistic, x, y)
    if n < 2 or np.allclose(pseudo, pseudo[0], rtol=0, atol=0):
        low = high = estimate
        method, note = "constant", f"every {unit} contributes alike: the interval is [{estimate:g}, {estimate:g}]"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.bootstrap((index,), difference, vectorized=False, n_resamples=resamples, method="BCa",
                                  confidence_level=confidence, rng=np.random.default_rng(seed))
        low, high, method, note = float(res.confidence_interval.low), float(res.confidence_interval.high), "bca", ""
        if not (math.isfinite(low) and math.isfinite(high)):
            dist = np.asarray(res.bootstrap_distribution)
            q = (1 - confidence) / 2
            low, high = (float(v) for v in np.quantile(dist[np.isfinite(dist)], [q, 1 - q]))
            method, note = "percentile", "BCa was not finite for these data; percentile interval of the same resamples"
    return PairedEffect(estimate=estimate, low=low, high=high, confidence=confidence, n=n, unit=unit, method=method,
                        p_value=_sign_flip_p(pseudo, "two-sided", resamples, seed), differences=tuple(pseudo.tolist()),
                        pairs=n, cluster_ids=None,
                        resamples=resamples, seed=seed, note=note)


# -- multiplicity ----------------------------------------------------------------------------

def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values, in the input order (monotone, capped at 1)."""
    p = np.asarray(list(p_values), dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p_values must be 1-D, got shape {p.shape}")
    if not (np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()):
        raise ValueError("p_values must be numbers in [0, 1]")
    m = p.size
    order = np.argsort(p, kind="stable")
    # the i-th smallest p (0-based) is multiplied by m − i; the running max keeps the step-down monotone
    stepped = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = stepped
    return out.tolist()


@dataclass(frozen=True)
class CorrectedClaim:
    """One claim's p-value before and after Holm's correction, against `alpha`."""

    name: str
    p_value: float
    p_holm: float
    alpha: float
    holds_before: bool  # p <= alpha
    holds_after: bool  # Holm-adjusted p <= alpha

    @property
    def only_before_correction(self) -> bool:
        return self.holds_before and not self.holds_after


def correct_claims(p_values: Mapping[str, float], *, alpha: float = 0.05) -> dict[str, CorrectedClaim]:
    """Holm-correct named claims' p-values; marks claims that hold only before the correction.

    For `Verdict.p_value`s, pass alpha = the verdicts' `level`, the level their intervals decide at.
    """
    if not (0 < alpha < 1):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    names = list(p_values)
    adjusted = holm([p_values[k] for k in names])
    return {k: CorrectedClaim(k, float(p_values[k]), q, alpha, bool(p_values[k] <= alpha), bool(q <= alpha))
            for k, q in zip(names, adjusted)}


# -- rank agreement of two profiles ----------------------------------------------------------

@dataclass(frozen=True)
class RankCorrelation:
    """Spearman's rho of two profiles with a bootstrap interval over paired units."""

    rho: float
    low: float
    high: float
    confidence: float
    n: int
    method: str
    p_value: float  # scipy.stats.spearmanr's two-sided p-value (t approximation)
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _spearman(x, y, axis=-1):
    # vectorised spearmanr: Pearson's r of average ranks; NaN for a constant resample
    rx, ry = stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (rx * ry).sum(axis=axis) / np.sqrt((rx * rx).sum(axis=axis) * (ry * ry).sum(axis=axis))
    return np.clip(r, -1.0, 1.0)  # rounding can land a perfect agreement at 1 + 1 ulp


def spearman_with_interval(x, y, *, confidence: float = 0.95, resamples: int = 9999, seed: int = 0) -> RankCorrelation:
    """Spearman's rho of x and y (scipy.stats.spearmanr), bootstrap interval over paired units.

    Resamples with a constant profile have no rank correlation and are left out (see `note`).
    """
    _check_args(confidence, resamples)
    xv, yv = _vector(x, "x"), _vector(y, "y")
    if xv.shape != yv.shape:
        raise ValueError(f"x and y must be paired: same length, got {xv.size} and {yv.size}")
    if xv.size < 3:
        raise ValueError(f"a rank correlation needs at least 3 units, got {xv.size}")
    if (xv == xv[0]).all() or (yv == yv[0]).all():
        raise ValueError("x or y is constant: the rank correlation is undefined")
    res = stats.spearmanr(xv, yv)
    iv = _bootstrap((xv, yv), _spearman, paired=True, confidence=confidence, resamples=resamples, seed=seed)
    return RankCorrelation(rho=float(res.statistic), low=iv.low, high=iv.high, confidence=confidence, n=int(xv.size),
                           method=iv.method, p_value=float(res.pvalue), note=iv.note)
