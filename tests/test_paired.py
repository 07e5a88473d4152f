"""Paired comparisons against references: scipy.stats.bootstrap / permutation_test / spearmanr, hand computation."""

import json
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from stance_harness.analysis.paired import (
    PairedEffect,
    correct_claims,
    decide,
    holm,
    mean_interval,
    min_units,
    paired_difference,
    paired_runs,
    spearman_with_interval,
)

R = 2000  # resamples: enough for stable intervals, small enough to keep the file fast
Z_975, Z_80 = 1.959963984540054, 0.8416212335729143  # normal quantiles from the table


def _reference(d, confidence=0.95, seed=0, method="BCa"):
    res = stats.bootstrap((np.asarray(d, dtype=float),), np.mean, n_resamples=R, method=method,
                          confidence_level=confidence, rng=np.random.default_rng(seed))
    return res.confidence_interval.low, res.confidence_interval.high


def _noise(n, seed):
    return np.random.default_rng(seed).normal(size=n)


# -- intervals and p-values against scipy ----------------------------------------------------

def test_paired_interval_and_p_value_are_scipy_bca_and_sign_flips_of_the_differences():
    a = _noise(15, 1) + 0.3
    b = _noise(15, 2)
    effect = paired_difference(a, b, unit="probe", resamples=R, seed=3)
    d = a - b
    assert effect.method == "bca" and effect.note == ""
    assert (effect.low, effect.high) == _reference(d, seed=3)
    assert effect.estimate == pytest.approx(d.mean(), abs=1e-15)
    assert effect.differences == tuple(d.tolist()) and effect.n == effect.pairs == 15 and effect.unit == "probe"
    p = stats.permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples",
                               n_resamples=R, rng=np.random.default_rng(3)).pvalue
    assert effect.p_value == pytest.approx(p)


def test_mean_interval_matches_scipy_at_another_confidence():
    x = _noise(12, 4)
    iv = mean_interval(x, confidence=0.9, resamples=R, seed=7)
    assert (iv.low, iv.high) == _reference(x, confidence=0.9, seed=7) and iv.method == "bca"
    assert mean_interval([2.5] * 4).low == mean_interval([2.5]).high == 2.5


def test_clusters_are_the_units_and_the_interval_resamples_cluster_means():
    # 4 seeds with unequal numbers of probes: every seed weighs the same, not every probe
    sizes = {"s0": 3, "s1": 5, "s2": 4, "s3": 6}
    ids = [s for s, k in sizes.items() for _ in range(k)]
    a = _noise(len(ids), 5) + np.repeat([0.1, 0.4, 0.2, 0.3], list(sizes.values()))
    b = _noise(len(ids), 6) * 0.1
    effect = paired_difference(a, b, clusters=ids, cluster_unit="seed", resamples=R, seed=2)
    d = a - b
    means = [d[np.array(ids) == s].mean() for s in sizes]
    assert effect.n == 4 and effect.pairs == 18 and effect.unit == "seed" and effect.cluster_ids == tuple(sizes)
    assert effect.differences == pytest.approx(means, abs=1e-15)
    assert effect.estimate == pytest.approx(np.mean(means))
    assert (effect.low, effect.high) == _reference(np.array(effect.differences), seed=2)


def test_one_cluster_falls_back_to_pairs_and_says_so():
    a, b = _noise(10, 7), _noise(10, 8)
    effect = paired_difference(a, b, clusters=["seed0"] * 10, unit="probe", cluster_unit="seed", resamples=R)
    assert effect.n == 10 and effect.unit == "probe" and effect.cluster_ids is None
    assert "one seed" in effect.note and "seed-to-seed" in effect.note
    assert (effect.low, effect.high) == (paired_difference(a, b, unit="probe", resamples=R).low,
                                         paired_difference(a, b, unit="probe", resamples=R).high)


def test_paired_runs_is_paired_difference_with_runs_as_clusters():
    runs_a = [_noise(5, 10), _noise(7, 11), _noise(6, 12)]
    runs_b = [_noise(5, 20), _noise(7, 21), _noise(6, 22)]
    effect = paired_runs(runs_a, runs_b, resamples=R, seed=1)
    ids = [i for i, r in enumerate(runs_a) for _ in r]
    ref = paired_difference(np.concatenate(runs_a), np.concatenate(runs_b), clusters=ids, unit="probe",
                            cluster_unit="seed", resamples=R, seed=1)
    assert effect == ref and effect.n == 3 and effect.unit == "seed"
    with pytest.raises(ValueError, match="same units"):
        paired_runs([[1.0, 2.0]], [[1.0]])


