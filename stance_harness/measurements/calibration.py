"""Calibration on held-out predictions: ECE, MCE, Brier, Acc@1 and reliability bins, adapted and base."""

from __future__ import annotations

from stance_harness.analysis.replication import unit_id
from stance_harness.core.metrics import HIGHER, LOWER
from stance_harness.measurements.base import MeasurementSpec, Metric, register_measurement


def calibration(ctx, n_bins: int = 15) -> dict:
    return ctx.task.calibration(ctx, n_bins)


def per_prediction(ctx, metric: str):
    """brier, acc1: per held-out prediction; ece: rows (confidence, correct), compared as a statistic."""
    items = ctx.measure("calibration")["items"]
    if metric == "ece":
        return "prediction", [list(r) for r in zip(items["confidence"], items["correct"])]
    return "prediction", items["brier"] if metric == "brier" else items["correct"]


def unit_ids(ctx, metric: str, unit: str, values: list) -> list[str]:
    """A prediction by its index among the stance's probes under this tokenizer and framing."""
    tokenizer = ctx.tokenizer
    vocab = f"{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}"
    probes = unit_id(*(p.prompt for p in ctx.stance.probes), vocab, ctx.framing.identity())
    return [f"prediction {i} on probes {probes}" for i in range(len(values))]


def report(key: str, value) -> dict | None:
    if key != "calibration":  # another bin count: kept in the store, not reported
        return None
    return {k: v for k, v in value.items() if k != "items"} if isinstance(value, dict) else value


register_measurement(MeasurementSpec(
    "calibration", calibration, "ECE, MCE, Brier, Acc@1 and reliability bins, adapted and base",
    key=lambda ctx, n_bins=15: "calibration" if n_bins == 15 else f"calibration:{n_bins}",
    metrics=(Metric("ece", LOWER, "expected calibration error"),
             Metric("mce", LOWER, "maximum calibration error"),
             Metric("brier", LOWER, "Brier score"),
             Metric("acc1", HIGHER, "top-1 accuracy")),
    paired={name: per_prediction for name in ("brier", "acc1", "ece")}, unit_ids=unit_ids,
    renderer="calibration", report=report, checks=("check_ece", "check_ece_not_worse")))
