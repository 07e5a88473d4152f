"""Comparative claims about methods: seeds as the unit of replication, units paired by identity.

Each arm is a (seeds × units) matrix of per-unit values, with one id per unit; the arms pair by
unit id (`pair_arms`), never by position alone. The difference is a − factor·b per unit, and a
claim is one side of a boundary (the margin enters per unit, see `boundary_of`):

    claim                          holds when              test (one-sided, level (1 − confidence)/2)
    "greater"                      a − f·b > +m            H0: mean ≤ +m
    "less"                         a − f·b < −m            H0: mean ≥ −m
    "not_worse", better="higher"   a − f·b > −m, m > 0     H0: mean ≤ −m   (non-inferiority)
    "not_worse", better="lower"    a − f·b < +m, m > 0     H0: mean ≥ +m
    "equivalent"                   −m < a − f·b < +m       both one-sided tests (TOST), m > 0

One procedure gives the verdict, the p-value and the interval (the interval inverts the test):

- two or more seeds per arm ("crossed"): seeds crossed with shared units. The variance of the
  difference of grand means is estimated from the two-way (seed × unit) ANOVA of each arm and the
  unit-level differences of the seed means:
      V = s²_d / n + Σ_arm max(MS_seed − MS_resid, 0) / (k · n)
  (s²_d: variance over units of the seed-averaged differences, carrying the unit × arm and the
  residual variance; MS_seed − MS_resid: n times the seed variance of the arm), with Satterthwaite
  degrees of freedom, and a t test / t interval. Claims are about the methods.
- one seed per arm ("run-level"): a claim about two runs, not about the methods. Decided over
  units with an exact sign-flip test of the mean (all 2^n flips for n ≤ EXACT_MAX units, else
  MONTE_CARLO_FLIPS random flips, whose Monte Carlo error is given); its interval inverts the same
  test. Paired 0/1 outcomes (kind "binary") at margin 0, factor 1 use McNemar's exact test
  (binomial on the discordant pairs) with the matching Clopper-Pearson interval.
- series (kind "series": step times): autocorrelated, so never resampled step by step; each
  series is cut into non-overlapping blocks whose means are the units (block means of a
  stationary series are nearly independent), then decided as above.

Only informative units (a non-zero difference from the boundary) can move a sign-flip test; a
verdict needs at least `min_informative` of them (6 at 95%: 2^-6 < 0.025).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy import stats

from stance_harness.core.errors import HarnessError

CLAIMS = ("greater", "less", "not_worse", "equivalent")
KINDS = ("continuous", "binary", "series")
EXACT_MAX = 16  # units up to which every sign flip is enumerated (65,536 flips)
MONTE_CARLO_FLIPS = 19_999
RUN_LEVEL = "run-level (one seed per arm): a claim about two runs, not about the methods"
SERIES_BLOCKS, MIN_BLOCK = 8, 10  # a series becomes up to 8 block means, each over at least 10 steps
CROSSED = "crossed seed x unit ANOVA, Satterthwaite t"


class PairingError(HarnessError):
    """Two arms were not measured on the same units."""


class ClaimError(HarnessError):
    """A claim that cannot be tested as asked (an unknown claim, a margin it cannot take)."""


def unit_id(*parts) -> str:
    """A short stable id for a unit from what identifies it (probe text, window offset, ...)."""
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()[:12]


# -- arms and pairing --------------------------------------------------------------------------

@dataclass(frozen=True)
class Arm:
    """Per-unit values of one arm: `values[s, u]` for seed s and unit `ids[u]`."""

    name: str
    values: np.ndarray
    ids: tuple

    @property
    def seeds(self) -> int:
        return int(self.values.shape[0])


def arm(name: str, values, ids: Sequence[Hashable] | None = None) -> Arm:
    """An arm from a 1-D vector (one seed) or a (seeds × units) matrix; ids default to positions
    (use them only where position is identity, as in constructed data)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.size == 0:
        raise HarnessError(f"arm {name!r}: values must be a non-empty vector or (seeds x units) matrix, "
                           f"got shape {x.shape}")
    if not np.isfinite(x).all():
        raise HarnessError(f"arm {name!r}: values must be finite (no NaN or inf)")
    ids = tuple(range(x.shape[1])) if ids is None else tuple(ids)
    if len(ids) != x.shape[1]:
        raise HarnessError(f"arm {name!r}: {len(ids)} unit ids for {x.shape[1]} units")
    if len(set(ids)) != len(ids):
        raise HarnessError(f"arm {name!r}: unit ids repeat; each unit needs its own id")
    return Arm(name, x, ids)


