"""Full fine-tuning held near the pretrained weights (seed 002): L2-SP and EWC.

Both penalise distance from the starting point θ0, which is the run's own before-snapshot:
no second copy of the weights is made. EWC weights each coordinate by a diagonal Fisher
estimated on general text (the "old task") before training starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..batches import collate
from ..data import general_text_windows
from ..registry import HarnessError
from .base import register_method
from .full import FullConfig, FullFineTuning


def _drift(ctx):
    """(θ - θ0) for every trained pretrained parameter, in the snapshot's order."""
    import torch

    params = dict(ctx.model.named_parameters())
    # a fresh task head has no pretrained value to stay near (L2-SP leaves new layers to weight decay)
    head = {id(p) for p in ctx.task.head_parameters(ctx.model)}
    names = [n for n in ctx.before if params[n].requires_grad and id(params[n]) not in head]
    return names, torch._foreach_sub([params[n] for n in names], [ctx.before[n] for n in names])


@dataclass(frozen=True)
class L2SPConfig(FullConfig):
    alpha: float = field(default=0.01, metadata={"help": "penalty weight: alpha * sum ||θ - θ0||²"})

    def __post_init__(self):
        if self.alpha < 0:
            raise HarnessError(f"l2sp: alpha must be >= 0, got {self.alpha!r}")


@register_method
class L2SP(FullFineTuning):
    """Full fine-tuning + alpha * ||θ - θ0||² toward the pretrained weights (seed 002)."""

    name = "l2sp"
    config_cls = L2SPConfig

    def extra_loss(self, ctx, step):
        import torch

        _, drift = _drift(ctx)
        return ctx.config.alpha * torch.stack(torch._foreach_norm(drift)).pow(2).sum()


@dataclass(frozen=True)
class EWCConfig(FullConfig):
    lambda_ewc: float = field(default=1000.0, metadata={"help": "penalty weight: lambda/2 * sum F (θ - θ0)²"})
    fisher_batches: int = field(default=16, metadata={"help": "general-text batches for the Fisher estimate"})
    fisher_batch_size: int = field(default=1, metadata={
        "help": "windows per Fisher batch; 1 gives the empirical Fisher (per-example squared gradients)"})
    fisher_seq_len: int = field(default=64, metadata={"help": "tokens per window"})

    def __post_init__(self):
        if self.lambda_ewc < 0:
            raise HarnessError(f"ewc: lambda_ewc must be >= 0, got {self.lambda_ewc!r}")
        if self.fisher_batches < 1 or self.fisher_batch_size < 1 or self.fisher_seq_len < 8:
            raise HarnessError("ewc: fisher_batches and fisher_batch_size must be >= 1, fisher_seq_len >= 8")


def diagonal_fisher(model, batches, device) -> dict:
    """Mean over batches of the squared gradient of each batch's mean LM loss.

    With one window per batch (the default) this is the empirical diagonal Fisher; larger
    batches square a mean gradient, which shrinks the estimate as the batch grows.
    """
    import torch

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**collate(batch, 0, device)).loss.backward()
        for name, param in params.items():
            if param.grad is not None:
                fisher[name] += param.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    return {n: f / len(batches) for n, f in fisher.items()}


@register_method
class EWC(FullFineTuning):
    """Full fine-tuning + lambda/2 * sum F (θ - θ0)², Fisher F from general text (seed 002)."""

    name = "ewc"
    config_cls = EWCConfig

    def check(self, ctx):
        ctx.require_lm_task("ewc", "it estimates its Fisher from the language-modelling loss on general text")

    def setup(self, ctx):
        config = ctx.config
        windows = general_text_windows(ctx.loaded.tokenizer, config.fisher_seq_len,
                                       config.fisher_batches * config.fisher_batch_size, seed=ctx.recipe.seed + 7919)
        batches = [windows[i : i + config.fisher_batch_size] for i in range(0, len(windows), config.fisher_batch_size)]
        device = next(ctx.model.parameters()).device
        ctx.state["fisher"] = diagonal_fisher(ctx.model, batches, device)

    def extra_loss(self, ctx, step):
        import torch

        names, drift = _drift(ctx)
        fisher = [ctx.state["fisher"][n] for n in names]
        weighted = torch._foreach_mul(torch._foreach_mul(drift, drift), fisher)
        return 0.5 * ctx.config.lambda_ewc * torch.stack([w.sum() for w in weighted]).sum()
