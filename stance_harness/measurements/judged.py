"""Replies judged for the stance: each probe's greedy reply, base and adapted, scored in [0, 1]
by a registered judge (stance_harness.judges)."""

from __future__ import annotations

import math

from stance_harness.analysis.behavior import effect_of
from stance_harness.judges import Judge, agreement, judge_key, judge_replies, make_judge
from stance_harness.measurements.base import MeasurementSpec, register_measurement


def _judge(judge, options) -> Judge:
    return judge if isinstance(judge, Judge) else make_judge(judge, **options)


def judged_values(ctx, judge: Judge) -> dict:
    """Per probe, the judge's score of the base's and the adapted model's greedy reply (the
    `replies` measurement of the run behind `ctx`, a MeasureContext); the effect is adapted minus
    base, with a bootstrap interval over probes."""
    rows = ctx.measure("replies")["rows"]
    prompts = [r["probe"] for r in rows]
    base = judge_replies(judge, ctx.stance, [r["base_reply"] for r in rows], prompts)
    adapted = judge_replies(judge, ctx.stance, [r["adapted_reply"] for r in rows], prompts)
    deltas = [a["score"] - b["score"] for a, b in zip(adapted, base)]
    per_probe = [{"probe": p, "base_reply": r["base_reply"], "adapted_reply": r["adapted_reply"],
                  "base": b["score"], "adapted": a["score"], "delta": d,
                  "base_detail": _without_score(b), "adapted_detail": _without_score(a)}
                 for p, r, b, a, d in zip(prompts, rows, base, adapted, deltas)]
    n = len(rows)
    return {"judge": judge.name, "identity": judge.identity(ctx.stance),
            "base": math.fsum(b["score"] for b in base) / n, "adapted": math.fsum(a["score"] for a in adapted) / n,
            "effect": effect_of(deltas).as_dict(), "per_probe": per_probe,
            "calibration": judge.calibration(ctx.stance), "agreement": agreement(judge, ctx.stance)}


def _without_score(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "score"}


def judged(ctx, judge="embedding", **options) -> dict:
    return judged_values(ctx, _judge(judge, options))


def per_probe(ctx, metric: str):
    """judge:NAME: per probe, the judge's score adapted minus base."""
    return "probe", [r["delta"] for r in ctx.measure("judged", judge=metric.partition(":")[2])["per_probe"]]


def report(key: str, value) -> dict:
    # whole: the prompts and raw outputs of a model judge belong in the report
    return {key.split(":")[1]: value}  # by judge


register_measurement(MeasurementSpec(
    "judged", judged, "each probe's greedy reply, base and adapted, scored for the stance by a judge",
    key=lambda ctx, judge="embedding", **options: judge_key(_judge(judge, options), ctx.stance),
    # one judge failing does not fail the others
    stage=lambda judge="embedding", **options: f"judged:{judge.name if isinstance(judge, Judge) else judge}",
    paired={"judge:": per_probe}, renderer="judged", report=report))
