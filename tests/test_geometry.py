"""Geometry of a weight change against peft, hand computation and independent formulas."""

import copy
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from stance_harness.analysis.geometry import (
    intruder_dimensions,
    intruder_dimensions_lora,
    linear_cka,
    magnitude_direction,
    magnitude_direction_correlation,
    magnitudes,
    profile_rank_correlation,
    retained_fraction,
)

FAST = settings(max_examples=60, deadline=None)


# -- intruder dimensions ---------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.mid = nn.Linear(16, 32), nn.Linear(32, 32)
        self.down, self.out = nn.Linear(32, 16), nn.Linear(16, 16)


# B's size per layer: big updates bring intruders, a tiny one none
_B_SIZE = {"up": 3.0, "mid": 1e-3, "down": 0.5, "out": 2.0}


def _lora_model(dtype):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    model = get_peft_model(_Net().to(dtype), LoraConfig(target_modules=list(_B_SIZE), r=4, init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    layers = {name: layer for name, layer in model.named_modules() if isinstance(layer, LoraLayer)}
    with torch.no_grad():
        for name, layer in layers.items():
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            A.copy_(torch.randn(A.shape, generator=g))
            B.copy_(_B_SIZE[name.rsplit(".", 1)[-1]] * torch.randn(B.shape, generator=g))
    return model, layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_intruder_counts_equal_peft_reduce_intruder_dimension(dtype):
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    model, layers = _lora_model(dtype)
    lines = []
    reduce_intruder_dimension(copy.deepcopy(model), logging_sink=lines.append)  # it adds an adapter
    peft_counts = {}
    for line in lines:
        name, _, verdict = line.partition(": ")
        if verdict == "No intruders":
            peft_counts[name] = 0
        elif verdict.startswith("Intruders: "):
            peft_counts[name] = int(verdict.removeprefix("Intruders: "))
    assert set(peft_counts) == set(layers)
    assert 0 in peft_counts.values() and max(peft_counts.values()) > 1  # the set-up has both kinds
    with torch.no_grad():
        for name, layer in layers.items():
            W = layer.get_base_layer().weight
            B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
            by_factors = intruder_dimensions_lora(W, B, A, layer.scaling["default"])
            merged = intruder_dimensions(W, W + layer.get_delta_weight("default"))
            assert by_factors.count == merged.count == peft_counts[name], name
            assert by_factors.indices == merged.indices
            assert torch.equal(by_factors.max_cosines, merged.max_cosines)
            assert len(by_factors.indices) == by_factors.count
            assert (by_factors.intruder_cosines < 0.5).all()


def test_intruder_in_a_constructed_direction():
    W = torch.diag(torch.arange(9.0, 0.0, -1.0))  # left singular vectors: the axes e_0..e_8
    v = torch.ones(9) / 3.0  # |cos| with every axis is 1/3
    got = intruder_dimensions(W, W + 100 * torch.outer(v, v), top_k=1)
    assert (got.count, got.indices) == (1, (0,))
    assert got.max_cosines[0].item() == pytest.approx(1 / 3, abs=0.02)
    # the same strength along an existing axis only reorders the axes: no intruder anywhere
    along_axis = intruder_dimensions(W, W + 100 * torch.outer(torch.eye(9)[4], torch.eye(9)[4]), top_k=10)
    assert along_axis.count == 0 and along_axis.max_cosines.shape == (9,)  # top_k beyond the rank
    assert along_axis.max_cosines.min().item() == pytest.approx(1.0, abs=1e-6)
    # epsilon is the threshold: 1/3 is an intruder at 0.5 and not at 0.3
    assert intruder_dimensions(W, W + 100 * torch.outer(v, v), top_k=1, epsilon=0.3).count == 0


def test_lora_route_fan_in_fan_out_transposes_the_update():
    g = torch.Generator().manual_seed(3)
    W_stored = torch.randn(30, 8, generator=g)  # (in, out), as Conv1D stores it
    B, A = torch.randn(8, 2, generator=g), torch.randn(2, 30, generator=g)
    got = intruder_dimensions_lora(W_stored, B, A, 4.0, fan_in_fan_out=True)
    want = intruder_dimensions(W_stored, W_stored + (B @ A).T * 4.0)
    assert got.count > 0 and got.indices == want.indices
    assert torch.equal(got.max_cosines, want.max_cosines)
    with pytest.raises(ValueError, match="same shape"):
        intruder_dimensions_lora(W_stored, B, A, 4.0)


@pytest.mark.parametrize("call, match", [
    (lambda: intruder_dimensions(torch.ones(3, 4), torch.ones(4, 3)), "same shape"),
    (lambda: intruder_dimensions(torch.ones(4), torch.ones(4)), "2-D"),
    (lambda: intruder_dimensions(torch.ones(3, 3), torch.full((3, 3), math.nan)), "non-finite"),
    (lambda: intruder_dimensions(torch.eye(3), torch.eye(3), top_k=0), "top_k"),
    (lambda: intruder_dimensions(torch.eye(3), torch.eye(3), epsilon=1.5), "epsilon"),
    (lambda: intruder_dimensions_lora(torch.eye(3), torch.ones(3, 2), torch.ones(3, 3), 1.0), r"\[out, r\]"),
    (lambda: intruder_dimensions_lora(torch.eye(3), torch.ones(3, 1), torch.ones(1, 3), math.inf), "scale"),
])
def test_intruder_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- magnitude and direction (DoRA) ----------------------------------------------------------


def test_magnitude_direction_by_hand():
    W = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # unit norms 5, 1
    W_adapted = torch.tensor([[0.0, 5.0], [2.0, 0.0]])  # 5, 2; cosines 20/25 and 1
    assert magnitude_direction(W, W_adapted) == pytest.approx((0.5, 0.1), abs=1e-15)
    # the same weights stored (in, out)
    assert magnitude_direction(W.T, W_adapted.T, fan_in_fan_out=True) == pytest.approx((0.5, 0.1), abs=1e-15)


def test_pure_scaling_of_units_changes_magnitude_only():
    W = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = torch.tensor([0.5, 2.0, 1.0, 3.0, 1.5], dtype=torch.float64)
    delta_m, delta_d = magnitude_direction(W, s[:, None] * W)
    assert delta_m == pytest.approx(((s - 1).abs() * W.norm(dim=1)).mean().item(), rel=1e-12)
    assert delta_d == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("theta", [0.7, 1e-3, 1e-5])
def test_norm_preserving_rotation_changes_direction_only(theta):
    W = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    R = torch.block_diag(rot, rot)  # turns every vector in R^4 by theta
    delta_m, delta_d = magnitude_direction(W, W @ R)
    assert delta_m == pytest.approx(0.0, abs=1e-14)
    # 2 sin²(θ/2) = 1 − cos θ without cancellation; at θ = 1e-5 float32 could not resolve it
    assert delta_d == pytest.approx(2 * math.sin(theta / 2) ** 2, rel=1e-6)


def test_magnitude_axis_is_peft_doras():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(6, 10)),
                           LoraConfig(target_modules=["0"], r=2, use_dora=True, init_lora_weights=False))
    layer = model.base_model.model[0]
    with torch.no_grad():
        merged = layer.get_base_layer().weight + layer.get_delta_weight("default")
        peft_m = layer.lora_magnitude_vector["default"].weight.double()
    assert peft_m.shape == (10,)  # one per output unit
    torch.testing.assert_close(magnitudes(merged), peft_m, rtol=1e-6, atol=0)


