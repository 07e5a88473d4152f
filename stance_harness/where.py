"""Where the behaviour lives: a run's change kept in part or scaled as a whole, measured again
without retraining; and the geometry of its ΔW, per matrix and per layer.

Owns the patching of a run's model: `patched(run, keep, dose)` reverts the change units
(`Method.change_units`: trained tensors, or LoRA adapters) that `keep` rejects and scales the
rest by `dose`, then restores every parameter bit-exactly by handing back its own storage
(nothing is recomputed, so nothing can round). Reverting costs no memory (the reverted tensor
is the stored starting value); a dose other than 0 or 1 builds one new tensor per scaled one.
Also owns what the localization, dose_response and geometry measurements compute from such
patched models (each given a MeasureContext, `ctx`, not the Run):
the loglik-margin shift per probe, held-out forgetting, and the per-matrix geometry rows. The
numbers themselves come from the pure functions in stance_harness.analysis.geometry.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable

import torch

from stance_harness.analysis.behavior import effect_of
from stance_harness.analysis.concentration import block_shares
from stance_harness.analysis.deltas import MatrixDelta
from stance_harness.analysis.geometry import linear_cka, magnitude_direction, magnitude_direction_correlation, retained_fraction
from stance_harness.models.anatomy import KIND_GROUPS, locus_of
from stance_harness.core.errors import HarnessError

if TYPE_CHECKING:
    from stance_harness.runs.methods.base import ChangeUnit

DOSES = (-1.0, 0.0, 0.25, 0.5, 1.0, 1.5, 2.0)  # λ: the whole change scaled; −1 subtracts the task vector
KIND_SETS = ("attention", "mlp", "norm")  # the kind groups a localisation reports
THIRDS = ("early", "middle", "late")
INTRUDER_TOP_K, INTRUDER_EPSILON = 10, 0.5  # peft's reduce_intruder_dimension defaults


def _dosed(start: torch.Tensor, end: torch.Tensor, dose: float) -> torch.Tensor:
    # float32 arithmetic, stored in the parameter's own dtype (bf16 would round the difference away)
    return (start.float() + dose * (end.float() - start.float())).to(end.dtype)


@contextmanager
def patched(ctx, keep: Callable[["ChangeUnit"], bool] | None = None, dose: float = 1.0):
    """The run's model with the units `keep` rejects reverted to their start and the others'
    change scaled by `dose`; every parameter gets its own storage back on exit, bit for bit."""
    model = ctx.model
    units = ctx.method.change_units(model, ctx.before, ctx.anatomy)
    saved = []
    try:
        for unit in units:
            if keep is not None and not keep(unit):
                for param, start in unit.revert:
                    saved.append((param, param.data))
                    param.data = start.to(param.device, param.dtype)
            elif dose != 1.0:
                for param, start in unit.scale:
                    saved.append((param, param.data))
                    param.data = start.to(param.device, param.dtype) if dose == 0 else _dosed(
                        start.to(param.device), param.data, dose)
        yield model
    finally:
        for param, data in reversed(saved):
            param.data = data


def selection(ctx, layers=None, kinds=None) -> Callable[["ChangeUnit"], bool]:
    """A `keep` for `patched`: units in `layers` (this model's indices) x `kinds` (kinds or groups).
    None means any: layers=None keeps units outside the blocks too (embeddings, head)."""
    layer_set = set(ctx.anatomy.check_layers(layers)) if layers is not None else None
    kind_set = set(ctx.anatomy.check_kinds(kinds)) if kinds is not None else None
    return lambda u: (layer_set is None or u.layer in layer_set) and (kind_set is None or u.kind in kind_set)


def _shift(margins: list[float], base: list[float]) -> float:
    return math.fsum(m - b for m, b in zip(margins, base)) / len(base)


def base_margins(ctx) -> list[float]:
    return [p["base"] for p in ctx.measure("behavior", metric="loglik_margin")["per_probe"]]


def kept_margins(ctx, keep=None, dose: float = 1.0) -> list[float]:
    """Per probe, the loglik margin of the run's model patched as `patched` does; one forward
    pass per distinct set of kept units (kept in memory on the run)."""
    units = ctx.method.change_units(ctx.model, ctx.before, ctx.anatomy)
    kept = sorted(u.name for u in units if keep is None or keep(u))

    def compute():
        with patched(ctx, keep, dose) as model:
            return ctx.task.probe_margins(ctx, model)
    return ctx.measured(f"kept_margins:{dose!r}:{hash(tuple(kept))}:{len(kept)}", compute, stage="localization",
                        keep=False)


def ends(ctx) -> dict:
    """The per-probe margins of the base, of the whole change kept and of none of it kept: what
    every retained fraction is measured between."""
    return {"base": base_margins(ctx), "full": kept_margins(ctx), "none": kept_margins(ctx, lambda u: False)}


def localized_key(ctx, layers=None, kinds=None) -> str:
    return (f"localized:{sorted(set(layers)) if layers is not None else 'all'}:"
            f"{sorted(ctx.anatomy.check_kinds(kinds)) if kinds is not None else 'all'}")


def localized(ctx, layers=None, kinds=None) -> dict:
    """Shift and retained fraction with only `layers` x `kinds` of the change kept."""
    keep = selection(ctx, layers, kinds)
    found = ctx.measure("localization_ends")
    margins = found["full"] if layers is None and kinds is None else kept_margins(ctx, keep)
    return _row(found, margins, layers=sorted(set(layers)) if layers is not None else None,
                kinds=list(kinds) if kinds is not None else None) | {"per_probe": margins}


def _row(found: dict, margins: list[float], **what) -> dict:
    base = found["base"]
    shift, full, none = _shift(margins, base), _shift(found["full"], base), _shift(found["none"], base)
    retained = retained_fraction(shift, full, none)
    return {**what, "shift": shift, "retained": retained.value, **({"reason": retained.reason} if retained.reason else {})}


def localization(ctx) -> dict:
    """Retained fractions per layer third, per kind group, per single layer, and (LoRA) per adapter.
    A set that holds none of the change is the "none" end and one that holds all of it the
    "full" end, without a forward pass (a surgical run's untouched layers cost nothing)."""
    found = ctx.measure("localization_ends")
    anatomy = ctx.anatomy
    n = anatomy.num_layers
    base = found["base"]
    units = ctx.method.change_units(ctx.model, ctx.before, anatomy)
    adapters = [u for u in units if len(u.revert) > 1]

    def measured(keep):
        kept = sum(keep(u) for u in units)
        return found["none"] if kept == 0 else found["full"] if kept == len(units) else kept_margins(ctx, keep)

    rows = []
    for third in THIRDS:
        layers = [i for i in range(n) if locus_of(i, n) == third]
        if layers:
            rows.append({"by": "third", "set": third, **_row(found, measured(selection(ctx, layers)), layers=layers)})
    known = set(anatomy.kinds)
    for group in KIND_SETS:
        kinds = [k for k in KIND_GROUPS[group] if k in known]
        if kinds:
            rows.append({"by": "kind", "set": group, **_row(found, measured(selection(ctx, kinds=kinds)), kinds=kinds)})
    for i in range(n):
        rows.append({"by": "layer", "set": f"L{i}", **_row(found, measured(selection(ctx, [i])), layers=[i])})
    for unit in adapters:  # several tensors kept as one: B·A
        rows.append({"by": "adapter", "set": unit.name,
                     **_row(found, measured(lambda u, name=unit.name: u.name == name),
                            layers=[unit.layer], kinds=[unit.kind])})
    return {"metric": "loglik_margin", "probes": len(base), "full": _shift(found["full"], base),
            "none": _shift(found["none"], base), "rows": rows}


def dose_response(ctx, doses=DOSES) -> dict:
    """Shift (loglik margin, 95% interval over probes) and forgetting (relative perplexity
    increase on held-out text) with the run's whole change scaled by each λ in `doses`."""
    base = base_margins(ctx)
    base_nll = ctx.on_base(("window_nll",), lambda model: ctx.task.heldout_nll(ctx, model))
    rows = []
    for dose in doses:
        with patched(ctx, dose=dose) as model:
            margins = ctx.task.probe_margins(ctx, model)
            nll = ctx.task.heldout_nll(ctx, model)
        effect = effect_of([m - b for m, b in zip(margins, base)])
        mean_nll, mean_base = math.fsum(nll) / len(nll), math.fsum(base_nll) / len(base_nll)
        forgetting = math.exp(min(mean_nll - mean_base, 709.0)) - 1  # perplexity ratio − 1
        rows.append({"dose": dose, "shift": effect.mean, "low": effect.low, "high": effect.high,
                     "forgetting": forgetting, "per_probe": margins,
                     "per_window": [a - b for a, b in zip(nll, base_nll)]})
    return {"metric": "loglik_margin", "forgetting": "relative perplexity increase", "rows": rows}


def geometry(ctx, top_k: int = INTRUDER_TOP_K, epsilon: float = INTRUDER_EPSILON) -> dict:
    """Per changed block matrix: intruder dimensions (peft's test), DoRA's ΔM and ΔD; per kind,
    ΔM–ΔD correlation across layers; per layer: change share, CKA of base vs adapted hidden
    states on held-out text (block i's output; the last one as the body returns it, after its
    final norm). One matrix at a time."""
    anatomy, model = ctx.anatomy, ctx.model
    intruders = []
    for name, found in ctx.method.intruders(model, ctx.before, anatomy, top_k=top_k, epsilon=epsilon):
        where = anatomy.name_of(name)
        intruders.append({"matrix": where.module, "layer": where.layer, "kind": where.kind, "count": found.count,
                          "checked": len(found.max_cosines)})
    fan_in_fan_out = anatomy.model_type == "gpt2"  # Conv1D stores (in, out)
    directions, undefined = [], []
    for name, start, end in ctx.method.effective_deltas(model, ctx.before, anatomy):
        where = anatomy.name_of(name)
        if start.ndim != 2 or where.layer is None or torch.equal(start, end):
            continue
        try:
            change = magnitude_direction(start, end, fan_in_fan_out=fan_in_fan_out)
        except ValueError as exc:  # an all-zero unit has no direction
            undefined.append({"matrix": where.module, "reason": str(exc)})
            continue
        directions.append({"matrix": where.module, "layer": where.layer, "kind": where.kind,
                           "delta_m": change.delta_m, "delta_d": change.delta_d})
    correlation = {}
    for kind in dict.fromkeys(r["kind"] for r in directions):
        stat = magnitude_direction_correlation((r["delta_m"], r["delta_d"]) for r in directions if r["kind"] == kind)
        correlation[kind] = {"value": stat.value, **({"reason": stat.reason} if stat.reason else {})}
    base_states = ctx.on_base(("hidden_states",), lambda m: ctx.task.hidden_states(ctx, m))
    adapted_states = ctx.task.hidden_states(ctx, model)
    shares = block_shares([MatrixDelta.from_dict(r) for r in ctx.measure("deltas", view="effective")])
    layers = []
    for i in range(anatomy.num_layers):
        in_layer = [r for r in directions if r["layer"] == i]
        counts = [r for r in intruders if r["layer"] == i]
        cka = linear_cka(base_states[i + 1], adapted_states[i + 1]) if i + 1 < len(adapted_states) else math.nan
        layers.append({"layer": f"L{i}", "change_share": shares.get(i, 0.0),
                       "intruders": sum(r["count"] for r in counts), "matrices": len(counts),
                       "delta_m": math.fsum(r["delta_m"] for r in in_layer) / len(in_layer) if in_layer else None,
                       "delta_d": math.fsum(r["delta_d"] for r in in_layer) / len(in_layer) if in_layer else None,
                       "cka": cka})
    return {"top_k": top_k, "epsilon": epsilon, "intruders": intruders, "magnitude_direction": directions,
            "undefined_directions": undefined, "correlation": correlation, "layers": layers,
            "cka_tokens": int(adapted_states[0].shape[0])}


def intruders_per_layer(found: dict) -> list[float]:
    """Per layer: intruder dimensions per changed block matrix (0 where none changed)."""
    return [row["intruders"] / row["matrices"] if row["matrices"] else 0.0 for row in found["layers"]]


def check_min_retained(min_retained) -> float:
    if isinstance(min_retained, bool) or not isinstance(min_retained, (int, float)) or not math.isfinite(min_retained):
        raise HarnessError(f"min_retained must be a finite number (a share of the shift, e.g. 0.8), got {min_retained!r}")
    return float(min_retained)
