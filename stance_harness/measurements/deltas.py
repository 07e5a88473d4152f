"""Weight deltas per matrix (effective: as the model sees it; adapter: per trained tensor), and
the frozen parameters whose bytes changed."""

from __future__ import annotations

from stance_harness.analysis.deltas import delta_table, raw_delta_pairs
from stance_harness.analysis.digest import tensor_digest
from stance_harness.core.errors import HarnessError
from stance_harness.measurements.base import MeasurementSpec, register_measurement

VIEWS = ("effective", "adapter")


def check_view(ctx, view: str = "effective") -> None:
    if view not in VIEWS:
        raise HarnessError(f"deltas: view must be 'effective' or 'adapter', not {view!r}")


def deltas(ctx, view: str = "effective") -> list[dict]:
    """effective: per matrix as the model sees it (for LoRA, ΔW = scale·B·A on the base matrix);
    adapter: per trained tensor (for LoRA, its own A and B). Rows of MatrixDelta.as_dict()."""
    model = ctx.model
    pairs = (ctx.method.effective_deltas(model, ctx.before, ctx.anatomy) if view == "effective"
             else raw_delta_pairs(model, ctx.before))
    return [row.as_dict() for row in delta_table(pairs, ctx.anatomy)]


def changed_frozen(ctx) -> list[str]:
    """Frozen parameters whose bytes differ from before training (should be none)."""
    params = dict(ctx.model.named_parameters())
    return [n for n, d in ctx.frozen_digests.items() if tensor_digest(params[n]) != d]


register_measurement(MeasurementSpec(
    "deltas", deltas, "weight deltas per matrix: mean, var, mean|Δ|, var|Δ|, ‖Δ‖/‖W‖, norm change",
    key=lambda ctx, view="effective": f"deltas:{view}", stage=lambda view="effective": f"{view}_deltas",
    check_params=check_view, checks=("check_change_concentrated", "check_change_spread", "check_layer_profiles_agree")))
register_measurement(MeasurementSpec(
    "frozen_changed", changed_frozen, "frozen parameters whose bytes changed in training", stage="frozen_digests",
    checks=("check_only_targets_changed",)))
