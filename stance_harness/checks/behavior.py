"""Checks on the model's behaviour: the stance shift on held-out probes (and behavior_effect, its
interval for tables), a metric's mean bounded, the shift localized in some layers, negation
reversing it, and no forgetting of held-out general text.
"""

from __future__ import annotations

import math

from stance_harness.analysis import replication
from stance_harness.analysis.behavior import effect_of
from stance_harness.analysis.paired import decide, paired_difference
from stance_harness.checks.common import _arm, _arm_name, _seeds, asserting, conclude, takes_runs
from stance_harness.core.metrics import Estimate
from stance_harness.core.registry import HarnessError
from stance_harness.core.results import CheckResult
from stance_harness.where import check_min_retained


def _interval(effect: dict) -> str:
    return f"{effect['mean']:+.4g} [{effect['low']:+.4g}, {effect['high']:+.4g}]"


@takes_runs("run", pooled=True)
def check_behavior_shift(run, metric: str = "loglik_margin", min_effect: float | None = 0.0,
                          max_effect: float | None = None) -> CheckResult:
    """The stance shift on held-out probes, adapted minus base, clears the bounds with confidence.

    `min_effect`: the 95% interval's LOWER end must exceed it (so noise cannot pass).
    `max_effect`: the interval's UPPER end must stay below it ("shifts at most this much"); both
    together claim the shift lies between them (with -m and +m: "no shift", an equivalence test).
    Metrics: loglik_margin, kl, marker_rate (see Run.behavior). One run: the bootstrap interval over
    its probes, a claim about that run. A RunSet: seeds crossed with the probes, each bound a
    one-sided test at 2.5% (analysis.replication), a claim about the method.
    """
    if min_effect is None and max_effect is None:
        raise ValueError("give min_effect, max_effect or both")
    if isinstance(run, (list, tuple)):
        if len(run) > 1:
            return _shift_across_seeds(list(run), metric, min_effect, max_effect)
        (run,) = run
    found = run.behavior(metric)
    effect = found["effect"]
    failures = []
    if min_effect is not None and not effect["low"] > min_effect:
        failures.append(f"lower end {effect['low']:+.4g} is not above min_effect {min_effect:+g}")
    if max_effect is not None and not effect["high"] < max_effect:
        failures.append(f"upper end {effect['high']:+.4g} is not below max_effect {max_effect:+g}")
    bounds = " and ".join(b for b in (f"> {min_effect:+g}" if min_effect is not None else "",
                                       f"< {max_effect:+g}" if max_effect is not None else "") if b)
    summary = (f"{run.label} {metric} shift {_interval(effect)} (mean [95% CI] over {effect['n']} probes; "
               f"base {found['base']:.4g} -> adapted {found['adapted']:.4g}); required {bounds}")
    if failures:
        summary += ": " + "; ".join(failures)
    rows = [[p["probe"][:48], p["base"], p["adapted"], p["delta"]] for p in found["per_probe"]]
    shift = Estimate(effect["mean"], effect["low"], effect["high"])  # with its interval, for --fail-on ...@ci
    return conclude([run], CheckResult(
        "assert_behavior_shift", not failures, summary, ["probe", "base", "adapted", "delta"], rows,
        {"metric": metric, **effect, "base": found["base"], "adapted": found["adapted"]},
    ), {f"{run.label}.{metric}": shift,
        # `behavior_shift` names the headline measure only, so a gate on it never mixes in a KL
        **({f"{run.label}.behavior_shift": shift} if metric == "loglik_margin" else {})})


def _beyond(bound: float, above: bool) -> tuple[str, float, str | None]:
    """(claim, margin, better) for "the shift is above `bound`" (or below it), margins being >= 0."""
    if above:
        return ("greater", bound, None) if bound >= 0 else ("not_worse", -bound, "higher")
    return ("less", -bound, None) if bound <= 0 else ("not_worse", bound, "lower")


RUN_LEVEL_NOTE = "One seed: a claim about this run, not about the method"