@pytest.mark.parametrize("W, W_adapted, match", [
    (torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.eye(2), "all-zero"),
    (torch.eye(2), torch.eye(3), "same shape"),
    (torch.eye(2), torch.tensor([[1.0, math.inf], [0.0, 1.0]]), "non-finite"),
])
def test_magnitude_direction_bad_input_is_refused(W, W_adapted, match):
    with pytest.raises(ValueError, match=match):
        magnitude_direction(W, W_adapted)


def test_magnitude_direction_correlation():
    # ΔM centred (-1, 0, 1), ΔD centred (-1/3, -4/3, 5/3): r = 2 / sqrt(2 · 42/9)
    got = magnitude_direction_correlation([(1.0, 2.0), (2.0, 1.0), (3.0, 4.0)])
    assert got.reason is None and got.value == pytest.approx(2 / math.sqrt(2 * 42 / 9), rel=1e-12)
    assert float(magnitude_direction_correlation([(1, 3.0), (2, 2.0), (4, 0.0)])) == pytest.approx(-1.0)
    too_few = magnitude_direction_correlation([(1.0, 2.0), (2.0, 1.0)])
    assert math.isnan(too_few.value) and "3 layers" in too_few.reason
    flat = magnitude_direction_correlation([(1.0, 0.5), (2.0, 0.5), (3.0, 0.5)])
    assert math.isnan(flat.value) and "ΔD" in flat.reason


