"""Error rates of the replication engine's decisions, by simulation, and each procedure against a
known answer (scipy or a hand computation).

Under no effect the one-sided "supported" rate must stay at most 3.5% (nominal 2.5%). The
default tier uses REPLICATES replicates per case (Monte Carlo sd of a 2.5% rate:
sqrt(0.025·0.975/R) = 0.35 points at R = 2000); `-m slow` runs SLOW_REPLICATES (0.11 points).
Everything is vectorised over replicates: the engine's own test functions take replicate axes.
Run `python tests/test_error_rates.py` to print the table docs/statistics.md shows.
"""

import math

import numpy as np
import pytest
from scipy import stats

from stance_harness.analysis.replication import (CROSSED, RUN_LEVEL, ClaimError, PairingError, arm, block_means, compare,
                                          crossed_components, crossed_variance, flips_for, plan_claim,
                                          sign_flip_p, sign_flip_test)

LEVEL = 0.025
CEILING = 0.035
REPLICATES = 2000
SLOW_REPLICATES = 20000


def mc_sd(rate: float, replicates: int) -> float:
    return math.sqrt(max(rate, LEVEL) * (1 - max(rate, LEVEL)) / replicates)


# -- the simulated designs: each returns (rate "greater" supported, rate "less" supported) --------

def sign_flip_rates(d: np.ndarray) -> tuple[float, float]:
    flips, exact = flips_for(d.shape[1], np.random.default_rng(0))
    return (float((sign_flip_p(d, flips, exact) <= LEVEL).mean()),
            float((sign_flip_p(-d, flips, exact) <= LEVEL).mean()))


def crossed_rates(A: np.ndarray, B: np.ndarray, shift: float = 0.0) -> tuple[float, float]:
    v, df = crossed_variance(crossed_components(A, B))
    t = (A.mean(axis=(-2, -1)) - B.mean(axis=(-2, -1))) / np.sqrt(v)
    q = stats.t.ppf(1 - LEVEL, df)
    return float((t > q).mean()), float((t < -q).mean())


def ar1(rng, shape, n, phi):
    e = rng.normal(size=(*shape, n))
    x = np.empty_like(e)
    x[..., 0] = e[..., 0] / math.sqrt(1 - phi ** 2)
    for t in range(1, n):
        x[..., t] = phi * x[..., t - 1] + e[..., t]
    return x


def crossed_arms(rng, replicates, seeds, units, seed_sd, effect=0.0, interaction=0.5):
    """Seeds crossed with shared units: Y = unit + arm×unit + effect + seed + residual (sd 1)."""
    shared = rng.normal(size=(replicates, 1, units))

    def one(shift):
        return (shared + shift + interaction * rng.normal(size=(replicates, 1, units))
                + seed_sd * rng.normal(size=(replicates, seeds, 1)) + rng.normal(size=(replicates, seeds, units)))
    return one(effect), one(0.0)


def null_cases(replicates: int, seed: int = 1):
    """(name, rates) for every null design the issue lists."""
    rng = np.random.default_rng(seed)
    for n in (6, 8, 16, 32):
        yield f"one seed, normal, {n} units", sign_flip_rates(rng.normal(size=(replicates, n))
                                                              - rng.normal(size=(replicates, n)))
        sparse = rng.choice([-1.0, 0.0, 0.0, 0.0, 0.0, 1.0], size=(replicates, n))
        yield f"one seed, sparse +-1 (1 in 3 informative), {n} units", sign_flip_rates(sparse)
        skew_a, skew_b = (rng.lognormal(0, 1, (replicates, n)) - math.exp(0.5) for _ in range(2))
        yield f"one seed, lognormal - mean per arm, {n} units", sign_flip_rates(skew_a - skew_b)
    for seeds in (2, 3, 5, 8):
        for seed_sd in (0.0, 0.5, 1.0, 3.0):
            A, B = crossed_arms(rng, replicates, seeds, 8, seed_sd)
            yield f"{seeds} seeds x 8 shared units, seed sd {seed_sd:g}", crossed_rates(A, B)
    for n in (64, 100, 400):
        means, block, _ = block_means(ar1(rng, (replicates,), n, 0.5) - ar1(rng, (replicates,), n, 0.5))
        yield f"one seed, AR(1) phi 0.5 series of {n} steps, blocks of {block}", sign_flip_rates(means)
    A, B = (ar1(rng, (replicates, 3), 100, 0.5) for _ in range(2))
    yield "3 seeds, AR(1) phi 0.5 series of 100 steps, blocks of 12", crossed_rates(block_means(A)[0], block_means(B)[0])


