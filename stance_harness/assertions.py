"""Assertion helpers: each checks one claim about a Run and shows a table of what it found.

`check_X(run, ...)` evaluates the claim and returns a CheckResult, whether it holds or not.
`assert_X(run, ...)` is the same check that raises HypothesisFailed (an AssertionError
carrying the result) when the claim does not hold. Either way the result is recorded in the
report section of every test that holds the run: the `train` fixture hands a run to a test
together with that test's record (`run.sinks`), so nothing is recorded through a hidden
channel, and a check outside a test records nothing and still returns its result.
Helper frames are hidden from tracebacks. Each metric a helper publishes is declared here.
"""

from __future__ import annotations

import functools
import inspect
import math
import statistics

from stance_harness.analysis.behavior import effect_of
from stance_harness.analysis.calibration import ece_interval, ece_of_items
from stance_harness.analysis.concentration import block_shares, change_mass, gini, shares, top_k_share
from stance_harness.analysis.deltas import aggregate, layer_label
from stance_harness.analysis.geometry import profile_rank_correlation
from stance_harness.analysis import replication
from stance_harness.analysis.paired import decide, paired_difference, spearman_with_interval
from stance_harness.where import check_min_retained
from stance_harness.runs.instruments import LOSS_RISE, WEIGHT_GROWTH, health_events
from stance_harness.core.registry import HarnessError, suggest
from stance_harness.core.metrics import HIGHER, LOWER, Estimate, declare_metrics, direction_of
from stance_harness.core.results import CheckResult
from stance_harness.report.sections import differing_options, short_value
from stance_harness.runs.request import TrainingRequest
from stance_harness.judges import JUDGES
from stance_harness.runs.run import PAIRED_METRICS, Run, runset

declare_metrics([
    ("ece", LOWER, "expected calibration error"),
    ("mce", LOWER, "maximum calibration error"),
    ("brier", LOWER, "Brier score"),
    ("acc1", HIGHER, "top-1 accuracy"),
    ("behavior_shift", HIGHER, "how far behaviour moved toward the stance (the log-likelihood margin's shift)"),
    ("loglik_margin", HIGHER, "log-likelihood margin of stance answers over plain ones"),
    ("kl", HIGHER, "KL divergence of the tuned model's predictions from the base model's on probes"),
    ("marker_rate", HIGHER, "share of generations that carry the stance's markers"),
    ("forgetting", LOWER, "relative increase of held-out perplexity, or embedding drift"),
    ("perplexity_increase", LOWER, "relative perplexity increase on held-out general text"),
    ("embedding_drift", LOWER, "drift of sentence embeddings of held-out text"),
    ("max_grad_norm", LOWER, "largest gradient norm during training"),
    ("grad_spike", LOWER, "largest grad norm over the median of the steps before it"),
    ("nonfinite_events", LOWER, "non-finite losses, gradients or weights during training"),
    ("effective_rank", LOWER, "mean energy rank of the block updates (lower: fewer directions)"),
    ("concentration_share", HIGHER, "share of the weight change inside the targeted layers"),
    ("retained", HIGHER, "share of the behaviour shift kept when only the chosen layers' change is kept"),
    ("intruders", LOWER, "intruder dimensions per changed block matrix (top 10 singular vectors, cosine < 0.5)"),
    ("profile_rho", HIGHER, "Spearman rank correlation of two runs' per-layer change profiles"),
    ("negated_shift", LOWER, "behaviour shift with the task vector subtracted (dose -1)"),
])


class HypothesisFailed(AssertionError):
    """The data refuted the claim."""

    def __init__(self, result: CheckResult):
        self.result = result
        super().__init__(result.render())


class HypothesisInconclusive(Exception):
    """The data neither support nor refute the claim (its interval straddles the margin); what
    pytest makes of it is --inconclusive's choice. Not an AssertionError: it is no refutation."""

    def __init__(self, result: CheckResult):
        self.result = result
        super().__init__(result.render())


def _conclude(runs, result: CheckResult, published: dict | None = None) -> CheckResult:
    """Record `result` (and the metrics it publishes) in the report of each test holding one of `runs`."""
    sinks = []
    for sink in (sink for run in runs for sink in getattr(run, "sinks", ())):
        if sink not in sinks:  # bound methods of one record compare equal, though not identical
            sinks.append(sink)
    for sink in sinks:
        sink(result, published)
    return result


# -- the arguments, checked before anything is measured ------------------------------------------
def _what(value) -> str:
    if callable(value) and getattr(value, "__name__", "") == "_train":  # the plugin's `train` fixture
        return "the `train` fixture itself (a function); call it: run = train('lora', ...)"
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} (type {type(value).__name__})"


def _is_run(value) -> bool:
    # under --plan, `train` returns a PlannedRun: its request is checked, and reading the run skips the
    # test; a stand-in (tests) has what every helper uses of a run, its label and its sinks
    return (isinstance(value, Run) or isinstance(getattr(value, "request", None), TrainingRequest)
            or (hasattr(value, "label") and hasattr(value, "sinks")))


def _same(a, b) -> bool:
    key = getattr(a, "run_id", None)
    return a is b or (key is not None and key == getattr(b, "run_id", None))


