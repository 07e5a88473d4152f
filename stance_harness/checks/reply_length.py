"""The check of the reply length shift measurement (stance_harness.measurements.reply_length)."""

from __future__ import annotations

import math

from stance_harness.checks.common import asserting, conclude, takes_runs
from stance_harness.core.errors import HarnessError
from stance_harness.core.metrics import Estimate
from stance_harness.core.results import CheckResult

SHOWN = 5  # probes in the failure table: those whose length moved most


@takes_runs("run")
def check_reply_length_shift(run, max_shift: float = 8.0) -> CheckResult:
    """The adapted model's greedy replies keep their length: the mean over the probes of adapted
    minus base reply tokens lies within ±`max_shift`. Supported when its 95% bootstrap interval
    lies inside the bounds, refuted when it lies wholly outside, inconclusive when it straddles one."""
    if isinstance(max_shift, bool) or not isinstance(max_shift, (int, float)) or not 0 <= max_shift < math.inf:
        raise HarnessError(f"check_reply_length_shift: max_shift must be a number of tokens >= 0, got {max_shift!r}")
    found = run.measure("reply_length")
    mean, low, high = (found["effect"][k] for k in ("mean", "low", "high"))
    inside = -max_shift <= low and high <= max_shift
    verdict = "supported" if inside else "refuted" if low > max_shift or high < -max_shift else "inconclusive"
    summary = (f"{run.label}: replies {found['base']:.3g} -> {found['adapted']:.3g} tokens, shift {mean:+.3g} "
               f"tokens per probe (95% interval {low:+.3g} to {high:+.3g}); allowed ±{max_shift:g}")
    moved = sorted(found["per_probe"], key=lambda r: -abs(r["delta"]))[:SHOWN]
    return conclude([run], CheckResult(
        "assert_reply_length_shift", inside, summary, ["probe", "base tokens", "adapted tokens", "shift"],
        [[r["probe"], r["base"], r["adapted"], r["delta"]] for r in moved],
        {"mean": mean, "low": low, "high": high, "max_shift": max_shift, "n": found["effect"]["n"]}, verdict=verdict,
    ), {f"{run.label}.reply_length_shift": Estimate(mean, low, high)})


assert_reply_length_shift = asserting(check_reply_length_shift)
