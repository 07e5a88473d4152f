"""Each probe's greedy reply, base and adapted side by side."""

from __future__ import annotations

from stance_harness.measurements.base import MeasurementSpec, register_measurement, without_units


def replies(ctx) -> dict:
    return ctx.task.replies(ctx)


register_measurement(MeasurementSpec(
    "replies", replies, "each probe's greedy reply, base and adapted, with markers and margin change",
    renderer="replies", report=lambda key, value: without_units(value)))
