"""Step time: seconds per optimizer step, from the training trace (paired by step)."""

from __future__ import annotations

from stance_harness.core.metrics import LOWER
from stance_harness.measurements.base import MeasurementSpec, Metric, register_measurement


def step_times(ctx) -> list[float]:
    return list(ctx.trace.step_time)


register_measurement(MeasurementSpec(
    "step_time", step_times, "seconds per optimizer step, from the training trace", kept=False,
    metrics=(Metric("step_time", LOWER, "seconds per optimizer step", wall_clock=True),),
    paired={"step_time": lambda ctx, metric: ("step", ctx.measure("step_time"))}))