def power_case(replicates: int, seed: int = 2) -> float:
    """+0.3 (unit sd 1) over 32 shared units and 5 seeds per arm, seed sd 0.25: the crossed test's power."""
    A, B = crossed_arms(np.random.default_rng(seed), replicates, 5, 32, 0.25, effect=0.3, interaction=0.0)
    return crossed_rates(A, B)[0]


def _check_nulls(replicates: int) -> None:
    failures = []
    for name, (up, down) in null_cases(replicates):
        for side, rate in (("greater", up), ("less", down)):
            if rate > CEILING:
                failures.append(f"{name}: '{side}' supported in {rate:.2%} of {replicates} null replicates "
                                f"(MC sd {mc_sd(rate, replicates):.2%}), above {CEILING:.1%}")
    assert not failures, "\n".join(failures)


def test_no_effect_is_rarely_supported():
    _check_nulls(REPLICATES)


@pytest.mark.slow
def test_no_effect_is_rarely_supported_long():
    _check_nulls(SLOW_REPLICATES)


def test_power_for_a_true_effect_over_seeds_and_units():
    power = power_case(REPLICATES)
    print(f"power for +0.3 sd over 32 units x 5 seeds per arm (seed sd 0.25): {power:.1%} of {REPLICATES}")
    floor = 0.15  # the design's normal-approximation power is about 0.24; well above the 2.5% null rate
    assert power > floor, f"power {power:.1%} over {REPLICATES} replicates is below the floor {floor:.0%}"


def test_iid_resampling_of_a_series_is_what_blocks_prevent():
    """The check can fail: sign flips over single AR(1) steps decide far too often."""
    rng = np.random.default_rng(3)
    d = ar1(rng, (REPLICATES,), 100, 0.5) - ar1(rng, (REPLICATES,), 100, 0.5)
    up, _ = sign_flip_rates(d)
    assert up > CEILING, f"step-wise sign flips on an AR(1) series gave only {up:.2%}"


def test_seed_means_alone_are_anticonservative_the_crossed_interval_is_not():
    """Dropping the unit variance (a t over seed means) decides too often with 8 seeds on shared units."""
    rng = np.random.default_rng(4)
    A, B = crossed_arms(rng, REPLICATES, 8, 8, 0.0, interaction=1.0)
    seed_means = A.mean(-1) - B.mean(-1)
    t = seed_means.mean(-1) / (seed_means.std(-1, ddof=1) / math.sqrt(8))
    naive = float((t > stats.t.ppf(1 - LEVEL, 7)).mean())
    assert naive > CEILING, f"the seed-means t decided in {naive:.2%}"
    assert crossed_rates(A, B)[0] <= CEILING


# -- known answers ---------------------------------------------------------------------------------

def test_exact_sign_flip_p_by_hand():
    d = np.array([1.0, 2.0, 3.0, -0.5, 4.0, 5.0])
    # flips whose sum reaches the observed 14.5: only those that flip nothing or only the -0.5 (sum 15.5)
    flips, exact = flips_for(6, np.random.default_rng(0))
    assert exact and flips.shape == (64, 6)
    assert sign_flip_p(d, flips, exact)[0] == pytest.approx(2 / 64)
    result = compare(arm("a", d), arm("b", np.zeros(6)), claim="greater")
    assert result.p_value == pytest.approx(2 / 64) and result.outcome == "inconclusive"  # 2/64 > 0.025
    assert result.method == "exact sign-flip" and result.scope == RUN_LEVEL
    assert result.explanation.startswith(RUN_LEVEL)


def test_sign_flip_interval_inverts_the_test():
    d = np.random.default_rng(5).normal(0.8, 1.0, 12)
    t = sign_flip_test(d, (0.0,), 0.95)
    flips, exact = flips_for(12, None)
    assert sign_flip_p(d - (t.low - 1e-6), flips, exact)[0] <= LEVEL < sign_flip_p(d - (t.low + 1e-6), flips, exact)[0]
    assert sign_flip_p(t.high + 1e-6 - d, flips, exact)[0] <= LEVEL < sign_flip_p(t.high - 1e-6 - d, flips, exact)[0]
    assert (t.p_greater[0.0] <= LEVEL) == (t.low > 0)


def test_sparse_units_follow_the_sign_test_not_bca():
    """The issue's case: 3 of 16 probes gain a marker, none loses one: exact p = 1/8, no verdict."""
    a = np.zeros(16)
    a[:3] = 1
    result = compare(arm("a", a), arm("b", np.zeros(16)), claim="greater", unit="probe")
    assert result.p_value == pytest.approx(stats.binomtest(3, 3, 0.5, alternative="greater").pvalue) == 0.125
    assert result.outcome == "inconclusive" and result.informative == 3
    assert "3 informative probes (non-zero differences) are too few" in result.explanation


