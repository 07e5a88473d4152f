"""Forgetting: held-out general text before and after (perplexity, or for a task head on a body,
the drift of its sentence embeddings)."""

from __future__ import annotations

from stance_harness.analysis.replication import unit_id
from stance_harness.core.metrics import LOWER
from stance_harness.measure import heldout_sentences
from stance_harness.measurements.base import MeasurementSpec, Metric, register_measurement


def forgetting(ctx) -> dict:
    return ctx.task.forgetting(ctx)


def per_unit(ctx, metric: str):
    found = ctx.measure("forgetting")
    return found["unit"], found["per_unit"]


def unit_ids(ctx, metric: str, unit: str, values: list) -> list[str]:
    """A window by its index, length and tokenizer; a sentence by its place and text (the held-out
    text repeats a sentence or two)."""
    if unit == "sentence":
        return [f"sentence {i} {unit_id(s)}" for i, s in enumerate(heldout_sentences(len(values)))]
    tokens = ctx.measure("forgetting").get("window_tokens")
    tokenizer = ctx.tokenizer
    vocab = f"{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}"
    return [f"window {i} ({tokens} tokens, tokenizer {unit_id(vocab)})" for i in range(len(values))]


def report(key: str, value) -> dict:
    # per-unit rows stay in the run store; the report keeps the summary
    return {k: v for k, v in value.items() if k != "items"} if isinstance(value, dict) else value


register_measurement(MeasurementSpec(
    "forgetting", forgetting, "held-out general text: perplexity before and after, or embedding drift",
    metrics=(Metric("forgetting", LOWER, "relative increase of held-out perplexity, or embedding drift"),
             Metric("perplexity_increase", LOWER, "relative perplexity increase on held-out general text"),
             Metric("embedding_drift", LOWER, "drift of sentence embeddings of held-out text")),
    paired={"forgetting": per_unit}, unit_ids=unit_ids, renderer="forgetting", report=report, checks=("check_no_forgetting",)))
