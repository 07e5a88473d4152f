"""Where the behaviour lives: the loglik-margin shift with only part of the change kept (the rest
reverted to the base), per layer third, kind group, single layer and adapter (stance_harness.where)."""

from __future__ import annotations

from stance_harness import where
from stance_harness.core.metrics import HIGHER
from stance_harness.measurements.base import MeasurementSpec, Metric, register_measurement, without_units


def needs_margin(ctx, **params) -> None:
    ctx.task.check_behavior_metric("loglik_margin")


def check_localized(ctx, layers=None, kinds=None) -> None:
    needs_margin(ctx)
    where.selection(ctx, layers, kinds)  # bad layers or kinds fail here, before any forward pass


register_measurement(MeasurementSpec(
    "localization", where.localization, "retained shift per layer third, kind group, layer and adapter",
    check_params=needs_margin,
    metrics=(Metric("retained", HIGHER,
                    "share of the behaviour shift kept when only the chosen layers' change is kept"),),
    renderer="localization", report=lambda key, value: without_units(value)))
register_measurement(MeasurementSpec(
    "localized", where.localized, "shift and retained fraction with only some layers x kinds of the change kept",
    key=where.localized_key, stage="localization", check_params=check_localized,
    checks=("check_behavior_localized",)))
register_measurement(MeasurementSpec(
    "localization_ends", where.ends, "per probe: the base's margin, and the run's with all and none of its change",
    stage="localization", check_params=needs_margin))
