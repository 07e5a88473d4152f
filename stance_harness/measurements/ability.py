"""General ability: a probe set of factual, arithmetic and instruction prompts checked by rules,
answered by the base and the adapted model (forgetting in continual learning's terms)."""

from __future__ import annotations

from stance_harness.analysis.ability import DEFAULT_PROBESET, load_probeset
from stance_harness.core.metrics import HIGHER
from stance_harness.measurements.base import MeasurementSpec, Metric, register_measurement


def general_ability(ctx, probeset: str = DEFAULT_PROBESET) -> dict:
    return ctx.task.general_ability(ctx, load_probeset(probeset))


def key(ctx, probeset: str = DEFAULT_PROBESET) -> str:
    return "general_ability" if probeset == DEFAULT_PROBESET else f"general_ability:{load_probeset(probeset).name}"


def per_probe(ctx, metric: str):
    found = ctx.measure("general_ability")
    return found["unit"], found["per_unit"]


def unit_ids(ctx, metric: str, unit: str, values: list) -> list[str]:
    return [f"ability probe {i}" for i in ctx.measure("general_ability")["unit_ids"]]  # its probe set names them


def report(key: str, value) -> dict | None:
    if key != "general_ability":
        return None
    # the report lists regressions and gains, not every probe
    return {k: v for k, v in value.items() if k not in ("rows", "per_unit", "unit_ids")}


register_measurement(MeasurementSpec(
    "general_ability", general_ability, "general-ability probes answered by base and adapted, scored by rules",
    key=key, check_params=lambda ctx, probeset=DEFAULT_PROBESET: load_probeset(probeset) and None,
    metrics=(Metric("general_ability", HIGHER,
                    "share of general-ability probes answered correctly (adapted minus base, per probe)"),
             Metric("backward_transfer", HIGHER, "mean over general-ability families of adapted minus base accuracy")),
    paired={"general_ability": per_probe}, unit_ids=unit_ids, renderer="general_ability", report=report))
