"""QLoRA: a really 4-bit base, honest counts, effective deltas against the dequantized base, refusals."""

import copy
import dataclasses
import math
import time

import pytest

from conftest import detached
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from bitsandbytes.nn import Linear4bit, Params4bit


from stance_harness import assert_only_targets_changed
from stance_harness.runs.methods import method_config
from stance_harness.runs.methods.base import TrainingContext
from stance_harness.runs.methods.qlora import COMPUTE_DTYPES, Qlora, QloraConfig
from stance_harness.models import ModelArgs
from stance_harness.core.errors import HarnessError
from stance_harness.runs.run import logical_numel
from stance_harness.runs.recipe import Recipe

from direct_training import save_tiny_gpt2, train_direct

QUICK = {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5, "seed": 0}
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")


def adapted(run):
    """Raw module path -> peft LoRA layer, for every adapted module of the run's model."""
    return {name.removeprefix("base_model.model."): module for name, module in run.model.named_modules()
            if hasattr(module, "lora_A") and "default" in module.lora_A}


def refuse_loading(monkeypatch, loaded):
    """Make any attempt to build a model copy fail loudly: refusals must come before loading."""
    def fresh(**overrides):
        raise AssertionError("a model was loaded before the config was refused")

    monkeypatch.setattr(loaded, "fresh", fresh)


def test_base_is_4bit_nf4_and_only_lora_trains(quick_run):
    run = quick_run("qlora")
    layers = adapted(run)
    assert len(layers) == 24 * len(KINDS)
    for module in layers.values():
        base = module.get_base_layer()
        assert isinstance(base, Linear4bit) and isinstance(base.weight, Params4bit)
        assert base.weight.dtype == torch.uint8 and base.weight.quant_state.quant_type == "nf4"
        assert base.compute_dtype == torch.bfloat16
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable == set(run.before) and all(".lora_" in n for n in trainable)


def test_counts_are_lora_params_and_the_logical_base(quick_run, tiny_qwen2):
    run = quick_run("qlora")
    # r=16; A is r x in, B is out x r. hidden 64, 4 heads of 16, 2 kv heads: q and o map
    # 64 -> 64, k and v map 64 -> 32. Per layer: 2 * (16*64 + 64*16) + 2 * (16*64 + 32*16).
    r, hidden, kv = 16, 64, 32
    per_layer = 2 * (r * hidden + hidden * r) + 2 * (r * hidden + kv * r)
    assert run.counts["trainable"] == 24 * per_layer == 172032
    # Frozen counts what the 4-bit base stands for (two weights per packed byte), which is
    # exactly the full-precision model: trainable + frozen = base + LoRA.
    base_params = sum(p.numel() for p in tiny_qwen2.base.parameters())
    assert run.counts["frozen"] == base_params
    frozen = [p for p in run.model.parameters() if not p.requires_grad]
    assert sum(logical_numel(p) for p in frozen) == base_params
    assert sum(p.numel() for p in frozen) < base_params  # the packed storage really is smaller


def test_only_targets_changed_frozen_4bit_bit_identical(quick_run):
    result = assert_only_targets_changed(quick_run("qlora"))
    assert result.passed
    assert result.metrics["changed_tensors"] == 24 * len(KINDS) * 2  # A and B


def test_effective_deltas_are_scale_BA_on_the_dequantized_base(quick_run):
    run = quick_run("qlora")
    rows = {row.name: row for row in run.effective_deltas}
    assert set(rows) == {f"L{i}.{kind}.weight" for i in range(24) for kind in KINDS}
    for row in rows.values():
        assert row.moments.nonfinite == 0
        assert all(math.isfinite(row.moments.stats()[k]) for k in ("delta_norm", "rel_change", "norm_change"))
        assert row.moments.total_sq > 0

    module = adapted(run)["model.layers.5.self_attn.v_proj"]  # non-square: a transposed ΔW would not fit
    row = rows["L5.v_proj.weight"]
    lora_a, lora_b = module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()
    delta = module.scaling["default"] * lora_b @ lora_a  # B starts at zero, so this is all of ΔW
    assert module.scaling["default"] == 32 / 16
    assert row.moments.total_sq == pytest.approx(delta.double().square().sum().item(), rel=1e-4)
    weight = module.get_base_layer().weight
    dequantized = dequantize_4bit(weight.data, weight.quant_state).double()
    assert row.moments.before_sq == pytest.approx(dequantized.square().sum().item(), rel=1e-5)
    assert row.moments.rel_change == pytest.approx((delta.double().norm() / dequantized.norm()).item(), rel=1e-4)


def test_eval_forward_leaves_the_4bit_weights_as_they_were(quick_run):
    # bitsandbytes repacks 4-bit weights in place on eval-mode forwards on AVX512-BF16 CPUs.
    run = detached(quick_run("qlora"), model=copy.deepcopy(quick_run("qlora").model))
    module = adapted(run)["model.layers.0.self_attn.q_proj"]
    before = Qlora.base_weight(module)
    with torch.no_grad():
        run.model(input_ids=torch.randint(0, 1024, (2, 12)))
    assert run.changed_frozen() == []
    assert torch.equal(Qlora.base_weight(module), before)


