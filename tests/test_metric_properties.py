"""Properties of the metrics that must hold on any input: bounds, zeros, invariances, monotonicity."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.functional.classification import multiclass_calibration_error

from stance_harness.analysis.behavior import kl_divergence
from stance_harness.analysis.calibration import calibration
from stance_harness.analysis.concentration import block_shares, shares
from stance_harness.analysis.deltas import MatrixDelta, aggregate, delta_moments, delta_table
from stance_harness.analysis.rank import energy_rank, stable_rank
from stance_harness.models.anatomy import ARCHITECTURES, Anatomy

FAST = settings(max_examples=50, deadline=None)


@st.composite
def probs_and_labels(draw):
    """[N, C] probability rows from random non-negative weights, and labels in [0, C)."""
    num_classes = draw(st.integers(2, 6))
    n = draw(st.integers(1, 30))
    weights = draw(st.lists(
        st.lists(st.floats(0, 100, allow_subnormal=False), min_size=num_classes, max_size=num_classes)
        .filter(lambda row: sum(row) > 1e-3),
        min_size=n, max_size=n,
    ))
    labels = draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n))
    w = torch.tensor(weights, dtype=torch.float64)
    return w / w.sum(dim=1, keepdim=True), torch.tensor(labels)


@FAST
@given(probs_and_labels(), st.integers(1, 20))
def test_ece_is_in_unit_interval_and_at_most_mce(data, n_bins):
    probs, labels = data
    got = calibration(probs, labels, n_bins=n_bins)
    assert 0 <= got.ece <= 1
    assert got.ece <= got.mce + 1e-12  # ECE is a count-weighted mean of the per-bin gaps MCE maxes
    assert 0 <= got.brier <= 2 and 0 <= got.acc1 <= 1
    assert sum(b.count for b in got.bins) == got.n


@FAST
@given(probs_and_labels())
def test_ece_and_mce_agree_with_torchmetrics_on_any_rows(data):
    probs, labels = data
    got = calibration(probs, labels)
    kw = dict(num_classes=probs.shape[1], n_bins=15)
    assert got.ece == pytest.approx(multiclass_calibration_error(probs, labels, norm="l1", **kw).item(), abs=1e-6)
    assert got.mce == pytest.approx(multiclass_calibration_error(probs, labels, norm="max", **kw).item(), abs=1e-6)


@st.composite
def calibrated_group(draw):
    """(k, j): k samples at confidence j/k in (0.5, 1], j of them right."""
    k = draw(st.integers(1, 9))
    j = draw(st.integers(k // 2 + 1, k))
    return k, j


@FAST
@given(st.lists(calibrated_group(), min_size=1, max_size=8), st.integers(1, 20))
def test_ece_is_zero_when_each_confidence_is_its_hit_rate(groups, n_bins):
    rows, labels = [], []
    for k, j in groups:
        c = j / k
        rows += [[c, 1 - c]] * k
        labels += [0] * j + [1] * (k - j)  # class 0 is the prediction: j right, k - j wrong
    got = calibration(torch.tensor(rows, dtype=torch.float64), torch.tensor(labels), n_bins=n_bins)
    # groups that share a bin stay calibrated: the bin's mean confidence Σj/Σk is its hit rate
    assert got.ece <= 1e-12
    assert got.mce <= 1e-12


logit = st.floats(-30, 30, allow_nan=False, allow_subnormal=False)


@FAST
@given(st.integers(1, 8).flatmap(lambda v: st.tuples(
    st.lists(st.lists(logit, min_size=v, max_size=v), min_size=1, max_size=5),
    st.lists(st.lists(logit, min_size=v, max_size=v), min_size=1, max_size=5),
)))
def test_kl_is_non_negative_and_zero_against_itself(pair):
    p_rows, q_rows = pair
    rows = min(len(p_rows), len(q_rows))
    p = torch.tensor(p_rows[:rows], dtype=torch.float64)
    q = torch.tensor(q_rows[:rows], dtype=torch.float64)
    assert (kl_divergence(p, q) >= 0).all()
    assert (kl_divergence(p, p).abs() <= 1e-12).all()
    assert (kl_divergence(p, p + 3.0).abs() <= 1e-12).all()  # softmax ignores a shift


# -- delta statistics and concentration ----------------------------------------------------

KINDS = ("q_proj", "v_proj", "mlp.up_proj")
ANATOMY = Anatomy("qwen2", 3, "model.layers", ARCHITECTURES.get("qwen2"))
element = st.floats(-100, 100, allow_nan=False, allow_subnormal=False, width=32)
parameter = st.tuples(
    st.integers(0, 2),  # layer
    st.sampled_from(KINDS),
    st.lists(st.tuples(element, element), min_size=1, max_size=12),  # (before, after) elements
)


def _pairs(params):
    pairs = []
    for layer, kind, elements in params:
        inner = kind if "." in kind else f"self_attn.{kind}"
        before = torch.tensor([b for b, _ in elements], dtype=torch.float64)
        after = torch.tensor([a for _, a in elements], dtype=torch.float64)
        pairs.append((f"model.layers.{layer}.{inner}.weight", before, after))
    return pairs


@FAST
@given(st.lists(parameter, min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_pooled_delta_moments_do_not_depend_on_parameter_or_element_order(params, rnd):
    pairs = _pairs(params)
    shuffled = []
    for name, before, after in pairs:
        perm = list(range(before.numel()))
        rnd.shuffle(perm)
        shuffled.append((name, before[perm], after[perm]))
    rnd.shuffle(shuffled)
    original = aggregate(delta_table(pairs, ANATOMY))
    permuted = aggregate(delta_table(shuffled, ANATOMY))
    assert list(original) == list(permuted)  # same layers, in layer order
    for label, moments in original.items():
        stats, other = moments.stats(), permuted[label].stats()
        for key, value in stats.items():
            assert other[key] == pytest.approx(value, rel=1e-9, abs=1e-9, nan_ok=True), (label, key)


mass = st.floats(0, 1e6, allow_nan=False)


@FAST
@given(st.dictionaries(st.text(min_size=1, max_size=4), mass, min_size=1, max_size=30).filter(
    lambda m: any(v > 0 for v in m.values())))
def test_shares_sum_to_one(masses):
    assert math.fsum(shares(masses).values()) == pytest.approx(1.0, abs=1e-12)


@FAST
@given(st.lists(parameter, min_size=1, max_size=8), st.lists(st.tuples(element, element), min_size=1, max_size=6))
def test_block_shares_sum_to_one_and_leave_out_the_embedding(params, embed_elements):
    rows = delta_table(_pairs(params), ANATOMY)
    before = torch.tensor([b for b, _ in embed_elements])
    after = torch.tensor([a for _, a in embed_elements])
    rows.append(MatrixDelta("embed.weight", "model.embed_tokens.weight", None, "embed", "weight",
                            delta_moments(before, after)))
    result = block_shares(rows)
    assert set(result) == {layer for layer, _, _ in params}
    if any(row.moments.total_sq > 0 for row in rows if row.layer is not None):
        assert math.fsum(result.values()) == pytest.approx(1.0, abs=1e-12)
    else:
        assert all(v == 0 for v in result.values())


# -- rank ---------------------------------------------------------------------------------------

@st.composite
def matrices(draw):
    rows, cols = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    values = draw(st.lists(st.floats(-10, 10, allow_nan=False, allow_subnormal=False),
                           min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(values, dtype=torch.float64).reshape(rows, cols)


@FAST
@given(matrices(), st.lists(st.floats(0.01, 1.0), min_size=2, max_size=6))
def test_energy_rank_is_monotone_in_energy_and_bounded_by_shape(delta, energies):
    ranks = [energy_rank(delta, e) for e in sorted(energies)]
    assert ranks == sorted(ranks)
    assert all(0 <= r <= min(delta.shape) for r in ranks)
    assert (ranks[0] == 0) == bool((delta == 0).all())


@FAST
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**16))
def test_energy_rank_at_full_energy_never_exceeds_the_true_rank(rows, cols, rank, seed):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(rows, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, cols, generator=g, dtype=torch.float64)
    assert energy_rank(delta, 1.0) <= min(rows, cols, rank)


def test_rank_of_a_tiny_nonzero_matrix_is_not_zero():
    # σ² of 5.7e-259 underflows float64; the ranks are taken relative to σ_max, so it still counts
    delta = torch.tensor([[5.6790e-259]], dtype=torch.float64)
    assert energy_rank(delta, 1.0) == 1 and stable_rank(delta) == 1.0
