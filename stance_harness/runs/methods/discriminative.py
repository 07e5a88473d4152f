"""Discriminative learning rates (seed 002): every weight trains, lower layers more slowly.

Block i of N gets lr·decay^(N-1-i); the embeddings lr·decay^N; the final norm and an untied
head the full lr. Each group is named (embed, L0, ..., head), and its LR is traced per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stance_harness.analysis.deltas import layer_label
from stance_harness.core.errors import HarnessError
from stance_harness.runs.methods.base import register_method
from stance_harness.runs.methods.full import FullFineTuning, FullConfig


@dataclass(frozen=True)
class DiscriminativeConfig(FullConfig):
    decay: float = field(default=0.95, metadata={"help": "LR multiplier per layer going down, in (0, 1]"})

    def __post_init__(self):
        if not 0 < self.decay <= 1:
            raise HarnessError(f"discriminative: decay must be in (0, 1], got {self.decay!r}")


def layer_lr_scale(layer: int | None, role: str, num_layers: int, decay: float) -> float:
    if layer is not None:
        return decay ** (num_layers - 1 - layer)
    if role.startswith("embed"):
        return decay**num_layers
    return 1.0


@register_method
class DiscriminativeLR(FullFineTuning):
    """Every weight trains; block i gets lr * decay^(N-1-i), embeddings lr * decay^N (seed 002)."""

    name = "discriminative"
    config_cls = DiscriminativeConfig

    def param_groups(self, ctx):
        anatomy, base_lr = ctx.anatomy, ctx.recipe.learning_rate
        groups: dict[str, dict] = {}
        for name, param in ctx.model.named_parameters():
            if not param.requires_grad:
                continue
            where = anatomy.name_of(name)
            label = layer_label(where)
            scale = layer_lr_scale(where.layer, label, anatomy.num_layers, ctx.config.decay)
            groups.setdefault(label, {"name": label, "params": [], "lr": base_lr * scale})["params"].append(param)
        return sorted(groups.values(), key=lambda g: g["lr"])
