"""Geometry of a weight change: intruder dimensions, DoRA magnitude/direction, linear CKA,
retained fraction by ablation, and layer-profile rank correlation.

Pure functions, one matrix (or one pair of hidden-state sets) at a time. SVDs run in float32
as peft's intruder detection does; float64 is used where a small change would otherwise drown
in rounding, and each such place says why. Statistics that can be undefined on valid input
return NaN with a reason instead of raising.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

from stance_harness.analysis.deltas import _label_order

_HALF = (torch.float16, torch.bfloat16)
# A centred set whose largest entry is at most this fraction of the raw set's counts as
# constant: float64 centring of identical rows leaves ~1e-16 relative residue, not zero.
CKA_REL_TOL = 1e-12


@dataclass(frozen=True)
class Statistic:
    """A number that may be undefined: `value` is NaN exactly when `reason` says why."""

    value: float
    reason: str | None = None

    def __float__(self) -> float:
        return self.value


def _undefined(reason: str) -> Statistic:
    return Statistic(math.nan, reason)


def _matrix(x, what: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach()
    if t.ndim != 2:
        raise ValueError(f"{what} must be a matrix (2-D tensor), got a {t.ndim}-D tensor of shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{what} must be non-empty, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} has non-finite entries (NaN or inf)")
    return t


def _same_shape(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _finite_number(x, what: str) -> float:
    # numbers.Real takes numpy scalars too; bool is a Real but never a measurement
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
        raise ValueError(f"{what} must be a finite number, got {x!r}")
    return float(x)


# -- intruder dimensions ---------------------------------------------------------------------


@dataclass(frozen=True)
class IntruderResult:
    """Intruders among the top-k left singular vectors of W': their count and indices, and
    for each of the top-k the largest |cosine| with any left singular vector of W."""

    count: int
    indices: tuple[int, ...]
    max_cosines: torch.Tensor  # [min(top_k, rank)], float32 (float64 for float64 input), on CPU

    @property
    def intruder_cosines(self) -> torch.Tensor:
        return self.max_cosines[list(self.indices)]


def intruder_dimensions(W, W_adapted, top_k: int = 10, epsilon: float = 0.5) -> IntruderResult:
    """Intruder dimensions of W' = `W_adapted` against W (Shuttleworth et al. 2024).

    Index i < top_k is an intruder when left singular vector i of W' has |cosine| below
    `epsilon` with every left singular vector of W. This is exactly peft's
    `reduce_intruder_dimension` test: float16/bfloat16 are upcast to float32 and other
    dtypes kept, so the same weights give the same detections bit for bit. "Left" is the
    first axis as stored: the output space of torch's (out, in) Linear weight.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not (0 < epsilon <= 1):
        raise ValueError(f"epsilon must be a cosine threshold in (0, 1], got {epsilon!r}")
    base = _matrix(W, "W")
    merged = _matrix(W_adapted, "W_adapted").to(base.device)
    _same_shape(base, merged, "W and W_adapted")
    # torch.linalg.svd has no half-precision kernels; peft upcasts these, and only these.
    base = base.float() if base.dtype in _HALF else base
    merged = merged.float() if merged.dtype in _HALF else merged
    common = torch.promote_types(base.dtype, merged.dtype)
    base, merged = base.to(common), merged.to(common)
    # Same calls as peft (full_matrices=False, U_merged.T @ U_base), so rounding agrees too.
    U_base, _, _ = torch.linalg.svd(base, full_matrices=False)
    U_merged, _, _ = torch.linalg.svd(merged, full_matrices=False)
    cos_sim = (U_merged.T @ U_base).abs().max(dim=1).values
    top = cos_sim[:top_k]
    indices = tuple(torch.where(top < epsilon)[0].tolist())
    return IntruderResult(len(indices), indices, top.cpu())


def intruder_dimensions_lora(W, B, A, scale: float, top_k: int = 10, epsilon: float = 0.5,
                             fan_in_fan_out: bool = False) -> IntruderResult:
    """Intruder dimensions of W + scale·B·A, for one LoRA-adapted matrix (B: [out, r], A: [r, in]).

    The merged matrix is materialised once, as peft's `get_delta_weight` builds it (half
    factors multiplied in float32 and cast back, then added to W with torch's type
    promotion), so the result matches peft's detection on CPU. On CUDA peft multiplies half
    factors in half, which can differ in the last bit. `fan_in_fan_out`: W is stored (in, out),
    as in GPT-2's Conv1D, so B·A is transposed to match.
    """
    base = _matrix(W, "W")
    b, a = _matrix(B, "B"), _matrix(A, "A")
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"B is [out, r] and A is [r, in]: got B {tuple(b.shape)} and A {tuple(a.shape)}")
    scale = _finite_number(scale, "scale")
    factor_dtype = b.dtype
    if factor_dtype in _HALF or a.dtype in _HALF:
        b, a = b.float(), a.float()
    delta = b @ a.to(b.device)
    if fan_in_fan_out:
        delta = delta.T
    delta = (delta * scale).to(factor_dtype)
    _same_shape(base, delta, "W and scale·B·A" + (" (transposed: fan_in_fan_out)" if fan_in_fan_out else ""))
    return intruder_dimensions(base, base + delta.to(base.device), top_k=top_k, epsilon=epsilon)