def _check_run_arguments(helper: str, arguments: dict, runs: tuple, lists: bool) -> None:
    """Each of `runs` a Run (or with `lists`, a list of Runs, one per seed), no run held against
    itself, and no run twice on one side."""
    sides = {}
    for name in runs:
        value = arguments[name]
        many = lists and isinstance(value, (list, tuple))
        for i, run in enumerate(value if many else [value]):
            if not _is_run(run):
                where = f"{name}[{i}]" if many else name
                wanted = "a Run (what train(...) returns)" + (
                    ", or a RunSet (train(..., seeds=N)) or list of Runs, one per seed" if lists else "")
                raise HarnessError(f"{helper}: `{where}` must be {wanted}, got {_what(run)}")
        sides[name] = side = list(value) if many else [value]
        twice = next((x for i, x in enumerate(side) if any(_same(x, y) for y in side[i + 1:])), None)
        if twice is not None:
            raise HarnessError(f"{helper}: `{name}` holds run {_name_of(twice)} twice; one per seed, each a "
                               f"different run")
    if len(runs) == 2:
        (first, a), (second, b) = sides.items()
        same = next((x for x, y in zip(a, b) if _same(x, y)), None)
        if same is not None:
            raise HarnessError(f"{helper}: `{first}` and `{second}` are the same run ({_name_of(same)}); a run "
                               f"compared with itself differs by exactly 0, which is no evidence either way. "
                               f"Compare two different runs (another method, recipe or seed)")


def _name_of(run) -> str:
    return getattr(run, "run_id", None) or run.label


def _check_metric(helper: str, metric, known) -> None:
    if isinstance(metric, str) and metric.startswith("judge:"):  # a registered judge's scores, per probe
        JUDGES.get(metric.partition(":")[2])
        return
    if metric not in known:
        raise HarnessError(f"{helper}: no metric {metric!r} to compare.{suggest(str(metric), list(known))} "
                           f"Paired comparisons take {', '.join(known)}, and judge:NAME for a judge "
                           f"({', '.join(f'judge:{n}' for n in JUDGES.names())})")


def _takes_runs(*runs: str, lists: bool = False, metric: tuple | None = None, pooled: bool = False):
    """check_X's arguments checked before any measurement: `runs` name its Run parameters (with
    `lists`, a list of runs per seed is allowed too); `metric`, the names its `metric` may take.
    A single-run check given a RunSet checks each seed, unless `pooled` (it then takes the seeds
    as one arm itself). The message names the helper as called: check_X, or assert_X."""
    def decorate(check):
        signature = inspect.signature(check)
        per_seed = runs == ("run",) and not pooled  # a single-run check takes a RunSet too, and checks each seed
        lists_ok = lists or runs == ("run",)

        def validate(helper: str, args, kwargs) -> None:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                return  # the call itself raises the TypeError, saying which argument
            bound.apply_defaults()
            if metric is not None:
                _check_metric(helper, bound.arguments["metric"], metric)
            _check_run_arguments(helper, bound.arguments, runs, lists_ok)

        body = _each_seed(check) if per_seed else check

        @functools.wraps(check)
        def checked(*args, **kwargs):
            __tracebackhide__ = True
            validate(check.__name__, args, kwargs)
            return body(*args, **kwargs)

        checked.validate, checked.unchecked = validate, body
        return checked
    return decorate


def _each_seed(check):
    """A single-run check that takes a RunSet (or list of runs) too: it checks each run, and the
    claim holds when it holds for every seed; the result names the seeds where it does not."""
    @functools.wraps(check)
    def per_seed(run, *args, **kwargs):
        if not isinstance(run, (list, tuple)):
            return check(run, *args, **kwargs)
        if not run:
            raise HarnessError(f"{check.__name__}: the RunSet holds no run")
        results = [check(r, *args, **kwargs) for r in run]  # each is recorded in the test's report
        seeds = _seeds(run)
        verdicts = [x.verdict for x in results]
        verdict = next((v for v in ("refuted", "inconclusive") if v in verdicts), "supported")
        failing = [f"seed {s}: {x.summary}" for s, x in zip(seeds, results) if not x.passed]
        summary = (f"{check.__name__.replace('check_', 'assert_', 1)} holds for all {len(run)} seeds" if not failing
                   else f"fails for {len(failing)} of {len(run)} seeds: " + "; ".join(failing))
        return CheckResult(results[0].check, all(x.passed for x in results), summary, ["seed", "verdict", "summary"],
                           [[s, x.verdict, x.summary] for s, x in zip(seeds, results)],
                           {"seeds": len(run), "failing_seeds": [s for s, x in zip(seeds, results) if not x.passed]},
                           verdict=verdict)
    return per_seed


def _asserting(check):
    """assert_X from check_X: the same arguments and result, raising when the claim does not hold."""
    name = check.__name__.replace("check_", "assert_", 1)

    @functools.wraps(check)
    def assertion(*args, **kwargs):
        __tracebackhide__ = True
        check.validate(name, args, kwargs)
        result = check.unchecked(*args, **kwargs)
        if result.verdict == "inconclusive":
            raise HypothesisInconclusive(result)
        if not result.passed:
            raise HypothesisFailed(result)
        return result

    assertion.__name__ = assertion.__qualname__ = name
    return assertion


def _targeted(row, layers, kinds) -> bool:
    return (layers is None or row.layer in layers) and (kinds is None or row.kind in kinds)