def _shift_across_seeds(runs: list, metric: str, min_effect, max_effect) -> CheckResult:
    """check_behavior_shift over seeds: each seed's per-probe shift, seeds crossed with probes."""
    return _within_bounds("assert_behavior_shift", runs, metric, min_effect, max_effect, "shift")


def _within_bounds(check: str, runs: list, metric: str, low, high, what: str,
                   confidence: float = 0.95) -> CheckResult:
    """The per-unit mean of `metric` above `low` and/or below `high`: each bound one one-sided test
    against a constant arm (seeds crossed with units for a RunSet, an exact sign-flip over the
    units for one run); the claim holds when every bound's does."""
    name = _arm_name(runs)
    unit, ids, rows = _arm(runs, metric, name)
    measured = replication.arm(name, rows, ids)
    bounds = [(b, above) for b, above in ((low, True), (high, False)) if b is not None]
    found = []
    for bound, above in bounds:
        constant = replication.arm(f"{bound:g}", [[float(bound)] * len(ids) for _ in rows], ids)
        claim, margin, better = _beyond(0.0, above)
        found.append(replication.compare(measured, constant, claim=claim, margin=margin, better=better, unit=unit,
                                         confidence=confidence))
    outcomes = [f.outcome for f in found]
    verdict = "refuted" if "refuted" in outcomes else "inconclusive" if "inconclusive" in outcomes else "supported"
    first = found[0]
    deciding = max(found, key=lambda f: f.p_value)  # the claim holds when every bound's test does
    estimate = first.estimate + bounds[0][0]  # the comparison is against the bound: add it back
    low_end, high_end = first.low + bounds[0][0], first.high + bounds[0][0]
    required = " and ".join(f"{'>' if above else '<'} {b:+g}" for b, above in bounds)
    summary = (f"{name} {metric} {what} {estimate:+.4g} [{low_end:+.4g}, {high_end:+.4g}] "
               f"({first.confidence:.0%} interval, {first.method}); required {required}: {verdict}; "
               + "; ".join(f"{'lower' if above else 'upper'} bound: {f.outcome}, one-sided p = {f.p_value:.3g}"
                           for (_, above), f in zip(bounds, found))
               + f"; rests on {deciding.rests_on()}" + (f". {RUN_LEVEL_NOTE}" if first.run_level else ""))
    table = [[f"{unit} {i}", *(row[i] for row in rows)] for i in range(len(ids))][:16]
    effect = {"mean": estimate, "low": low_end, "high": high_end, "n": first.units}
    published = Estimate(estimate, low_end, high_end)  # with its interval, for --fail-on ...@ci
    return conclude(runs, CheckResult(
        check, verdict == "supported", summary, [unit, *(f"seed {s}" for s in _seeds(runs))],
        table, {"metric": metric, **effect, "estimate": estimate, "unit": unit, "seeds": len(runs),
                "scope": first.scope, "method": first.method, "df": first.df, "level": first.level,
                "p_value": deciding.p_value, "rests_on": deciding.rests_on(), "bounds": [low, high]},
        verdict=verdict),
        {f"{runs[0].label}.{metric}": published,
         **({f"{runs[0].label}.behavior_shift": published} if metric == "loglik_margin" else {})})


@takes_runs("runs", lists=True, paired=True)
def check_bounded(runs, metric: str = "acc1", above: float | None = None, below: float | None = None,
                  confidence: float = 0.95) -> CheckResult:
    """The mean of `metric` over its units (predictions, probes, windows; see Run.unit_values) lies
    above `above` and/or below `below`, with confidence: for a RunSet, seeds crossed with units (a
    claim about the method); for one run, an exact sign-flip test over its units (a claim about
    the run). For example Acc@1 above chance: `check_bounded(runs, "acc1", above=0.5)`."""
    if above is None and below is None:
        raise HarnessError("check_bounded: give above=, below= or both")
    if metric == "ece":
        raise HarnessError("check_bounded: ECE is a statistic of all predictions, not a mean over them; "
                           "use check_ece for a bound on one run")
    return _within_bounds("assert_bounded", list(runs) if isinstance(runs, (list, tuple)) else [runs], metric,
                          above, below, "mean", confidence)


