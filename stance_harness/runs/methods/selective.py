"""Selective unfreezing (seed 000): full weights of chosen layers x module kinds, the rest frozen."""

from __future__ import annotations

from dataclasses import dataclass, field

from stance_harness.core.errors import HarnessError
from stance_harness.runs.methods.base import Method, MethodConfig, params_where, register_method, set_trainable


@dataclass(frozen=True)
class SelectiveConfig(MethodConfig):
    layers: tuple = field(default=(), metadata={"help": "layer indices to unfreeze (required)"})
    kinds: tuple = field(default=("q_proj", "v_proj"), metadata={"help": "module kinds or groups to unfreeze"})
    biases: bool = field(default=True, metadata={"help": "unfreeze those modules' biases too"})

    def __post_init__(self):
        if isinstance(self.kinds, str):
            object.__setattr__(self, "kinds", (self.kinds,))
        if not self.layers:
            raise HarnessError("selective: `layers` must name at least one layer to unfreeze, e.g. layers=[13, 15]")
        if not self.kinds:
            raise HarnessError("selective: `kinds` must name at least one module kind")


@register_method
class SelectiveUnfreezing(Method):
    """Full weights of chosen layers x module kinds (and their biases); everything else frozen (seed 000)."""

    name = "selective"
    config_cls = SelectiveConfig

    def check(self, ctx):
        ctx.state["layers"] = set(ctx.anatomy.check_layers(list(ctx.config.layers)))
        ctx.state["kinds"] = set(ctx.anatomy.check_kinds(list(ctx.config.kinds)))

    def prepare(self, model, ctx):
        config = ctx.config
        layers, kinds = ctx.state["layers"], ctx.state["kinds"]
        leaves = {"weight", "bias"} if config.biases else {"weight"}
        names = params_where(model, ctx.anatomy, lambda p: p.layer in layers and p.kind in kinds and p.leaf in leaves)
        set_trainable(model, names)
        return model
