"""Where the behaviour lives: does the stance sit where the weights changed?

Seed 000 says Qwen's concentration in a few layers "was emergent from full fine-tuning"; seed
001 treats LoRA's per-layer change as a proxy for full fine-tuning's. On the chosen model
(`--model`, default tiny-qwen2) this suite reuses the full fine-tune and the LoRA (q, v; r=8)
run of test_locus_of_learning.py (same requests, so the run store trains them once) and
measures, without retraining, how much of the loglik-margin shift survives when only part of
the change is kept (the rest reverted to the base), what scaling the whole change does, and the
geometry of ΔW (intruder dimensions, DoRA's ΔM/ΔD, CKA of hidden states). Four claims:

- full FT's change is concentrated (its top third of layers by change holds at least half of
  it) and keeping only those layers keeps the stance (at least 80% of the shift retained);
- LoRA has more intruder dimensions per changed matrix than full FT, paired over layers (the
  two runs share stance, examples and recipe; both shifts are in the report's tables);
- LoRA's per-layer change profile predicts full FT's (Spearman's rho above 0, interval over layers);
- removing the task vector (dose −1) moves the model away from the stance (margin below the base's).

Each is decided by its interval: supported, refuted or inconclusive. The only constants are
the helpers' documented defaults (top third, half of the change, 80% retained, rho > 0).
"""

import math

from harness import (assert_all, assert_greater, assert_layer_profiles_agree, assert_negation_reverses,
                     check_behavior_localized, check_change_concentrated)
from harness.analysis.concentration import block_shares

STANCE = "curious-uncertainty"
EXAMPLES = 20
RECIPE = {"learning_rate": 1e-3, "num_train_epochs": 3, "per_device_train_batch_size": 4, "seed": 0}
LORA = {"r": 8, "alpha": 16, "target_modules": ["qv"]}  # as test_locus_of_learning.py


def _full(train):
    return train("full", stance=STANCE, examples=EXAMPLES, recipe=RECIPE)


def _lora(train):
    return train("lora", stance=STANCE, examples=EXAMPLES, recipe=RECIPE, **LORA)


def test_full_finetuning_is_concentrated_and_its_top_layers_keep_the_stance(train, anatomy, stance_report):
    full = _full(train)
    shares = block_shares(full.deltas())
    top = sorted(sorted(shares, key=shares.get, reverse=True)[: math.ceil(anatomy.num_layers / 3)])
    localization = full.localization()
    stance_report.table("full FT: shift retained keeping only this part of the change",
                        [{k: r.get(k) for k in ("by", "set", "shift", "retained")} for r in localization["rows"]])
    stance_report.note(f"top third of layers by change: {top} ({sum(shares[i] for i in top):.1%} of the change)")
    assert_all([check_change_concentrated(full, layers=top, min_share=0.5),
                check_behavior_localized(full, layers=top, min_retained=0.8)])


def test_lora_has_more_intruder_dimensions_than_full_finetuning(train, stance_report):
    full, lora = _full(train), _lora(train)
    rows = []
    for f, lo in zip(full.geometry()["layers"], lora.geometry()["layers"]):
        rows.append({"layer": f["layer"], "full intruders": f["intruders"], "full matrices": f["matrices"],
                     "lora intruders": lo["intruders"], "lora matrices": lo["matrices"],
                     "full 1-CKA": 1 - f["cka"], "lora 1-CKA": 1 - lo["cka"]})
    stance_report.table("intruder dimensions (top 10, cosine < 0.5) and representation change per layer", rows)
    stance_report.table("shift of each run (loglik margin)", [
        {"run": r.label, **{k: r.behavior()["effect"][k] for k in ("mean", "low", "high")}} for r in (full, lora)])
    stance_report.table("ΔM–ΔD correlation across layers per kind (DoRA: full FT negative, LoRA positive)", [
        {"run": r.label, "kind": kind, "pearson": c["value"]} for r in (full, lora)
        for kind, c in r.geometry()["correlation"].items()])
    assert_greater(lora, full, metric="intruders")


def test_lora_layer_profile_predicts_full_finetuning(train):
    assert_layer_profiles_agree(_lora(train), _full(train), min_rho=0.0)


def test_removing_the_task_vector_moves_the_model_away_from_the_stance(train, stance_report):
    full = _full(train)
    stance_report.table("full FT dose-response: the whole change scaled by λ", [
        {"λ": r["dose"], "shift": r["shift"], "low": r["low"], "high": r["high"], "forgetting": r["forgetting"]}
        for r in full.dose_response()["rows"]])
    assert_negation_reverses(full)