# -- magnitude and direction (DoRA) ----------------------------------------------------------


class MagnitudeDirection(NamedTuple):
    delta_m: float  # mean_j |m'_j - m_j|
    delta_d: float  # mean_j (1 - cos(w_j, w'_j))


def _per_unit(W, what: str, fan_in_fan_out: bool) -> torch.Tensor:
    # float64: ΔM and ΔD are differences of nearly equal quantities when the change is small
    # (the usual fine-tuning regime); float32 rounding (~6e-8) would swamp a ΔD of 1e-8.
    t = _matrix(W, what).to(torch.float64)
    return t.T if fan_in_fan_out else t


def magnitudes(W, fan_in_fan_out: bool = False) -> torch.Tensor:
    """DoRA's magnitude vector m (float64): one L2 norm per output unit, taken over the
    input dimension, i.e. per row of torch's (out, in) layout, as peft's `get_weight_norm`."""
    return torch.linalg.vector_norm(_per_unit(W, "W", fan_in_fan_out), dim=1)


def magnitude_direction(W, W_adapted, fan_in_fan_out: bool = False) -> MagnitudeDirection:
    """(ΔM, ΔD) of one matrix, as in DoRA (Liu et al. 2024), in float64.

    w_j is output unit j's weight vector (DoRA's "column"; a row of torch's (out, in)
    layout, see `magnitudes`), m_j = ‖w_j‖. ΔM = mean_j |m'_j − m_j|; ΔD = mean_j
    (1 − cos(w_j, w'_j)). A zero weight vector has no direction: ValueError.
    """
    before = _per_unit(W, "W", fan_in_fan_out)
    after = _per_unit(W_adapted, "W_adapted", fan_in_fan_out).to(before.device)
    _same_shape(before, after, "W and W_adapted")
    m0 = torch.linalg.vector_norm(before, dim=1)
    m1 = torch.linalg.vector_norm(after, dim=1)
    zero = int(((m0 == 0) | (m1 == 0)).sum())
    if zero:
        raise ValueError(f"{zero} output unit(s) have an all-zero weight vector in W or W_adapted; "
                         "their direction, and so ΔD, is undefined")
    # 1 − cos = ‖u − v‖²/2 for unit u, v: no cancellation when cos is near 1.
    chord = torch.linalg.vector_norm(before / m0[:, None] - after / m1[:, None], dim=1)
    return MagnitudeDirection((m1 - m0).abs().mean().item(), (chord.square() / 2).mean().item())


def magnitude_direction_correlation(pairs: Iterable[tuple[float, float]]) -> Statistic:
    """Pearson correlation of ΔM with ΔD across layers, one (ΔM, ΔD) pair per layer.

    DoRA reports it negative for full fine-tuning and positive for LoRA. NaN with a reason
    for fewer than 3 layers or when ΔM or ΔD does not vary.
    """
    rows = [tuple(p) for p in pairs]
    if any(len(r) != 2 for r in rows):
        raise ValueError("pairs must be (delta_m, delta_d) pairs, one per layer")
    for i, (m, d) in enumerate(rows):
        _finite_number(m, f"delta_m of layer {i}")
        _finite_number(d, f"delta_d of layer {i}")
    if len(rows) < 3:
        return _undefined(f"needs at least 3 layers, got {len(rows)}")
    m, d = np.array(rows, dtype=np.float64).T
    if np.ptp(m) == 0 or np.ptp(d) == 0:
        return _undefined(f"{'ΔM' if np.ptp(m) == 0 else 'ΔD'} is the same in every layer")
    return Statistic(float(pearsonr(m, d).statistic))


# -- linear CKA ------------------------------------------------------------------------------