def behavior_effect(runs, metric: str = "loglik_margin", confidence: float = 0.95) -> dict:
    """The shift of `metric` on held-out probes, adapted minus base, as {mean, low, high, n, seeds,
    method}: for one run, its bootstrap interval over the probes; for a RunSet, the interval with
    seeds crossed with probes (the one check_behavior_shift decides on). For tables."""
    runs = list(runs) if isinstance(runs, (list, tuple)) else [runs]
    if len(runs) == 1:
        effect = runs[0].behavior(metric)["effect"]
        return {"mean": effect["mean"], "low": effect["low"], "high": effect["high"], "n": effect["n"],
                "seeds": 1, "method": "bootstrap over probes (one run)"}
    name = _arm_name(runs)
    unit, ids, rows = _arm(runs, metric, name)
    found = replication.compare(replication.arm(name, rows, ids),
                                replication.arm("no shift", [[0.0] * len(ids) for _ in rows], ids),
                                claim="greater", unit=unit, confidence=confidence)
    return {"mean": found.estimate, "low": found.low, "high": found.high, "n": found.units, "seeds": len(runs),
            "method": found.method}


@takes_runs("run")
def check_no_forgetting(run, max_increase: float = 0.1) -> CheckResult:
    """Held-out general text is not forgotten beyond `max_increase`.

    Causal LM: the relative perplexity increase (0.1 = 10% higher). A task head on a body
    (stance-classification): the mean embedding drift 1 − cos of held-out sentences.
    """
    if max_increase < 0:
        raise ValueError(f"max_increase must be >= 0, got {max_increase!r}")
    found = run.forgetting()
    value = found["relative_increase"]
    ok = math.isfinite(value) and value <= max_increase
    if found["kind"] == "perplexity":
        summary = (f"{run.label}: held-out perplexity {found['base']:.4g} -> {found['adapted']:.4g} "
                   f"({value:+.2%}); allowed {max_increase:+.2%}")
        rows = [["perplexity", found["base"], found["adapted"], value]]
    else:
        summary = (f"{run.label}: held-out sentence embeddings drifted by {value:.4g} (mean 1 - cos over "
                   f"{found['sentences']} sentences); allowed {max_increase:.4g}")
        rows = [["embedding drift", 0.0, value, value]]
    published = _forgetting_estimate(found)
    return conclude([run], CheckResult(
        "assert_no_forgetting", ok, summary, ["measure", "base", "adapted", "change"], rows, dict(found),
    ), {f"{run.label}.forgetting": published,
        f"{run.label}.{'perplexity_increase' if found['kind'] == 'perplexity' else 'embedding_drift'}": published})


def _forgetting_estimate(found: dict):
    """The relative perplexity increase with its interval: it is exp(mean window NLL increase) − 1,
    so the bootstrap interval of that mean, through expm1 (BCa intervals follow monotone maps)."""
    value, per_unit = found["relative_increase"], found.get("per_unit")
    if found["kind"] != "perplexity" or not per_unit or not math.isfinite(value):
        return value
    effect = effect_of(per_unit)
    return Estimate(value, min(value, math.expm1(effect.low)), max(value, math.expm1(effect.high)))


def _set_text(layers, kinds) -> str:
    return (f"layers {sorted(set(layers))}" if layers is not None else "every layer") + (
        f" x {list(kinds)}" if kinds is not None else "")


