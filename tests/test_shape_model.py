"""benchmarks/shape_model.py: real models' shapes with random weights (issue 30, item 6)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from stance_harness.core.errors import HarnessError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import shape_model  # noqa: E402 - benchmarks/ is not a package


def _by_hand(values: dict, layers: int) -> int:
    """Parameters of a tied-head decoder from its config values: embedding, per layer q/k/v/o
    (Qwen2's q, k and v with biases), the SwiGLU MLP's three matrices and two norms, the final norm."""
    hidden, head_dim = values["hidden_size"], values.get("head_dim", values["hidden_size"] // values["num_attention_heads"])
    q, kv = values["num_attention_heads"] * head_dim, values["num_key_value_heads"] * head_dim
    biases = q + 2 * kv if values["model_type"] == "qwen2" else 0
    layer = hidden * q + 2 * hidden * kv + q * hidden + biases + 3 * hidden * values["intermediate_size"] + 2 * hidden
    return values["vocab_size"] * hidden + layers * layer + hidden


@pytest.mark.parametrize("shape, published", [("qwen2-0.5b", 0.49), ("llama-3.2-3b", 3.21)])
def test_each_shape_has_its_models_parameter_count(shape, published):
    values = shape_model.shape_values(shape)
    count = shape_model.parameter_count(shape)  # on the meta device: nothing allocated
    assert count == _by_hand(values, values["num_hidden_layers"])
    assert round(count / 1e9, 2) == published  # the model cards' figures
    assert shape_model.parameter_count(shape, 2) == _by_hand(values, 2)


def test_llama_shape_carries_llama3_rope_scaling():
    config = shape_model.config_for("llama-3.2-3b", eos_id=5)
    rope = config.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0 and rope["rope_theta"] == 500000.0
    assert rope["original_max_position_embeddings"] == 8192 and config.max_position_embeddings == 131072
    assert config.tie_word_embeddings and config.eos_token_id == config.pad_token_id == 5


@pytest.mark.parametrize("call, message", [
    (lambda: shape_model.shape_values("llama-3-8b"), r"shape 'llama-3-8b' is not one of qwen2-0.5b, llama-3.2-3b"),
    (lambda: shape_model.config_for("llama-3.2-3b", 29), r"layers=29 for llama-3.2-3b; allowed 1 to 28"),
    (lambda: shape_model.config_for("qwen2-0.5b", 0), r"layers=0 for qwen2-0.5b; allowed 1 to 24"),
])
def test_unknown_shapes_and_depths_are_refused(call, message):
    with pytest.raises(HarnessError, match=message):
        call()


def test_default_dir_names_the_shape_and_its_depth():
    assert shape_model.default_dir("llama-3.2-3b").name == "llama-3.2-3b-shape-28"
    assert shape_model.default_dir("qwen2-0.5b", 2).name == "qwen2-0.5b-shape-2"


def test_a_sharded_build_is_complete_seeded_tied_and_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(shape_model, "SHARD", "100MB")  # a 1-layer Qwen2 (0.27 GB bf16) in several files
    out = shape_model.build(tmp_path / "q", 1, "qwen2-0.5b")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and shape_model.is_built(out)
    assert not (tmp_path / "q.partial").exists()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == shape_model.parameter_count("qwen2-0.5b", 1)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    attention = model.model.layers[0].self_attn
    assert torch.all(attention.q_proj.bias == 0) and torch.all(model.model.norm.weight == 1)
    std = attention.o_proj.weight.float().std().item()
    assert abs(std - shape_model.STD) < 0.001, std
    # a second build of the same shape keeps the files; another shape or depth there is refused
    stamp = (out / "config.json").stat().st_mtime_ns
    assert shape_model.build(out, 1, "qwen2-0.5b") == out and (out / "config.json").stat().st_mtime_ns == stamp
    with pytest.raises(HarnessError, match=r"already holds a different model .* not llama-3.2-3b at 1 layers"):
        shape_model.build(out, 1, "llama-3.2-3b")


def test_the_same_seed_gives_the_same_weights_and_another_seed_others():
    config = shape_model.config_for("qwen2-0.5b", 1)
    filled = []
    for seed in (3, 3, 4):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model = model.to_empty(device="cpu")
        shape_model.fill(model, seed=seed)
        filled.append(model.model.layers[0].mlp.down_proj.weight)
    assert torch.equal(filled[0], filled[1]) and not torch.equal(filled[0], filled[2])
