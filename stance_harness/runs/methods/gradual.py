"""Gradual unfreezing (seed 002): blocks unfreeze top-down on a schedule, embeddings last.

The final norm (and an untied head) train from the start. A head tied to the input
embeddings counts as the embeddings, so it trains only if `unfreeze_embeddings` is set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stance_harness.core.errors import HarnessError
from stance_harness.runs.methods.base import Method, MethodConfig, register_method, tied_head


@dataclass(frozen=True)
class GradualConfig(MethodConfig):
    every_steps: int | None = field(default=None, metadata={"help": "unfreeze the next stage every N optimizer steps"})
    every_epochs: int | None = field(default=None, metadata={"help": "or every N epochs (give exactly one of the two)"})
    start_layers: int = field(default=1, metadata={"help": "top blocks trainable from the first step"})
    layers_per_stage: int = field(default=1, metadata={"help": "blocks unfrozen at each stage"})
    unfreeze_embeddings: bool = field(default=False, metadata={"help": "unfreeze the embeddings one stage after the last block"})

    def __post_init__(self):
        if (self.every_steps is None) == (self.every_epochs is None):
            raise HarnessError("gradual: give exactly one of every_steps or every_epochs")
        every = self.every_steps if self.every_steps is not None else self.every_epochs
        if not isinstance(every, int) or every < 1:
            raise HarnessError(f"gradual: the unfreezing interval must be an integer >= 1, got {every!r}")
        if self.layers_per_stage < 1:
            raise HarnessError(f"gradual: layers_per_stage must be >= 1 (a stage with no layers never unfreezes anything), got {self.layers_per_stage}")
        if self.start_layers < 0:
            raise HarnessError(f"gradual: start_layers must be >= 0, got {self.start_layers}")


def unfrozen_at(step: int, num_layers: int, config: GradualConfig, steps_per_epoch: int) -> tuple[list[int], bool]:
    """Which blocks are trainable at `step` (top-down), and whether the embeddings are."""
    interval = config.every_steps if config.every_steps is not None else config.every_epochs * steps_per_epoch
    stage = step // interval
    count = min(num_layers, config.start_layers + stage * config.layers_per_stage)
    all_stage = max(0, -(-(num_layers - config.start_layers) // config.layers_per_stage))  # first stage with every block
    embeddings = config.unfreeze_embeddings and stage >= all_stage + 1
    return list(range(num_layers - count, num_layers)), embeddings


@register_method
class GradualUnfreezing(Method):
    """Blocks unfreeze top-down every N steps or epochs; optionally the embeddings last (seed 002)."""

    name = "gradual"
    config_cls = GradualConfig

    def check(self, ctx):
        interval = ctx.config.every_steps or ctx.config.every_epochs * ctx.steps_per_epoch
        if ctx.config.start_layers == 0 and interval >= ctx.total_steps:
            raise HarnessError(
                f"gradual: the first stage comes at step {interval}, but the run has only {ctx.total_steps} "
                f"steps, so no block would ever train; lower every_steps/every_epochs or raise start_layers"
            )
        if ctx.config.unfreeze_embeddings and not unfrozen_at(ctx.total_steps - 1, ctx.anatomy.num_layers,
                                                              ctx.config, ctx.steps_per_epoch)[1]:
            raise HarnessError(
                f"gradual: unfreeze_embeddings=True, but the embeddings' stage comes after the run's "
                f"{ctx.total_steps} steps; shorten the interval or lengthen the run")
        if ctx.config.start_layers > ctx.anatomy.num_layers:
            raise HarnessError(f"gradual: start_layers={ctx.config.start_layers} exceeds the model's {ctx.anatomy.num_layers} layers")

    def _groups(self, model, ctx):
        """Raw parameter names by group: block index, 'embeddings', or 'always'."""
        tied = tied_head(model)
        groups: dict = {}
        for name, _ in model.named_parameters():
            where = ctx.anatomy.name_of(name)
            if where.layer is not None:
                key = where.layer
            elif where.kind.startswith("embed") or (tied and where.kind.startswith("head")):
                key = "embeddings"
            else:
                key = "always"  # final norm, untied head
            groups.setdefault(key, []).append(name)
        return groups

    def prepare(self, model, ctx):
        ctx.state["groups"] = groups = self._groups(model, ctx)
        last_layers, last_embeddings = unfrozen_at(ctx.total_steps - 1, ctx.anatomy.num_layers, ctx.config, ctx.steps_per_epoch)
        ever = set(groups.get("always", [])) | {n for i in last_layers for n in groups.get(i, [])}
        if last_embeddings:
            ever |= set(groups.get("embeddings", []))
        for name, param in model.named_parameters():
            param.requires_grad_(name in ever)  # what trains at some step; the schedule narrows it
        return model

    def schedule(self, ctx, step):
        layers, embeddings = unfrozen_at(step, ctx.anatomy.num_layers, ctx.config, ctx.steps_per_epoch)
        groups = ctx.state["groups"]
        active = set(groups.get("always", [])) | {n for i in layers for n in groups.get(i, [])}
        if embeddings:
            active |= set(groups.get("embeddings", []))
        for name, param in ctx.model.named_parameters():
            if name in ctx.before:
                param.requires_grad_(name in active)
        return {"unfrozen_layers": layers, "embeddings": embeddings}
