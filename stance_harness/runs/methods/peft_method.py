"""`peft`: whatever a peft config builds (LoRA with DoRA, rsLoRA, PiSSA or OLoRA init, IA³,
AdaLoRA, VeRA, LoHa, ...), trained by the one loop, its ΔW taken from peft's own merge.

The config is the user's PeftConfig or its dict form; it is validated by peft itself and kept
as the whole `to_dict()` (every default filled in), so the run key holds all of it.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

import torch

from stance_harness.analysis.deltas import raw_delta_pairs
from stance_harness.core.registry import HarnessError, suggest
from stance_harness.runs.methods.base import Method, MethodConfig, peft_module, register_method

ADAPTER = "default"  # the adapter name get_peft_model gives; the harness trains one adapter


def _jsonable(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"not JSON: {value!r}")


def _peft_config_class(peft_type):
    known = {str(getattr(k, "value", k)): cls for k, cls in peft_module().mapping.PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    name = str(getattr(peft_type, "value", peft_type)).upper()
    if name not in known:
        raise HarnessError(f"peft: unknown peft_type {peft_type!r}.{suggest(name, list(known))} "
                           f"Known: {', '.join(sorted(known))}")
    return known[name]


def build_peft_config(value):
    """A fresh PeftConfig from a PeftConfig or its dict form; peft's own checks, as HarnessErrors."""
    if isinstance(value, peft_module().PeftConfig):
        value = value.to_dict()
    if not isinstance(value, dict):
        raise HarnessError(f"peft: config must be a peft PeftConfig or its dict form, got {value!r}")
    options = dict(value)
    if "peft_type" not in options or options["peft_type"] is None:
        raise HarnessError("peft: the config dict needs a peft_type, e.g. {'peft_type': 'LORA', 'r': 8}")
    cls = _peft_config_class(options.pop("peft_type"))
    allowed = [f.name for f in fields(cls) if f.init]
    for key in options:
        if key not in allowed:
            raise HarnessError(f"peft: {cls.__name__} has no field {key!r}.{suggest(str(key), allowed)}")
    try:
        config = cls(**options)
    except (TypeError, ValueError) as err:
        raise HarnessError(f"peft: {cls.__name__} refused the config: {err}") from None
    if config.is_prompt_learning:
        raise HarnessError(f"peft: {config.peft_type.value} is prompt learning: it trains virtual tokens, not a "
                           "weight update, so there is no ΔW to analyse; use a tuner such as LORA, IA3, VERA")
    return config


@dataclass(frozen=True)
class PeftMethodConfig(MethodConfig):
    config: Any = field(default=None, metadata={
        "help": "a peft PeftConfig (LoraConfig(use_dora=True), IA3Config(...), ...) or its dict form with peft_type"})

    def __post_init__(self):
        if self.config is None:
            raise HarnessError("peft: give the adapter as config=<a peft PeftConfig or its dict form>, "
                               "e.g. train('peft', config=LoraConfig(r=8, use_dora=True))")
        whole = build_peft_config(self.config).to_dict()
        object.__setattr__(self, "config", json.loads(json.dumps(whole, default=_jsonable, sort_keys=True)))

    def __hash__(self):
        return hash(json.dumps(self.config, sort_keys=True))

    def peft_config(self):
        """A new PeftConfig each time: get_peft_model writes into the one it is given."""
        return build_peft_config(self.config)


