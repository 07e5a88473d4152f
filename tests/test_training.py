import copy

import pytest
import torch

from stance_harness.runs.methods import METHODS, method_config
from stance_harness.core.errors import HarnessError
from stance_harness.runs.batches import Framing, encode_examples
from stance_harness.runs.recipe import Recipe
from stance_harness.runs.training import linear_schedule

from direct_training import train_direct


def test_recipe_uses_hf_names_and_accepts_short_aliases():
    recipe = Recipe.of({"lr": 2e-4, "epochs": 2}, warmup_steps=3)
    assert (recipe.learning_rate, recipe.num_train_epochs, recipe.warmup_steps) == (2e-4, 2, 3)


def test_recipe_unknown_field_suggests():
    with pytest.raises(HarnessError, match="recipe has no field 'warmup_step'. Did you mean: warmup_steps"):
        Recipe.of(warmup_step=3)


@pytest.mark.parametrize("field,value,rule", [
    ("learning_rate", 0, "> 0"), ("gradient_accumulation_steps", 0, ">= 1"),
    ("max_grad_norm", -1.0, "> 0 or None"), ("num_train_epochs", 0, ">= 1"),
])
def test_recipe_validates_values(field, value, rule):
    with pytest.raises(HarnessError, match=f"recipe: {field} must be {rule}"):
        Recipe.of({field: value})


def test_linear_schedule_matches_hand_values():
    factor = linear_schedule(warmup=2, total=6)
    assert [round(factor(s), 4) for s in range(7)] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]


def test_linear_schedule_matches_transformers():
    import torch
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=10)
    factor = linear_schedule(warmup=3, total=10)
    for step in range(11):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(factor(step))
        optimizer.step()
        reference.step()


def test_loss_counts_only_response_tokens(tiny_qwen2, stance):
    (ids, labels), = encode_examples(Framing(tiny_qwen2.tokenizer, chat=False), stance.training_examples(1), 128)
    prompt_len = len(tiny_qwen2.tokenizer(stance.examples[0].prompt + "\n", add_special_tokens=False)["input_ids"])
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert ids[-1] == tiny_qwen2.tokenizer.eos_token_id


def test_method_options_are_validated_with_suggestions():
    with pytest.raises(HarnessError, match="method 'lora' has no option 'rank'"):
        method_config("lora", {"rank": 4})
    with pytest.raises(HarnessError, match="lora: r must be a positive integer"):
        method_config("lora", {"r": 0})


def test_unknown_method_suggests():
    with pytest.raises(HarnessError, match="Did you mean: lora"):
        METHODS.get("lorra")


def test_snapshot_holds_trainable_weights_only(quick_run):
    lora = quick_run("lora")
    assert lora.before and all("lora_" in name for name in lora.before)
    trainable = {n for n, p in lora.model.named_parameters() if p.requires_grad}
    assert set(lora.before) == trainable
    assert len(lora.frozen_digests) == sum(1 for p in lora.model.parameters() if not p.requires_grad)


def test_training_changes_a_copy_never_the_base(quick_run, tiny_qwen2):
    from stance_harness.analysis.digest import tensor_digest

    base_before = {n: tensor_digest(p) for n, p in tiny_qwen2.base.named_parameters()}
    run = quick_run("full")
    assert run.model is not tiny_qwen2.base
    assert {n: tensor_digest(p) for n, p in tiny_qwen2.base.named_parameters()} == base_before


def test_run_records_loss_per_step_and_counts(quick_run):
    run = quick_run("full")
    assert len(run.trace.loss) == 2  # 10 examples, batch 5, 1 epoch
    assert all(torch.isfinite(torch.tensor(run.trace.loss)))
    assert run.counts["frozen"] == 0 and run.counts["trainable_pct"] == 100.0
    lora = quick_run("lora")
    assert lora.counts["stance_bytes"] < run.counts["stance_bytes"]
    # r=8; A is r x in, B is out x r; q: 64 -> 64, v: 64 -> 32 (2 of 4 heads are kv heads)
    assert lora.counts["trainable"] == 24 * ((8 * 64 + 64 * 8) + (8 * 64 + 32 * 8))


def test_same_request_is_deterministic(tiny_qwen2, stance, quick_run):
    first = quick_run("lora")
    again = train_direct(tiny_qwen2, stance, "lora", first.config, first.recipe, examples=10)
    assert again.trace.loss == first.trace.loss


def test_session_trains_identical_requests_once(tiny_qwen2):
    from pathlib import Path

    from stance_harness.models import ModelArgs
    from stance_harness.session import HarnessOptions, HarnessSession

    session = HarnessSession(HarnessOptions("tiny-qwen2", ModelArgs(), [], None, Path("."), []))
    session.use_model(tiny_qwen2)
    recipe = {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5}
    a = session.train("lora", examples=5, recipe=recipe, r=2)
    b = session.train("lora", examples=5, recipe=dict(recipe), r=2)
    c = session.train("lora", examples=5, recipe=recipe, r=4)
    assert a is b and a is not c
    assert len(session.runs()) == 2


def test_lora_effective_delta_equals_merged_minus_base(quick_run, tiny_qwen2):
    """Our ΔW = scale·B·A agrees with peft's own merge."""
    run = quick_run("lora")
    merged = copy.deepcopy(run.model).merge_and_unload()
    merged_params = dict(merged.named_parameters())
    base_params = dict(tiny_qwen2.base.named_parameters())
    rows = {r.raw_name: r for r in run.effective_deltas}
    name = "base_model.model.model.layers.13.self_attn.v_proj.weight"
    assert name in rows
    plain = name.removeprefix("base_model.model.")
    expected = (merged_params[plain] - base_params[plain]).double()
    assert rows[name].moments.total_sq == pytest.approx((expected**2).sum().item(), rel=1e-4)
    assert rows[name].moments.mean_abs == pytest.approx(expected.abs().mean().item(), rel=1e-4)
    assert rows[name].name == "L13.v_proj.weight"


def test_adapter_view_shows_a_and_b(quick_run):
    names = {r.name for r in quick_run("lora").adapter_deltas}
    assert {"L0.q_proj.lora_A", "L0.q_proj.lora_B", "L23.v_proj.lora_B"} <= names


@pytest.mark.parametrize("options,message", [
    ({"epochs": 1.5}, "recipe: num_train_epochs must be an integer, got 1.5"),
    ({"lr": "1e-3"}, "recipe: learning_rate must be a number, got '1e-3'"),
    ({"seed": True}, "recipe: seed must be an integer, got True"),
])
def test_recipe_checks_types(options, message):
    with pytest.raises(HarnessError, match=message):
        Recipe.of(options)


def test_warmup_longer_than_the_run_is_refused_before_training(tiny_qwen2, stance):
    recipe = Recipe.of(num_train_epochs=1, per_device_train_batch_size=5, warmup_steps=2)
    with pytest.raises(HarnessError, match=r"warmup_steps=2 is not shorter than the run \(2 steps\)"):
        train_direct(tiny_qwen2, stance, "full", method_config("full"), recipe, examples=10)


def test_an_encoder_is_refused_for_the_causal_lm_task(tmp_path, stance):
    from transformers import BertConfig, BertModel

    from stance_harness.models import load_model
    from stance_harness.models.weights import build_tokenizer
    BertModel(BertConfig(vocab_size=1024, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.anatomy.model_type == "bert" and not loaded.is_causal_lm
    with pytest.raises(HarnessError, match="is a bert encoder .*the stance-lm task needs a causal LM. Use task=.stance-classification."):
        train_direct(loaded, stance, "full", method_config("full"), Recipe.of(num_train_epochs=1), examples=5)
