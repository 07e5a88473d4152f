"""Concentration of change: each group's share, top-k share, Gini, and the locus.

Shares use an additive measure of change so they sum to 1: `sq_fro` (Σ Δ², the default:
energy, rotation-invariant) or `abs` (Σ |Δ|).
"""

from __future__ import annotations

import math

from stance_harness.analysis.deltas import DeltaMoments, aggregate

MEASURES = ("sq_fro", "abs")


def change_mass(moments: DeltaMoments, measure: str = "sq_fro") -> float:
    if measure == "sq_fro":
        return moments.total_sq
    if measure == "abs":
        return moments.total_abs
    raise ValueError(f"measure must be one of {MEASURES}, not {measure!r}")


def shares(masses: dict[str, float]) -> dict[str, float]:
    """Each key's share of the total; all zero (not NaN) when nothing changed."""
    total = sum(masses.values())
    return {k: (v / total if total > 0 else 0.0) for k, v in masses.items()}


def block_shares(rows, measure: str = "sq_fro") -> dict[int, float]:
    """Each block's share of the change in all blocks (embeddings and head left out)."""
    masses = {label: change_mass(m, measure) for label, m in aggregate(rows).items() if label.startswith("L")}
    return {int(label[1:]): share for label, share in shares(masses).items()}


def top_k_share(share: dict[str, float], k: int) -> float:
    return sum(sorted(share.values(), reverse=True)[:k])


def gini(values) -> float:
    """Gini coefficient of non-negative values: 0 for equal spread, -> 1 for one holder."""
    xs = sorted(float(v) for v in values)
    n, total = len(xs), sum(xs)
    if n == 0 or total <= 0:
        return 0.0
    weighted = sum((i + 1) * x for i, x in enumerate(xs))
    return (2 * weighted) / (n * total) - (n + 1) / n


def centre_of_mass(layer_share: dict[int, float]) -> float:
    total = sum(layer_share.values())
    return sum(i * s for i, s in layer_share.items()) / total if total > 0 else math.nan
