"""Checks on how training went, from the run's trace: gradients stable (finite, bounded, no
spike) and training healthy (no collapse, with or without a NaN).
"""

from __future__ import annotations

import math

from stance_harness.checks.common import asserting, conclude, takes_runs
from stance_harness.core.results import CheckResult
from stance_harness.runs.instruments import LOSS_RISE, WEIGHT_GROWTH, health_events


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


@takes_runs("run")
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
        return conclude([run], CheckResult("assert_gradients_stable", False, summary, headers,
                                            _steps_around(trace, first["step"], "<- first non-finite"), metrics),
                         published)
    if max_grad_norm is not None:
        over = next((s for s, n in enumerate(norms) if n > max_grad_norm), None)
        if over is not None:
            summary = f"grad norm {norms[over]:.4g} at step {over} exceeds max_grad_norm {max_grad_norm:g}"
            return conclude([run], CheckResult("assert_gradients_stable", False, summary, headers,
                                                _steps_around(trace, over, "<- over the bound"), metrics), published)
    if max_spike is not None:
        for s, median in _previous_medians(norms, window):
            if median > 0 and norms[s] / median > max_spike:
                summary = (f"grad norm spike at step {s}: {norms[s]:.4g} is {norms[s] / median:.3g}x the median "
                           f"{median:.4g} of the previous {min(s, window)} steps (allowed {max_spike:g}x)")
                return conclude([run], CheckResult("assert_gradients_stable", False, summary, headers,
                                                    _steps_around(trace, s, "<- spike"), metrics), published)
    peak = metrics["max_grad_norm"]
    summary = f"{len(norms)} steps, all finite; max grad norm {peak:.4g}" if peak is not None else "no steps ran"
    return conclude([run], CheckResult("assert_gradients_stable", bool(norms), summary, headers, [], metrics), published)


@takes_runs("run")
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
        return conclude([run], CheckResult("assert_training_healthy", False, "no steps ran", headers, [], metrics))
    if not events:
        summary = (f"{len(trace.loss)} steps: no non-finite value, loss {trace.loss[0]:.4g} -> {trace.loss[-1]:.4g}, "
                   f"weights x{metrics['weight_growth'] or 1:.3g}, gradients alive")
        return conclude([run], CheckResult("assert_training_healthy", True, summary, headers, [], metrics))
    first = min(events, key=lambda e: e["step"])
    summary = (f"training collapsed at step {first['step']}: {first['what']} ({first['detail']}); "
               f"{len(events)} events: " + ", ".join(f"{e['what']} at step {e['step']}" for e in events))
    return conclude([run], CheckResult("assert_training_healthy", False, summary, headers,
                                        _steps_around(trace, first["step"], f"<- {first['what']}"), metrics))


assert_gradients_stable = asserting(check_gradients_stable)
assert_training_healthy = asserting(check_training_healthy)