@_takes_runs("run")
def check_change_concentrated(run, layers, kinds=None, min_share: float = 0.5,
                               view: str = "effective", measure: str = "sq_fro") -> CheckResult:
    """At least `min_share` of the run's total change lies in `layers` (x `kinds`).

    `layers`: indices in this model (use `anatomy.analog(...)` to carry indices across depths).
    `kinds`: module kinds or groups (q_proj, attention, mlp, ...); None means every kind.
    """
    if not 0 <= min_share <= 1:
        raise ValueError(f"min_share must be in [0, 1], got {min_share!r}")
    anatomy = run.anatomy
    layer_set = set(anatomy.check_layers(layers))
    kind_set = set(anatomy.check_kinds(kinds)) if kinds is not None else None
    rows = run.deltas(view)
    total = sum(change_mass(r.moments, measure) for r in rows)
    in_target: dict[str, float] = {}  # targeted mass per layer
    for r in rows:
        if _targeted(r, layer_set, kind_set):
            in_target[layer_label(r)] = in_target.get(layer_label(r), 0.0) + change_mass(r.moments, measure)
    target = sum(in_target.values())
    per_group = {label: change_mass(m, measure) for label, m in aggregate(rows).items()}
    group_share = shares(per_group)
    share = target / total if total > 0 else 0.0
    where = f"layers {sorted(layer_set)}" + (f" x {sorted(kind_set)}" if kind_set else "")
    metrics = {"share": share, "top2_share": top_k_share(group_share, 2), "gini": gini(group_share.values())}
    if total <= 0:
        summary = f"the run changed nothing ({view} view), so no change can be concentrated in {where}"
    else:
        verdict = ">=" if share >= min_share else "<"
        summary = f"{share:.1%} of the change ({measure}, {view} view) is in {where}; {verdict} required {min_share:.1%}"
    table = [[label, s, in_target[label] / (total or 1.0) if label in in_target else ""]
             for label, s in group_share.items()]
    return _conclude([run], CheckResult(
        "assert_change_concentrated", total > 0 and share >= min_share, summary,
        ["layer", "share", "in target"], table, metrics,
    ), {f"{run.label}.concentration_share": share})


@_takes_runs("run")
def check_change_spread(run, top_k: int = 2, max_share: float = 0.5,
                         view: str = "effective", measure: str = "sq_fro") -> CheckResult:
    """The `top_k` layers that changed most hold at most `max_share` of the change."""
    if not 0 <= max_share <= 1 or top_k < 1:
        raise ValueError(f"need top_k >= 1 and max_share in [0, 1], got top_k={top_k!r}, max_share={max_share!r}")
    layer_share = block_shares(run.deltas(view), measure)
    ranked = sorted(((f"L{i}", s) for i, s in layer_share.items()), key=lambda kv: kv[1], reverse=True)
    held = sum(s for _, s in ranked[:top_k])
    changed = sum(layer_share.values()) > 0
    if not changed:
        summary = f"the run changed no layer ({view} view), so its change cannot be spread"
    else:
        verdict = "<=" if held <= max_share else ">"
        top = ", ".join(label for label, _ in ranked[:top_k])
        summary = f"the top {top_k} layers ({top}) hold {held:.1%} of the layer change; {verdict} allowed {max_share:.1%}"
    return _conclude([run], CheckResult(
        "assert_change_spread", changed and held <= max_share, summary,
        ["layer", "share", "rank"], [[label, s, i + 1] for i, (label, s) in enumerate(ranked)],
        {"top_k_share": held, "gini": gini(layer_share.values())},
    ))