@takes_runs("run")
def check_behavior_localized(run, layers=None, kinds=None, min_retained: float = 0.8,
                             confidence: float = 0.95) -> CheckResult:
    """Keeping only `layers` x `kinds` of the run's change (the rest reverted to the base) keeps
    at least `min_retained` of its loglik-margin shift: retained = (kept − none) / (full − none).

    Decided per probe, paired: kept − none against min_retained · (full − none), so the verdict
    is supported, refuted or inconclusive by the interval of that difference (see check_greater).
    `layers`: this model's indices (None: every position, embeddings and head too); `kinds`:
    kinds or groups (attention, mlp, norm, q_proj, ...; None: every kind)."""
    min_retained = check_min_retained(min_retained)
    found = run.localized(layers, kinds)
    ends = run.localization_ends()
    full_shift = sum(f - b for f, b in zip(ends["full"], ends["base"])) / len(ends["base"])
    none_shift = sum(n - b for n, b in zip(ends["none"], ends["base"])) / len(ends["base"])
    where_text = _set_text(layers, kinds)
    headers = ["probe", "kept - none", f"{min_retained:g} x (full - none)", "difference"]
    metrics = {"retained": found["retained"], "shift": found["shift"], "full": full_shift, "none": none_shift,
               "min_retained": min_retained}
    if full_shift == none_shift:
        summary = f"{run.label}: the whole change shifts behaviour no more than none of it, so nothing can be retained"
        return conclude([run], CheckResult("assert_behavior_localized", False, summary, headers, [], metrics),
                         {f"{run.label}.retained": found["retained"]})
    sign = 1.0 if full_shift > none_shift else -1.0  # a shift away from the stance is retained the same way
    kept = [sign * (k - n) for k, n in zip(found["per_probe"], ends["none"])]
    needed = [sign * min_retained * (f - n) for f, n in zip(ends["full"], ends["none"])]
    effect = paired_difference(kept, needed, unit="probe", confidence=confidence)
    verdict = decide(effect, claim="greater", margin=0.0)
    summary = (f"{run.label}: keeping only {where_text} retains {found['retained']:.1%} of the shift "
               f"({found['shift']:+.4g} of {full_shift:+.4g}, none kept {none_shift:+.4g}); required "
               f"{min_retained:.0%}: {verdict.explanation}")
    rows = [[i, k, m, d] for i, (k, m, d) in enumerate(zip(kept, needed, effect.differences))][:16]
    metrics.update(estimate=effect.estimate, low=effect.low, high=effect.high, n=effect.n, p_value=verdict.p_value,
                   metric="loglik_margin", unit=effect.unit)
    return conclude([run], CheckResult("assert_behavior_localized", verdict.outcome == "supported", summary, headers,
                                        rows, metrics, verdict=verdict.outcome),
                     {f"{run.label}.retained": found["retained"]})


@takes_runs("run")
def check_negation_reverses(run, confidence: float = 0.95) -> CheckResult:
    """Subtracting the task vector (dose λ = −1: θ₀ − (θ − θ₀)) moves the model away from the
    stance: its loglik margin falls below the base's, paired per probe."""
    found = run.dose_response()
    by_dose = {r["dose"]: r for r in found["rows"]}
    if -1.0 not in by_dose or 1.0 not in by_dose:
        raise HarnessError("the dose-response measurement holds no dose -1 or 1")
    base = [p["base"] for p in run.behavior("loglik_margin")["per_probe"]]
    negated = by_dose[-1.0]["per_probe"]
    effect = paired_difference(negated, base, unit="probe", confidence=confidence)
    verdict = decide(effect, claim="less", margin=0.0)
    summary = (f"{run.label}: the task vector subtracted shifts the loglik margin by {effect.estimate:+.4g} "
               f"(added: {by_dose[1.0]['shift']:+.4g}); claim: below the base: {verdict.explanation}")
    rows = [[r["dose"], r["shift"], r["low"], r["high"], r["forgetting"]] for r in found["rows"]]
    return conclude([run], CheckResult(
        "assert_negation_reverses", verdict.outcome == "supported", summary,
        ["dose", "shift", "low", "high", "forgetting"], rows,
        {"estimate": effect.estimate, "low": effect.low, "high": effect.high, "n": effect.n,
         "p_value": verdict.p_value, "metric": "loglik_margin", "unit": effect.unit}, verdict=verdict.outcome,
    ), {f"{run.label}.negated_shift": effect.estimate})


assert_behavior_shift = asserting(check_behavior_shift)
assert_bounded = asserting(check_bounded)
assert_no_forgetting = asserting(check_no_forgetting)
assert_behavior_localized = asserting(check_behavior_localized)
assert_negation_reverses = asserting(check_negation_reverses)
