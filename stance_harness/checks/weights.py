"""Checks on the weight change itself: where it lies (concentrated in target layers, spread
over many, only the targets changed), its rank, its intruder dimensions, and whether two runs'
per-layer change profiles agree.
"""

from __future__ import annotations

from stance_harness.analysis.concentration import block_shares, change_mass, gini, shares, top_k_share
from stance_harness.analysis.deltas import aggregate, layer_label
from stance_harness.analysis.geometry import profile_rank_correlation
from stance_harness.analysis.paired import spearman_with_interval
from stance_harness.checks.common import _names, asserting, conclude, takes_runs
from stance_harness.core.registry import HarnessError
from stance_harness.core.results import CheckResult


def _targeted(row, layers, kinds) -> bool:
    return (layers is None or row.layer in layers) and (kinds is None or row.kind in kinds)


@takes_runs("run")
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
    return conclude([run], CheckResult(
        "assert_change_concentrated", total > 0 and share >= min_share, summary,
        ["layer", "share", "in target"], table, metrics,
    ), {f"{run.label}.concentration_share": share})


@takes_runs("run")
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
    return conclude([run], CheckResult(
        "assert_change_spread", changed and held <= max_share, summary,
        ["layer", "share", "rank"], [[label, s, i + 1] for i, (label, s) in enumerate(ranked)],
        {"top_k_share": held, "gini": gini(layer_share.values())},
    ))


@takes_runs("run")
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
    return conclude([run], CheckResult(
        "assert_only_targets_changed", not offenders, summary,
        ["parameter", "problem", "mean |Δ|"], offenders,
        {"frozen_tensors": frozen, "changed_tensors": changed, "unchanged_trainable": unchanged},
    ))


@takes_runs("run")
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
    return conclude([run], CheckResult(
        "assert_low_rank_update", bool(rows) and not over, summary, ["matrix", "rank", "stable rank", "shape"], table,
        {"energy": energy, "max_rank_seen": worst, "mean_rank": mean_rank, "matrices": len(rows)},
    ), {f"{run.label}.effective_rank": mean_rank})


@takes_runs("run")
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
    return conclude([run], CheckResult(
        "assert_few_intruders", mean <= max_per_matrix, summary, ["matrix", "intruders", "checked"],
        [[r["matrix"], r["count"], r["checked"]] for r in worst[:12]],
        {"intruders": total, "matrices": len(rows), "per_matrix": mean},
    ), {f"{run.label}.intruders": mean})


@takes_runs("a", "b")
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
        return conclude([a, b], CheckResult("assert_layer_profiles_agree", False, summary, headers, rows,
                                             {"rho": aligned.rho}, verdict="inconclusive"))
    found = spearman_with_interval(aligned.a, aligned.b, confidence=confidence)
    outcome = "supported" if found.low > min_rho else "refuted" if found.high <= min_rho else "inconclusive"
    summary = (f"{name_a} vs {name_b}: per-layer change profiles rank-correlate rho = {found.rho:+.3f} "
               f"[{found.low:+.3f}, {found.high:+.3f}] ({confidence:.0%} bootstrap over {found.n} layers); "
               f"required above {min_rho:+g}: {outcome}")
    return conclude([a, b], CheckResult(
        "assert_layer_profiles_agree", outcome == "supported", summary, headers, rows,
        {"rho": found.rho, "low": found.low, "high": found.high, "n": found.n, "min_rho": min_rho,
         "p_value": found.p_value, "note": found.note}, verdict=outcome,
    ), {f"{a.label}.profile_rho": found.rho})


assert_change_concentrated = asserting(check_change_concentrated)
assert_change_spread = asserting(check_change_spread)
assert_only_targets_changed = asserting(check_only_targets_changed)
assert_low_rank_update = asserting(check_low_rank_update)
assert_few_intruders = asserting(check_few_intruders)
assert_layer_profiles_agree = asserting(check_layer_profiles_agree)
