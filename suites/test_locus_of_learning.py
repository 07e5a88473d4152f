"""Locus of learning: where in the network does adaptation put its change?

Seed 001 asks whether fine-tuning moves early, middle or late layers. On the chosen model
(`--model`, default tiny-qwen2) this suite trains the curious-uncertainty stance with full
fine-tuning, LoRA over every layer, and surgical LoRA on the relative-depth analogs of
Qwen2-0.5B's layers 13 and 15, then states and checks:

- LoRA leaves the base bit-identical: only its adapters change.
- Full fine-tuning moves every tensor of the model.
- Surgical LoRA puts all of its effective change (scale·B·A) in the two chosen layers.
- Full fine-tuning spreads its change: no two layers hold half of it.

The per-layer tables (mean Δ, var Δ, mean |Δ|, var |Δ|, ‖Δ‖/‖W‖, norm change) of every run
go to the report, with each method's centre of change and locus (early, middle, late).
"""

import pytest

from harness import assert_change_concentrated, assert_change_spread, assert_only_targets_changed
from harness.analysis.concentration import block_shares, centre_of_mass
from harness.models import locus_of

STANCE = "curious-uncertainty"
EXAMPLES = 20
RECIPE = {"learning_rate": 1e-3, "num_train_epochs": 3, "per_device_train_batch_size": 4, "seed": 0}
QWEN2_CRITICAL = [13, 15]  # of Qwen2-0.5B's 24 layers (seed 000)

METHODS = {
    "full": {},
    # "qv": q_proj + v_proj, or the fused projection holding them (GPT-2's c_attn)
    "lora": {"r": 8, "alpha": 16, "target_modules": ["qv"]},
}


@pytest.fixture(scope="module")
def critical_layers(anatomy):
    return anatomy.analog(QWEN2_CRITICAL, depth=24)


@pytest.mark.parametrize("method", list(METHODS))
def test_per_layer_change_is_recorded(train, anatomy, stance_report, method):
    run = train(method, stance=STANCE, examples=EXAMPLES, recipe=RECIPE, **METHODS[method])
    table = run.layer_table()
    stance_report.table(f"{method}: per-layer change (effective ΔW)", table)
    centre = centre_of_mass(block_shares(run.deltas()))
    stance_report.metric(f"{method}.centre_layer", centre)
    stance_report.note(f"{method}: centre of change at layer {centre:.1f} of {anatomy.num_layers} "
                       f"({locus_of(centre, anatomy.num_layers)})")
    # both methods reach every block, so every layer has a row
    assert [r["layer"] for r in table if r["layer"].startswith("L")] == [f"L{i}" for i in range(anatomy.num_layers)]


def test_lora_changes_only_its_adapters(train):
    run = train("lora", stance=STANCE, examples=EXAMPLES, recipe=RECIPE, **METHODS["lora"])
    assert_only_targets_changed(run)


def test_full_finetuning_moves_every_tensor(train):
    run = train("full", stance=STANCE, examples=EXAMPLES, recipe=RECIPE)
    assert_only_targets_changed(run)


def test_surgical_lora_concentrates_change_in_critical_layers(train, critical_layers, stance_report):
    run = train("surgical-lora", stance=STANCE, examples=EXAMPLES, recipe=RECIPE, target_modules=["qv"],
                layers=critical_layers)  # seed 000: rank 32 on two layers
    stance_report.note(f"critical layers on this model: {critical_layers} (Qwen2-0.5B 13, 15 by relative depth)")
    assert_only_targets_changed(run, layers=critical_layers, kinds=["qv"])
    assert_change_concentrated(run, layers=critical_layers, min_share=0.999)


def test_full_finetuning_spreads_change(train):
    run = train("full", stance=STANCE, examples=EXAMPLES, recipe=RECIPE)
    assert_change_spread(run, top_k=2, max_share=0.5)


def test_lora_and_full_compared_layer_by_layer(train, anatomy, stance_report):
    full = train("full", stance=STANCE, examples=EXAMPLES, recipe=RECIPE)
    lora = train("lora", stance=STANCE, examples=EXAMPLES, recipe=RECIPE, **METHODS["lora"])
    full_layers = {r["layer"]: r for r in full.layer_table()}
    lora_layers = {r["layer"]: r for r in lora.layer_table()}
    rows = []
    for i in range(anatomy.num_layers):
        label = f"L{i}"
        f, lo = full_layers.get(label), lora_layers.get(label)
        rows.append({"layer": label, "locus": locus_of(i, anatomy.num_layers),
                     "full mean|Δ|": f["mean_abs"] if f else 0.0, "full ‖Δ‖/‖W‖": f["rel_change"] if f else 0.0,
                     "lora mean|Δ|": lo["mean_abs"] if lo else 0.0, "lora ‖Δ‖/‖W‖": lo["rel_change"] if lo else 0.0})
    stance_report.table("full FT vs LoRA (q, v) per layer", rows)
    stance_report.metric("full.trainable_params", full.counts["trainable"])
    stance_report.metric("lora.trainable_params", lora.counts["trainable"])
    stance_report.metric("lora.stance_bytes", lora.counts["stance_bytes"])
    stance_report.metric("full.stance_bytes", full.counts["stance_bytes"])
    assert lora.counts["stance_bytes"] < full.counts["stance_bytes"]
