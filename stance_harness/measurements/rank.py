"""Rank of the update: energy rank and stable rank of each block matrix's ΔW, one matrix at a time."""

from __future__ import annotations

from stance_harness.analysis.rank import energy_rank_from_singular_values, stable_rank_from_singular_values
from stance_harness.core.metrics import LOWER
from stance_harness.measurements.base import MeasurementSpec, Metric, register_measurement


def rank(ctx, energy: float = 0.9) -> dict:
    """Energy rank (top-k singular values holding `energy` of ‖ΔW‖²) and stable rank (for LoRA, from its factors)."""
    rows = []
    for name, shape, values in ctx.method.delta_spectra(ctx.model, ctx.before, ctx.anatomy):
        rows.append({"matrix": str(ctx.anatomy.name_of(name)),
                     "rank": energy_rank_from_singular_values(values, energy),
                     "stable_rank": stable_rank_from_singular_values(values), "shape": list(shape)})
    return {"energy": energy, "rows": rows}


register_measurement(MeasurementSpec(
    "rank", rank, "energy rank and stable rank of each block matrix's update",
    key=lambda ctx, energy=0.9: f"rank:{energy:g}",
    metrics=(Metric("effective_rank", LOWER, "mean energy rank of the block updates (lower: fewer directions)"),),
    renderer="rank", shows="last", checks=("check_low_rank_update",), report=lambda key, value: value))
