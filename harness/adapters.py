"""Saved stance adapters: write a run's LoRA adapter, and gate one on its base without training.

An adapter directory is what peft's `save_pretrained` writes (adapter_config.json and
adapter_model.safetensors) plus `stance_harness.json`, the provenance of the run that made
it. Only safetensors are loaded: a pickle (.bin) can run code on load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .analysis.digest import tensor_digest
from .batches import framing_for
from .files import atomic_write
from .instruments import InstrumentConfig, Trace
from .methods import METHODS, method_config
from .models import share_frozen_weights
from .recipe import Recipe
from .registry import HarnessError
from .run import Run
from .tasks import TASKS

PROVENANCE_FILE = "stance_harness.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def save_adapter(run, path) -> Path:
    """Save a LoRA-family run's adapter (safetensors) with its provenance; returns the directory."""
    from peft import PeftModel

    if not isinstance(run.model, PeftModel) or run.task.name != "stance-lm":
        raise HarnessError(f"save_adapter: run {run.run_id} ({run.method.name}, task {run.task.name}) has no "
                           f"peft adapter on a causal LM to save; use lora, surgical-lora or qlora")
    extra = [n for n in run.before if "lora_" not in n]
    if extra:
        raise HarnessError(f"save_adapter: {run.method.name} also trains {len(extra)} tensors outside its adapters "
                           f"(e.g. {run.anatomy.name_of(extra[0])}), which an adapter file would not hold")
    out = Path(path)
    run.model.save_pretrained(out, safe_serialization=True)
    atomic_write(out / PROVENANCE_FILE, json.dumps({
        "run_id": run.run_id, "model": run.loaded.provenance(), "stance": run.stance.provenance(),
        "method": run.method.name, "config": run.config.as_dict(), "recipe": run.recipe.as_dict(),
    }, indent=2, default=str))
    return out


def read_adapter(path) -> tuple[Path, dict, dict]:
    """(directory, adapter_config, provenance or {}); refuses what it cannot load safely."""
    directory = Path(path).expanduser()
    if not directory.exists():
        raise HarnessError(f"--adapter {path}: the directory does not exist ({directory.resolve()})")
    if not directory.is_dir():
        raise HarnessError(f"--adapter {path}: it is a file; give the directory that save_pretrained wrote")
    config_file = directory / "adapter_config.json"
    if not config_file.is_file():
        raise HarnessError(f"--adapter {path}: no adapter_config.json there, so it is not a saved PEFT adapter")
    if not (directory / WEIGHTS_FILE).is_file():
        pickled = " (it holds adapter_model.bin, a pickle, which is refused)" if (directory / "adapter_model.bin").exists() else ""
        raise HarnessError(f"--adapter {path}: no {WEIGHTS_FILE}{pickled}; the harness loads adapters only as "
                           f"safetensors. Re-save it with save_pretrained(..., safe_serialization=True)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise HarnessError(f"--adapter {path}: {config_file} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise HarnessError(f"--adapter {path}: {config_file} holds a JSON {type(config).__name__}, not an object")
    if config.get("peft_type") != "LORA":
        raise HarnessError(f"--adapter {path}: peft_type {config.get('peft_type')!r}; only LoRA adapters are gated")
    provenance_file = directory / PROVENANCE_FILE
    try:
        provenance = json.loads(provenance_file.read_text(encoding="utf-8")) if provenance_file.is_file() else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise HarnessError(f"--adapter {path}: {provenance_file} is not valid JSON ({exc})") from None
    return directory, config, provenance


def check_base(loaded, path, config: dict, provenance: dict) -> None:
    """Refuse an adapter that was trained for another base model (or another build of it)."""
    recorded = provenance.get("model", {})
    if recorded:
        same_model = recorded.get("id") == loaded.model_id or recorded.get("name") == loaded.spec.name
        if not same_model:
            raise HarnessError(
                f"--adapter {path} was trained for base {recorded.get('name')} ({recorded.get('id')}), "
                f"not for --model {loaded.spec.name} ({loaded.model_id}); gate it with --model {recorded.get('name')}")
        if recorded.get("revision") and loaded.revision and recorded["revision"] != loaded.revision:
            raise HarnessError(
                f"--adapter {path} was trained for {recorded.get('name')} revision {recorded['revision']}, "
                f"but the loaded base is revision {loaded.revision}")
        return
    named = config.get("base_model_name_or_path")
    known = {loaded.spec.name, loaded.model_id, str(loaded.path), Path(loaded.path).name}
    if named and named not in known and Path(named).name != Path(loaded.path).name:
        raise HarnessError(f"--adapter {path} names base model {named!r} in adapter_config.json, not --model "
                           f"{loaded.spec.name} ({loaded.model_id})")


def load_adapter_run(loaded, path, stance_of, chat_template: str = "auto"):
    """The adapter on `loaded`'s base (sharing its weights), as a Run whose 'before' is the zero update.

    `stance_of(name)` loads a stance; the adapter's provenance names it (default: curious-uncertainty).
    `chat_template` (auto or none) frames its probes, as --chat-template says.
    """
    import torch
    from peft import PeftModel

    directory, config, provenance = read_adapter(path)
    check_base(loaded, path, config, provenance)
    try:
        model = PeftModel.from_pretrained(share_frozen_weights(loaded.base), directory, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise HarnessError(f"--adapter {path} does not fit the {loaded.spec.name} base ({type(exc).__name__}: {first}); "
                           f"it was most likely trained for another base model") from None
    model.eval()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    if not lora:
        raise HarnessError(f"--adapter {path}: no LoRA weights matched the {loaded.spec.name} base")
    # The update starts at zero (B = 0), so 'before' is the adapter with its B matrices zeroed.
    before = {n: torch.zeros_like(p) if ".lora_B." in n else p.detach().clone() for n, p in lora.items()}
    anatomy = loaded.anatomy
    kinds = sorted({anatomy.name_of(f"{t}.weight").kind for t in _targets(model)})
    stance = stance_of(provenance.get("stance", {}).get("name", "curious-uncertainty"))
    digest = hashlib.sha256(b"".join((directory / f).read_bytes() for f in ("adapter_config.json", WEIGHTS_FILE)))
    return Run(
        run_id=f"adapter-{directory.name}-{digest.hexdigest()[:8]}", loaded=loaded, stance=stance,
        method=METHODS.get("lora"),
        config=method_config("lora", {"r": int(config.get("r", 8)), "alpha": float(config.get("lora_alpha", 8)),
                                      "target_modules": kinds or ["qv"]}),
        recipe=Recipe.of(provenance.get("recipe")), examples=0, model=model, before=before,
        frozen_digests={n: loaded.base_digest(p) or tensor_digest(p) for n, p in model.named_parameters()
                        if n not in lora},
        trace=Trace(), train_seconds=0.0, instruments=InstrumentConfig(), name=directory.name, origin="adapter",
        task=TASKS.get("stance-lm"), anatomy=anatomy, framing=framing_for(loaded.tokenizer, chat_template),
    )


def _targets(model) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [name.removeprefix("base_model.model.") for name, module in model.named_modules()
            if isinstance(module, LoraLayer)]