def match_ids(ids_a: Sequence, ids_b: Sequence, name_a: str, name_b: str, unit: str = "unit") -> list[int]:
    """For each of a's unit ids, its position among b's; a mismatch is refused, naming both sides."""
    if tuple(ids_a) == tuple(ids_b):
        return list(range(len(ids_a)))
    set_a, set_b = set(ids_a), set(ids_b)
    only_a = [i for i in ids_a if i not in set_b]
    only_b = [i for i in ids_b if i not in set_a]
    if only_a or only_b or len(ids_a) != len(ids_b):
        raise PairingError(
            f"{name_a} and {name_b} were not measured on the same {unit}s, so they cannot be paired: "
            f"{len(ids_a)} {unit}s of {name_a}, {len(ids_b)} of {name_b}; {len(only_a)} only in {name_a} "
            f"(first {only_a[:1]}), {len(only_b)} only in {name_b} (first {only_b[:1]})")
    where = {u: j for j, u in enumerate(ids_b)}
    return [where[u] for u in ids_a]


def pair_arms(a: Arm, b: Arm, unit: str = "unit") -> tuple[np.ndarray, np.ndarray, tuple]:
    """(A, B, ids): b's columns reordered to a's unit ids. A mismatch is refused, naming both sides."""
    return a.values, b.values[:, match_ids(a.ids, b.ids, a.name, b.name, unit)], a.ids


# -- the claim's boundary ------------------------------------------------------------------------

def boundary_of(claim: str, margin: float, better: str | None) -> tuple[float, ...]:
    """The boundary value(s) of mean(a − f·b) the claim is tested against (see the module table)."""
    if claim not in CLAIMS:
        raise ClaimError(f"claim must be one of {', '.join(CLAIMS)}, got {claim!r}")
    if isinstance(margin, bool) or not (isinstance(margin, numbers.Real) and math.isfinite(margin) and margin >= 0):
        raise ClaimError(f"margin must be a finite number >= 0 (the claim gives the sign), got {margin!r}")
    if claim == "not_worse":
        if better not in ("higher", "lower"):
            raise ClaimError(f"not_worse needs better='higher' or better='lower', got {better!r}")
        if margin == 0:
            raise ClaimError("not_worse with margin 0 is a superiority test, not non-inferiority: declare the "
                             "largest loss you accept as margin > 0 (or claim 'greater'/'less')")
    elif better is not None:
        raise ClaimError(f"better applies to not_worse only; {claim!r} already gives the direction")
    if claim == "equivalent":
        if margin == 0:
            raise ClaimError("equivalent needs a margin > 0: no data show a difference of exactly 0")
        return (-float(margin), float(margin))
    m = float(margin)
    return ((m if claim == "greater" or better == "lower" else -m) + 0.0,)


def _above(claim: str, better: str | None) -> bool:
    return claim == "greater" or (claim == "not_worse" and better == "higher")


def min_informative(confidence: float) -> int:
    """Fewest informative units whose exact sign-flip test can reach level (1 − confidence) / 2."""
    level = (1 - confidence) / 2
    return max(1, math.ceil(math.log2(1 / level) - 1e-12))


# -- one-sided tests: p for "mean > δ" (greater) at each boundary δ ----------------------------