def test_mcnemar_against_scipy_binomtest():
    rng = np.random.default_rng(6)
    a, b = (rng.random(200) < 0.7).astype(float), (rng.random(200) < 0.6).astype(float)
    up, down = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    result = compare(arm("a", a), arm("b", b), claim="greater", kind="binary", unit="prediction")
    assert result.method == "McNemar exact"
    assert result.p_value == pytest.approx(stats.binomtest(up, up + down, 0.5, alternative="greater").pvalue)
    ci = stats.binomtest(up, up + down).proportion_ci(0.95, method="exact")
    assert result.low == pytest.approx((2 * ci.low - 1) * (up + down) / 200)
    assert (result.outcome == "supported") == (result.p_value <= LEVEL) == (result.low > 0)


def test_crossed_interval_against_a_hand_anova_on_3x4():
    A = np.array([[1.0, 2.0, 3.0, 5.0], [2.0, 2.5, 4.0, 5.5], [0.5, 1.0, 3.5, 4.0]])
    B = np.array([[0.0, 1.5, 2.0, 4.0], [1.0, 1.0, 3.0, 4.5], [0.0, 2.0, 2.5, 3.0]])
    k, n = 3, 4
    d = A.mean(0) - B.mean(0)
    s2_d = sum((x - d.mean()) ** 2 for x in d) / (n - 1)
    terms, dfs = [s2_d / n], [n - 1]
    for X in (A, B):
        rows, cols, grand = X.mean(1), X.mean(0), X.mean()
        ms_seed = n * sum((r - grand) ** 2 for r in rows) / (k - 1)
        ms_resid = sum((X[i, j] - rows[i] - cols[j] + grand) ** 2 for i in range(k) for j in range(n)) / ((k - 1) * (n - 1))
        if ms_seed > ms_resid:
            terms += [ms_seed / (k * n), -ms_resid / (k * n)]
            dfs += [k - 1, (k - 1) * (n - 1)]
    v = sum(terms)
    df = v ** 2 / sum(t ** 2 / f for t, f in zip(terms, dfs))
    half = stats.t.ppf(0.975, df) * math.sqrt(v)
    result = compare(arm("a", A), arm("b", B), claim="greater")
    assert result.method == CROSSED and result.scope == "method-level"
    assert result.df == pytest.approx(df) and result.low == pytest.approx(A.mean() - B.mean() - half)
    assert result.high == pytest.approx(A.mean() - B.mean() + half)
    assert result.p_value == pytest.approx(stats.t.sf((A.mean() - B.mean()) / math.sqrt(v), df))
    assert "3 seeds per arm x 4 units" in result.explanation and RUN_LEVEL not in result.explanation


def test_tost_against_two_scipy_one_sided_t_tests():
    """With no seed variance left the crossed test of 2 seeds is a paired t over unit means: TOST's
    p is the larger of scipy's two one-sided t-tests at ±margin."""
    rng = np.random.default_rng(7)
    unit = rng.normal(0, 1, 20)
    A = unit + rng.normal(0.05, 0.3, 20) + np.array([[0.0], [0.0]])
    B = np.vstack([unit, unit])
    margin = 0.3
    d = A.mean(0) - B.mean(0)
    lower = stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    upper = stats.ttest_1samp(d, margin, alternative="less").pvalue
    result = compare(arm("a", A), arm("b", B), claim="equivalent", margin=margin)
    assert result.df == pytest.approx(19)
    assert result.p_value == pytest.approx(max(lower, upper))
    assert result.outcome == ("supported" if max(lower, upper) <= LEVEL else "inconclusive")
    far = compare(arm("a", A + 1.0), arm("b", B), claim="equivalent", margin=margin)
    assert far.outcome == "refuted"


def test_margins_enter_per_unit():
    rng = np.random.default_rng(8)
    b = rng.normal(2.0, 0.1, 12)
    a = 0.5 * b + rng.normal(0, 0.01, 12)
    # "a keeps more than 40% of b": tested on a − 0.4·b per unit
    kept = compare(arm("a", a), arm("b", b), claim="greater", factor=0.4)
    assert kept.outcome == "supported" and kept.estimate == pytest.approx(np.mean(a - 0.4 * b))
    assert compare(arm("a", a), arm("b", b), claim="greater", factor=0.6).outcome == "refuted"
    shifted = compare(arm("a", b + 0.05), arm("b", b), claim="greater", margin=0.1)
    assert shifted.outcome == "refuted" and shifted.p_value == 1.0