def test_as_dict_is_json_ready():
    effect = paired_difference([1.0, 2.0, 3.5], [0.5, 2.5, 1.0], clusters=[0, 0, 1], resamples=R)
    verdict = decide(effect, claim="greater")
    data = json.loads(json.dumps(verdict.as_dict()))
    assert data["effect"]["differences"] == list(effect.differences) and data["effect"]["cluster_ids"] == [0, 1]
    assert data["outcome"] == verdict.outcome and data["boundary"] == 0.0


# -- verdicts ----------------------------------------------------------------------------------

def _effect(low, high, estimate=None, n=20):
    """A PairedEffect with the given interval, for reading the convention table directly."""
    estimate = (low + high) / 2 if estimate is None else estimate
    d = estimate + np.linspace(-1, 1, n) * (high - low)
    return PairedEffect(estimate=estimate, low=low, high=high, confidence=0.95, n=n, unit="probe", method="bca",
                        p_value=1.0, differences=tuple(d.tolist()), pairs=n, cluster_ids=None, resamples=R, seed=0)


@pytest.mark.parametrize("claim, margin, better, interval, outcome", [
    # the module docstring's worked examples, one row each
    ("greater", 0.02, None, (0.03, 0.09), "supported"),
    ("greater", 0.02, None, (-0.05, 0.01), "refuted"),
    ("greater", 0.02, None, (0.00, 0.06), "inconclusive"),
    ("less", 0.02, None, (-0.09, -0.03), "supported"),
    ("less", 0.02, None, (-0.01, 0.05), "refuted"),
    ("less", 0.02, None, (-0.06, 0.00), "inconclusive"),
    ("not_worse", 0.01, "higher", (-0.005, 0.02), "supported"),
    ("not_worse", 0.01, "higher", (-0.04, -0.02), "refuted"),
    ("not_worse", 0.01, "higher", (-0.03, 0.01), "inconclusive"),
    ("not_worse", 0.5, "lower", (-0.2, 0.3), "supported"),
    ("not_worse", 0.5, "lower", (0.6, 1.1), "refuted"),
    ("not_worse", 0.5, "lower", (0.1, 0.9), "inconclusive"),
    # an interval that ends on the boundary: a strict claim is refuted from below, open from above
    ("greater", 0.0, None, (-0.1, 0.0), "refuted"),
    ("greater", 0.0, None, (0.0, 0.1), "inconclusive"),
])
def test_the_documented_convention(claim, margin, better, interval, outcome):
    verdict = decide(_effect(*interval), claim=claim, margin=margin, better=better)
    assert verdict.outcome == outcome
    assert verdict.explanation.startswith(outcome)


CLEAR = 0.5 + 0.1 * _noise(20, 30)  # differences far above 0
NOISY = _noise(20, 31) - _noise(20, 31).mean() + 0.05  # sd 1 around 0.05: every boundary near 0 is inside

CASES = [  # (claim, margin, better) -> outcome for CLEAR, -CLEAR, NOISY
    ("greater", 0.0, None, "supported", "refuted", "inconclusive"),
    ("less", 0.0, None, "refuted", "supported", "inconclusive"),
    ("not_worse", 0.1, "higher", "supported", "refuted", "inconclusive"),
    ("not_worse", 0.1, "lower", "refuted", "supported", "inconclusive"),
]


@pytest.mark.parametrize("claim, margin, better, clear, opposite, noisy", CASES)
def test_verdicts_on_constructed_differences(claim, margin, better, clear, opposite, noisy):
    base = np.zeros(20)
    for d, outcome in ((CLEAR, clear), (-CLEAR, opposite), (NOISY, noisy)):
        effect = paired_difference(base + d, base, unit="probe", resamples=R)
        verdict = decide(effect, claim=claim, margin=margin, better=better)
        assert verdict.outcome == outcome, verdict.explanation
        # the one-sided p-value agrees with a clear interval verdict
        if outcome == "supported":
            assert verdict.p_value <= verdict.level
        if outcome == "refuted":
            assert verdict.p_value > 0.5