def _previous_medians(norms: list[float], window: int):
    """(step, median grad norm of the up to `window` steps before it), from step 1 on."""
    for s in range(1, len(norms)):
        previous = sorted(norms[max(0, s - window) : s])
        yield s, previous[len(previous) // 2]


def _steps_around(trace, step: int, mark: str, radius: int = 2) -> list[list]:
    rows = []
    for s in range(max(0, step - radius), min(len(trace.loss), step + radius + 1)):
        layers = {label: norms[s] for label, norms in trace.layer_grad_norm.items() if s < len(norms)}
        top = max(layers, key=lambda k: layers[k] if math.isfinite(layers[k]) else math.inf) if layers else ""
        rows.append([s, trace.loss[s], trace.grad_norm[s], f"{top} {layers.get(top, float('nan')):.4g}" if top else "",
                     mark if s == step else ""])
    return rows


@_takes_runs("run")
def check_gradients_stable(run, max_grad_norm: float | None = None, max_spike: float | None = None,
                            window: int = 5) -> CheckResult:
    """No non-finite loss, gradient or weight; optionally, no grad norm above `max_grad_norm`
    and no spike above `max_spike` times the median of the previous `window` steps.
    Grad norms are the global norms before clipping."""
    if window < 1 or (max_spike is not None and max_spike <= 0) or (max_grad_norm is not None and max_grad_norm <= 0):
        raise ValueError(f"need window >= 1 and positive bounds, got window={window!r}, "
                         f"max_spike={max_spike!r}, max_grad_norm={max_grad_norm!r}")
    trace = run.trace
    norms = trace.grad_norm
    headers = ["step", "loss", "grad norm", "largest layer", ""]
    metrics = {"steps": len(norms), "max_grad_norm": max((n for n in norms if math.isfinite(n)), default=None),
               "nonfinite_events": len(trace.nonfinite)}
    spikes = [(s, norms[s] / m) for s, m in _previous_medians(norms, window) if m > 0 and math.isfinite(norms[s])]
    published = {f"{run.label}.nonfinite_events": len(trace.nonfinite),
                 f"{run.label}.grad_spike": max((ratio for _, ratio in spikes), default=0.0),
                 **({f"{run.label}.max_grad_norm": metrics["max_grad_norm"]} if metrics["max_grad_norm"] is not None
                    else {})}
    if trace.nonfinite:
        first = trace.nonfinite[0]
        where = f" in {first['parameter']}" if first["parameter"] else ""
        halted = f"; the run halted at step {trace.halted_at}" if trace.halted_at is not None else ""
        summary = (f"non-finite {first['what']} at step {first['step']}{where} "
                   f"({len(trace.nonfinite)} non-finite events{halted}, policy {run.instruments.nonfinite})")
        return _conclude([run], CheckResult("assert_gradients_stable", False, summary, headers,
                                            _steps_around(trace, first["step"], "<- first non-finite"), metrics),
                         published)
    if max_grad_norm is not None:
        over = next((s for s, n in enumerate(norms) if n > max_grad_norm), None)
        if over is not None:
            summary = f"grad norm {norms[over]:.4g} at step {over} exceeds max_grad_norm {max_grad_norm:g}"
            return _conclude([run], CheckResult("assert_gradients_stable", False, summary, headers,
                                                _steps_around(trace, over, "<- over the bound"), metrics), published)
    if max_spike is not None:
        for s, median in _previous_medians(norms, window):
            if median > 0 and norms[s] / median > max_spike:
                summary = (f"grad norm spike at step {s}: {norms[s]:.4g} is {norms[s] / median:.3g}x the median "
                           f"{median:.4g} of the previous {min(s, window)} steps (allowed {max_spike:g}x)")
                return _conclude([run], CheckResult("assert_gradients_stable", False, summary, headers,
                                                    _steps_around(trace, s, "<- spike"), metrics), published)
    peak = metrics["max_grad_norm"]
    summary = f"{len(norms)} steps, all finite; max grad norm {peak:.4g}" if peak is not None else "no steps ran"
    return _conclude([run], CheckResult("assert_gradients_stable", bool(norms), summary, headers, [], metrics), published)


@_takes_runs("run")
def check_training_healthy(run, max_loss_rise: float = LOSS_RISE, max_weight_growth: float = WEIGHT_GROWTH) -> CheckResult:
    """Training did not collapse, with or without a NaN: nothing non-finite; the loss never rose past
    its start by `max_loss_rise` (a share of it) nor reached the uniform level (ln of the
    vocabulary, within 5%); the gradients did not vanish to exactly 0 for every trained tensor to the
    end; the trained weights' norm never grew past `max_weight_growth` times its start."""
    if max_loss_rise <= 0 or max_weight_growth <= 1:
        raise ValueError(f"need max_loss_rise > 0 and max_weight_growth > 1, got {max_loss_rise!r}, {max_weight_growth!r}")
    trace = run.trace
    headers = ["step", "loss", "grad norm", "largest layer", ""]
    events = [{"step": e["step"], "what": f"non-finite {e['what']}", "detail": f"in {e['parameter']}" if e["parameter"] else ""}
              for e in trace.nonfinite[:1]]
    events += health_events(trace, loss_rise=max_loss_rise, weight_growth=max_weight_growth)
    metrics = {"steps": len(trace.loss), "events": len(events), "uniform_loss": trace.uniform_loss,
               "weight_growth": (max(trace.weight_norm) / trace.weight_norm[0]
                                 if trace.weight_norm and trace.weight_norm[0] > 0 else None)}
    if not trace.loss:
        return _conclude([run], CheckResult("assert_training_healthy", False, "no steps ran", headers, [], metrics))
    if not events:
        summary = (f"{len(trace.loss)} steps: no non-finite value, loss {trace.loss[0]:.4g} -> {trace.loss[-1]:.4g}, "
                   f"weights x{metrics['weight_growth'] or 1:.3g}, gradients alive")
        return _conclude([run], CheckResult("assert_training_healthy", True, summary, headers, [], metrics))
    first = min(events, key=lambda e: e["step"])
    summary = (f"training collapsed at step {first['step']}: {first['what']} ({first['detail']}); "
               f"{len(events)} events: " + ", ".join(f"{e['what']} at step {e['step']}" for e in events))
    return _conclude([run], CheckResult("assert_training_healthy", False, summary, headers,
                                        _steps_around(trace, first["step"], f"<- {first['what']}"), metrics))


@_takes_runs("run")
def check_only_targets_changed(run, layers=None, kinds=None) -> CheckResult:
    """Frozen weights are bit-identical; trained ones changed.

    With `layers`/`kinds`, trainable tensors outside them must also be bit-identical, and
    every tensor inside them must have changed.
    """
    anatomy = run.anatomy
    layer_set = set(anatomy.check_layers(layers)) if layers is not None else None
    kind_set = set(anatomy.check_kinds(kinds)) if kinds is not None else None
    offenders = []
    for raw in run.changed_frozen():
        offenders.append([str(anatomy.name_of(raw)), "frozen, but its bytes changed", ""])
    changed = unchanged = 0
    for row in run.adapter_deltas:
        moved = row.moments.total_abs > 0 or row.moments.nonfinite > 0
        inside = _targeted(row, layer_set, kind_set)
        changed += moved
        unchanged += not moved
        if inside and not moved:
            offenders.append([row.name, "a target, but unchanged", 0.0])
        elif moved and not inside:
            offenders.append([row.name, "outside the targets, but changed", row.moments.mean_abs])
    scope = "all trainable tensors" if layer_set is None and kind_set is None else (
        f"layers {sorted(layer_set) if layer_set else 'any'} x kinds {sorted(kind_set) if kind_set else 'any'}")
    frozen = len(run.frozen_digests)
    if offenders:
        summary = f"{len(offenders)} tensors break the rule (targets: {scope})"
    else:
        summary = f"{frozen} frozen tensors bit-identical; {changed} trained tensors changed (targets: {scope})"
    return _conclude([run], CheckResult(
        "assert_only_targets_changed", not offenders, summary,
        ["parameter", "problem", "mean |Δ|"], offenders,
        {"frozen_tensors": frozen, "changed_tensors": changed, "unchanged_trainable": unchanged},
    ))


def _interval(effect: dict) -> str:
    return f"{effect['mean']:+.4g} [{effect['low']:+.4g}, {effect['high']:+.4g}]"


@_takes_runs("run", pooled=True)
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
    return _conclude([run], CheckResult(
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
    return _conclude(runs, CheckResult(
        check, verdict == "supported", summary, [unit, *(f"seed {s}" for s in _seeds(runs))],
        table, {"metric": metric, **effect, "estimate": estimate, "unit": unit, "seeds": len(runs),
                "scope": first.scope, "method": first.method, "df": first.df, "level": first.level,
                "p_value": deciding.p_value, "rests_on": deciding.rests_on(), "bounds": [low, high]},
        verdict=verdict),
        {f"{runs[0].label}.{metric}": published,
         **({f"{runs[0].label}.behavior_shift": published} if metric == "loglik_margin" else {})})


@_takes_runs("runs", lists=True, metric=PAIRED_METRICS)
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


def _seeds(runs) -> list:
    return runset(runs).seeds


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


@_takes_runs("run")
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
    return _conclude([run], CheckResult(
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


def _calibration_rows(found: dict) -> list[list]:
    rows = []
    for bin_ in found["adapted"]["bins"]:
        if bin_["count"]:
            rows.append([f"({bin_['lower']:.3f}, {bin_['upper']:.3f}]", bin_["count"], bin_["confidence"],
                         bin_["accuracy"], abs(bin_["accuracy"] - bin_["confidence"])])
    return rows


_CALIBRATION_HEADERS = ["bin", "count", "confidence", "accuracy", "gap"]


def _calibration_metrics(run, found: dict, n_bins: int) -> dict:
    adapted = found["adapted"]
    metrics = {f"{run.label}.{k}": adapted[k] for k in ("ece", "mce", "brier", "acc1")}
    items = found.get("items")
    if items and items.get("confidence"):  # ECE's bootstrap interval over the predictions, for --fail-on ...@ci
        metrics[f"{run.label}.ece"] = Estimate(adapted["ece"], *ece_interval(items["confidence"], items["correct"],
                                                                             n_bins))
    return metrics


@_takes_runs("run")
def check_ece(run, max: float = 0.1, n_bins: int = 15) -> CheckResult:  # noqa: A002 - the issue's name
    """Expected calibration error on held-out data is at most `max` (15 equal-width bins)."""
    bound = max
    found = run.calibration(n_bins)
    adapted = found["adapted"]
    summary = (f"{run.label}: ECE {adapted['ece']:.4f} ({n_bins} bins, {adapted['n']} {found['unit']} predictions; "
               f"Acc@1 {adapted['acc1']:.3f}, MCE {adapted['mce']:.4f}, Brier {adapted['brier']:.4f}); "
               f"allowed {bound:.4f}")
    return _conclude([run], CheckResult("assert_ece", adapted["ece"] <= bound, summary, _CALIBRATION_HEADERS,
                                 _calibration_rows(found), dict(adapted, bins=None)), _calibration_metrics(run, found, n_bins))


@_takes_runs("run", "than")
def check_ece_not_worse(run, than, tol: float = 0.0, n_bins: int = 15) -> CheckResult:
    """ECE of `run` is at most that of `than` (another Run, e.g. a baseline method) plus `tol`."""
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    found, other = run.calibration(n_bins), than.calibration(n_bins)
    ece, reference = found["adapted"]["ece"], other["adapted"]["ece"]
    mine, theirs = _names([run], [than])  # two hybrid schedules: by the options that differ
    summary = (f"{mine} ECE {ece:.4f} vs {theirs} ECE {reference:.4f} (difference {ece - reference:+.4f}); "
               f"allowed at most {tol:+.4f}")
    rows = [[name, c["adapted"]["ece"], c["adapted"]["mce"], c["adapted"]["brier"], c["adapted"]["acc1"]]
            for name, c in ((mine, found), (theirs, other))]
    return _conclude([run, than], CheckResult(
        "assert_ece_not_worse", ece <= reference + tol, summary, ["run", "ECE", "MCE", "Brier", "Acc@1"], rows,
        {"ece": ece, "reference_ece": reference, "difference": ece - reference},
    ), _calibration_metrics(run, found, n_bins))


@_takes_runs("run")
def check_low_rank_update(run, energy: float = 0.9, max_rank: int = 8) -> CheckResult:
    """Every block matrix's update ΔW needs at most `max_rank` singular directions to hold
    `energy` of its squared norm (LoRA with rank r gives at most r)."""
    if not 0 < energy <= 1 or max_rank < 0:
        raise ValueError(f"need energy in (0, 1] and max_rank >= 0, got energy={energy!r}, max_rank={max_rank!r}")
    rows = run.rank(energy)["rows"]
    ranked = sorted(rows, key=lambda r: r["rank"], reverse=True)
    worst = ranked[0]["rank"] if ranked else 0
    over = [r for r in ranked if r["rank"] > max_rank]
    mean_rank = sum(r["rank"] for r in rows) / len(rows) if rows else 0.0
    if not rows:
        summary = f"{run.label} changed no block matrix, so there is no update to rank"
    else:
        summary = (f"{run.label}: the highest energy-{energy:g} rank of ΔW over {len(rows)} block matrices is {worst} "
                   f"(mean {mean_rank:.3g}); allowed {max_rank}" + (f"; {len(over)} matrices exceed it" if over else ""))
    table = [[r["matrix"], r["rank"], r["stable_rank"], "x".join(map(str, r["shape"]))] for r in (over or ranked)[:12]]
    return _conclude([run], CheckResult(
        "assert_low_rank_update", bool(rows) and not over, summary, ["matrix", "rank", "stable rank", "shape"], table,
        {"energy": energy, "max_rank_seen": worst, "mean_rank": mean_rank, "matrices": len(rows)},
    ), {f"{run.label}.effective_rank": mean_rank})


def _set_text(layers, kinds) -> str:
    return (f"layers {sorted(set(layers))}" if layers is not None else "every layer") + (
        f" x {list(kinds)}" if kinds is not None else "")


@_takes_runs("run")
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
        return _conclude([run], CheckResult("assert_behavior_localized", False, summary, headers, [], metrics),
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
    return _conclude([run], CheckResult("assert_behavior_localized", verdict.outcome == "supported", summary, headers,
                                        rows, metrics, verdict=verdict.outcome),
                     {f"{run.label}.retained": found["retained"]})


@_takes_runs("run")
def check_few_intruders(run, max_per_matrix: float = 1.0) -> CheckResult:
    """The run's changed block matrices carry at most `max_per_matrix` intruder dimensions on
    average: singular vectors among the top 10 of W + ΔW whose largest |cosine| with the base's
    singular vectors is below 0.5 (Shuttleworth et al. 2024; peft's defaults)."""
    if isinstance(max_per_matrix, bool) or not isinstance(max_per_matrix, (int, float)) or not max_per_matrix >= 0:
        raise HarnessError(f"max_per_matrix must be a number >= 0, got {max_per_matrix!r}")
    found = run.geometry()
    rows = found["intruders"]
    total = sum(r["count"] for r in rows)
    mean = total / len(rows) if rows else 0.0
    worst = sorted(rows, key=lambda r: r["count"], reverse=True)
    if not rows:
        summary = f"{run.label} changed no block matrix, so it has no intruder dimensions to count"
    else:
        summary = (f"{run.label}: {total} intruder dimensions over {len(rows)} changed block matrices "
                   f"({mean:.3g} per matrix; top {found['top_k']}, cosine < {found['epsilon']:g}); "
                   f"allowed {max_per_matrix:g} per matrix")
    return _conclude([run], CheckResult(
        "assert_few_intruders", mean <= max_per_matrix, summary, ["matrix", "intruders", "checked"],
        [[r["matrix"], r["count"], r["checked"]] for r in worst[:12]],
        {"intruders": total, "matrices": len(rows), "per_matrix": mean},
    ), {f"{run.label}.intruders": mean})


@_takes_runs("a", "b")
def check_layer_profiles_agree(a, b, min_rho: float = 0.0, measure: str = "sq_fro", view: str = "effective",
                               confidence: float = 0.95) -> CheckResult:
    """The per-layer change profiles of runs `a` and `b` (each layer's share of the block
    change) rank-correlate above `min_rho`: Spearman's rho over the layers both changed, with a
    bootstrap interval over layers. Supported when the interval lies above `min_rho`, refuted
    when it lies at or below it, inconclusive when it straddles it."""
    if isinstance(min_rho, bool) or not isinstance(min_rho, (int, float)) or not -1 <= min_rho < 1:
        raise HarnessError(f"min_rho must be a correlation in [-1, 1), got {min_rho!r}")
    profile_a, profile_b = block_shares(a.deltas(view), measure), block_shares(b.deltas(view), measure)
    aligned = profile_rank_correlation(profile_a, profile_b)
    name_a, name_b = _names([a], [b])
    headers = ["layer", name_a, name_b]
    rows = [[f"L{label}", x, y] for label, x, y in zip(aligned.labels, aligned.a, aligned.b)]
    if aligned.reason:
        summary = f"{name_a} vs {name_b}: no rank correlation: {aligned.reason}"
        return _conclude([a, b], CheckResult("assert_layer_profiles_agree", False, summary, headers, rows,
                                             {"rho": aligned.rho}, verdict="inconclusive"))
    found = spearman_with_interval(aligned.a, aligned.b, confidence=confidence)
    outcome = "supported" if found.low > min_rho else "refuted" if found.high <= min_rho else "inconclusive"
    summary = (f"{name_a} vs {name_b}: per-layer change profiles rank-correlate rho = {found.rho:+.3f} "
               f"[{found.low:+.3f}, {found.high:+.3f}] ({confidence:.0%} bootstrap over {found.n} layers); "
               f"required above {min_rho:+g}: {outcome}")
    return _conclude([a, b], CheckResult(
        "assert_layer_profiles_agree", outcome == "supported", summary, headers, rows,
        {"rho": found.rho, "low": found.low, "high": found.high, "n": found.n, "min_rho": min_rho,
         "p_value": found.p_value, "note": found.note}, verdict=outcome,
    ), {f"{a.label}.profile_rho": found.rho})


@_takes_runs("run")
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
    return _conclude([run], CheckResult(
        "assert_negation_reverses", verdict.outcome == "supported", summary,
        ["dose", "shift", "low", "high", "forgetting"], rows,
        {"estimate": effect.estimate, "low": effect.low, "high": effect.high, "n": effect.n,
         "p_value": verdict.p_value, "metric": "loglik_margin", "unit": effect.unit}, verdict=verdict.outcome,
    ), {f"{run.label}.negated_shift": effect.estimate})


assert_change_concentrated = _asserting(check_change_concentrated)
assert_change_spread = _asserting(check_change_spread)
assert_gradients_stable = _asserting(check_gradients_stable)
assert_only_targets_changed = _asserting(check_only_targets_changed)
assert_training_healthy = _asserting(check_training_healthy)
assert_behavior_shift = _asserting(check_behavior_shift)
assert_no_forgetting = _asserting(check_no_forgetting)
assert_ece = _asserting(check_ece)
assert_ece_not_worse = _asserting(check_ece_not_worse)
assert_low_rank_update = _asserting(check_low_rank_update)
assert_behavior_localized = _asserting(check_behavior_localized)
assert_few_intruders = _asserting(check_few_intruders)
assert_layer_profiles_agree = _asserting(check_layer_profiles_agree)
assert_negation_reverses = _asserting(check_negation_reverses)
assert_bounded = _asserting(check_bounded)


# -- comparisons between runs: paired by unit id, seeds as the unit of replication --------------
def _runs(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _options(run) -> dict:
    """A run's options as its report summary holds them (what report/sections.py compares)."""
    def as_dict(value):
        return value.as_dict() if hasattr(value, "as_dict") else {}
    return {"method": run.label, "config": as_dict(getattr(run, "config", None)),
            "recipe": as_dict(getattr(run, "recipe", None)),
            "stance": {"name": getattr(getattr(run, "stance", None), "name", None)},
            "examples": getattr(run, "examples", None), "task": getattr(getattr(run, "task", None), "name", None)}


def _arm_name(runs: list) -> str:
    """One arm's name on its own: its runs' label, `x5` for five seeds."""
    labels = list(dict.fromkeys(r.label for r in runs))
    return labels[0] if len(labels) == 1 and len(runs) == 1 else f"{'/'.join(labels)} x{len(runs)}"


def _names(runs_a: list, runs_b: list) -> tuple[str, str]:
    """Each arm's name: its runs' label, with the options that tell it from the other arm when
    both share one (`hybrid[freeze_lora_steps=4] vs hybrid[freeze_lora_steps=0]`, not `hybrid vs
    hybrid`); `x3` for three seeds. Two arms alike in every option are named by run id."""
    differing = differing_options({"a": _options(runs_a[0]), "b": _options(runs_b[0])})
    names = []
    for side, runs in (("a", runs_a), ("b", runs_b)):
        labels = list(dict.fromkeys(r.label for r in runs))
        name = "/".join(labels)
        if runs_a[0].label == runs_b[0].label:
            parts = [f"{k}={short_value(v)}" for k, v in differing[side][:3]] or [str(getattr(runs[0], "run_id", side))]
            name += "[" + ", ".join(parts) + "]"
        names.append(name if len(runs) == 1 else f"{name} x{len(runs)}")
    return names[0], names[1]


_KIND = {"acc1": "binary", "step_time": "series"}  # how a metric's units are decided (see replication)
# With seeds, these compare one statistic per seed: ECE is a statistic of all predictions, and a
# seed's steps are not crossed with another seed's (other batches, another moment of a shared machine)
_PER_SEED_STATISTIC = {"ece": ece_of_items, "step_time": statistics.median}


def _arm(runs: list, metric: str, name: str) -> tuple[str, tuple, list]:
    """(unit, unit ids, one row of per-unit values per seed): the seeds' units paired by id."""
    unit, first, rows = None, None, []
    for run in runs:
        unit, values = run.unit_values(metric)
        ids = tuple(run.unit_ids(metric))
        if first is None:
            first = ids
        else:  # the same units in another order are reordered; other units are refused
            where = replication.match_ids(first, ids, f"{name} (first seed)", f"{name} ({run.label}, a later seed)", unit)
            values = [values[j] for j in where]
        rows.append(list(values))
    return unit, first, rows


def _compare(check: str, claim: str, a, b, metric: str, margin: float, confidence: float,
             better: str | None, factor: float = 1.0) -> CheckResult:
    """Decide `claim` about a − factor·b of `metric`, paired by unit id: one run per arm is a
    run-level claim; several seeds per arm, a claim about the methods (see analysis.replication)."""
    runs_a, runs_b = _runs(a), _runs(b)
    if not runs_a or not runs_b:
        raise HarnessError(f"{check}: give a run or a RunSet on each side; got {len(runs_a)} and {len(runs_b)} runs")
    name_a, name_b = _names(runs_a, runs_b)
    unit, ids, rows_a = _arm(runs_a, metric, name_a)
    _, ids_b, rows_b = _arm(runs_b, metric, name_b)
    where = replication.match_ids(ids, ids_b, name_a, name_b, unit)  # pairing by unit id, not position
    rows_b = [[row[j] for j in where] for row in rows_b]
    per_seed = _PER_SEED_STATISTIC.get(metric)
    if per_seed is not None and (len(runs_a) > 1 or len(runs_b) > 1):  # each seed's statistic is one unit
        found = replication.compare_statistics(name_a, [per_seed(r) for r in rows_a], name_b,
                                               [per_seed(r) for r in rows_b], claim=claim, margin=margin,
                                               better=better, factor=factor, confidence=confidence)
    elif metric == "ece":  # a statistic of all predictions, not a mean of per-prediction values
        found = replication.compare_paired_statistic(name_a, rows_a[0], name_b, rows_b[0], ece_of_items,
                                                     claim=claim, margin=margin, better=better, unit=unit,
                                                     confidence=confidence)
    else:
        found = replication.compare(replication.arm(name_a, rows_a, ids), replication.arm(name_b, rows_b, ids),
                                    claim=claim, margin=margin, better=better, factor=factor, unit=unit,
                                    kind=_KIND.get(metric, "continuous"), confidence=confidence)
    summary = f"{name_a} vs {name_b}, {metric} (a = {name_a}, b = {name_b}): {found.explanation}"
    if len(runs_a) == 1 and len(runs_b) == 1 and metric != "ece":
        rows = [[i, x, y, d] for i, (x, y, d) in enumerate(zip(rows_a[0], rows_b[0], found.differences))][:16]
    else:
        rows = [[f"{found.unit} {i}", "", "", d] for i, d in enumerate(found.differences)][:16]
    return _conclude(runs_a + runs_b, CheckResult(
        check, found.outcome == "supported", summary, [unit, name_a, name_b, "a - b"], rows,
        {"metric": metric, "claim": claim, "margin": margin, "factor": factor, "estimate": found.estimate,
         "low": found.low, "high": found.high, "confidence": confidence, "n": found.units, "unit": found.unit,
         "informative": found.informative, "seeds_a": found.seeds_a, "seeds_b": found.seeds_b,
         "scope": found.scope, "method": found.method, "df": found.df, "p_value": found.p_value,
         "level": found.level, "rests_on": found.rests_on(), "note": found.note},
        verdict=found.outcome))


@_takes_runs("a", "b", lists=True, metric=PAIRED_METRICS)
def check_greater(a, b, metric: str = "behavior_shift", margin: float = 0.0, confidence: float = 0.95,
                  factor: float = 1.0) -> CheckResult:
    """`a`'s metric exceeds `factor` times `b`'s by more than `margin` (a − factor·b > margin, per
    unit), paired by unit id over the units both were measured on (probes, windows, predictions,
    steps; see Run.unit_values). `a`, `b`: a Run (a run-level claim: about two runs, not the
    methods) or a RunSet / list of runs, one per seed (a claim about the methods: seeds crossed
    with units). The verdict, p-value and interval come from one test (see docs/statistics.md)."""
    return _compare("assert_greater", "greater", a, b, metric, margin, confidence, None, factor)


@_takes_runs("a", "b", lists=True, metric=PAIRED_METRICS)
def check_less(a, b, metric: str = "forgetting", margin: float = 0.0, confidence: float = 0.95,
               factor: float = 1.0) -> CheckResult:
    """`a`'s metric falls below `factor` times `b`'s by more than `margin` (a − factor·b < −margin),
    paired as in check_greater."""
    return _compare("assert_less", "less", a, b, metric, margin, confidence, None, factor)


@_takes_runs("a", "than", lists=True, metric=PAIRED_METRICS)
def check_not_worse(a, than, metric: str = "ece", margin: float | None = None, confidence: float = 0.95) -> CheckResult:
    """Non-inferiority: `a` is worse than `than` by less than `margin` (> 0, declared), "worse" in
    the metric's own direction (a higher ECE, a lower behaviour shift), paired as in check_greater."""
    if margin is None:
        raise replication.ClaimError("assert_not_worse needs margin=: the largest loss you accept (> 0); "
                                     "with margin 0 it would be a superiority test")
    better = "higher" if direction_of(metric) == HIGHER else "lower"
    return _compare("assert_not_worse", "not_worse", a, than, metric, margin, confidence, better)


@_takes_runs("a", "b", lists=True, metric=PAIRED_METRICS)
def check_equivalent(a, b, metric: str = "behavior_shift", margin: float | None = None,
                     confidence: float = 0.95) -> CheckResult:
    """No shift: |a − b| < `margin` (> 0, declared), by two one-sided tests (TOST), paired as in
    check_greater. An interval that merely contains 0 is no evidence of "no shift"."""
    if margin is None:
        raise replication.ClaimError("assert_equivalent needs margin=: the largest difference that counts as none (> 0)")
    return _compare("assert_equivalent", "equivalent", a, b, metric, margin, confidence, None)


assert_greater = _asserting(check_greater)
assert_less = _asserting(check_less)
assert_not_worse = _asserting(check_not_worse)
assert_equivalent = _asserting(check_equivalent)


def assert_all(results) -> list[CheckResult]:
    """Several checks as one claim (a list of check_ results, so every one is recorded): raise for
    the first refuted one, else for the first inconclusive one; return them all when all hold."""
    __tracebackhide__ = True
    results = list(results)
    if not results:
        raise ValueError("assert_all needs at least one CheckResult")
    for i, result in enumerate(results):
        if not isinstance(result, CheckResult):
            hint = "; use check_X (which returns one), not assert_X" if result is None else ""
            raise HarnessError(f"assert_all: `results[{i}]` must be a CheckResult (what a check_X helper returns), "
                               f"got {_what(result)}{hint}")
    for verdict, error in (("refuted", HypothesisFailed), ("inconclusive", HypothesisInconclusive)):
        for result in results:
            if result.verdict == verdict:
                raise error(result)
    return list(results)