def test_double_quant_and_compute_dtype_reach_the_4bit_layers(tiny_qwen2):
    config = QloraConfig(compute_dtype="float32", double_quant=True)
    ctx = TrainingContext(tiny_qwen2, config, Recipe.of(QUICK), total_steps=1, steps_per_epoch=1)
    model = Qlora().load(ctx)
    quantized = model.model.layers[3].self_attn.k_proj
    original = tiny_qwen2.base.model.layers[3].self_attn.k_proj.weight
    assert quantized.compute_dtype == torch.float32 and quantized.weight.quant_state.nested
    error = (dequantize_4bit(quantized.weight.data, quantized.weight.quant_state) - original).norm() / original.norm()
    assert error < 0.15  # nf4 keeps 4 bits: about 10 % relative error on these weights


def test_base_weight_is_float32_when_the_model_loads_in_bfloat16(tiny_qwen2):
    # effective_deltas adds ΔW in base_weight's dtype; in bf16 a small ΔW would round away.
    bf16_model = dataclasses.replace(tiny_qwen2, args=ModelArgs(dtype="bfloat16"))
    ctx = TrainingContext(bf16_model, QloraConfig(), Recipe.of(QUICK), total_steps=1, steps_per_epoch=1)
    layer = Qlora().prepare(Qlora().load(ctx), ctx).base_model.model.model.layers[0].self_attn.o_proj
    weight = layer.get_base_layer().weight
    assert dequantize_4bit(weight.data, weight.quant_state).dtype == torch.bfloat16
    assert Qlora.base_weight(layer).dtype == torch.float32
    assert torch.equal(Qlora.base_weight(layer), dequantize_4bit(weight.data, weight.quant_state).float())


def test_config_defaults_are_the_seed_experiment():
    config = method_config("qlora", {})
    assert (config.r, config.alpha, config.target_modules) == (16, 32, KINDS)
    assert (config.compute_dtype, config.double_quant, config.dropout, config.layers) == ("auto", False, 0.0, None)
    assert all(help_text for _, _, help_text in QloraConfig.describe())


def test_bad_compute_dtype_lists_the_allowed_values():
    with pytest.raises(HarnessError, match="qlora: compute_dtype must be one of auto, bfloat16, float16, float32, got 'fp8'"):
        method_config("qlora", {"compute_dtype": "fp8"})
    assert COMPUTE_DTYPES == ("auto", "bfloat16", "float16", "float32")
    with pytest.raises(HarnessError, match="lora: r must be a positive integer"):
        QloraConfig(r=0)  # LoRA's own checks still apply


def test_non_linear_targets_are_refused_before_loading(tiny_qwen2, stance, monkeypatch):
    refuse_loading(monkeypatch, tiny_qwen2)
    config = QloraConfig(target_modules=("q_proj", "attn_norm"))
    started = time.perf_counter()
    with pytest.raises(HarnessError, match=r"qlora cannot quantize the targets of this qwen2 model: "
                                           r"attn_norm \(Qwen2RMSNorm\) are not linear layers"):
        train_direct(tiny_qwen2, stance, "qlora", config, Recipe.of(QUICK), examples=10)
    assert time.perf_counter() - started < 5


# -- GPT-2: Conv1D attention, which transformers quantizes transposed ---------------------------
@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    from stance_harness.models import load_model

    return load_model(str(save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))))


def test_gpt2_with_the_default_targets_is_refused_before_loading(tiny_gpt2, stance, monkeypatch):
    refuse_loading(monkeypatch, tiny_gpt2)
    started = time.perf_counter()
    with pytest.raises(HarnessError, match="module kind 'q_proj' does not exist in this gpt2 model"):
        train_direct(tiny_gpt2, stance, "qlora", QloraConfig(), Recipe.of(QUICK), examples=10)
    assert time.perf_counter() - started < 5


def test_gpt2_conv1d_targets_are_quantized_and_deltas_match_the_forward(tiny_gpt2, stance):
    config = QloraConfig(target_modules=("qkv_proj", "o_proj"), compute_dtype="float32")
    run = train_direct(tiny_gpt2, stance, "qlora", config, Recipe.of(QUICK), examples=10)
    assert assert_only_targets_changed(run).passed
    layers = adapted(run)
    assert set(layers) == {f"transformer.h.{i}.attn.{m}" for i in range(2) for m in ("c_attn", "c_proj")}

    module = layers["transformer.h.1.attn.c_attn"]
    base = module.get_base_layer()
    conv1d = tiny_gpt2.base.transformer.h[1].attn.c_attn  # stores W as (in, out)
    expected, _ = quantize_4bit(conv1d.weight.detach().T.contiguous(), quant_type="nf4", blocksize=64)
    assert isinstance(base, Linear4bit) and torch.equal(base.weight.data, expected)

    # The effective weight the table reports is the one the adapted layer computes with.
    pairs = {name: after for name, _, after in run.method.effective_deltas(run.model, run.before, run.anatomy)}
    effective = pairs["base_model.model.transformer.h.1.attn.c_attn.weight"]
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(module(x), x @ effective.T + base.bias, atol=1e-5)