# -- linear CKA ------------------------------------------------------------------------------


def _kernel_cka(X, Y):
    """HSIC form, Kornblith et al. eq. (3): tr(KHLH) / sqrt(tr(KHKH) tr(LHLH))."""
    X, Y = X.double(), Y.double()
    n = X.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    K, L = H @ (X @ X.T) @ H, H @ (Y @ Y.T) @ H
    return (torch.trace(K @ L) / torch.sqrt(torch.trace(K @ K) * torch.trace(L @ L))).item()


def test_cka_by_hand():
    # one feature each: linear CKA is the squared Pearson correlation, here (1 / 2)²
    assert linear_cka(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [3.0], [2.0]])) == pytest.approx(0.25)
    # centred X with Xᵀ X = 2I; Y its first column: ‖YᵀX‖² = 4, ‖XᵀX‖ = √8, ‖YᵀY‖ = 2
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert linear_cka(X, X[:, :1]) == pytest.approx(1 / math.sqrt(2), rel=1e-12)


@pytest.mark.parametrize("n, d1, d2", [(60, 5, 8), (6, 20, 30), (12, 3, 40)])
def test_cka_equals_the_kernel_form(n, d1, d2):
    # the shapes take the feature form, the Gram form, and a mixed case
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, d1, generator=g) + 3.0
    Y = X @ torch.randn(d1, d2, generator=g) + 0.5 * torch.randn(n, d2, generator=g)
    assert linear_cka(X, Y) == pytest.approx(_kernel_cka(X, Y), rel=1e-10)


def test_cka_invariances_and_their_limit():
    g = torch.Generator().manual_seed(5)
    X, Y = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(40, 4, generator=g, dtype=torch.float64)
    Y = Y + X[:, :4]
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    base = linear_cka(X, Y)
    assert 0.1 < base < 0.99
    assert linear_cka(X @ Q, Y) == pytest.approx(base, rel=1e-12)
    assert linear_cka(7.5 * X, 0.01 * Y) == pytest.approx(base, rel=1e-12)
    assert linear_cka(X, X) == pytest.approx(1.0, rel=1e-14)
    # an anisotropic scaling is not an orthogonal transform: CKA moves
    stretch = torch.tensor([10.0, 1, 1, 1, 1, 1], dtype=torch.float64)
    assert abs(linear_cka(X * stretch, Y) - base) > 1e-3


def test_cka_of_a_constant_set_is_nan_and_bad_input_is_refused():
    X = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert math.isnan(linear_cka(torch.full((5, 2), 0.1), X))
    with pytest.raises(ValueError, match="same n"):
        linear_cka(X, X[:4])
    with pytest.raises(ValueError, match="at least 2"):
        linear_cka(X[:1], X[:1])
    with pytest.raises(ValueError, match="non-finite"):
        linear_cka(X, X.masked_fill(X > 0, math.nan))


@st.composite
def two_sets(draw):
    n, d1, d2 = draw(st.integers(2, 8)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    element = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False)
    X = draw(st.lists(st.lists(element, min_size=d1, max_size=d1), min_size=n, max_size=n))
    Y = draw(st.lists(st.lists(element, min_size=d2, max_size=d2), min_size=n, max_size=n))
    return torch.tensor(X, dtype=torch.float64), torch.tensor(Y, dtype=torch.float64)


def _constant(X):
    return bool((X == X[0]).all())


