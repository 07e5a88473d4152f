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
import math
import os
import shutil
import tempfile
import time
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


def tiny_model_dir(name: str, progress: Callable[[str], None] | None = None) -> Path:
    """The cached directory of an embedded model, built first if missing (safe across workers)."""
    progress = progress or (lambda _msg: None)
    if name in TINY_CHAT_VARIANTS:
        base = tiny_model_dir(TINY_CHAT_VARIANTS[name], progress)
        return cached_build(embedded_entry(name), lambda out: _build_chat_variant(name, base, out, progress))
    recipe = TINY_RECIPES[name]
    return cached_build(embedded_entry(name), lambda out: _build(name, recipe, out, progress))


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


def _build_chat_variant(name: str, base: Path, out: Path, progress: Callable[[str], None]) -> None:
    """The base's files (weights hard-linked where the file system allows) and its tokenizer with
    TINY_CHAT_TEMPLATE."""
    from transformers import AutoTokenizer

    progress(f"making embedded model {name}: {base.name} with a chat template")
    for file in base.iterdir():
        if file.is_file() and file.name != "stance_harness.json":
            try:
                os.link(file, out / file.name)
            except OSError:
                shutil.copy2(file, out / file.name)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    for file in out.iterdir():  # the tokenizer's files are written anew, not through the links
        if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            file.unlink()
    tokenizer.save_pretrained(out)
    (out / "stance_harness.json").write_text(json.dumps({"name": name, "base": base.name,
                                                         "chat_template": TINY_CHAT_TEMPLATE}, indent=2))


def build_tokenizer():
    """Byte-level BPE trained on the pretraining text; deterministic for the same text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from stance_harness.runs.data import general_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(general_text("pretrain"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def _build(name: str, recipe: TinyRecipe, out: Path, progress: Callable[[str], None]) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from stance_harness.runs.data import general_text

    started = time.perf_counter()
    progress(f"building embedded model {name} (first use; cached after): {recipe.num_layers} layers like {recipe.like}")
    tokenizer = build_tokenizer()
    ids = torch.tensor(tokenizer("\n\n".join(general_text("pretrain")))["input_ids"])
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = AutoConfig.for_model(
        recipe.model_type, vocab_size=VOCAB_SIZE, num_hidden_layers=recipe.num_layers,
        max_position_embeddings=256, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        **recipe.config,
    )
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(config)
    # foreach: one call per step for all 290 tensors instead of one per tensor (on the CPU the default
    # is per tensor); the same elementwise arithmetic, so the same weights, bit for bit
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0,
                                  foreach=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / recipe.warmup) * 0.5 * (1 + math.cos(math.pi * s / recipe.steps)),
    )
    sampler = torch.Generator().manual_seed(recipe.seed)
    model.train()
    for step in range(recipe.steps):
        starts = torch.randint(0, len(ids) - recipe.seq_len - 1, (recipe.batch_size,), generator=sampler)
        batch = torch.stack([ids[s : s + recipe.seq_len] for s in starts.tolist()])
        # no KV cache: training never reads it back, and building it cost a concatenation per layer
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0 or step == 0:
            progress(f"  {name} pretraining step {step + 1}/{recipe.steps} loss {loss.item():.3f}")
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "stance_harness.json").write_text(json.dumps(
        {"name": name, "fingerprint": recipe.fingerprint(), "recipe": asdict(recipe),
         "final_pretrain_loss": loss.item(), "build_seconds": time.perf_counter() - started},
        indent=2,
    ))
    progress(f"  {name} built in {time.perf_counter() - started:.0f}s (final pretraining loss {loss.item():.3f})")
