"""Everything about models that needs torch, transformers or gguf, apart from `loading`, which
pytest's start-up reads and which reaches this module at first use: building the embedded tiny
models (a byte-level BPE tokenizer and a brief pretraining on CPython's documentation text, or a
chat variant of a built base), dequantizing GGUF files into the cache, and opening saved weights."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Callable

import gguf
import gguf.quants
import safetensors.torch
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

from stance_harness.analysis.digest import tensor_digest  # noqa: F401 - for loading.LoadedModel.base_digest
from stance_harness.core.devices import resolve_device
from stance_harness.core.errors import HarnessError
from stance_harness.core.files import atomic_write, file_digest
from stance_harness.models.dtypes import checkpoint_dtype, resolve_dtype
from stance_harness.models.gguf_files import CONVERTER_VERSION, ORIGIN_FILE, GGUFInfo, entry_name
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


def disable_progress_bars() -> None:
    transformers.logging.disable_progress_bar()


def open_tokenizer(path: Path, trust_remote_code: bool):
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)


def from_pretrained(path: Path, args, **overrides):
    """The saved model at `path` loaded with `args` (a ModelArgs), in eval mode: safetensors only, local files
    only, remote code only where the args allow it."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    auto = _auto_class(config)
    dtype = _dtype(path, args)
    if args.device_map is not None:
        overrides.setdefault("device_map", args.device_map)
    else:
        args = args.resolved()
    model = auto.from_pretrained(
        path, dtype=dtype, use_safetensors=True, local_files_only=True,
        trust_remote_code=args.trust_remote_code, **overrides,
    )
    # a device_map placed the model already (and a 4-bit model cannot move)
    return model.eval() if "device_map" in overrides else model.to(args.device).eval()


def _dtype(path: Path, args):
    """The torch dtype `args` load the model at `path` in: concrete once load_model has resolved
    them, else resolved here the same way (dtypes.resolve_dtype)."""
    device = resolve_device(args.device)
    return getattr(torch, resolve_dtype(args.dtype, device, checkpoint_dtype(path), f"{path / 'config.json'}"))


def _auto_class(config):
    is_decoder = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in (config.architectures or []))
    return AutoModelForCausalLM if is_decoder or config.model_type in ("qwen2", "llama", "phi", "gpt2") else AutoModel


def skeleton(path: Path, args):
    """The model `from_pretrained(path, args)` builds, on the meta device: its class, config, modules
    and parameters' shapes and dtypes, without reading or holding a weight."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    dtype = _dtype(path, args)
    with torch.device("meta"):
        model = _auto_class(config).from_config(config, dtype=dtype, trust_remote_code=args.trust_remote_code)
    return model.eval()


def share_frozen_weights(base):
    """A structural copy of `base` whose parameters and buffers share the base's storage.

    Each parameter is a new Parameter object (so a run sets its own requires_grad) over the
    same bytes; ties between parameters are kept. Whatever a run trains must be un-shared
    first (the training loop does this), so nothing ever writes to the base."""
    memo: dict = {id(p): torch.nn.Parameter(p.data, requires_grad=False) for p in base.parameters()}
    memo.update({id(b): b for b in base.buffers()})
    return copy.deepcopy(base, memo)


# -- GGUF files ----------------------------------------------------------------------------
# transformers' list holds two metadata groups beside the architectures
_NOT_ARCHITECTURES = ("general", "tokenizer")
# llama.cpp spellings that transformers renames before it checks its list
_RENAMED = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
            "t5encoder": "t5"}


def supported_architectures() -> list[str]:
    return sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in _NOT_ARCHITECTURES)


def supported_tensor_types() -> list[str]:
    """The GGML tensor types the gguf package can dequantize (what transformers calls on each tensor)."""
    kinds = gguf.GGMLQuantizationType
    return sorted({kinds.F32.name, kinds.F16.name} | {t.name for t in gguf.quants._type_traits})


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode("utf-8") if field.types and field.types[0].name == "STRING" else value[0].item()


def inspect_gguf(path: Path) -> GGUFInfo:
    """The file's architecture and tensor types; HarnessError unless transformers can dequantize it."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise HarnessError(f"--model {path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    architecture = _field(reader, "general.architecture")
    if architecture is None:
        raise HarnessError(f"--model {path}: the GGUF file has no general.architecture, so its layout is unknown")
    supported = supported_architectures()
    if architecture not in supported and _RENAMED.get(architecture) not in supported:
        raise HarnessError(f"--model {path}: GGUF architecture {architecture!r} is not one transformers can "
                           f"dequantize. Supported architectures: {', '.join(supported)}")
    types = Counter()
    for tensor in reader.tensors:
        try:
            types[gguf.GGMLQuantizationType(int(tensor.tensor_type)).name] += 1
        except ValueError:
            types[f"type {int(tensor.tensor_type)}"] += 1
    allowed = supported_tensor_types()
    unsupported = sorted(t for t in types if t not in allowed)
    if unsupported:
        raise HarnessError(f"--model {path}: GGUF tensor type(s) {', '.join(unsupported)} cannot be dequantized "
                           f"(gguf {metadata.version('gguf')}). Supported tensor types: {', '.join(allowed)}")
    file_type = _field(reader, "general.file_type")
    try:
        file_type = gguf.LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        file_type = f"file type {file_type}"
    return GGUFInfo(architecture, _field(reader, "general.name"), file_type, dict(sorted(types.items())))


