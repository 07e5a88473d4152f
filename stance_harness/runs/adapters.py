"""Saved stance adapters and fine-tuned checkpoints: write a run's, and gate one on its base
without training.

`--adapter [NAME=]PATH` names either
- a peft adapter of any tuner type (LoRA, IA³, LoHa, ...): what `save_pretrained` writes
  (adapter_config.json and adapter_model.safetensors), or
- a fully fine-tuned checkpoint of the `--model` base (config.json and *.safetensors),
plus, where the harness saved it, `stance_harness.json`: the provenance of the run that made it
(its base, stance and recipe). NAME (default: the directory's name) namespaces its metrics
(`NAME.ece`). Only safetensors are loaded: a pickle (.bin) can run code on load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from peft.tuners.lora import LoraLayer

from stance_harness.analysis.digest import tensor_digest
from stance_harness.core.errors import HarnessError
from stance_harness.core.files import atomic_write
from stance_harness.models import share_frozen_weights
from stance_harness.models.loading import check_model_directory, local_weights_hash
from stance_harness.models.weights import from_pretrained
# re-exported: the spec of an --adapter argument lives in a torch-free module
from stance_harness.runs.adapter_spec import AdapterSpec, parse_adapter_spec
from stance_harness.runs.batches import framing_for
from stance_harness.runs.from_model import check_same_architecture, run_from_model
from stance_harness.runs.instruments import InstrumentConfig, Trace
from stance_harness.runs.methods import METHODS, method_config
from stance_harness.runs.methods.peft_method import _peft_config_class
from stance_harness.runs.recipe import Recipe
from stance_harness.runs.run import Run
from stance_harness.runs.tasks import TASKS

PROVENANCE_FILE = "stance_harness.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PEFT, FULL = "peft", "full"  # the two kinds of saved model --adapter gates
# LoRA options the `lora` method's ΔW (scale alpha / r, B @ A) does not model: such adapters are measured
# as `peft` measures any tuner, from peft's own merge
_NOT_PLAIN_LORA = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern")


@dataclass(frozen=True)
class SavedModel:
    """What an --adapter directory holds: a peft adapter or a full checkpoint, its config
    (adapter_config.json or config.json) and the harness's provenance ({} when not saved by it)."""

    spec: AdapterSpec
    kind: str  # PEFT or FULL
    config: dict
    provenance: dict

    @property
    def directory(self) -> Path:
        return self.spec.path

    def stance_name(self, given: str | None = None) -> str:
        """The stance to measure on: `given` (--stance), else the one the provenance names; else refused."""
        if given:
            return given
        recorded = self.provenance.get("stance")
        name = recorded.get("name") if isinstance(recorded, dict) else None
        if not name:
            where = (f"its {PROVENANCE_FILE} names none" if self.provenance
                     else f"it has no {PROVENANCE_FILE} (stance_harness.runs.adapters.save_adapter writes one)")
            raise HarnessError(f"--adapter {self.spec.text}: no stance to measure it on: {where}. Name it on the "
                               f"command line with --stance NAME, or save the adapter with save_adapter, which records "
                               f"its stance")
        return str(name)


def save_adapter(run, path) -> Path:
    """Save what a run trained, with its provenance (base, stance, method, recipe); returns the directory.

    A run with a peft adapter (lora, surgical-lora, qlora, peft with any tuner) saves the adapter
    alone (safetensors); a run without one (full, selective, ...) saves the whole fine-tuned model
    as a checkpoint of its base. Either is gated with `--adapter [NAME=]PATH`."""
    if run.task.name != "stance-lm":
        raise HarnessError(f"save_adapter: run {run.run_id} trained task {run.task.name}, a head on the body; only "
                           f"a causal LM (task stance-lm) is saved for --adapter")
    out = Path(path)
    if isinstance(run.model, PeftModel):
        prefix = run.model.base_model.prefix
        extra = [n for n in run.before if prefix not in n]
        if extra:
            raise HarnessError(f"save_adapter: {run.method.name} also trains {len(extra)} tensors outside its adapters "
                               f"(e.g. {run.anatomy.name_of(extra[0])}), which an adapter file would not hold")
    elif not run.loaded.is_causal_lm:
        raise HarnessError(f"save_adapter: run {run.run_id} has no peft adapter and its model is no causal LM")
    run.model.save_pretrained(out, safe_serialization=True)
    atomic_write(out / PROVENANCE_FILE, json.dumps({
        "run_id": run.run_id, "model": run.loaded.provenance(), "stance": run.stance.provenance(),
        "method": run.method.name, "config": run.config.as_dict(), "recipe": run.recipe.as_dict(),
    }, indent=2, default=str))
    return out


