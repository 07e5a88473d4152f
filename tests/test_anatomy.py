"""Anatomy on every supported architecture, built from tiny random configs (no download)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stance_harness.models.anatomy import Anatomy, locus_of, relative_depth_analog
from stance_harness.core.errors import HarnessError

TINY = dict(vocab_size=64, hidden_size=16, num_attention_heads=2, intermediate_size=32)


def build(model_type, layers=4):
    import torch
    from transformers import (AutoModelForCausalLM, BertConfig, BertModel, GPT2Config, LlamaConfig,
                              PhiConfig, Qwen2Config)

    torch.manual_seed(0)
    if model_type == "gpt2":
        return AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=16, n_head=2, n_layer=layers, n_positions=32))
    if model_type == "bert":
        return BertModel(BertConfig(num_hidden_layers=layers, max_position_embeddings=32, **TINY))
    config = {"qwen2": Qwen2Config, "llama": LlamaConfig, "phi": PhiConfig}[model_type]
    return AutoModelForCausalLM.from_config(config(num_hidden_layers=layers, max_position_embeddings=32, **TINY))


EXPECTED_KINDS = {
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "attn_norm", "mlp_norm"},
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "attn_norm", "mlp_norm"},
    "phi": {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "attn_norm"},
    "gpt2": {"qkv_proj", "o_proj", "up_proj", "down_proj", "attn_norm", "mlp_norm"},
    "bert": {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "attn_norm", "mlp_norm"},
}


@pytest.mark.parametrize("model_type", sorted(EXPECTED_KINDS))
def test_blocks_and_kinds_of_each_architecture(model_type):
    model = build(model_type, layers=3)
    anatomy = Anatomy.of(model)
    assert anatomy.num_layers == 3
    assert set(anatomy.kinds) == EXPECTED_KINDS[model_type]
    names = [anatomy.name_of(n) for n, _ in model.named_parameters()]
    in_blocks = [n for n in names if n.layer is not None]
    assert {n.layer for n in in_blocks} == {0, 1, 2}
    # every block parameter maps to a known kind: the layout covers the whole block
    assert {n.kind for n in in_blocks} <= EXPECTED_KINDS[model_type]
    # module paths exist in the model for every layer x kind
    modules = dict(model.named_modules())
    for path in anatomy.module_paths():
        assert path in modules


@pytest.mark.parametrize("model_type,raw,canonical", [
    ("qwen2", "model.layers.2.self_attn.v_proj.weight", "L2.v_proj.weight"),
    ("qwen2", "model.layers.1.self_attn.q_proj.bias", "L1.q_proj.bias"),
    ("qwen2", "model.embed_tokens.weight", "embed.weight"),
    ("phi", "model.layers.2.self_attn.dense.weight", "L2.o_proj.weight"),
    ("phi", "model.final_layernorm.weight", "final_norm.weight"),
    ("gpt2", "transformer.h.0.attn.c_attn.weight", "L0.qkv_proj.weight"),
    ("gpt2", "transformer.h.0.mlp.c_proj.weight", "L0.down_proj.weight"),
    ("bert", "encoder.layer.1.attention.self.value.weight", "L1.v_proj.weight"),
    ("bert", "encoder.layer.1.output.LayerNorm.bias", "L1.mlp_norm.bias"),
])
def test_canonical_names(model_type, raw, canonical):
    anatomy = Anatomy.of(build(model_type, layers=3))
    assert str(anatomy.name_of(raw)) == canonical


def test_peft_wrapped_names_map_to_the_same_module():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build("qwen2"), LoraConfig(r=2, target_modules=["v_proj"]))
    anatomy = Anatomy.of(model)
    assert anatomy.num_layers == 4
    names = {str(anatomy.name_of(n)) for n, _ in model.named_parameters()}
    assert {"L3.v_proj.lora_A", "L3.v_proj.lora_B", "L3.v_proj.weight", "L3.v_proj.bias"} <= names


def test_layer_out_of_range_lists_what_exists():
    anatomy = Anatomy.of(build("qwen2", layers=4))
    with pytest.raises(HarnessError, match=r"layer 7 does not exist in this qwen2 model: it has 4 layers, 0\.\.3"):
        anatomy.check_layers([1, 7])
    # issue 14: a negative index is refused, not read as Python's "from the end"
    with pytest.raises(HarnessError, match=r"layer -1 does not exist.*no negative indices.*the last is 3"):
        anatomy.check_layers([-1, 0])
    assert anatomy.check_layers([3, 0]) == [0, 3]


def test_unknown_module_kind_lists_what_exists():
    anatomy = Anatomy.of(build("gpt2"))
    with pytest.raises(HarnessError) as err:
        anatomy.check_kinds(["v_proj"])
    message = str(err.value)
    assert "module kind 'v_proj' does not exist in this gpt2 model" in message
    assert "qkv_proj" in message and "groups: attention, mlp, norm" in message


def test_qv_group_is_query_and_value_or_the_fused_projection():
    assert Anatomy.of(build("qwen2")).check_kinds(["qv"]) == ["q_proj", "v_proj"]
    assert Anatomy.of(build("gpt2")).check_kinds(["qv"]) == ["qkv_proj"]


def test_kind_groups_expand_to_the_kinds_present():
    assert Anatomy.of(build("phi")).check_kinds(["mlp"]) == ["up_proj", "down_proj"]
    assert Anatomy.of(build("qwen2")).check_kinds(["attention"]) == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_seed_relative_depth_mapping_qwen2_to_phi():
    assert relative_depth_analog(13, 24, 32) == 17
    assert relative_depth_analog(15, 24, 32) == 20


def test_analog_uses_this_models_depth():
    anatomy = Anatomy.of(build("qwen2", layers=32))
    assert anatomy.analog([13, 15], depth=24) == [17, 20]


@given(st.integers(1, 96), st.integers(1, 96), st.data())
def test_relative_depth_is_in_range_monotone_and_identity_on_same_depth(n_from, n_to, data):
    i = data.draw(st.integers(0, n_from - 1))
    j = data.draw(st.integers(i, n_from - 1))
    a, b = relative_depth_analog(i, n_from, n_to), relative_depth_analog(j, n_from, n_to)
    assert 0 <= a <= b < n_to
    assert relative_depth_analog(i, n_from, n_from) == i


def test_locus_thirds():
    assert [locus_of(i, 24) for i in (0, 7, 8, 15, 16, 23)] == ["early", "early", "middle", "middle", "late", "late"]


def test_layers_must_be_a_list():
    with pytest.raises(HarnessError, match=r"layers must be a list of layer indices, e.g. \[13, 15\], not 13"):
        Anatomy.of(build("qwen2")).check_layers(13)
