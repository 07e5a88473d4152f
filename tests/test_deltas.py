"""Delta statistics against hand computation and torch, concentration, and their invariants."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stance_harness.analysis.concentration import centre_of_mass, change_mass, gini, shares, top_k_share
from stance_harness.analysis.deltas import DeltaMoments, MatrixDelta, aggregate, delta_moments


def test_matrix_statistics_by_hand():
    before = torch.tensor([[1.0, 2.0], [2.0, 4.0]])  # ‖W‖ = 5
    after = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # Δ = [0, 0, 0, -3]; ‖W'‖ = sqrt(10)
    stats = delta_moments(before, after).stats()
    assert stats["mean"] == pytest.approx(-0.75)
    assert stats["var"] == pytest.approx((3 * 0.75**2 + 2.25**2) / 3)  # unbiased: n - 1
    assert stats["mean_abs"] == pytest.approx(0.75)
    assert stats["var_abs"] == pytest.approx((3 * 0.75**2 + 2.25**2) / 3)
    assert stats["delta_norm"] == pytest.approx(3.0)
    assert stats["rel_change"] == pytest.approx(3.0 / 5.0)
    assert stats["norm_change"] == pytest.approx((math.sqrt(10) - 5) / 5)
    assert stats["numel"] == 4 and stats["nonfinite"] == 0


def test_statistics_agree_with_torch_on_random_tensors():
    g = torch.Generator().manual_seed(0)
    before = torch.randn(37, 11, generator=g)
    after = before + 0.01 * torch.randn(37, 11, generator=g) + 0.003
    delta = (after - before).double()
    stats = delta_moments(before, after).stats()
    assert stats["mean"] == pytest.approx(delta.mean().item(), rel=1e-9)
    assert stats["var"] == pytest.approx(delta.var().item(), rel=1e-9)
    assert stats["mean_abs"] == pytest.approx(delta.abs().mean().item(), rel=1e-9)
    assert stats["var_abs"] == pytest.approx(delta.abs().var().item(), rel=1e-9)
    assert stats["rel_change"] == pytest.approx((delta.norm() / before.double().norm()).item(), rel=1e-9)


def test_layer_aggregate_equals_pooled_elements():
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)),
             (torch.randn(7, generator=g), torch.randn(7, generator=g))]
    rows = [MatrixDelta(f"L0.m{i}.weight", f"m{i}", 0, f"m{i}", "weight", delta_moments(b, a)) for i, (b, a) in enumerate(pairs)]
    pooled_before = torch.cat([b.flatten() for b, _ in pairs])
    pooled_after = torch.cat([a.flatten() for _, a in pairs])
    expected = delta_moments(pooled_before, pooled_after).stats()
    got = aggregate(rows)["L0"].stats()
    for key in ("mean", "var", "mean_abs", "var_abs", "rel_change", "norm_change"):
        assert got[key] == pytest.approx(expected[key], rel=1e-9)


def test_nonfinite_elements_are_counted_and_left_out():
    before = torch.zeros(4)
    after = torch.tensor([1.0, float("nan"), float("inf"), 3.0])
    moments = delta_moments(before, after)
    assert moments.nonfinite == 2 and moments.n == 2
    assert moments.mean == pytest.approx(2.0)


def test_empty_moments_give_nan_not_errors():
    stats = DeltaMoments().stats()
    assert math.isnan(stats["mean"]) and math.isnan(stats["var"]) and math.isnan(stats["rel_change"])


finite = st.floats(-100, 100, allow_nan=False, width=32)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=2, max_size=40), st.randoms())
def test_delta_statistics_are_invariant_to_parameter_order(pairs, rnd):
    before = torch.tensor([b for b, _ in pairs], dtype=torch.float64)
    after = torch.tensor([a for _, a in pairs], dtype=torch.float64)
    perm = list(range(len(pairs)))
    rnd.shuffle(perm)
    original = delta_moments(before, after).stats()
    shuffled = delta_moments(before[perm], after[perm]).stats()
    for key, value in original.items():
        assert shuffled[key] == pytest.approx(value, rel=1e-9, abs=1e-9, nan_ok=True)


@given(st.dictionaries(st.text(min_size=1, max_size=4), st.floats(0, 1e6), min_size=1, max_size=30))
def test_shares_sum_to_one_or_are_all_zero(masses):
    result = shares(masses)
    total = sum(result.values())
    if sum(masses.values()) > 0:
        assert total == pytest.approx(1.0)
        assert all(0 <= v <= 1 for v in result.values())
    else:
        assert total == 0


@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=50))
def test_gini_lies_in_unit_interval(values):
    assert -1e-9 <= gini(values) <= 1.0


def test_gini_and_top_k_by_hand():
    assert gini([1, 1, 1, 1]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 4]) == pytest.approx(3 / 4)  # (n - 1) / n for one holder
    assert top_k_share({"a": 0.5, "b": 0.3, "c": 0.2}, 2) == pytest.approx(0.8)
    assert centre_of_mass({0: 1.0, 10: 1.0}) == pytest.approx(5.0)


def test_change_mass_measures():
    moments = delta_moments(torch.zeros(2), torch.tensor([3.0, -4.0]))
    assert change_mass(moments, "sq_fro") == pytest.approx(25.0)
    assert change_mass(moments, "abs") == pytest.approx(7.0)
    with pytest.raises(ValueError, match="measure must be one of"):
        change_mass(moments, "l3")


def test_report_values_become_json():
    import json

    import numpy as np

    from stance_harness.core.results import json_safe

    value = json_safe({"t": torch.tensor(1.5), "n": np.float32(2.0), "v": torch.tensor([1.0, 2.0]), "bad": math.nan})
    assert json.loads(json.dumps(value)) == {"t": 1.5, "n": 2.0, "v": [1.0, 2.0], "bad": "nan"}
