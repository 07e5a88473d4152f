"""A model with Qwen2-0.5B's exact shapes and random weights, written as a local model directory.

24 layers, hidden 896, MLP 4864, 14 attention heads with 2 KV heads, vocab 151936, tied head:
494M parameters, 0.92 GiB of bf16 safetensors. Its behaviour means nothing; it exists to
measure memory and time at real size. Nothing is downloaded: the tokenizer is the embedded
models' (its 1,024 ids are all inside the 151,936-row embedding).

    python benchmarks/shape_model.py OUT_DIR [--layers N]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QWEN2_0_5B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0)


def build(out: Path, layers: int = 24) -> Path:
    """Write the model to `out` once (kept when it is already there); returns `out`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from stance_harness.models.weights import build_tokenizer

    out = Path(out)
    if (out / "model.safetensors").is_file():
        return out
    tokenizer = build_tokenizer()
    config = Qwen2Config(**{**QWEN2_0_5B, "num_hidden_layers": layers}, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()
    print(build(args.out, args.layers))
