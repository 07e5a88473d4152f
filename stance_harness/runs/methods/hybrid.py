"""Hybrid LoRA + norm layers with selective-freezing schedules (seed 004).

Two groups train: LoRA adapters and the norm layers. Schedules, in optimizer steps:
  freeze_lora_steps = W   warm-up: only the norm layers train for the first W steps
  alternate_every = K     then the groups take turns, K steps each
  order                   "lora-first" (the seed's name): LoRA is the first group frozen,
                          so the norm layers train first; "norm-first": the reverse
The active group of every step is recorded in the run's trace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from stance_harness.core.errors import HarnessError
from stance_harness.runs.methods.base import register_method
from stance_harness.runs.methods.lora import Lora, LoraMethodConfig

ORDERS = ("lora-first", "norm-first")
GROUPS = ("lora", "norm")


@dataclass(frozen=True)
class HybridConfig(LoraMethodConfig):
    method: ClassVar[str] = "hybrid"

    freeze_lora_steps: int = field(default=0, metadata={"help": "warm-up steps with LoRA frozen (norm layers only)"})
    alternate_every: int = field(default=0, metadata={"help": "after warm-up, switch the trained group every K steps; 0 = train both"})
    order: str = field(default="lora-first", metadata={"help": "lora-first: LoRA frozen first (norm trains first); norm-first: the reverse"})

    def __post_init__(self):
        super().__post_init__()
        if self.order not in ORDERS:
            raise HarnessError(f"hybrid: order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.freeze_lora_steps < 0 or self.alternate_every < 0:
            raise HarnessError("hybrid: freeze_lora_steps and alternate_every must be >= 0")


def active_groups(step: int, config: HybridConfig) -> tuple[str, ...]:
    if step < config.freeze_lora_steps:
        return ("norm",)
    if not config.alternate_every:
        return GROUPS
    phase = (step - config.freeze_lora_steps) // config.alternate_every
    first, second = ("norm", "lora") if config.order == "lora-first" else ("lora", "norm")
    return (first,) if phase % 2 == 0 else (second,)


@register_method
class HybridLoraNorm(Lora):
    """LoRA adapters + norm layers, with LoRA warm-up freezing and alternation schedules (seed 004)."""

    name = "hybrid"
    trains_sharded = False  # it also trains the base's own norm weights
    config_cls = HybridConfig

    def check(self, ctx):
        config, total = ctx.config, ctx.total_steps
        if config.freeze_lora_steps >= total:
            raise HarnessError(
                f"hybrid: freeze_lora_steps={config.freeze_lora_steps} covers the whole run ({total} steps), "
                f"so LoRA would never train; use fewer warm-up steps or a longer run")
        if config.alternate_every and config.alternate_every >= total - config.freeze_lora_steps:
            raise HarnessError(
                f"hybrid: alternate_every={config.alternate_every} is longer than the {total - config.freeze_lora_steps} "
                f"steps after warm-up, so the groups would never alternate")

    def prepare(self, model, ctx):
        model = self.wrap(model, ctx.anatomy, ctx.config)
        groups = {"lora": [], "norm": []}
        for name, param in model.named_parameters():
            where = ctx.anatomy.name_of(name)
            if where.leaf.startswith("lora_"):
                groups["lora"].append(name)
            elif where.kind in ("attn_norm", "mlp_norm", "final_norm"):
                groups["norm"].append(name)
                param.requires_grad_(True)
        ctx.state["groups"] = groups
        return model

    def param_groups(self, ctx):
        params = dict(ctx.model.named_parameters())
        return [{"name": g, "params": [params[n] for n in names]} for g, names in ctx.state["groups"].items()]

    def schedule(self, ctx, step):
        active = active_groups(step, ctx.config)
        params = dict(ctx.model.named_parameters())
        for group, names in ctx.state["groups"].items():
            for name in names:
                params[name].requires_grad_(group in active)
        return {"active": list(active)}
