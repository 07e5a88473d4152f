"""Counts: trainable and frozen parameters, and the bytes a stance needs stored."""

from __future__ import annotations

import math

from stance_harness.core.metrics import LOWER
from stance_harness.measurements.base import MeasurementSpec, Metric, register_measurement


def logical_numel(param) -> int:
    """Elements a parameter stands for; 4-bit packed weights (bitsandbytes) hold two per byte."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(math.prod(quant_state.shape))
    return param.numel()


def counts(ctx) -> dict:
    """Parameters that trained at some step count as trainable, the rest as frozen."""
    model = ctx.model
    trainable = sum(t.numel() for t in ctx.before.values())
    total = sum(logical_numel(p) for p in model.parameters())
    full_bytes = ctx.loaded.base_bytes
    return {
        "trainable": trainable, "frozen": total - trainable,
        "trainable_pct": 100.0 * trainable / total if total else 0.0,
        "stance_bytes": ctx.method.storage_bytes(model, ctx.before),
        "full_weights_bytes": full_bytes,
        "examples": ctx.examples,
        "params_per_example": trainable / ctx.examples if ctx.examples else None,
    }


register_measurement(MeasurementSpec(
    "counts", counts, "trainable and frozen parameters, stance bytes, parameters per example",
    metrics=(Metric("trainable_params", LOWER, "trainable parameter count"),
             Metric("params_per_example", LOWER, "trainable parameters per training example"),
             Metric("stance_bytes", LOWER, "bytes needed to store the stance"))))