def test_non_inferiority_needs_a_margin():
    with pytest.raises(ClaimError, match="not_worse with margin 0 is a superiority test"):
        compare(arm("a", [1.0] * 8), arm("b", [1.0] * 8), claim="not_worse", better="higher")
    with pytest.raises(ClaimError, match="equivalent needs a margin > 0"):
        compare(arm("a", [1.0] * 8), arm("b", [1.0] * 8), claim="equivalent")
    with pytest.raises(ClaimError, match="claim must be one of greater, less, not_worse, equivalent"):
        compare(arm("a", [1.0] * 8), arm("b", [1.0] * 8), claim="bigger")


def test_pairing_is_by_id_and_a_mismatch_names_both_sides():
    a = arm("lora", [1.0, 2.0, 3.0], ids=["p1", "p2", "p3"])
    b = arm("full", [3.0, 1.0, 2.0], ids=["p3", "p1", "p2"])
    assert compare(a, b, claim="greater").estimate == 0.0  # reordered by id, not by position
    other = arm("full", [1.0, 2.0, 3.0], ids=["p1", "p2", "q9"])
    with pytest.raises(PairingError, match=r"lora and full were not measured on the same probes.*1 only in lora "
                                           r"\(first \['p3'\]\), 1 only in full \(first \['q9'\]\)"):
        compare(a, other, claim="greater", unit="probe")


def test_one_seed_against_several_is_refused():
    with pytest.raises(ClaimError, match="a has 1 seed"):
        compare(arm("a", np.ones((1, 8))), arm("b", np.ones((3, 8))), claim="greater")


def test_series_are_cut_into_blocks():
    x = np.arange(103, dtype=float)
    means, block, drop = block_means(x)
    assert block == 12 and drop == 7 and means.shape == (8,)
    assert means[0] == pytest.approx(x[7:19].mean())
    result = compare(arm("a", x + 1), arm("b", x), claim="greater", kind="series", unit="step")
    assert result.unit == "12-step block" and result.units == 8 and result.outcome == "supported"
    assert "autocorrelated" in result.note and "7 first steps dropped" in result.note
    short = compare(arm("a", x[:40] + 1), arm("b", x[:40]), claim="greater", kind="series", unit="step")
    assert short.units == 4 and short.outcome == "inconclusive"  # 4 blocks of 10: 2^-4 cannot reach 2.5%
    assert block_means(x[:3])[1:] == (3, 0)  # shorter than a block: one block, no verdict


def test_plan_claim_from_a_pilot():
    rng = np.random.default_rng(9)
    A, B = crossed_arms(rng, 1, 4, 24, 0.3, effect=0.0, interaction=0.2)
    plan = plan_claim(A[0], B[0], min_effect=0.5)
    c = plan.components
    se_needed = 0.5 / (stats.norm.ppf(0.975) + stats.norm.ppf(0.8))
    # enough seeds: the design's se meets the normal-approximation requirement
    k = plan.seeds_needed
    se = math.sqrt(c["unit_interaction"] / 24 + (c["seed_a"] + c["seed_b"]) / k + (c["resid_a"] + c["resid_b"]) / (k * 24))
    assert k is not None and se <= se_needed
    assert plan.units_needed[2] is None or plan.units_needed[2] >= 2
    assert f"{k} seeds per arm at the pilot's 24 units" in plan.explanation
    with pytest.raises(ClaimError, match="at least 2 seeds"):
        plan_claim(A[0][:1], B[0], min_effect=0.5)
    with pytest.raises(ClaimError, match="min_effect must be a number > 0"):
        plan_claim(A[0], B[0], min_effect=0)


if __name__ == "__main__":
    import sys

    replicates = int(sys.argv[1]) if len(sys.argv) > 1 else SLOW_REPLICATES
    print(f"| design (no effect) | 'greater' supported | 'less' supported |  ({replicates} replicates, "
          f"MC sd at 2.5%: {mc_sd(LEVEL, replicates):.2%})")
    for name, (up, down) in null_cases(replicates):
        print(f"| {name} | {up:.2%} | {down:.2%} |")
    # not asserted, shown as the documented limitation: sign flips test symmetry about the boundary,
    # so mean-zero but skewed unit differences (no exchangeable arms) decide too often on one side
    skewed = np.random.default_rng(5).lognormal(0, 1, (replicates, 16)) - math.exp(0.5)
    print("| (limitation) one seed, skewed differences lognormal - mean, 16 units | %.2f%% | %.2f%% |"
          % tuple(100 * r for r in sign_flip_rates(skewed)))
    print(f"power, +0.3 sd, 32 units x 5 seeds per arm (seed sd 0.25): {power_case(replicates):.1%}")
