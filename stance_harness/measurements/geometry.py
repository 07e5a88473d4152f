"""Geometry of the update: intruder dimensions, DoRA's ΔM/ΔD and their correlation, per-layer CKA
of base vs adapted hidden states (stance_harness.where)."""

from __future__ import annotations

from stance_harness import where
from stance_harness.core.metrics import LOWER
from stance_harness.measurements.base import MeasurementSpec, Metric, register_measurement, without_units

register_measurement(MeasurementSpec(
    "geometry", where.geometry, "intruders, ΔM/ΔD and their correlation, per-layer CKA",
    metrics=(Metric("intruders", LOWER,
                    "intruder dimensions per changed block matrix (top 10 singular vectors, cosine < 0.5)"),),
    paired={"intruders": lambda ctx, metric: ("layer", where.intruders_per_layer(ctx.measure("geometry")))},
    renderer="geometry", checks=("check_few_intruders",), report=lambda key, value: without_units(value)))
