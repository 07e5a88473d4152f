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

Both runs train SEEDS times, differing only in the training seed. A claim about one run's
change (concentration, localisation, the dose) must hold on every seed; the intruder comparison
pairs layers with seeds crossed; the profiles are compared seed by seed (seed i of LoRA with seed
i of full FT), and must agree on every pair. Each is decided by its interval: supported, refuted
or inconclusive. The only constants are the helpers' documented defaults (top third, half of the
change, 80% retained, rho > 0).
"""

import math

import pytest

from stance_harness import (assert_all, assert_greater, assert_negation_reverses, behavior_effect, check_behavior_localized,
                     check_change_concentrated, check_layer_profiles_agree)
from stance_harness.analysis.concentration import block_shares

SEEDS = 5  # training seeds per method
pytestmark = pytest.mark.seeds(SEEDS)

STANCE = "curious-uncertainty"
EXAMPLES = 20
RECIPE = {"learning_rate": 1e-3, "num_train_epochs": 3, "per_device_train_batch_size": 4, "seed": 0}
LORA = {"r": 8, "alpha": 16, "target_modules": ["qv"]}  # as test_locus_of_learning.py


def _full(train):
    return train("full", stance=STANCE, examples=EXAMPLES, recipe=RECIPE)


def _lora(train):
    return train("lora", stance=STANCE, examples=EXAMPLES, recipe=RECIPE, **LORA)


@pytest.mark.quick
def test_full_finetuning_is_concentrated_and_its_top_layers_keep_the_stance(train, anatomy, stance_report):
    checks = []
    for full in _full(train):  # each seed's own top third
        shares = block_shares(full.deltas())
        top = sorted(sorted(shares, key=shares.get, reverse=True)[: math.ceil(anatomy.num_layers / 3)])
        stance_report.table(f"full FT, seed {full.recipe.seed}: shift retained keeping only this part of the change",
                            [{k: r.get(k) for k in ("by", "set", "shift", "retained")}
                             for r in full.localization()["rows"]])
        stance_report.note(f"seed {full.recipe.seed}: top third of layers by change: {top} "
                           f"({sum(shares[i] for i in top):.1%} of the change)")
        checks += [check_change_concentrated(full, layers=top, min_share=0.5),
                   check_behavior_localized(full, layers=top, min_retained=0.8)]
    assert_all(checks)


def test_lora_has_more_intruder_dimensions_than_full_finetuning(train, stance_report):
    full, lora = _full(train), _lora(train)
    rows = []  # the first seed's layers; the comparison below uses every seed
    for f, lo in zip(full[0].geometry()["layers"], lora[0].geometry()["layers"]):
        rows.append({"layer": f["layer"], "full intruders": f["intruders"], "full matrices": f["matrices"],
                     "lora intruders": lo["intruders"], "lora matrices": lo["matrices"],
                     "full 1-CKA": 1 - f["cka"], "lora 1-CKA": 1 - lo["cka"]})
    stance_report.table(f"intruder dimensions (top 10, cosine < 0.5) and representation change per layer, "
                        f"seed {full[0].recipe.seed}", rows)
    stance_report.table("shift of each method (loglik margin; seeds crossed with probes)", [
        {"run": runs.label, "seeds": len(runs), **{k: behavior_effect(runs)[k] for k in ("mean", "low", "high")}}
        for runs in (full, lora)])
    stance_report.table("ΔM–ΔD correlation across layers per kind (DoRA: full FT negative, LoRA positive)", [
        {"run": r.label, "seed": r.recipe.seed, "kind": kind, "pearson": c["value"]} for runs in (full, lora)
        for r in runs for kind, c in r.geometry()["correlation"].items()])
    assert_greater(lora, full, metric="intruders")


def test_lora_layer_profile_predicts_full_finetuning(train):
    assert_all([check_layer_profiles_agree(lora, full, min_rho=0.0) for lora, full in zip(_lora(train), _full(train))])


def test_removing_the_task_vector_moves_the_model_away_from_the_stance(train, stance_report):
    full = _full(train)
    stance_report.table(f"full FT dose-response: the whole change scaled by λ (seed {full[0].recipe.seed})", [
        {"λ": r["dose"], "shift": r["shift"], "low": r["low"], "high": r["high"], "forgetting": r["forgetting"]}
        for r in full[0].dose_response()["rows"]])
    assert_negation_reverses(full)
