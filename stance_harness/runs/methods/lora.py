"""LoRA through peft, over all layers or surgically on chosen layers and module kinds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from stance_harness.analysis.deltas import raw_delta_pairs
from stance_harness.analysis.geometry import intruder_dimensions, intruder_dimensions_lora
from stance_harness.analysis.rank import lora_singular_values
from stance_harness.core.errors import HarnessError
from stance_harness.runs.methods.base import (
    ChangeUnit,
    Method,
    MethodConfig,
    block_spectrum,
    peft_module,
    register_method,
    tensor_units,
)


@dataclass(frozen=True)
class LoraMethodConfig(MethodConfig):
    method: ClassVar[str] = "lora"  # names the method in errors; subclasses set their own

    r: int = field(default=8, metadata={"help": "rank of the update"})
    alpha: float = field(default=16, metadata={"help": "lora_alpha; the update is scaled by alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "lora_dropout"})
    target_modules: tuple = field(default=("q_proj", "v_proj"), metadata={
        "help": "module kinds or groups (q_proj, v_proj, attention, mlp, ...)"})
    layers: tuple | None = field(default=None, metadata={"help": "layer indices; None means every layer"})

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        if not isinstance(self.r, int) or self.r < 1:
            raise HarnessError(f"{self.method}: r must be a positive integer, got {self.r!r}")
        if self.alpha <= 0:
            raise HarnessError(f"{self.method}: alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise HarnessError(f"{self.method}: dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise HarnessError(f"{self.method}: target_modules must name at least one module kind")


def target_paths(anatomy, config: LoraMethodConfig) -> list[str]:
    """Raw module paths of the adapter targets; unknown kinds or layers fail here."""
    return anatomy.module_paths(config.layers, anatomy.check_kinds(list(config.target_modules)))


@register_method
class Lora(Method):
    """Low-rank adapters (peft) on chosen module kinds and layers; the base is frozen (seed 000, 001)."""

    name = "lora"
    trains_sharded = True  # only the adapters train; the frozen base may span devices
    config_cls = LoraMethodConfig

    def prepare(self, model, ctx):
        return self.wrap(model, ctx.anatomy, ctx.config)

    def wrap(self, model, anatomy, config: LoraMethodConfig):
        peft = peft_module()
        paths = target_paths(anatomy, config)
        if not paths:
            raise HarnessError(f"{config.method}: no modules of kinds {config.target_modules} in layers {config.layers}")
        peft_config = peft.LoraConfig(
            r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
            target_modules=paths, bias="none", init_lora_weights=True,
            fan_in_fan_out=anatomy.model_type == "gpt2",  # GPT-2's Conv1D stores W transposed
        )
        return peft.get_peft_model(model, peft_config)

    @staticmethod
    def base_weight(module):
        """The frozen base matrix under a LoRA layer, in float32: in bf16 a small ΔW added to it would round away."""
        return module.get_base_layer().weight.detach().float()

    def effective_deltas(self, model, before: dict, anatomy):
        """ΔW = scale·B·A on each adapted base matrix (minus the same at the start), built one
        matrix at a time as the caller asks for it."""
        adapted = set()
        for module_name, module, a_name, b_name in _lora_modules(model):
            adapted.update((a_name, b_name))
            base = self.base_weight(module)
            delta_after = module.get_delta_weight("default").detach()
            if torch.count_nonzero(before[b_name]) == 0:  # peft's default init: the update starts at zero
                yield f"{module_name}.weight", base, base + delta_after.float()
                continue
            delta_before = (before[b_name] @ before[a_name]) * module.scaling["default"]
            if getattr(module, "fan_in_fan_out", False):
                delta_before = delta_before.T
            yield f"{module_name}.weight", base + delta_before.float(), base + delta_after.float()
        yield from raw_delta_pairs(model, {k: v for k, v in before.items() if k not in adapted})

    def change_units(self, model, before: dict, anatomy) -> list[ChangeUnit]:
        """One unit per adapter (its A and B together); a dose scales B alone where B started at
        zero (peft's default), so the adapter's ΔW scales by exactly λ."""
        params = dict(model.named_parameters())
        units, adapted = [], set()
        for module_name, module, a_name, b_name in _lora_modules(model):
            adapted.update((a_name, b_name))
            where = anatomy.name_of(f"{module_name}.weight")
            pairs = [(params[a_name], before[a_name]), (params[b_name], before[b_name])]
            zero_start = torch.count_nonzero(before[b_name]) == 0 and not module.use_dora.get("default", False)
            units.append(ChangeUnit(where.module, where.layer, where.kind, pairs, pairs[1:] if zero_start else pairs))
        return units + tensor_units(model, before, anatomy, skip=adapted)

    def intruders(self, model, before: dict, anatomy, top_k: int = 10, epsilon: float = 0.5):
        """From the factors where the update started at zero (no DoRA): W + scale·B·A built once,
        as peft's `reduce_intruder_dimension` builds it; any other matrix the general way."""
        params = dict(model.named_parameters())
        adapted = set()
        for module_name, module, a_name, b_name in _lora_modules(model):
            adapted.update((a_name, b_name))
            fan_in_fan_out = getattr(module, "fan_in_fan_out", False)
            if torch.count_nonzero(before[b_name]) == 0 and not module.use_dora.get("default", False):
                raw = module.get_base_layer().weight
                # the stored matrix as peft merges it; a packed 4-bit one (QLoRA) dequantized first
                base = raw.detach() if raw.is_floating_point() else self.base_weight(module)
                yield f"{module_name}.weight", intruder_dimensions_lora(
                    base, params[b_name].detach(), params[a_name].detach(),
                    module.scaling["default"], top_k=top_k, epsilon=epsilon, fan_in_fan_out=fan_in_fan_out)
            else:
                base = self.base_weight(module)
                delta_before = (before[b_name] @ before[a_name]).float() * module.scaling["default"]
                start = base + (delta_before.T if fan_in_fan_out else delta_before)
                end = base + module.get_delta_weight("default").detach().float()
                yield f"{module_name}.weight", intruder_dimensions(start, end, top_k=top_k, epsilon=epsilon)
        for name, start, end in raw_delta_pairs(model, {k: v for k, v in before.items() if k not in adapted}):
            if start.ndim == 2 and anatomy.name_of(name).layer is not None and not torch.equal(start, end):
                yield name, intruder_dimensions(start.detach(), end.detach(), top_k=top_k, epsilon=epsilon)

    def delta_spectra(self, model, before: dict, anatomy):
        """From the factors where the update started at zero (B₀ = 0, peft's default init, no DoRA):
        the singular values of scale·B·A from the QR of B and Aᵀ and the r x r core, never a
        materialised ΔW. Any other adapter, and every other trained matrix, goes the general way."""
        params = dict(model.named_parameters())
        adapted = set()
        for module_name, module, a_name, b_name in _lora_modules(model):
            adapted.update((a_name, b_name))
            name = f"{module_name}.weight"
            if torch.count_nonzero(before[b_name]) == 0 and not module.use_dora.get("default", False):
                yield name, tuple(self.base_weight(module).shape), lora_singular_values(
                    params[b_name].detach(), params[a_name].detach(), module.scaling["default"], torch.float32)
            else:
                base = self.base_weight(module)
                start = base + (before[b_name] @ before[a_name]).float() * module.scaling["default"]
                end = base + module.get_delta_weight("default").detach().float()
                yield from block_spectrum(name, start, end, anatomy)
        for name, start, end in raw_delta_pairs(model, {k: v for k, v in before.items() if k not in adapted}):
            yield from block_spectrum(name, start, end, anatomy)


def _lora_modules(model):
    """(module name, LoRA layer, A's and B's parameter names) of each module with a default adapter."""
    lora_layer = peft_module().tuners.lora.LoraLayer
    for module_name, module in model.named_modules():
        if isinstance(module, lora_layer) and "default" in module.lora_A:
            yield module_name, module, f"{module_name}.lora_A.default.weight", f"{module_name}.lora_B.default.weight"
