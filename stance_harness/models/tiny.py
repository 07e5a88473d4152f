"""Embedded default models: tiny width, real architecture and depth, briefly pretrained.

Each is built deterministically on first use (tokenizer + pretraining on CPython's own
documentation text) and cached as an ordinary Hugging Face directory (safetensors), so every
later load is `from_pretrained(path)`, exactly like a real model.

A chat variant (`tiny-qwen2-chat`) is its base's directory, weights shared by hard link, with a
small chat template in its tokenizer: the chat-template path, offline. The template is on a
variant rather than on the base models so that `--chat-template auto` leaves every existing
suite, test and recorded verdict on tiny-qwen2, tiny-phi and tiny-llama framed as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from stance_harness.core.files import file_lock

BUILDER_VERSION = 2
VOCAB_SIZE = 1024
EOS = "<|endoftext|>"


# initializer_range=0.08 (not the usual 0.02): the deep, narrow stacks then leave the
# unigram plateau within a few hundred steps instead of by chance.
@dataclass(frozen=True)
class TinyRecipe:
    """How an embedded model is built. Any change gives a new cache entry."""

    model_type: str
    num_layers: int
    like: str  # the real model whose depth and module names it copies
    config: dict = field(default_factory=dict)
    steps: int = 500
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 4e-3
    warmup: int = 30
    seed: int = 0

    def fingerprint(self) -> str:
        blob = json.dumps({"builder": BUILDER_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


TINY_RECIPES: dict[str, TinyRecipe] = {
    "tiny-qwen2": TinyRecipe(
        "qwen2", 24, like="Qwen/Qwen2-0.5B",
        config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.08),
    ),
    "tiny-phi": TinyRecipe(
        "phi", 32, like="microsoft/phi-2",
        config=dict(hidden_size=64, intermediate_size=256, num_attention_heads=4,
                    partial_rotary_factor=0.4, tie_word_embeddings=False, initializer_range=0.08),
        steps=300,  # 32 wider blocks: fewer steps keep the first build near a minute
    ),
    "tiny-llama": TinyRecipe(
        "llama", 28, like="meta-llama/Llama-3.2-3B",
        config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.08),
    ),
}


# A small template in the shape of Qwen's ChatML, in plain text the tiny tokenizer already has
# (no new special tokens, so no new embeddings). The assistant's reply is wrapped in
# {% generation %}, so transformers' return_assistant_tokens_mask works on it too (the tests use
# that as a reference for the harness's own mask).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{{ '\\n' }}{% generation %}{{ message['content'] }}" + EOS + "{% endgeneration %}"
    "{% else %}"
    "<|{{ message['role'] }}|>{{ '\\n' }}{{ message['content'] }}{{ '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
)

TINY_CHAT_VARIANTS: dict[str, str] = {"tiny-qwen2-chat": "tiny-qwen2"}  # variant -> its base


def embedded_model_names() -> list[str]:
    return [*TINY_RECIPES, *TINY_CHAT_VARIANTS]


def cache_root() -> Path:
    env = os.environ.get("STANCE_HARNESS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "stance-harness"


def embedded_entry(name: str) -> str:
    """The cache entry (a directory name under cache_root()/models) of an embedded model."""
    if name in TINY_CHAT_VARIANTS:
        base = embedded_entry(TINY_CHAT_VARIANTS[name])
        fingerprint = hashlib.sha256(f"{base}\0{TINY_CHAT_TEMPLATE}".encode()).hexdigest()[:12]
        return f"{name}-{fingerprint}"
    return f"{name}-{TINY_RECIPES[name].fingerprint()}"



def cached_build(entry: str, build: Callable[[Path], None], what: str | None = None) -> Path:
    """cache_root()/models/entry, built by `build` into a temporary directory and moved in whole
    (embedded models, converted GGUF files); `what` names the build in the lock's message."""
    root = cache_root() / "models"
    target = root / entry
    if (target / "model.safetensors").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f"{target.name}.lock", what=what or f"building embedded model {entry}"):
        if not (target / "model.safetensors").exists():  # another worker may have built it
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}-"))
            try:
                build(tmp)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target
