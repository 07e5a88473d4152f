"""Reply length shift: per probe, the tokens of the adapted model's greedy reply minus the base's.

The replies are those of the `replies` measurement (greedy, framed as training frames a prompt,
at most measure.GENERATION_TOKENS new tokens), each counted in the run's tokenizer without special
tokens. Paired by probe, so two runs' shifts compare probe for probe (check_paired and friends
take `reply_length_shift`).

Direction: a stance is neither better nor worse for making replies longer, but a metric's
direction must be lower or higher (core.metrics). It is declared `lower`: a gate then reads a
rise as the regression, since longer replies cost tokens and time at inference.
"""

from __future__ import annotations

import math

from stance_harness.analysis.behavior import effect_of
from stance_harness.core.metrics import LOWER
from stance_harness.measurements.base import MeasurementSpec, Metric, register_measurement, without_units


def reply_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def reply_length(ctx) -> dict:
    """Mean reply length in tokens, base and adapted; per probe, adapted minus base, with a 95% BCa
    bootstrap interval over probes."""
    replies = ctx.measure("replies")
    rows = replies["rows"]
    base = [reply_tokens(ctx.tokenizer, r["base_reply"]) for r in rows]
    adapted = [reply_tokens(ctx.tokenizer, r["adapted_reply"]) for r in rows]
    deltas = [float(a - b) for a, b in zip(adapted, base)]
    return {"description": "tokens of the greedy reply, adapted minus base, per probe",
            "base": math.fsum(base) / len(base), "adapted": math.fsum(adapted) / len(adapted),
            "max_new_tokens": replies["max_new_tokens"], "effect": effect_of(deltas).as_dict(),
            "per_probe": [{"probe": r["probe"], "base": b, "adapted": a, "delta": d}
                          for r, b, a, d in zip(rows, base, adapted, deltas)]}


register_measurement(MeasurementSpec(
    "reply_length", reply_length, "tokens of each probe's greedy reply, adapted minus base",
    stage="replies",  # the time limit of the replies it counts
    metrics=(Metric("reply_length_shift", LOWER,
                    "tokens of the adapted greedy reply minus the base's, per probe (a rise costs inference)"),),
    paired={"reply_length_shift": lambda ctx, metric: (
        "probe", [r["delta"] for r in ctx.measure("reply_length")["per_probe"]])},
    renderer="reply_length", report=lambda key, value: without_units(value),
    checks=("check_reply_length_shift",)))  # stance_harness/checks/reply_length.py