def convert(path: Path, out: Path, progress: Callable[[str], None] | None = None) -> None:
    """Dequantize the GGUF at `path` to a float32 HF directory in `out`: config.json (without
    transformers' GGUF quantization flag), model.safetensors (each tied tensor once, under the
    name the model declares first, as save_pretrained does), the tokenizer with its chat
    template, and ORIGIN_FILE saying where it came from."""
    progress = progress or (lambda _msg: None)
    path = Path(path)
    info = inspect_gguf(path)
    started = time.perf_counter()
    progress(f"converting {path.name} ({info.architecture}, {info.quantization}) to float32 (first use; cached after)")
    where = dict(pretrained_model_name_or_path=path.parent, gguf_file=path.name, local_files_only=True)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(**where)
        model = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise HarnessError(f"--model {path}: transformers {transformers.__version__} could not load this GGUF "
                           f"({info.architecture}) as a causal LM: {exc}") from None
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain float32
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied weight (lm_head = embed_tokens): config.tie_word_embeddings restores it
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().contiguous()
    safetensors.torch.save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    atomic_write(out / ORIGIN_FILE, json.dumps({
        "gguf_file": path.name, "sha256": file_digest(path), "bytes": path.stat().st_size,
        "architecture": info.architecture, "gguf_name": info.name, "file_type": info.file_type,
        "tensor_types": info.tensor_types, "quantization": info.quantization,
        "converted": f"dequantized from {info.quantization} to float32 by transformers "
                     f"{transformers.__version__} with gguf {metadata.version('gguf')}"
                     f"; not the exact published checkpoint" if info.quantization != "none" else
                     f"read from GGUF ({', '.join(info.tensor_types)}) to float32 by transformers {transformers.__version__}",
        "converter": CONVERTER_VERSION, "convert_seconds": round(time.perf_counter() - started, 1),
    }, indent=2))
    progress(f"  {path.name} converted in {time.perf_counter() - started:.0f}s")


def converted_dir(path: Path, progress: Callable[[str], None] | None = None) -> Path:
    """The cached float32 directory of the GGUF at `path`, converted first if missing (safe across
    workers). Keyed by the file's sha256 and CONVERTER_VERSION."""
    path = Path(path)
    return cached_build(entry_name(path), lambda out: convert(path, out, progress), what=f"converting {path.name}")