def test_all_zero_differences_sit_on_the_boundary():
    # [0, 0] exactly: a − b is 0, which is not > 0 (nor < 0), and is within any non-inferiority margin
    effect = paired_difference([0.3] * 20, [0.3] * 20, unit="probe", resamples=R)
    assert (effect.estimate, effect.low, effect.high, effect.method) == (0.0, 0.0, 0.0, "constant")
    assert effect.p_value == 1.0
    assert decide(effect, claim="greater").outcome == "refuted"
    assert decide(effect, claim="less").outcome == "refuted"
    assert decide(effect, claim="not_worse", margin=0.01, better="higher").outcome == "supported"
    assert decide(effect, claim="not_worse", margin=0.01, better="lower").outcome == "supported"


def test_too_few_units_give_no_verdict():
    assert [min_units(c) for c in (0.9, 0.95, 0.99)] == [5, 6, 8]  # 2**-n <= (1 - c) / 2
    effect = paired_difference([1.0, 1.1, 0.9, 1.2, 1.05], [0.0] * 5, unit="seed", resamples=R)
    verdict = decide(effect, claim="greater")
    assert effect.low > 0  # the interval alone would support the claim
    assert verdict.outcome == "inconclusive"
    assert "5 seeds are too few" in verdict.explanation and "would support it" in verdict.explanation
    single = decide(paired_difference([1.0], [0.0]), claim="greater")
    assert single.outcome == "inconclusive" and single.mde is None and "1 pair is too few" in single.explanation


def test_mde_by_hand_and_no_post_hoc_power_in_the_message():
    s = np.array([-1.0, 1.0] * 8) * math.sqrt(15 / 16)  # sd (ddof=1) exactly 1, mean exactly 0
    effect = paired_difference(0.015 + 0.08 * s, np.zeros(16), unit="probe", resamples=R)
    verdict = decide(effect, claim="greater")
    assert verdict.outcome == "inconclusive"
    z = Z_975 + Z_80
    assert verdict.sd == pytest.approx(0.08, rel=1e-12)
    assert verdict.mde == pytest.approx(z * 0.08 / 4, rel=1e-12)  # 0.0560
    assert not hasattr(verdict, "n_needed")
    assert verdict.explanation == (f"inconclusive: the 95% interval [{effect.low:.3g}, {effect.high:.3g}] "
                                   "straddles 0, the boundary of the claim a - b > 0")
    # at 90%: z_{0.95} = 1.6448536269514722
    at90 = decide(paired_difference(0.015 + 0.08 * s, np.zeros(16), confidence=0.9, resamples=R), claim="greater")
    assert at90.mde == pytest.approx((1.6448536269514722 + Z_80) * 0.08 / 4, rel=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(claim="bigger"), "claim must be one of"),
    (dict(claim="greater", margin=-0.1), "margin must be a finite number >= 0"),
    (dict(claim="not_worse", margin=0.1), "better='higher' or better='lower'"),
    (dict(claim="less", better="lower"), "better applies to not_worse only"),
])
def test_decide_rejects_ambiguous_claims(kwargs, message):
    with pytest.raises(ValueError, match=message):
        decide(_effect(0.1, 0.2), **kwargs)


@pytest.mark.parametrize("args, kwargs, message", [
    (([1.0, 2.0], [1.0]), {}, "same length"),
    (([1.0, 2.0], [1.0, 2.0]), dict(clusters=[0]), "one id per pair"),
    (([1.0, math.nan], [1.0, 2.0]), {}, "finite"),
    (([], []), {}, "empty"),
    (([1.0, 2.0], [1.0, 2.0]), dict(confidence=1.0), r"confidence must be in \(0, 1\)"),
])
def test_paired_difference_rejects_bad_input(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_difference(*args, **kwargs)


# -- Holm -----------------------------------------------------------------------------------

def test_holm_by_hand():
    p = [0.01, 0.04, 0.03, 0.005, 0.20]
    # sorted: 0.005·5 = 0.025, 0.01·4 = 0.04, 0.03·3 = 0.09, 0.04·2 = 0.08 → 0.09 (monotone), 0.20·1 = 0.20
    assert holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.20])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # 0.5·2 = 1.0 caps at 1; then max(1.0, 0.6)
    assert holm([]) == [] and holm([0.03]) == [0.03]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.1, 1.5])