def linear_cka(X, Y) -> float:
    """Linear CKA (Kornblith et al. 2019) of hidden states X [n, d1] and Y [n, d2] on the same
    n inputs: ‖Ycᵀ Xc‖_F² / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F), columns centred. In [0, 1]; invariant
    to orthogonal transforms and isotropic scaling of either side.

    Float64: centring cancels against large feature offsets, and the norms sum fourth powers
    of activations whose range (outlier features) float32 cannot hold without losing the
    small ones; each centred set is scaled to a largest entry of 1 so those powers neither
    under- nor overflow. Uses the d×d feature form or the equal n×n Gram form, whichever has
    fewer multiply-adds. NaN when either set is constant across the inputs.
    """
    x, y = _matrix(X, "X"), _matrix(Y, "Y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"X and Y must hold the same n inputs (rows), got {x.shape[0]} and {y.shape[0]}")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"CKA needs at least 2 inputs, got {n}")
    x = x.to(torch.float64)
    y = y.to(torch.float64, copy=False).to(x.device)
    xc, yc = x - x.mean(dim=0), y - y.mean(dim=0)
    scaled = []
    for raw, centred in ((x, xc), (y, yc)):
        peak = centred.abs().max()
        if peak <= CKA_REL_TOL * raw.abs().max():
            return math.nan
        # CKA is scale invariant; entries at most 1 keep the squares and fourth powers below
        # from under- or overflowing for very small or very large activations.
        scaled.append(centred / peak)
    xc, yc = scaled
    d1, d2 = x.shape[1], y.shape[1]
    if d1 * d1 + d1 * d2 + d2 * d2 <= n * (d1 + d2):
        num = torch.linalg.matrix_norm(yc.T @ xc).square()
        den = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    else:
        # ⟨K, L⟩_F with K = Xc Xcᵀ, L = Yc Ycᵀ equals ‖Ycᵀ Xc‖_F², and ‖K‖_F = ‖Xcᵀ Xc‖_F.
        k, l_ = xc @ xc.T, yc @ yc.T
        num = (k * l_).sum()
        den = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l_)
    return (num / den).item()


# -- retained fraction by ablation ------------------------------------------------------------


def retained_fraction(shift_kept: float, shift_full: float, shift_none: float = 0.0) -> Statistic:
    """(kept − none) / (full − none): the share of the full change's behaviour shift that is
    left when only a subset of the weight changes is kept (the rest reverted to the base).

    NaN with a reason when full == none. Fractions of disjoint sets S, T that together make
    up everything need not sum to 1: r(S) + r(T) = 1 − I / (full − none), with the
    interaction I = shift(S ∪ T) − shift(S) − shift(T) + shift(∅); they sum to 1 only when
    the sets' effects add. A fraction may lie outside [0, 1] (overshoot, or a subset that
    shifts the other way).
    """
    kept = _finite_number(shift_kept, "shift_kept")
    full = _finite_number(shift_full, "shift_full")
    none = _finite_number(shift_none, "shift_none")
    if full == none:
        return _undefined("the full change shifts behaviour no more than no change (shift_full == shift_none)")
    # Exact rationals, rounded once: keeping all gives exactly 1 and none exactly 0, and the
    # differences cannot overflow or cancel as float subtraction can.
    ratio = (Fraction(kept) - Fraction(none)) / (Fraction(full) - Fraction(none))
    try:
        return Statistic(float(ratio))
    except OverflowError:
        return Statistic(math.copysign(math.inf, ratio))


# -- layer-profile similarity -----------------------------------------------------------------


@dataclass(frozen=True)
class ProfileCorrelation:
    """Spearman rho over the shared labels, and the aligned vectors it was computed from."""

    rho: float
    labels: tuple
    a: tuple[float, ...]
    b: tuple[float, ...]
    reason: str | None = None  # why rho is NaN


def _layer_key(label):
    # Blocks in layer order (L0, L1, ... or bare ints), then other roles, as deltas.aggregate.
    return _label_order(f"L{label}" if isinstance(label, int) and not isinstance(label, bool) else str(label))


def profile_rank_correlation(profile_a: Mapping, profile_b: Mapping) -> ProfileCorrelation:
    """Spearman rank correlation of two per-layer profiles over their shared labels, aligned in
    layer order (scipy.stats.spearmanr; ties take average ranks).

    Needs at least 3 shared labels (ValueError); NaN with a reason when a profile is constant
    over them.
    """
    labels = tuple(sorted((k for k in profile_a if k in profile_b), key=_layer_key))
    if len(labels) < 3:
        raise ValueError(f"profiles must share at least 3 labels to rank-correlate, got {len(labels)}: {list(labels)}")
    a = tuple(_finite_number(profile_a[k], f"profile_a[{k!r}]") for k in labels)
    b = tuple(_finite_number(profile_b[k], f"profile_b[{k!r}]") for k in labels)
    for name, v in (("profile_a", a), ("profile_b", b)):
        if min(v) == max(v):
            return ProfileCorrelation(math.nan, labels, a, b, f"{name} is constant over the shared labels")
    return ProfileCorrelation(float(spearmanr(a, b).statistic), labels, a, b)
