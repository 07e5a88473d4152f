"""Training instruments: per-layer grad norms, non-finite detection, throughput, peak memory.

Per step the loop computes everything on the device (foreach norms, clipping) and reads it
back with a single host transfer: the loss, every trained tensor's grad norm, and every
trained tensor's weight norm (finite-ness of the weights the step started from).
"""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass, field

from .registry import HarnessError

POLICIES = ("halt", "skip_step", "record")
MAX_EVENTS = 50  # non-finite events kept per run; the first is what matters


@dataclass(frozen=True)
class InstrumentConfig:
    """`train(..., instruments={"nonfinite": "record"})`."""

    nonfinite: str = field(default="halt", metadata={
        "help": "on a NaN/Inf loss, gradient or weight: halt (default), skip_step, or record and go on"})
    interference: tuple | None = field(default=None, metadata={
        "help": "two parameter-group names (e.g. ('lora', 'norm')): trace their gradient interference"})

    def __post_init__(self):
        if self.nonfinite not in POLICIES:
            raise HarnessError(f"instruments: nonfinite must be one of {', '.join(POLICIES)}, got {self.nonfinite!r}")
        if self.interference is not None:
            if isinstance(self.interference, list):
                object.__setattr__(self, "interference", tuple(self.interference))
            if len(self.interference) != 2 or len(set(self.interference)) != 2:
                raise HarnessError(f"instruments: interference needs two different group names, got {self.interference!r}")

    @classmethod
    def of(cls, value) -> "InstrumentConfig":
        if isinstance(value, cls):
            return value
        from dataclasses import fields

        from .registry import suggest

        allowed = [f.name for f in fields(cls)]
        if value is not None and not isinstance(value, dict):
            raise HarnessError(f"instruments must be a dict such as {{'nonfinite': 'record'}}, got {value!r}")
        unknown = [k for k in (value or {}) if k not in allowed]
        if unknown:
            raise HarnessError(f"instruments: unknown option {unknown[0]!r}.{suggest(unknown[0], allowed)} "
                               f"Options: {', '.join(allowed)}")
        return cls(**(value or {}))


@dataclass
class StepReading:
    loss: float
    grad_norm: float  # global, before clipping
    layer_grad_norm: dict[str, float]
    bad_grad: str | None  # first trained tensor (raw name) with a non-finite gradient
    bad_weight: str | None  # first trained tensor with a non-finite weight


class StepProbe:
    """Device-side measurements over the trained tensors, in a fixed order."""

    def __init__(self, named_params: list[tuple[str, object]], labels: list[str]):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.labels = labels  # layer label per tensor (L0, ..., embed, head)

    def grad_norms(self):
        """Each tensor's grad norm; 0 for a tensor with no gradient this step (frozen by a schedule)."""
        import torch

        grads = [p.grad for p in self.params]
        present = [g.detach() for g in grads if g is not None]
        norms = iter(torch._foreach_norm(present)) if present else iter(())
        zero = torch.zeros((), device=self.params[0].device)
        return torch.stack([next(norms).float() if g is not None else zero for g in grads])

    def weight_norms(self):
        import torch

        return torch.stack(torch._foreach_norm([p.detach() for p in self.params])).float()

    def first_nonfinite(self, norms: list[float]) -> str | None:
        """Raw name of the first trained tensor whose norm is not finite."""
        return next((name for name, v in zip(self.names, norms) if not math.isfinite(v)), None)

    def first_nonfinite_weight(self) -> str | None:
        """Raw name of the first trained tensor with a non-finite weight (one host sync)."""
        return self.first_nonfinite(self.weight_norms().tolist())

    def clip_(self, grad_norms, max_norm: float | None):
        """Scale gradients so their global norm is at most max_norm, without a host sync."""
        import torch

        total = grad_norms.pow(2).sum().sqrt()
        grads = [p.grad for p in self.params if p.grad is not None]
        if max_norm is not None and grads:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            coef = torch.where(torch.isfinite(coef), coef, torch.ones_like(coef))
            torch._foreach_mul_(grads, coef)
        return total

    def read(self, loss, grad_norms, total, weight_norms) -> StepReading:
        """The one host sync of a step."""
        import torch

        values = torch.cat([loss.detach().float().view(1), total.view(1), grad_norms, weight_norms]).tolist()
        n = len(self.params)
        loss_v, total_v, g, w = values[0], values[1], values[2 : 2 + n], values[2 + n :]
        per_layer: dict[str, float] = {}
        for label, norm in zip(self.labels, g):
            per_layer[label] = per_layer.get(label, 0.0) + norm * norm
        return StepReading(loss_v, total_v, {k: math.sqrt(v) for k, v in per_layer.items()},
                           self.first_nonfinite(g), self.first_nonfinite(w))


def reset_peak_memory(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> dict:
    """CUDA max allocated on GPU; the process's peak RSS (a high-water mark for the whole process) on CPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": "process_peak_rss", "bytes": int(rss if sys.platform == "darwin" else rss * 1024)}


def output_change_cosine(forward, group_a: list, group_b: list, step_size: float = 1e-3):
    """Interference between two parameter groups, measured where they meet: the outputs.

    Each group takes a small step along its own gradient (size `step_size` relative to the
    group's weight norm); the cosine between the two resulting output changes is returned.
    +1: the groups move the model the same way; -1: they fight. Parameters are restored
    bit-exactly. Returns (cosine, None), or (None, reason) when a group has no gradient.
    `forward()` must return the model's output tensor for a fixed batch.
    """
    import torch

    with torch.no_grad():
        base = forward().float()
        changes = []
        for label, params in (("first", group_a), ("second", group_b)):
            grads = [p.grad for p in params]
            if not params or any(g is None for g in grads):
                return None, f"the {label} group has no gradient at this step"
            grad_norm = torch.stack(torch._foreach_norm(grads)).norm()
            if not torch.isfinite(grad_norm) or grad_norm == 0:
                return None, f"the {label} group's gradient is zero or non-finite"
            weight_norm = torch.stack(torch._foreach_norm([p.detach() for p in params])).norm()
            saved = [p.detach().clone() for p in params]
            scale = step_size * max(weight_norm.item(), 1.0) / grad_norm.item()
            torch._foreach_add_([p.data for p in params], grads, alpha=-scale)
            changes.append((forward().float() - base).flatten())
            for p, s in zip(params, saved):
                p.data.copy_(s)
        a, b = changes
        denom = a.norm() * b.norm()
        if denom == 0:
            return None, "a group's step did not change the outputs"
        return float((a @ b) / denom), None
