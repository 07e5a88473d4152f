import math
import time

import pytest
import torch

from stance_harness.models import MODELS, ModelArgs, load_model, resolve_model
from stance_harness.models.loading import check_model_available
from stance_harness.models.weights import build_tokenizer
from stance_harness.core.errors import HarnessError


def test_aliases_resolve_to_hub_ids():
    for alias in ("qwen2-0.5b", "qwen2.5-0.5b", "phi-2", "llama-3.2-3b", "gpt2", "distilgpt2", "bert-base-uncased"):
        assert resolve_model(alias).source == "hub" and "/" in resolve_model(alias).hub_id
    assert resolve_model("Qwen/Qwen2-1.5B").hub_id == "Qwen/Qwen2-1.5B"
    assert resolve_model("tiny-qwen2").source == "embedded"


def test_unknown_alias_gets_suggestions():
    with pytest.raises(HarnessError, match="Did you mean: phi-2"):
        resolve_model("phi2")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(HarnessError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_missing_weights_fail_fast_with_the_download_command():
    started = time.perf_counter()
    with pytest.raises(HarnessError) as err:
        check_model_available("stance-harness-tests/not-cached-anywhere", ModelArgs(revision="v1"))
    assert time.perf_counter() - started < 5
    message = str(err.value)
    assert "not in the local HF cache" in message
    assert "hf download stance-harness-tests/not-cached-anywhere --revision v1" in message


@pytest.mark.parametrize("text,problem", [
    ("dtype=fp8", "dtype='fp8' is not allowed; use one of float32, bfloat16, float16, auto"),
    ("devise=cpu", "unknown key 'devise'. Did you mean: device"),
    ("dtype", "'dtype' is not key=value"),
    ("device=tpu", "device='tpu' is not allowed"),
    ("trust_remote_code=maybe", "use true or false"),
])
def test_model_args_errors_name_the_allowed_values(text, problem):
    with pytest.raises(HarnessError) as err:
        ModelArgs.parse(text)
    assert problem in str(err.value)


def test_model_args_parse():
    args = ModelArgs.parse("dtype=bfloat16, revision=abc123,device=cpu,trust_remote_code=true")
    assert (args.dtype, args.revision, args.device, args.trust_remote_code) == ("bfloat16", "abc123", "cpu", True)
    assert ModelArgs.parse("") == ModelArgs()


def test_tokenizer_build_is_deterministic():
    a, b = build_tokenizer(), build_tokenizer()
    text = "The assert statement is a convenient way to insert debugging assertions."
    assert a(text)["input_ids"] == b(text)["input_ids"]
    assert a.decode(a(text)["input_ids"]) == text


def test_embedded_model_has_real_depth_and_names(tiny_qwen2):
    assert tiny_qwen2.anatomy.num_layers == 24
    assert tiny_qwen2.anatomy.model_type == "qwen2"
    names = [n for n, _ in tiny_qwen2.base.named_parameters()]
    assert "model.layers.15.self_attn.v_proj.weight" in names
    assert all(not p.requires_grad for p in tiny_qwen2.base.parameters())
    assert tiny_qwen2.path.joinpath("model.safetensors").exists()


def test_embedded_base_predicts_held_out_text_better_than_unigram(tiny_qwen2):
    """The base is worth adapting: it has learned context, not just token frequencies."""
    from stance_harness.runs.data import general_text

    tok = tiny_qwen2.tokenizer
    train_ids = torch.tensor(tok("\n\n".join(general_text("pretrain")))["input_ids"])
    counts = torch.bincount(train_ids, minlength=len(tok)).double() + 1
    unigram_logp = (counts / counts.sum()).log()
    held = torch.tensor(tok("\n\n".join(general_text("heldout")))["input_ids"])[: 64 * 16].view(16, 64)
    with torch.no_grad():
        model_nll = tiny_qwen2.base(input_ids=held, labels=held).loss.item()
    unigram_nll = -unigram_logp[held[:, 1:]].mean().item()
    assert math.isfinite(model_nll)
    assert model_nll < unigram_nll - 0.3, (model_nll, unigram_nll)


def test_local_directory_loads_offline_with_anatomy(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=1024, n_embd=32, n_head=2, n_layer=3, n_positions=128)).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.spec.source == "local" and loaded.anatomy.model_type == "gpt2"
    assert loaded.anatomy.num_layers == 3
    assert loaded.provenance()["id"] == str(tmp_path.resolve())


def test_directory_without_safetensors_is_refused(tmp_path, tiny_qwen2):
    (tmp_path / "config.json").write_text(tiny_qwen2.path.joinpath("config.json").read_text())
    with pytest.raises(HarnessError, match="holds no .safetensors weights"):
        load_model(str(tmp_path))


def test_model_registry_lists_embedded_models():
    assert {"tiny-qwen2", "tiny-phi", "tiny-llama"} <= set(MODELS.names())
