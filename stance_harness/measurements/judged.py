"""Replies judged for the stance: each probe's greedy reply, base and adapted, scored in [0, 1]
by a registered judge (stance_harness.judges)."""

from __future__ import annotations

from stance_harness.judges import Judge, judge_key, judged_values, make_judge
from stance_harness.measurements.base import MeasurementSpec, register_measurement


def _judge(judge, options) -> Judge:
    return judge if isinstance(judge, Judge) else make_judge(judge, **options)


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
