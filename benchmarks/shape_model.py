"""A model with a real model's exact shapes and random weights, written as a local model directory.

Shapes (`--shape`, the architecture's own config values; `--layers` cuts the depth):

  qwen2-0.5b     24 layers, hidden 896, MLP 4864, 14 attention heads with 2 KV heads, vocab 151936,
                 tied head: 494M parameters, 0.92 GiB of bf16 safetensors.
  llama-3.2-3b   28 layers, hidden 3072, MLP 8192, 24 attention heads with 8 KV heads (head_dim 128),
                 vocab 128256, tied head, rms_norm_eps 1e-5, rope_theta 500000 with llama3 rope
                 scaling (factor 32, low/high frequency factors 1 and 4, original context 8192),
                 131072 positions: 3.21B parameters, 5.98 GiB of bf16 safetensors. The values are
                 meta-llama/Llama-3.2-3B's config.json, checked against copies of it quoted in public
                 repositories (a torchtitan DCP-to-HF converter's 3B entry, a params.json-to-config.json
                 converter, NeMo's Llama3.2-3B recipe); they agree on every value here.

Its behaviour means nothing; it exists to measure memory and time at real size. Nothing is
downloaded: the tokenizer is the embedded models' (its 1,024 ids are inside either vocabulary).
The model is built on the meta device (no initialisation cost), then each parameter is filled from
one seeded generator in bf16: normal(0, 0.02) for matrices and embeddings, ones for norm weights,
zeros for biases (the architectures' own initialisation, without its float32 pass over 3B numbers),
and saved in shards. A directory already holding a complete build of the same shape is kept.

    python benchmarks/shape_model.py [OUT_DIR] [--shape qwen2-0.5b] [--layers N]

OUT_DIR defaults to $TMPDIR/<shape>-shape-<layers>.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from stance_harness.core.errors import HarnessError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {
    "qwen2-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       max_position_embeddings=4096, tie_word_embeddings=True, rms_norm_eps=1e-6,
                       rope_theta=1000000.0),
    "llama-3.2-3b": dict(model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                         num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         rope_theta=500000.0, hidden_act="silu", attention_bias=False, mlp_bias=False,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
DEFAULT_SHAPE = "qwen2-0.5b"
SHARD = "2GB"  # a 3B bf16 model in four files, each written while the next is still in memory
STD = 0.02  # both architectures' initializer_range


def shape_values(shape: str) -> dict:
    """The config values of `shape`, or a HarnessError naming the shapes there are."""
    if shape not in SHAPES:
        raise HarnessError(f"shape_model: shape {shape!r} is not one of {', '.join(SHAPES)}")
    return dict(SHAPES[shape])


def full_depth(shape: str) -> int:
    return shape_values(shape)["num_hidden_layers"]


def default_dir(shape: str = DEFAULT_SHAPE, layers: int | None = None) -> Path:
    """Where a build of `shape` at `layers` (default: its full depth) goes unless told otherwise."""
    layers = full_depth(shape) if layers is None else layers
    return Path(tempfile.gettempdir()) / f"{shape}-shape-{layers}"


def config_for(shape: str, layers: int | None = None, eos_id: int = 0):
    """The transformers config of `shape` cut to `layers` decoder layers, with `eos_id` as bos, eos and pad."""
    from transformers import AutoConfig

    values = shape_values(shape)
    model_type = values.pop("model_type")
    depth = values["num_hidden_layers"] if layers is None else layers
    if not 1 <= depth <= values["num_hidden_layers"]:
        raise HarnessError(f"shape_model: layers={depth} for {shape}; allowed 1 to {values['num_hidden_layers']}")
    return AutoConfig.for_model(model_type, **{**values, "num_hidden_layers": depth},
                                bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)


def is_built(out: Path) -> bool:
    """Whether `out` holds a finished build: its config and all its weights (a single file or an index)."""
    return (out / "config.json").is_file() and any((out / name).is_file() for name in
                                                     ("model.safetensors", "model.safetensors.index.json"))


def _check_existing(out: Path, shape: str, layers: int) -> None:
    saved = json.loads((out / "config.json").read_text())
    want = shape_values(shape)
    found = {key: saved.get(key) for key in ("model_type", "hidden_size", "vocab_size", "num_hidden_layers")}
    expected = {**{key: want[key] for key in found}, "num_hidden_layers": layers}
    if found != expected:
        raise HarnessError(f"shape_model: {out} already holds a different model ({found}), not {shape} at "
                           f"{layers} layers ({expected}); name another directory or remove it")


def fill(model, seed: int = 0) -> None:
    """Give every parameter of `model` seeded values in place: ones for norm weights (1-D, not a
    bias), zeros for biases, normal(0, STD) otherwise. Tied parameters are filled once."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # each tied tensor once
            if name.endswith(".bias"):
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, STD, generator=generator)


def build(out: Path | None = None, layers: int | None = None, shape: str = DEFAULT_SHAPE) -> Path:
    """Write `shape` at `layers` (default: its full depth) to `out` (default: default_dir) once;
    a directory already holding that build is kept, one holding another model is an error. Returns `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    from stance_harness.models.weights import build_tokenizer

    layers = full_depth(shape) if layers is None else layers
    out = Path(out) if out is not None else default_dir(shape, layers)
    if is_built(out):
        _check_existing(out, shape, layers)
        return out
    tokenizer = build_tokenizer()
    config = config_for(shape, layers, tokenizer.eos_token_id)
    if len(tokenizer) > config.vocab_size:
        raise HarnessError(f"shape_model: the tokenizer's {len(tokenizer)} ids do not fit {shape}'s "
                           f"vocab_size {config.vocab_size}")
    with torch.device("meta"):  # no memory and no initialisation pass
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives each module its own tensor; tie the head back to the embedding
    fill(model)
    # written beside `out` and renamed when complete, so a build cut short (a timeout) is never kept
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True, max_shard_size=SHARD)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def parameter_count(shape: str, layers: int | None = None) -> int:
    """Parameters of `shape` at `layers`, counted on the meta device (nothing allocated; tied once)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config_for(shape, layers), dtype=torch.bfloat16)
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", default=None)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=DEFAULT_SHAPE)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's full depth)")
    args = parser.parse_args()
    print(build(args.out, args.layers, args.shape))
