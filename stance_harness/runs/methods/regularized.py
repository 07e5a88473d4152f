"""Full fine-tuning held near the pretrained weights (seed 002): L2-SP and EWC.

Both penalise distance from the starting point θ0, which is the run's own before-snapshot:
no second copy of the weights is made. EWC weights each coordinate by a diagonal Fisher
estimated on general text (the "old task") before training starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stance_harness.core.errors import HarnessError
from stance_harness.runs.batches import collate
from stance_harness.runs.data import general_text_windows
from stance_harness.runs.methods.base import register_method
from stance_harness.runs.methods.full import FullConfig, FullFineTuning

CHUNK = 1 << 22  # elements: the penalties' temporaries are this size, not a whole tensor's


def _anchored(ctx) -> list:
    """(θ, θ0) for every trained pretrained parameter, in the snapshot's order."""
    params = dict(ctx.model.named_parameters())
    # a fresh task head has no pretrained value to stay near (L2-SP leaves new layers to weight decay)
    head = {id(p) for p in ctx.task.head_parameters(ctx.model)}
    return [(params[n], ctx.before[n]) for n in ctx.before if params[n].requires_grad and id(params[n]) not in head]


def _chunks(*tensors):
    """Aligned flat slices of same-shaped tensors, CHUNK elements at a time (views, no copies)."""
    flat = [t.detach().reshape(-1) for t in tensors]
    for start in range(0, flat[0].numel(), CHUNK):
        yield [f[start : start + CHUNK] for f in flat]


def _grad(param):
    """The parameter's .grad, made (zeros) if this step gave it none; contiguous, so views write into it."""
    if param.grad is None:
        param.grad = torch.zeros_like(param, memory_format=torch.contiguous_format)
    elif not param.grad.is_contiguous():
        param.grad = param.grad.contiguous()
    return param.grad


def _penalise(pairs, weights, scale: float, device):
    """Σ w·(θ − θ0)² over `pairs` (w = 1 where `weights` is None) as a float32 0-dim tensor, after
    adding its gradient times `scale` (2·scale·w·(θ − θ0)) to each θ's .grad in place."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    with torch.no_grad():
        for i, (param, anchor) in enumerate(pairs):
            tensors = (param, anchor, _grad(param)) + (() if weights is None else (weights[i],))
            for theta, theta0, grad, *w in _chunks(*tensors):
                drift = theta - theta0
                weighted = drift if not w else drift * w[0]
                total += (weighted * drift).sum(dtype=torch.float32).to(device)
                grad.add_(weighted, alpha=2 * scale)
    return total


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

    def penalty_gradient(self, ctx, step):
        """alpha * Σ ||θ − θ0||², its gradient 2·alpha·(θ − θ0) added to .grad a chunk at a time."""
        pairs = _anchored(ctx)
        if not pairs:
            return None
        return ctx.config.alpha * _penalise(pairs, None, ctx.config.alpha, pairs[0][0].device)


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

    def penalty_gradient(self, ctx, step):
        """lambda/2 * Σ F (θ − θ0)², its gradient lambda·F·(θ − θ0) added to .grad a chunk at a time."""
        params = {id(p): n for n, p in ctx.model.named_parameters()}
        pairs = _anchored(ctx)
        if not pairs:
            return None
        fisher = [ctx.state["fisher"][params[id(p)]] for p, _ in pairs]
        half = 0.5 * ctx.config.lambda_ewc
        return half * _penalise(pairs, fisher, half, pairs[0][0].device)
