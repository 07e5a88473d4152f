"""Building the embedded tiny models (see `tiny`): a byte-level BPE tokenizer and a brief
pretraining on CPython's documentation text, or a chat variant of a built base."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from stance_harness.models.tiny import (
    EOS,
    TINY_CHAT_TEMPLATE,
    TINY_CHAT_VARIANTS,
    TINY_RECIPES,
    VOCAB_SIZE,
    TinyRecipe,
    cached_build,
    embedded_entry,
)
from stance_harness.runs.data import general_text


def build_chat_variant(name: str, base: Path, out: Path, progress: Callable[[str], None]) -> None:
    """The base's files (weights hard-linked where the file system allows) and its tokenizer with
    TINY_CHAT_TEMPLATE."""
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
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(general_text("pretrain"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def build_model(name: str, recipe: TinyRecipe, out: Path, progress: Callable[[str], None]) -> None:
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


def tiny_model_dir(name: str, progress: Callable[[str], None] | None = None) -> Path:
    """The cached directory of an embedded model, built first if missing (safe across workers)."""
    progress = progress or (lambda _msg: None)
    if name in TINY_CHAT_VARIANTS:
        base = tiny_model_dir(TINY_CHAT_VARIANTS[name], progress)
        return cached_build(embedded_entry(name), lambda out: build_chat_variant(name, base, out, progress))
    recipe = TINY_RECIPES[name]
    return cached_build(embedded_entry(name), lambda out: build_model(name, recipe, out, progress))