@FAST
@given(two_sets())
@example((torch.tensor([[0.0], [1.0]], dtype=torch.float64), torch.tensor([[0.0], [3e-171]], dtype=torch.float64)))
def test_cka_properties(sets):
    X, Y = sets
    xy = linear_cka(X, Y)
    assert math.isnan(xy) == (_constant(X) or _constant(Y))
    if math.isnan(xy):
        return
    assert -1e-12 <= xy <= 1 + 1e-12
    assert linear_cka(Y, X) == pytest.approx(xy, rel=1e-9, abs=1e-12)
    assert linear_cka(X, X) == pytest.approx(1.0, rel=1e-9)


# -- retained fraction ---------------------------------------------------------------------


def test_retained_fraction_by_hand():
    assert retained_fraction(3.0, 4.0, 1.0).value == pytest.approx(2 / 3)
    assert retained_fraction(0.25, 0.5).value == 0.5
    assert retained_fraction(-1.0, 2.0).value == -0.5  # a subset that shifts the other way
    flat = retained_fraction(1.0, 2.0, 2.0)
    assert math.isnan(flat.value) and "shift_full == shift_none" in flat.reason
    with pytest.raises(ValueError, match="shift_kept"):
        retained_fraction(math.nan, 1.0)


finite = st.floats(allow_nan=False, allow_infinity=False)


@FAST
@given(finite, finite)
@example(1.7e308, -1.7e308)  # full − none overflows a float
@example(5e-324, 0.0)  # the smallest subnormal difference
def test_keeping_all_gives_one_and_none_gives_zero_exactly(full, none):
    if full == none:
        assert math.isnan(retained_fraction(full, full, none).value)
        return
    assert retained_fraction(full, full, none).value == 1.0
    assert retained_fraction(none, full, none).value == 0.0


moderate = st.floats(-1e6, 1e6, allow_nan=False)


@FAST
@given(moderate, moderate, moderate, moderate)
def test_disjoint_fractions_sum_to_one_minus_the_interaction(shift_s, shift_t, full, none):
    if abs(full - none) < 1e-3:
        return
    total = retained_fraction(shift_s, full, none).value + retained_fraction(shift_t, full, none).value
    interaction = full - shift_s - shift_t + none
    assert total == pytest.approx(1 - interaction / (full - none), rel=1e-9, abs=1e-9)


# -- layer-profile rank correlation ---------------------------------------------------------


def test_profile_rank_correlation_aligns_in_layer_order():
    a = {"L10": 4.0, "head": 9.0, "L2": 2.0, "L0": 1.0, "embed": 0.0, "L5": 3.0, "only_a": 7.0}
    b = {"L0": 10.0, "L5": 40.0, "L2": 20.0, "L10": 30.0, "only_b": 1.0}
    got = profile_rank_correlation(a, b)
    assert got.labels == ("L0", "L2", "L5", "L10")  # L10 after L5, not after L0 as strings sort
    assert got.a == (1.0, 2.0, 3.0, 4.0) and got.b == (10.0, 20.0, 40.0, 30.0)
    assert got.rho == pytest.approx(1 - 6 * 2 / (4 * 15)) and got.reason is None  # Σd² = 2
    ints = profile_rank_correlation({2: 1.0, 10: 3.0, 1: 2.0}, {1: 1.0, 2: 2.0, 10: 3.0})
    assert ints.labels == (1, 2, 10) and ints.rho == pytest.approx(0.5)


def test_profile_rank_correlation_needs_three_shared_labels_and_variation():
    with pytest.raises(ValueError, match="at least 3"):
        profile_rank_correlation({"L0": 1.0, "L1": 2.0, "L2": 3.0}, {"L0": 1.0, "L1": 2.0, "L9": 3.0})
    flat = profile_rank_correlation({"L0": 1.0, "L1": 1.0, "L2": 1.0}, {"L0": 1.0, "L1": 2.0, "L2": 3.0})
    assert math.isnan(flat.rho) and "profile_a" in flat.reason
    with pytest.raises(ValueError, match="profile_b"):
        profile_rank_correlation({"L0": 1.0, "L1": 2.0, "L2": 3.0}, {"L0": 1.0, "L1": math.nan, "L2": 3.0})
