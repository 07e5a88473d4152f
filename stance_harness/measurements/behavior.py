"""Behavioural shift on the stance's held-out probes: loglik margin, KL, marker rate."""

from __future__ import annotations

from stance_harness.analysis.behavior import effect_of
from stance_harness.core.metrics import HIGHER
from stance_harness.measurements.base import MeasurementSpec, Metric, register_measurement


def check_metric(ctx, metric: str = "loglik_margin") -> None:
    ctx.task.check_behavior_metric(metric)


def behavior(ctx, metric: str = "loglik_margin") -> dict:
    """Per probe, the base's and the adapted model's value of `metric` (from the task); the
    effect is adapted minus base with a 95% BCa bootstrap interval over probes."""
    base, adapted = ctx.task.behavior_values(ctx, metric)
    deltas = [a - b for a, b in zip(adapted, base)]
    return {
        "base": sum(base) / len(base), "adapted": sum(adapted) / len(adapted),
        "effect": effect_of(deltas).as_dict(),
        "per_probe": [{"probe": p.prompt, "base": b, "adapted": a, "delta": a - b}
                      for p, b, a in zip(ctx.stance.probes, base, adapted)],
    }


def per_probe(ctx, metric: str):
    """Per probe, adapted minus base; for kl, the adapted model's divergence (the base's is 0)."""
    name = "loglik_margin" if metric == "behavior_shift" else metric
    rows = ctx.measure("behavior", metric=name)["per_probe"]
    return "probe", [r["adapted"] if name == "kl" else r["delta"] for r in rows]


def report(key: str, value) -> dict:
    return {key.partition(":")[2]: value}  # by metric


register_measurement(MeasurementSpec(
    "behavior", behavior, "shift of the adapted model from its base on the stance's probes",
    key=lambda ctx, metric="loglik_margin": f"behavior:{metric}", check_params=check_metric,
    metrics=(Metric("behavior_shift", HIGHER,
                    "how far behaviour moved toward the stance (the log-likelihood margin's shift)"),
             Metric("loglik_margin", HIGHER, "log-likelihood margin of stance answers over plain ones"),
             Metric("kl", HIGHER, "KL divergence of the tuned model's predictions from the base model's on probes"),
             Metric("marker_rate", HIGHER, "share of generations that carry the stance's markers")),
    paired={name: per_probe for name in ("behavior_shift", "loglik_margin", "kl", "marker_rate")},
    renderer="behavior", report=report, checks=("check_behavior_shift",)))