def test_claims_that_hold_only_before_the_correction():
    claims = correct_claims({"kl": 0.01, "loglik": 0.04, "rank": 0.03, "drift": 0.005, "ece": 0.20}, alpha=0.05)
    assert list(claims) == ["kl", "loglik", "rank", "drift", "ece"]
    assert {k for k, c in claims.items() if c.holds_before} == {"kl", "loglik", "rank", "drift"}
    assert {k for k, c in claims.items() if c.holds_after} == {"kl", "drift"}
    assert {k for k, c in claims.items() if c.only_before_correction} == {"loglik", "rank"}
    assert claims["rank"].p_holm == pytest.approx(0.09)


# -- rank correlation -----------------------------------------------------------------------

def test_spearman_matches_scipy_and_a_direct_bootstrap():
    x = _noise(12, 40)
    y = x + _noise(12, 41)
    rc = spearman_with_interval(x, y, resamples=999, seed=4)
    assert rc.rho == stats.spearmanr(x, y).statistic and rc.method == "bca" and rc.n == 12
    assert rc.p_value == stats.spearmanr(x, y).pvalue
    ref = stats.bootstrap((x, y), lambda u, v: stats.spearmanr(u, v).statistic, paired=True, vectorized=False,
                          n_resamples=999, rng=np.random.default_rng(4))
    assert rc.low == pytest.approx(ref.confidence_interval.low, abs=1e-9)
    assert rc.high == pytest.approx(ref.confidence_interval.high, abs=1e-9)
    assert rc.low < rc.rho < rc.high


def test_spearman_with_ties_and_a_perfect_profile():
    x = [1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 8.0]
    y = [0.1, 0.3, 0.2, 0.2, 0.9, 0.4, 0.5]
    assert spearman_with_interval(x, y, resamples=R).rho == pytest.approx(stats.spearmanr(x, y).statistic)
    # identical profiles: every jackknife rho is 1, so BCa is undefined; constant resamples have no rho
    rc = spearman_with_interval([1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 6.0, 8.0, 10.0], resamples=R)
    assert rc.rho == pytest.approx(1.0) and (rc.low, rc.high) == (1.0, 1.0) and rc.method == "percentile"
    assert "resamples left out" in rc.note and "BCa interval is undefined" in rc.note
    with pytest.raises(ValueError, match="constant"):
        spearman_with_interval([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])


# -- properties -----------------------------------------------------------------------------

pairs = st.lists(st.tuples(st.floats(-10, 10), st.floats(-10, 10)), min_size=6, max_size=20)


@settings(max_examples=30, deadline=None)
@given(pairs)
def test_interval_contains_the_estimate(data):
    a, b = zip(*data)
    d = np.subtract(a, b)
    assume(np.ptp(d) > 1e-6)  # non-degenerate: not all differences (nearly) equal
    effect = paired_difference(a, b, resamples=999)
    assert effect.method in ("bca", "percentile")
    assert effect.low <= effect.estimate <= effect.high


@settings(max_examples=30, deadline=None)
@given(pairs, st.sampled_from([0.0, 0.5]))
def test_swapping_a_and_b_negates_and_flips(data, margin):
    a, b = zip(*data)
    ab = paired_difference(a, b, resamples=999)
    ba = paired_difference(b, a, resamples=999)
    assert ba.estimate == -ab.estimate
    assert ba.low == pytest.approx(-ab.high, abs=1e-9) and ba.high == pytest.approx(-ab.low, abs=1e-9)
    assert decide(ba, claim="less", margin=margin).outcome == decide(ab, claim="greater", margin=margin).outcome
    assert decide(ba, claim="greater", margin=margin).outcome == decide(ab, claim="less", margin=margin).outcome


@settings(max_examples=15, deadline=None)
@given(pairs, st.integers(0, 2**32 - 1))
def test_verdicts_are_deterministic_for_a_seed(data, seed):
    a, b = zip(*data)
    first = decide(paired_difference(a, b, resamples=999, seed=seed), claim="not_worse", margin=0.1, better="higher")
    again = decide(paired_difference(a, b, resamples=999, seed=seed), claim="not_worse", margin=0.1, better="higher")
    assert first == again