@register_method
class Peft(Method):
    """Any peft tuner from a PeftConfig or its dict (DoRA, rsLoRA, PiSSA, IA³, AdaLoRA, VeRA, ...); ΔW from peft's merge."""

    name = "peft"
    config_cls = PeftMethodConfig

    def check(self, ctx):
        config = ctx.config.config
        if config["peft_type"] == "ADALORA" and config["total_step"] != ctx.total_steps:
            raise HarnessError(f"peft: AdaLoRA's total_step is {config['total_step']}, but this run has "
                               f"{ctx.total_steps} optimizer steps; set total_step={ctx.total_steps} so its rank "
                               "budget schedule fits the run")

    def prepare(self, model, ctx):
        peft_config = ctx.config.peft_config()
        originals = unshare_rewritten_targets(model, peft_config)
        starting = {name: param.data for name, param in model.named_parameters()}  # references, not copies
        try:
            peft_model = peft_module().get_peft_model(model, peft_config)
        except (ValueError, TypeError, KeyError) as err:  # e.g. target modules the model lacks
            raise HarnessError(f"peft: get_peft_model refused the config on this model: {err}") from None
        # ΔW is taken against the original base matrix, which is still the session base's tensor.
        peft_model.harness_original_weights = {f"base_model.model.{path}": w for path, w in originals.items()}
        for path, layer in tuner_layers(peft_model):
            weight = layer.get_base_layer().weight
            original = starting.get(f"{path.removeprefix('base_model.model.')}.weight")
            if original is not None and weight.data_ptr() != original.data_ptr():  # rebound by an init
                peft_model.harness_original_weights.setdefault(path, original)
        return peft_model

    def after_optimizer_step(self, ctx, step):
        if ctx.config.config["peft_type"] == "ADALORA":
            ctx.model.base_model.update_and_allocate(step)  # peft: after optimizer.step, before zero_grad

    def effective_deltas(self, model, before: dict, anatomy):
        """(base matrix name, W before, W after) per adapted module, from peft's merge on a float32
        copy of that one module. W before is the original base matrix (for PiSSA and OLoRA too),
        unless the merge of the adapter's starting values differs from it: an adapter that does not
        start as the identity (init_lora_weights=False), or a base rewritten in low precision. Then
        it is that merged start, so that ΔW is what training changed."""
        adapted = set()
        originals = getattr(model, "harness_original_weights", {})
        for path, layer in tuner_layers(model):
            params = {f"{path}.{name}": p for name, p in layer.named_parameters() if p.requires_grad}
            adapted.update(params)
            original = originals.get(path, layer.get_base_layer().weight).detach().float()
            after = merged_weight(layer)
            start = merged_weight(layer, {name.removeprefix(f"{path}."): before[name]
                                          for name in params if name in before})
            if not torch.allclose(start, original, rtol=1e-5, atol=1e-6):
                original = start
            yield f"{path}.weight", original, after
        yield from raw_delta_pairs(model, {k: v for k, v in before.items() if k not in adapted})


def unshare_rewritten_targets(model, peft_config) -> dict:
    """Give each target module's weight its own copy when the init may rewrite it (PiSSA, OLoRA,
    CorDA, LoftQ: any init_lora_weights other than True/False). peft's OLoRA subtracts in place,
    which would otherwise write into the session's base. Returns {module path: the base's tensor}."""
    check_target_module_exists = peft_module().tuners.tuners_utils.check_target_module_exists
    if isinstance(getattr(peft_config, "init_lora_weights", True), bool):
        return {}
    if peft_config.target_modules is None:
        raise HarnessError(f"peft: init_lora_weights={peft_config.init_lora_weights!r} rewrites the base matrices; "
                           "name them with target_modules (e.g. ['q_proj', 'v_proj'])")
    originals = {}
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and path and check_target_module_exists(peft_config, path):
            originals[path] = weight.data
            weight.data = weight.data.clone()
    return originals


def tuner_layers(model):
    """(module path, peft tuner layer) of each module holding the adapter."""
    tuner_layer = peft_module().tuners.tuners_utils.BaseTunerLayer
    for path, module in model.named_modules():
        if isinstance(module, tuner_layer) and ADAPTER in module.active_adapters:
            yield path, module


def merged_weight(layer, values: dict | None = None):
    """The base matrix with the adapter merged in by peft, on a float32 copy of `layer` (with
    `values`, by local parameter name, put in first); `layer` itself is untouched."""
    work = copy.deepcopy(layer).float()
    if values:
        own = dict(work.named_parameters())
        with torch.no_grad():
            for name, value in values.items():
                own[name].copy_(value)
    work.merge(adapter_names=[ADAPTER])
    return work.get_base_layer().weight.detach().float()