def flips_for(n: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """(±1 matrix, exact): every flip of n units for n ≤ EXACT_MAX, else MONTE_CARLO_FLIPS random ones."""
    if n <= EXACT_MAX:
        bits = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1
        return (1 - 2 * bits).astype(np.float64), True
    return rng.choice(np.array([-1.0, 1.0]), size=(MONTE_CARLO_FLIPS, n)), False


def sign_flip_p(x: np.ndarray, flips: np.ndarray, exact: bool) -> np.ndarray:
    """One-sided p for H1 mean > 0 of each row of `x` (replicates × units), by sign flips.

    Exact: the share of all flips whose sum reaches the observed one (the identity included).
    Monte Carlo: (1 + count) / (1 + draws), a valid p-value for random flips."""
    x = np.atleast_2d(x)
    observed = x.sum(axis=1)
    scale = np.abs(x).sum(axis=1) * 1e-12  # ties within rounding count as reaching the observed sum
    out = np.empty(x.shape[0])
    step = max(1, (1 << 22) // flips.shape[0])
    for i in range(0, x.shape[0], step):
        sums = x[i:i + step] @ flips.T
        count = (sums >= (observed[i:i + step] - scale[i:i + step])[:, None]).sum(axis=1)
        out[i:i + step] = count / flips.shape[0] if exact else (1 + count) / (1 + flips.shape[0])
    return out


def _invert(p_at, level: float, lo: float, hi: float, increasing: bool) -> float:
    """The δ where p_at(δ) crosses `level` (bisection; p_at is monotone in δ)."""
    for _ in range(60):
        mid = (lo + hi) / 2
        if (p_at(mid) <= level) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class Tested:
    """One procedure's estimate, interval, and one-sided p-values at boundaries."""

    estimate: float
    low: float
    high: float
    p_greater: dict  # δ -> p for H1 mean > δ
    p_less: dict  # δ -> p for H1 mean < δ
    method: str
    df: float | None = None
    se: float | None = None
    note: str = ""
    components: dict = field(default_factory=dict)


def sign_flip_test(d: np.ndarray, boundaries: Sequence[float], confidence: float, seed: int = 0) -> Tested:
    """Exact (or Monte Carlo) sign-flip test of the mean of unit differences `d` at each boundary,
    and the interval that inverts it."""
    level = (1 - confidence) / 2
    rng = np.random.default_rng(seed)
    flips, exact = flips_for(d.size, rng)

    def p_greater(delta):
        return float(sign_flip_p((d - delta)[None, :], flips, exact)[0])

    def p_less(delta):
        return float(sign_flip_p((delta - d)[None, :], flips, exact)[0])

    span = float(d.max() - d.min()) or max(1.0, abs(float(d.max())))
    lo_end, hi_end = float(d.min()) - span, float(d.max()) + span
    # the lower bound: the largest δ that "mean > δ" still rejects; none if even far below the data it cannot
    low = _invert(p_greater, level, lo_end, hi_end, True) if p_greater(lo_end) <= level else -math.inf
    high = _invert(p_less, level, lo_end, hi_end, False) if p_less(hi_end) <= level else math.inf
    # bisection leaves rounding where the bound is a data value (0 with zero differences)
    low, high = (0.0 if math.isfinite(v) and abs(v) < 1e-9 * span else v for v in (low, high))
    method = "exact sign-flip" if exact else f"sign-flip, {MONTE_CARLO_FLIPS} random flips"
    pg = {b: p_greater(b) for b in boundaries}
    pl = {b: p_less(b) for b in boundaries}
    note = ""
    if not exact:
        note = f"Monte Carlo p-values: error about ±{math.sqrt(level * (1 - level) / MONTE_CARLO_FLIPS):.4f} at the level"
    return Tested(float(d.mean()), low, high, pg, pl, method, note=note)


def mcnemar_test(a: np.ndarray, b: np.ndarray, confidence: float) -> Tested:
    """McNemar's exact test for paired 0/1 outcomes: binomial on the discordant pairs, with the
    Clopper-Pearson interval of their split carried to the difference of proportions."""
    n = a.size
    up, down = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    disc = up + down
    estimate = (up - down) / n
    if disc == 0:
        return Tested(estimate, -math.inf, math.inf, {0.0: 1.0}, {0.0: 1.0}, "McNemar exact",
                      note="no discordant pair: nothing to decide on")
    test = stats.binomtest(up, disc, 0.5, alternative="greater")
    # two-sided Clopper-Pearson: each end is the one-sided exact bound at (1 − confidence)/2
    ci = stats.binomtest(up, disc, 0.5).proportion_ci(confidence_level=confidence, method="exact")
    p_less = stats.binomtest(up, disc, 0.5, alternative="less").pvalue
    return Tested(estimate, (2 * ci.low - 1) * disc / n, (2 * ci.high - 1) * disc / n, {0.0: float(test.pvalue)},
                  {0.0: float(p_less)}, "McNemar exact", note=f"{up} pairs gained, {down} lost")


def crossed_components(A: np.ndarray, B: np.ndarray) -> dict:
    """Mean squares of the crossed design, vectorised over leading axes: A (..., ka, n), B (..., kb, n).

    s2_d: variance over units of the seed-averaged differences (df n − 1); per arm, ms_seed
    (df k − 1) and ms_resid (df (k − 1)(n − 1)) of its two-way seed × unit table."""
    n = A.shape[-1]
    d = A.mean(axis=-2) - B.mean(axis=-2)
    out = {"n": n, "s2_d": d.var(axis=-1, ddof=1)}
    for name, X in (("a", A), ("b", B)):
        k = X.shape[-2]
        row = X.mean(axis=-1, keepdims=True)
        col = X.mean(axis=-2, keepdims=True)
        grand = X.mean(axis=(-2, -1), keepdims=True)
        out[f"k_{name}"] = k
        out[f"ms_seed_{name}"] = n * ((row - grand) ** 2).sum(axis=(-2, -1)) / (k - 1)
        out[f"ms_resid_{name}"] = ((X - row - col + grand) ** 2).sum(axis=(-2, -1)) / ((k - 1) * (n - 1))
    return out


def crossed_variance(c: dict) -> tuple[np.ndarray, np.ndarray]:
    """(variance of the difference of grand means, Satterthwaite df) from `crossed_components`.

    V = s2_d/n + Σ max(ms_seed − ms_resid, 0)/(k n); df = V² / Σ (c_i M_i)² / df_i over the terms used."""
    n = c["n"]
    terms = [(c["s2_d"] / n, np.full_like(c["s2_d"], n - 1.0))]
    for name in ("a", "b"):
        k = c[f"k_{name}"]
        excess = c[f"ms_seed_{name}"] - c[f"ms_resid_{name}"]
        keep = excess > 0  # a negative seed variance estimate is 0: drop both mean squares
        terms.append((np.where(keep, c[f"ms_seed_{name}"] / (k * n), 0.0), np.full_like(excess, k - 1.0)))
        terms.append((np.where(keep, -c[f"ms_resid_{name}"] / (k * n), 0.0), np.full_like(excess, (k - 1.0) * (n - 1))))
    v = sum(t for t, _ in terms)
    denom = sum(t ** 2 / f for t, f in terms)
    with np.errstate(invalid="ignore", divide="ignore"):
        df = np.where(denom > 0, v ** 2 / np.where(denom > 0, denom, 1.0), np.inf)
    return v, df


def crossed_test(A: np.ndarray, B: np.ndarray, boundaries: Sequence[float], confidence: float) -> Tested:
    """t test and interval of mean(A) − mean(B), seeds crossed with shared units (see the module)."""
    level = (1 - confidence) / 2
    c = crossed_components(A, B)
    v, df = crossed_variance(c)
    v, df = float(v), float(df)
    estimate = float(A.mean() - B.mean())
    comps = {k: (float(x) if not isinstance(x, int) else x) for k, x in c.items()}
    if v <= 0:
        # every unit difference and every seed mean agree: nothing varies, so nothing is estimated
        pg = {b: 0.0 if estimate > b else 1.0 for b in boundaries}
        pl = {b: 0.0 if estimate < b else 1.0 for b in boundaries}
        return Tested(estimate, estimate, estimate, pg, pl, CROSSED, df=df, se=0.0,
                      note="no variation between seeds or units", components=comps)
    se = math.sqrt(v)
    q = float(stats.t.ppf(1 - level, df))
    pg = {b: float(stats.t.sf((estimate - b) / se, df)) for b in boundaries}
    pl = {b: float(stats.t.cdf((estimate - b) / se, df)) for b in boundaries}
    return Tested(estimate, estimate - q * se, estimate + q * se, pg, pl, CROSSED, df=df, se=se, components=comps)


def block_means(x: np.ndarray, block: int | None = None) -> tuple[np.ndarray, int, int]:
    """(block means along the last axis, block length, steps dropped at the start).

    By default 8 blocks of at least MIN_BLOCK steps (simulated: AR(1) with phi 0.5 stays within
    the error ceiling from blocks of 10; blocks of 8 came within 0.1 point of it); shorter series give fewer blocks, too few to decide
    (a series shorter than MIN_BLOCK is one block). The remainder is dropped from the start
    (warm-up steps)."""
    n = x.shape[-1]
    block = block or max(1, min(n, max(MIN_BLOCK, n // SERIES_BLOCKS)))
    blocks = n // block
    if blocks < 1:
        raise HarnessError(f"a series of {n} steps is shorter than one block of {block}")
    drop = n - blocks * block
    return x[..., drop:].reshape(*x.shape[:-1], blocks, block).mean(axis=-1), block, drop


# -- the verdict ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """A claim about a − factor·b decided by one procedure: its verdict, p-value and interval."""

    outcome: str
    claim: str
    margin: float
    factor: float
    better: str | None
    boundaries: tuple
    estimate: float
    low: float
    high: float
    confidence: float
    p_value: float  # one-sided, at the claim's boundary (TOST: the larger of the two)
    level: float
    method: str
    scope: str  # "method-level" or RUN_LEVEL
    seeds_a: int
    seeds_b: int
    units: int
    informative: int
    unit: str
    df: float | None
    explanation: str
    note: str = ""
    differences: tuple = ()

    @property
    def run_level(self) -> bool:
        return self.scope != "method-level"

    def as_dict(self) -> dict:
        out = asdict(self)
        out["differences"] = list(self.differences)
        return out

    def rests_on(self) -> str:
        """What the verdict rests on, in one phrase."""
        seeds = f"{self.seeds_a} seed{'s' if self.seeds_a != 1 else ''} per arm" if self.seeds_a == self.seeds_b \
            else f"{self.seeds_a} and {self.seeds_b} seeds"
        df = f", df {self.df:.3g}" if self.df is not None and math.isfinite(self.df) else ""
        return (f"{seeds} x {self.units} {self.unit}{'s' if self.units != 1 else ''} ({self.informative} informative), {self.method}{df}, "
                f"one-sided p = {self.p_value:.3g}")


def _fmt(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else ("-inf" if x < 0 else "inf")


def compare(a: Arm, b: Arm, *, claim: str, margin: float = 0.0, better: str | None = None, factor: float = 1.0,
            unit: str = "unit", kind: str = "continuous", confidence: float = 0.95, seed: int = 0) -> Comparison:
    """Decide `claim` about a − factor·b (see the module docstring for the procedures)."""
    if kind not in KINDS:
        raise ClaimError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not (0 < confidence < 1):
        raise ClaimError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(factor, bool) or not (isinstance(factor, numbers.Real) and math.isfinite(factor)):
        raise ClaimError(f"factor must be a finite number, got {factor!r}")
    boundaries = boundary_of(claim, margin, better)
    A, B, ids = pair_arms(a, b, unit)
    B = factor * B
    ka, kb = A.shape[0], B.shape[0]
    if (ka == 1) != (kb == 1):
        raise ClaimError(f"{a.name} has {ka} seed(s) and {b.name} {kb}: give one run per arm (a run-level claim) "
                         f"or at least 2 seeds per arm (the seed variance of an arm with one seed is unknown)")
    note, shown_unit = "", unit
    if kind == "series":
        A, block, drop = block_means(A)
        B, _, _ = block_means(B)
        shown_unit = f"{block}-{unit} block"  # pluralises as "4 10-step blocks"
        note = f"{unit}s are autocorrelated: means of non-overlapping blocks of {block} are the units" + (
            f" ({drop} first {unit}s dropped)" if drop else "")
    n = A.shape[1]
    scope = "method-level" if ka > 1 else RUN_LEVEL
    if ka > 1:
        if n < 2:
            raise ClaimError(f"a crossed interval needs at least 2 {unit}s, got {n}")
        tested = crossed_test(A, B, boundaries, confidence)
        d = A.mean(axis=0) - B.mean(axis=0)
    else:
        d = A[0] - B[0]
        binary = kind == "binary" and factor == 1 and boundaries == (0.0,) and np.isin(A, (0, 1)).all() \
            and np.isin(B, (0, 1)).all()
        tested = mcnemar_test(A[0], B[0], confidence) if binary else sign_flip_test(d, boundaries, confidence, seed)
    informative = int(min(np.count_nonzero(d - bd) for bd in boundaries))
    return _verdict(tested, claim, margin, better, factor, boundaries, confidence, scope, ka, kb, n, informative,
                    shown_unit, d, note)


def _verdict(tested: Tested, claim, margin, better, factor, boundaries, confidence, scope, ka, kb, n, informative,
             shown_unit, d, note) -> Comparison:
    """The outcome from the one-sided p-value(s) at the boundary, and its explanation."""
    level = (1 - confidence) / 2
    need = min_informative(confidence)
    few = ka == 1 and informative < need

    if claim == "equivalent":
        lo_b, hi_b = boundaries
        p = max(tested.p_greater[lo_b], tested.p_less[hi_b])
        supported = p <= level
        refuted = tested.p_greater[hi_b] <= level or tested.p_less[lo_b] <= level
    else:
        (bd,) = boundaries
        up = _above(claim, better)
        p = tested.p_greater[bd] if up else tested.p_less[bd]
        supported = p <= level
        refuted = (tested.p_less[bd] if up else tested.p_greater[bd]) <= level
    outcome = "supported" if supported and not few else "refuted" if refuted and not few else "inconclusive"

    pct = f"{confidence * 100:g}%"
    lhs = "a - b" if factor == 1 else f"a - {factor:g}*b"
    if claim == "equivalent":
        claim_text = f"|{lhs}| < {boundaries[1]:g}"
    else:
        claim_text = f"{lhs} {'>' if _above(claim, better) else '<'} {boundaries[0]:g}"
    interval = f"{lhs} = {tested.estimate:.3g}, {pct} interval [{_fmt(tested.low)}, {_fmt(tested.high)}]"
    if few:
        head = (f"inconclusive: {informative} informative {shown_unit}{'s' if informative != 1 else ''} (non-zero differences) are too few for a "
                f"verdict at {pct} (at least {need} needed)")
    elif outcome == "inconclusive":
        head = f"inconclusive: the data neither support nor refute {claim_text}"
    else:
        head = f"{outcome}: claim {claim_text}"
    comparison = Comparison(
        outcome=outcome, claim=claim, margin=float(margin), factor=float(factor), better=better,
        boundaries=boundaries, estimate=tested.estimate, low=tested.low, high=tested.high, confidence=confidence,
        p_value=float(p), level=level, method=tested.method, scope=scope, seeds_a=ka, seeds_b=kb, units=n,
        informative=informative, unit=shown_unit, df=tested.df, explanation="",
        note="; ".join(filter(None, [note, tested.note])), differences=tuple(np.asarray(d).tolist()))
    text = f"{head}; {interval}; {comparison.rests_on()}"
    if scope != "method-level":
        text = f"{RUN_LEVEL}. {text}"
    return replace(comparison, explanation=text)


def compare_statistics(name_a: str, values_a: Sequence[float], name_b: str, values_b: Sequence[float], *,
                       claim: str, margin: float = 0.0, better: str | None = None, factor: float = 1.0,
                       confidence: float = 0.95) -> Comparison:
    """A claim about a statistic of each run that is no mean of units (ECE): one value per seed,
    which carries its own unit sampling; Welch's t over seeds (at least 2 per arm)."""
    boundaries = boundary_of(claim, margin, better)
    x, y = np.asarray(values_a, dtype=np.float64), factor * np.asarray(values_b, dtype=np.float64)
    if x.size < 2 or y.size < 2:
        raise ClaimError(f"a per-run statistic needs at least 2 seeds per arm; got {x.size} and {y.size}")
    level = (1 - confidence) / 2
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    v = va + vb
    estimate = float(x.mean() - y.mean())
    if v == 0:
        pg = {bd: 0.0 if estimate > bd else 1.0 for bd in boundaries}
        pl = {bd: 0.0 if estimate < bd else 1.0 for bd in boundaries}
        low = high = estimate
        df = math.inf
    else:
        df = v ** 2 / (va ** 2 / (x.size - 1) + vb ** 2 / (y.size - 1))
        se = math.sqrt(v)
        pg = {bd: float(stats.t.sf((estimate - bd) / se, df)) for bd in boundaries}
        pl = {bd: float(stats.t.cdf((estimate - bd) / se, df)) for bd in boundaries}
        q = float(stats.t.ppf(1 - level, df))
        low, high = estimate - q * se, estimate + q * se
    tested = Tested(estimate, low, high, pg, pl, "Welch t over per-seed values", df=df)
    return _verdict(tested, claim, margin, better, factor, boundaries, confidence, "method-level", x.size, y.size,
                    1, x.size + y.size, "statistic per run", np.concatenate([x, -y]), "")


SWAPS = 1999


def compare_paired_statistic(name_a: str, items_a, name_b: str, items_b, statistic, *, claim: str,
                             margin: float = 0.0, better: str | None = None, unit: str = "item",
                             confidence: float = 0.95, seed: int = 0) -> Comparison:
    """A run-level claim about statistic(a) − statistic(b) (ECE: no mean of units), paired items
    as rows: a randomization test that swaps each item's pair between the arms (the sign flip of a
    statistic), SWAPS random swaps; p at boundary δ counts swapped differences reaching the observed
    one minus δ, and the interval inverts it."""
    boundaries = boundary_of(claim, margin, better)
    x, y = np.asarray(items_a, dtype=np.float64), np.asarray(items_b, dtype=np.float64)
    if x.shape != y.shape or x.ndim < 1 or len(x) == 0:
        raise PairingError(f"{name_a} and {name_b} must be paired items of one shape, got {x.shape} and {y.shape}")
    level = (1 - confidence) / 2
    observed = float(statistic(x) - statistic(y))
    rng = np.random.default_rng(seed)
    swapped = np.empty(SWAPS)
    for i in range(SWAPS):
        mask = (rng.random(len(x)) < 0.5).reshape((-1,) + (1,) * (x.ndim - 1))
        swapped[i] = statistic(np.where(mask, y, x)) - statistic(np.where(mask, x, y))
    tol = 1e-12 * max(1.0, abs(observed))
    pg = {bd: (1 + int((swapped >= observed - bd - tol).sum())) / (1 + SWAPS) for bd in boundaries}
    pl = {bd: (1 + int((swapped <= observed - bd + tol).sum())) / (1 + SWAPS) for bd in boundaries}
    c = math.floor(level * (1 + SWAPS) - 1)  # swapped values allowed beyond the observed at the level
    ordered = np.sort(swapped)
    low = observed - ordered[-(c + 1)] if c >= 0 else -math.inf
    high = observed - ordered[c] if c >= 0 else math.inf
    tested = Tested(observed, float(low), float(high), pg, pl, f"paired-swap randomization, {SWAPS} swaps",
                    note=f"Monte Carlo p-values: error about ±{math.sqrt(level * (1 - level) / SWAPS):.4f} at the level")
    rows = x.reshape(len(x), -1), y.reshape(len(y), -1)
    informative = int((rows[0] != rows[1]).any(axis=1).sum())
    return _verdict(tested, claim, margin, better, 1.0, boundaries, confidence, RUN_LEVEL, 1, 1, len(x), informative,
                    unit, np.empty(0), "")


# -- design ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """How many seeds per arm and units a claim needs (from a pilot's variance components)."""

    min_effect: float
    power: float
    confidence: float
    units: int  # the pilot's unit count
    seeds_needed: int | None  # at the pilot's unit count; None: not within max_seeds
    units_needed: dict  # seeds per arm -> units needed (None: seed variance alone is too large)
    components: dict
    explanation: str


def _crossed_power_se(comp: dict, k: int, n: int) -> tuple[float, float]:
    """(se, Satterthwaite df) for k seeds per arm and n units, from variance components."""
    e_a, e_b = comp["resid_a"], comp["resid_b"]
    c = {"n": n, "k_a": k, "k_b": k, "s2_d": np.float64(comp["unit_interaction"] + e_a / k + e_b / k),
         "ms_seed_a": np.float64(n * comp["seed_a"] + e_a), "ms_resid_a": np.float64(e_a),
         "ms_seed_b": np.float64(n * comp["seed_b"] + e_b), "ms_resid_b": np.float64(e_b)}
    v, df = crossed_variance(c)
    return math.sqrt(float(v)), float(df)


def plan_claim(pilot_a, pilot_b, min_effect: float, power: float = 0.8, confidence: float = 0.95,
               max_seeds: int = 50, seed_counts: Sequence[int] = (2, 3, 5, 8, 10, 20)) -> Plan:
    """Seeds per arm and units needed to detect a true difference `min_effect` from the boundary
    with `power`, by the crossed t test at one-sided level (1 − confidence)/2.

    pilot_a, pilot_b: (seeds × units) matrices, at least 2 seeds each, the same units in the same
    order. Power: the t test's, with the Satterthwaite df the design would have (normal
    shift approximation: (t_{1−level,df} + t_{power,df})·se ≤ min_effect)."""
    if not (isinstance(min_effect, numbers.Real) and math.isfinite(min_effect) and min_effect > 0):
        raise ClaimError(f"min_effect must be a number > 0 (the smallest difference worth detecting), got {min_effect!r}")
    if not (0 < power < 1):
        raise ClaimError(f"power must be in (0, 1), got {power!r}")
    A, B = np.asarray(pilot_a, dtype=np.float64), np.asarray(pilot_b, dtype=np.float64)
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] < 2 or B.shape[0] < 2 or A.shape[1] != B.shape[1] or A.shape[1] < 2:
        raise ClaimError(f"a pilot needs (seeds x units) matrices with at least 2 seeds and 2 units on each arm, "
                         f"on the same units; got shapes {A.shape} and {B.shape}")
    c = crossed_components(A, B)
    n = A.shape[1]
    comp = {"resid_a": float(c["ms_resid_a"]), "resid_b": float(c["ms_resid_b"]),
            "seed_a": max(0.0, float(c["ms_seed_a"] - c["ms_resid_a"]) / n),
            "seed_b": max(0.0, float(c["ms_seed_b"] - c["ms_resid_b"]) / n)}
    comp["unit_interaction"] = max(0.0, float(c["s2_d"]) - comp["resid_a"] / A.shape[0] - comp["resid_b"] / B.shape[0])
    level = (1 - confidence) / 2

    def detects(k: int, units: int) -> bool:
        se, df = _crossed_power_se(comp, k, units)
        if se == 0:
            return True
        return (stats.t.ppf(1 - level, df) + stats.t.ppf(power, df)) * se <= min_effect

    seeds_needed = next((k for k in range(2, max_seeds + 1) if detects(k, n)), None)
    units_needed = {}
    for k in seed_counts:
        # seeds alone bound the se from below: no unit count beats (seed_a + seed_b)/k
        if not detects(k, 10 ** 7):
            units_needed[k] = None
            continue
        lo, hi = 2, 2
        while not detects(k, hi):
            hi *= 2
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if not detects(k, mid) else (lo, mid)
        units_needed[k] = lo
    shown = ", ".join(f"{k} seeds: {u if u is not None else 'no unit count'}" for k, u in units_needed.items())
    head = (f"to detect {min_effect:g} with {power:.0%} power at {confidence:.0%}: "
            + (f"{seeds_needed} seeds per arm at the pilot's {n} units" if seeds_needed is not None
               else f"more than {max_seeds} seeds per arm at the pilot's {n} units"))
    text = (f"{head}; units needed per seed count ({shown}); variance components: unit x arm "
            f"{comp['unit_interaction']:.3g}, seed {comp['seed_a']:.3g} and {comp['seed_b']:.3g}, residual "
            f"{comp['resid_a']:.3g} and {comp['resid_b']:.3g}")
    return Plan(float(min_effect), power, confidence, n, seeds_needed, units_needed, comp, text)
