"""A Run from a model trained anywhere: a fine-tuned model object against its base, or a peft model
whose base is inside it (adapters off). Every check takes it, as it takes a run the harness trained.

Nothing is copied that the run can share: a full fine-tune's `before` tensors are the base's own;
a peft model's base is a structural copy of it with the adapters taken out, over the same storage.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

from stance_harness.analysis.digest import tensor_digest
from stance_harness.core.errors import HarnessError
from stance_harness.models import Anatomy, LoadedModel, ModelArgs, ModelSpec, share_frozen_weights
from stance_harness.runs.batches import framing_for
from stance_harness.runs.instruments import InstrumentConfig, Trace
from stance_harness.runs.methods import METHODS, method_config
from stance_harness.runs.methods.peft_method import ADAPTER
from stance_harness.runs.recipe import Recipe
from stance_harness.runs.run import Run
from stance_harness.runs.tasks import TASKS
from stance_harness.stances import Stance, load_stance

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def run_from_model(model, base=None, *, stance: str | Stance = "curious-uncertainty", tokenizer=None,
                   name: str | None = None, before: dict | None = None, trace: Trace | None = None,
                   stance_dirs=(), chat_template: str = "auto", examples: int = 0, recipe=None,
                   train_seconds: float = 0.0) -> Run:
    """`model` as a Run against its base.

    base: what `model` was fine-tuned from: `stance_harness.load_model(...)`'s LoadedModel, or a transformers
        model object (then give `tokenizer`). None for a peft model: its base is inside it.
    before: the trained tensors' starting values by parameter name (StanceCallback snapshots them).
        Without it: for a full fine-tune, the base's own tensors; for LoRA, its B matrices at zero (its
        update starts at zero); for another peft type, a fresh initialisation of the same config.
    trace: the training's steps (StanceCallback collects them); without it, none.
    """
    stance_obj = stance if isinstance(stance, Stance) else load_stance(stance, list(stance_dirs))
    is_peft = isinstance(model, PeftModel)
    if (base.base if isinstance(base, LoadedModel) else base) is model:
        raise HarnessError(f"run_from_model: the model is the {getattr(base, 'name', 'given')} base itself; "
                           f"fine-tune a copy (load it again), so the base keeps its starting weights")
    if is_peft:
        loaded = peft_base(model, base, tokenizer)
    elif base is None:
        raise HarnessError(f"run_from_model: a {type(model).__name__} is not a peft model, so give base=, the "
                           f"model it was fine-tuned from (stance_harness.load_model(...) or a transformers model)")
    else:
        loaded = base if isinstance(base, LoadedModel) else loaded_from_object(base, tokenizer)
    if not is_peft:
        check_same_architecture(model, loaded)
    task = TASKS.get("stance-lm")
    task.check(loaded)
    if is_peft:
        method, config, trained = _peft_method(model)
    else:
        method, config = METHODS.get("full"), method_config("full")
        trained = [n for n, p in model.named_parameters() if p.requires_grad] or [n for n, _ in model.named_parameters()]
    if before is None:
        before = _peft_before(model, loaded, trained) if is_peft else _base_tensors(loaded, trained)
    else:
        before = _checked_before(model, before)
    # a frozen weight's digest is the base's, so changed_frozen compares it with the base
    base_params = {} if is_peft else dict(loaded.base.named_parameters())
    digests = {raw: loaded.base_digest(base_params.get(raw, param)) or tensor_digest(base_params.get(raw, param))
               for raw, param in model.named_parameters() if raw not in before}
    label = name or method.name
    return Run(
        run_id=f"model-{label}-{loaded.name}", loaded=loaded, stance=stance_obj, method=method, config=config,
        recipe=Recipe.of(recipe), task=task, anatomy=loaded.anatomy, examples=examples, model=model,
        before=before, frozen_digests=digests, trace=trace or Trace(), train_seconds=train_seconds,
        instruments=InstrumentConfig(nonfinite="record"), name=name, origin="model",
        framing=framing_for(loaded.tokenizer, chat_template),
    )


def loaded_from_object(base, tokenizer, spec: ModelSpec | None = None, args: ModelArgs | None = None,
                       path=None, revision=None) -> LoadedModel:
    """A transformers model object as the harness's base: put in eval mode and frozen, never copied."""
    if not isinstance(base, torch.nn.Module) or not hasattr(base, "config"):
        raise HarnessError(f"run_from_model: base must be stance_harness.load_model(...)'s LoadedModel or a transformers "
                           f"model, not {type(base).__name__}")
    if tokenizer is None:
        raise HarnessError("run_from_model: give tokenizer= (the tokenizer the model was trained with); a "
                           "transformers model does not carry one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    first = next(base.parameters())
    name = getattr(base.config, "_name_or_path", "") or base.config.model_type
    base.eval()
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    return LoadedModel(
        spec or ModelSpec(Path(name).name or name, "object", path=name,
                          description=f"an in-memory {type(base).__name__}"),
        args or ModelArgs(dtype=_DTYPE_NAMES.get(first.dtype, "float32"), device=str(first.device)),
        Path(path or name), revision, tokenizer, base, Anatomy.of(base))


def peft_base(model, base, tokenizer) -> LoadedModel:
    """The peft model's own base (a copy over the same storage with the adapters taken out), named
    as `base` names it where given."""
    if len(model.peft_config) != 1 or model.active_adapter != ADAPTER:
        raise HarnessError(f"run_from_model: the peft model holds adapters {sorted(model.peft_config)} (active "
                           f"{model.active_adapter!r}); the harness analyses one adapter named {ADAPTER!r}, "
                           f"peft's default")
    if isinstance(base, LoadedModel):
        owners = {p.data_ptr() for p in base.base.parameters()}
        if all(p.data_ptr() in owners for p in model.parameters() if not p.requires_grad):
            return base  # already this model's own base (StanceCallback measures on it every N steps)
    inner = share_frozen_weights(model).unload()
    if isinstance(base, LoadedModel):
        check_same_architecture(inner, base)
        return loaded_from_object(inner, tokenizer or base.tokenizer, base.spec, base.args, base.path, base.revision)
    if base is not None:
        raise HarnessError("run_from_model: a peft model carries its base; give base= only as stance_harness.load_model(...) "
                           "(to name it), or leave it out")
    return loaded_from_object(inner, tokenizer)


def check_same_architecture(model, loaded: LoadedModel, what: str = "run_from_model: the model") -> None:
    """Refuse a model whose weights are not the base's: a fine-tune of another model. `what`
    names the model in the message."""
    base = {n: tuple(p.shape) for n, p in loaded.base.named_parameters()}
    ours = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for name, shape in ours.items():
        if base.get(name) != shape:
            where = "has no counterpart in the base" if name not in base else f"is {list(base[name])} in the base"
            raise HarnessError(f"{what} is not a fine-tune of {loaded.name} "
                               f"({loaded.anatomy.model_type}, {loaded.anatomy.num_layers} layers): its parameter "
                               f"{name} {list(shape)} {where}")
    missing = [n for n in base if n not in ours]
    if missing:
        raise HarnessError(f"{what} is not a fine-tune of {loaded.name}: it lacks the base's "
                           f"{missing[0]} (and {len(missing) - 1} more)")


def _peft_method(model):
    """The `peft` method with the model's own config, and the names of its adapter's tensors."""
    config = method_config("peft", {"config": model.peft_config[ADAPTER]})
    prefix = model.base_model.prefix
    trained = ([n for n, p in model.named_parameters() if p.requires_grad]
               or [n for n, _ in model.named_parameters() if prefix in n])
    if not trained:
        raise HarnessError(f"run_from_model: the peft model has no {prefix}* tensors to analyse")
    return METHODS.get("peft"), config, trained


def _base_tensors(loaded: LoadedModel, trained: list[str]) -> dict:
    base = dict(loaded.base.named_parameters())
    return {n: base[n].detach() for n in trained}


def _peft_before(model, loaded: LoadedModel, trained: list[str]) -> dict:
    """Where the adapter started, when nobody snapshotted it: a LoRA update starts at zero (B = 0),
    so B is zeroed and the rest kept; another peft type starts as peft initialises its config."""
    params = dict(model.named_parameters())
    config = model.peft_config[ADAPTER]
    if config.peft_type.value == "LORA" and config.init_lora_weights is True:
        return {n: torch.zeros_like(params[n]) if ".lora_B." in n or ".lora_embedding_B." in n
                else params[n].detach().clone() for n in trained}
    torch.manual_seed(0)
    fresh = dict(get_peft_model(share_frozen_weights(loaded.base), dataclasses.replace(config)).named_parameters())
    return {n: fresh[n].detach().clone() if n in fresh else params[n].detach().clone() for n in trained}


def _checked_before(model, before: dict) -> dict:
    params = dict(model.named_parameters())
    for name, value in before.items():
        if name not in params or tuple(value.shape) != tuple(params[name].shape):
            raise HarnessError(f"run_from_model: before[{name!r}] {list(value.shape)} is not a parameter of the "
                               f"model of that shape")
    return {n: v.to(params[n].device) for n, v in before.items()}  # a CPU snapshot of a model on a GPU
