"""Dose-response: shift and forgetting with the run's whole change scaled by λ (stance_harness.where)."""

from __future__ import annotations

from stance_harness import where
from stance_harness.core.metrics import LOWER
from stance_harness.measurements.base import MeasurementSpec, Metric, register_measurement, without_units

register_measurement(MeasurementSpec(
    "dose_response", where.dose_response, "shift and forgetting with the whole change scaled by λ in where.DOSES",
    check_params=lambda ctx, **params: ctx.task.check_behavior_metric("loglik_margin"),
    metrics=(Metric("negated_shift", LOWER, "behaviour shift with the task vector subtracted (dose -1)"),),
    renderer="dose_response", checks=("check_negation_reverses",), report=lambda key, value: without_units(value)))