def read_adapter(path) -> SavedModel:
    """What `--adapter [NAME=]PATH` names, checked; refuses what it cannot load safely."""
    spec = parse_adapter_spec(path)
    directory, text = spec.path, spec.text
    if not directory.exists():
        raise HarnessError(f"--adapter {text}: the directory does not exist ({directory.resolve()})")
    if not directory.is_dir():
        raise HarnessError(f"--adapter {text}: it is a file; give the directory that save_pretrained wrote")
    config_file = directory / CONFIG_FILE
    if config_file.is_file():
        kind = PEFT
        if not (directory / WEIGHTS_FILE).is_file():
            pickled = " (it holds adapter_model.bin, a pickle, which is refused)" if (directory / "adapter_model.bin").exists() else ""
            raise HarnessError(f"--adapter {text}: no {WEIGHTS_FILE}{pickled}; the harness loads adapters only as "
                               f"safetensors. Re-save it with save_pretrained(..., safe_serialization=True)")
        config = _json_object(config_file, text)
        _check_peft_config(directory, config, text)
    elif (directory / "config.json").is_file():
        kind = FULL
        check_model_directory(directory, f"--adapter {text}")
        config = _json_object(directory / "config.json", text)
    else:
        raise HarnessError(f"--adapter {text}: no {CONFIG_FILE} there (a saved peft adapter) and no config.json (a "
                           f"fine-tuned model's checkpoint), so it is neither")
    provenance_file = directory / PROVENANCE_FILE
    provenance = _json_object(provenance_file, text) if provenance_file.is_file() else {}
    return SavedModel(spec, kind, config, provenance)


