"""Assertion helpers: each checks one claim about a Run and fails with a table.

Every helper returns a CheckResult when the claim holds and raises HypothesisFailed (an
AssertionError carrying the same result) when it does not. Both outcomes are recorded in the
current test's report. Helper frames are hidden from tracebacks.
"""

from __future__ import annotations

import math

from .analysis.concentration import block_shares, change_mass, gini, shares, top_k_share
from .analysis.deltas import aggregate, layer_label
from .report.records import CheckResult, emit


class HypothesisFailed(AssertionError):
    def __init__(self, result: CheckResult):
        self.result = result
        super().__init__(result.render())


def _conclude(result: CheckResult) -> CheckResult:
    __tracebackhide__ = True
    emit(result)
    if not result.passed:
        raise HypothesisFailed(result)
    return result


def _targeted(row, layers, kinds) -> bool:
    return (layers is None or row.layer in layers) and (kinds is None or row.kind in kinds)


def assert_change_concentrated(run, layers, kinds=None, min_share: float = 0.5,
                               view: str = "effective", measure: str = "sq_fro") -> CheckResult:
    """At least `min_share` of the run's total change lies in `layers` (x `kinds`).

    `layers`: indices in this model (use `anatomy.analog(...)` to carry indices across depths).
    `kinds`: module kinds or groups (q_proj, attention, mlp, ...); None means every kind.
    """
    __tracebackhide__ = True
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
    return _conclude(CheckResult(
        "assert_change_concentrated", total > 0 and share >= min_share, summary,
        ["layer", "share", "in target"], table, metrics,
    ))


def assert_change_spread(run, top_k: int = 2, max_share: float = 0.5,
                         view: str = "effective", measure: str = "sq_fro") -> CheckResult:
    """The `top_k` layers that changed most hold at most `max_share` of the change."""
    __tracebackhide__ = True
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
    return _conclude(CheckResult(
        "assert_change_spread", changed and held <= max_share, summary,
        ["layer", "share", "rank"], [[label, s, i + 1] for i, (label, s) in enumerate(ranked)],
        {"top_k_share": held, "gini": gini(layer_share.values())},
    ))


def _steps_around(trace, step: int, mark: str, radius: int = 2) -> list[list]:
    rows = []
    for s in range(max(0, step - radius), min(len(trace.loss), step + radius + 1)):
        layers = {label: norms[s] for label, norms in trace.layer_grad_norm.items() if s < len(norms)}
        top = max(layers, key=lambda k: layers[k] if math.isfinite(layers[k]) else math.inf) if layers else ""
        rows.append([s, trace.loss[s], trace.grad_norm[s], f"{top} {layers.get(top, float('nan')):.4g}" if top else "",
                     mark if s == step else ""])
    return rows


def assert_gradients_stable(run, max_grad_norm: float | None = None, max_spike: float | None = None,
                            window: int = 5) -> CheckResult:
    """No non-finite loss, gradient or weight; optionally, no grad norm above `max_grad_norm`
    and no spike above `max_spike` times the median of the previous `window` steps.
    Grad norms are the global norms before clipping."""
    __tracebackhide__ = True
    if window < 1 or (max_spike is not None and max_spike <= 0) or (max_grad_norm is not None and max_grad_norm <= 0):
        raise ValueError(f"need window >= 1 and positive bounds, got window={window!r}, "
                         f"max_spike={max_spike!r}, max_grad_norm={max_grad_norm!r}")
    trace = run.trace
    norms = trace.grad_norm
    headers = ["step", "loss", "grad norm", "largest layer", ""]
    metrics = {"steps": len(norms), "max_grad_norm": max((n for n in norms if math.isfinite(n)), default=None),
               "nonfinite_events": len(trace.nonfinite)}
    if trace.nonfinite:
        first = trace.nonfinite[0]
        where = f" in {first['parameter']}" if first["parameter"] else ""
        halted = f"; the run halted at step {trace.halted_at}" if trace.halted_at is not None else ""
        summary = (f"non-finite {first['what']} at step {first['step']}{where} "
                   f"({len(trace.nonfinite)} non-finite events{halted}, policy {run.instruments.nonfinite})")
        return _conclude(CheckResult("assert_gradients_stable", False, summary, headers,
                                     _steps_around(trace, first["step"], "<- first non-finite"), metrics))
    if max_grad_norm is not None:
        over = next((s for s, n in enumerate(norms) if n > max_grad_norm), None)
        if over is not None:
            summary = f"grad norm {norms[over]:.4g} at step {over} exceeds max_grad_norm {max_grad_norm:g}"
            return _conclude(CheckResult("assert_gradients_stable", False, summary, headers,
                                         _steps_around(trace, over, "<- over the bound"), metrics))
    if max_spike is not None:
        for s in range(1, len(norms)):
            previous = sorted(norms[max(0, s - window) : s])
            median = previous[len(previous) // 2]
            if median > 0 and norms[s] / median > max_spike:
                summary = (f"grad norm spike at step {s}: {norms[s]:.4g} is {norms[s] / median:.3g}x the median "
                           f"{median:.4g} of the previous {len(previous)} steps (allowed {max_spike:g}x)")
                return _conclude(CheckResult("assert_gradients_stable", False, summary, headers,
                                             _steps_around(trace, s, "<- spike"), metrics))
    peak = metrics["max_grad_norm"]
    summary = f"{len(norms)} steps, all finite; max grad norm {peak:.4g}" if peak is not None else "no steps ran"
    return _conclude(CheckResult("assert_gradients_stable", bool(norms), summary, headers, [], metrics))


def assert_only_targets_changed(run, layers=None, kinds=None) -> CheckResult:
    """Frozen weights are bit-identical; trained ones changed.

    With `layers`/`kinds`, trainable tensors outside them must also be bit-identical, and
    every tensor inside them must have changed.
    """
    __tracebackhide__ = True
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
    return _conclude(CheckResult(
        "assert_only_targets_changed", not offenders, summary,
        ["parameter", "problem", "mean |Δ|"], offenders,
        {"frozen_tensors": frozen, "changed_tensors": changed, "unchanged_trainable": unchanged},
    ))