def _json_object(file: Path, text: str) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise HarnessError(f"--adapter {text}: {file} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise HarnessError(f"--adapter {text}: {file} holds a JSON {type(data).__name__}, not an object")
    return data


def _check_peft_config(directory: Path, config: dict, text: str) -> None:
    """Any tuner `peft.PeftConfig.from_pretrained` loads; prompt learning (no weight update) is refused."""
    try:
        _peft_config_class(config.get("peft_type"))  # an unknown type, named with the known ones
        loaded = PeftConfig.from_pretrained(str(directory))
    except HarnessError as exc:
        raise HarnessError(f"--adapter {text}: {CONFIG_FILE}: {str(exc).removeprefix('peft: ')}") from None
    except (TypeError, ValueError, KeyError) as exc:
        raise HarnessError(f"--adapter {text}: peft cannot read its {CONFIG_FILE} ({type(exc).__name__}: "
                           f"{str(exc).strip()[:300]})") from None
    if loaded.is_prompt_learning:
        raise HarnessError(f"--adapter {text}: a {loaded.peft_type.value} adapter is prompt learning: it trains "
                           f"virtual tokens, not a weight update, so there is no change to gate")


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


def load_adapter_run(loaded, path, stance_of, chat_template: str = "auto", stance: str | None = None):
    """`--adapter [NAME=]PATH` on `loaded`'s base, as a Run named NAME that compares it with the base.

    A LoRA adapter's 'before' is the zero update (B = 0); another tuner's, peft's initialisation
    of its config (IA³: ones); a full checkpoint's, the base's own tensors, as for a full
    fine-tune. `stance_of(name)` loads a stance: `stance` (--stance) where given, else the one
    the provenance names; neither is refused. `chat_template` (auto or none) frames its probes.
    """
    saved = read_adapter(path)
    spec = saved.spec
    check_base(loaded, spec.text, saved.config if saved.kind == PEFT else {}, saved.provenance)
    if saved.kind == FULL:
        return _full_run(loaded, saved, stance_of, chat_template, stance)
    plain_lora = saved.config.get("peft_type") == "LORA" and not any(saved.config.get(k) for k in _NOT_PLAIN_LORA)
    try:
        model = PeftModel.from_pretrained(share_frozen_weights(loaded.base), spec.path, is_trainable=not plain_lora)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise HarnessError(f"--adapter {spec.text} does not fit the {loaded.spec.name} base ({type(exc).__name__}: "
                           f"{first}); it was most likely trained for another base model") from None
    model.eval()
    stance_obj = stance_of(saved.stance_name(stance))
    digest = hashlib.sha256(b"".join((spec.path / f).read_bytes() for f in (CONFIG_FILE, WEIGHTS_FILE)))
    run_id = f"adapter-{spec.name}-{digest.hexdigest()[:8]}"
    if not plain_lora:  # any other tuner: its adapter tensors are what trained (requires_grad marks them)
        run = run_from_model(model, loaded, stance=stance_obj, name=spec.name, chat_template=chat_template,
                             recipe=saved.provenance.get("recipe"))
        return dataclasses.replace(run, run_id=run_id, origin="adapter")
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    if not lora:
        raise HarnessError(f"--adapter {spec.text}: no LoRA weights matched the {loaded.spec.name} base")
    # The update starts at zero (B = 0), so 'before' is the adapter with its B matrices zeroed.
    before = {n: torch.zeros_like(p) if ".lora_B." in n else p.detach().clone() for n, p in lora.items()}
    anatomy = loaded.anatomy
    kinds = sorted({anatomy.name_of(f"{t}.weight").kind for t in _targets(model)})
    return Run(
        run_id=run_id, loaded=loaded, stance=stance_obj, method=METHODS.get("lora"),
        config=method_config("lora", {"r": int(saved.config.get("r", 8)),
                                      "alpha": float(saved.config.get("lora_alpha", 8)),
                                      "target_modules": kinds or ["qv"]}),
        recipe=Recipe.of(saved.provenance.get("recipe")), examples=0, model=model, before=before,
        frozen_digests={n: loaded.base_digest(p) or tensor_digest(p) for n, p in model.named_parameters()
                        if n not in lora},
        trace=Trace(), train_seconds=0.0, instruments=InstrumentConfig(), name=spec.name, origin="adapter",
        task=TASKS.get("stance-lm"), anatomy=anatomy, framing=framing_for(loaded.tokenizer, chat_template),
    )


def _full_run(loaded, saved: SavedModel, stance_of, chat_template: str, stance: str | None) -> Run:
    """A fully fine-tuned checkpoint against the base, as a full fine-tune's run: every tensor of
    the checkpoint against the base's own."""
    spec = saved.spec
    stance_obj = stance_of(saved.stance_name(stance))  # before the load: a refusal should cost nothing
    model = from_pretrained(spec.path, loaded.args)  # safetensors only, no remote code unless --model-args says
    model.requires_grad_(False)
    check_same_architecture(model, loaded, what=f"--adapter {spec.text}")
    run = run_from_model(model, loaded, stance=stance_obj, name=spec.name, chat_template=chat_template,
                         recipe=saved.provenance.get("recipe"))
    return dataclasses.replace(run, run_id=f"adapter-{spec.name}-{local_weights_hash(spec.path)[:8]}",
                               origin="adapter")


def _targets(model) -> list[str]:
    return [name.removeprefix("base_model.model.") for name, module in model.named_modules()
            if isinstance(module, LoraLayer)]
