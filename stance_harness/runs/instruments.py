"""Training instruments and the trace they fill: per-layer grad norms, non-finite detection,
throughput, peak memory, interference.

Per step the loop computes everything on the device (foreach norms, clipping) and reads it
back with a single host transfer: the loss, every trained tensor's grad norm, and every
trained tensor's weight norm (finite-ness of the weights the step started from).
"""

from __future__ import annotations

import ctypes
import gc
import math
import resource
import sys
from dataclasses import asdict, dataclass, field, fields

import torch

from stance_harness.core.config import build_config
from stance_harness.core.errors import HarnessError
from stance_harness.core.metrics import LOWER, declare_metrics

POLICIES = ("halt", "skip_step", "record")
# What the trace gives a suite to publish and gate.
declare_metrics([
    ("step_time", LOWER, "seconds per optimizer step"),
    ("peak_memory", LOWER, "peak memory in bytes (CUDA max allocated, or the process's peak RSS)"),
])
MAX_EVENTS = 50  # non-finite events kept per run; the first is what matters


@dataclass(frozen=True)
class InstrumentConfig:
    """`train(..., instruments={"nonfinite": "record"})`."""

    nonfinite: str = field(default="halt", metadata={
        "help": "on a NaN/Inf loss, gradient or weight: halt (default), skip_step, or record and go on"})
    interference: tuple | None = field(default=None, metadata={
        "help": "two parameter-group names (e.g. ('lora', 'norm')): trace their gradient interference"})
    interference_every: int = field(default=1, metadata={
        "help": "measure the interference at every N-th optimizer step (steps 0, N, 2N, ...): each costs "
                "three forward passes, kept out of the step's time"})

    def __post_init__(self):
        if self.nonfinite not in POLICIES:
            raise HarnessError(f"instruments: nonfinite must be one of {', '.join(POLICIES)}, got {self.nonfinite!r}")
        if self.interference is not None:
            if isinstance(self.interference, list):
                object.__setattr__(self, "interference", tuple(self.interference))
            if len(self.interference) != 2 or len(set(self.interference)) != 2:
                raise HarnessError(f"instruments: interference needs two different group names, got {self.interference!r}")
        if self.interference_every < 1:  # its type is checked where the config is built
            raise HarnessError(f"instruments: interference_every must be a whole number of steps >= 1, "
                               f"got {self.interference_every!r}")

    @classmethod
    def of(cls, value) -> "InstrumentConfig":
        return build_config(cls, value, what="instruments", unknown="instruments: unknown option")


@dataclass
class Trace:
    """What happened at each optimizer step."""

    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)  # global, before clipping
    layer_grad_norm: dict[str, list[float]] = field(default_factory=dict)  # per layer label, before clipping
    lr: list[float] = field(default_factory=list)  # the first group's
    group_lr: dict[str, list[float]] = field(default_factory=dict)  # every named group's
    schedule: list[dict] = field(default_factory=list)  # what the method's schedule set, per step
    step_time: list[float] = field(default_factory=list)
    examples: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    nonfinite: list[dict] = field(default_factory=list)  # events: step, what, parameter
    weight_norm: list[float] = field(default_factory=list)  # of the trained tensors, as each step starts (and at the end)
    health: list[dict] = field(default_factory=list)  # collapse events without a NaN: step, what, detail
    uniform_loss: float | None = None  # the loss of a uniform prediction (ln of the classes or vocabulary)
    interference: list[dict] = field(default_factory=list)  # step, epoch, cosine or reason
    skipped_steps: list[int] = field(default_factory=list)
    peak_memory: dict = field(default_factory=dict)
    halted_at: int | None = None
    halt_reason: str | None = None

    def __repr__(self) -> str:
        # Short, like Run's: per-layer series at real size would fill a failure report.
        last = f"{self.loss[-1]:.4g}" if self.loss else "-"
        return f"Trace(steps={len(self.loss)}, last_loss={last}, halted_at={self.halted_at})"

    def add_reading(self, reading: "StepReading", lrs: list[float], examples: int, tokens: int) -> None:
        self.loss.append(reading.loss)
        self.grad_norm.append(reading.grad_norm)
        self.weight_norm.append(reading.weight_norm)
        for label, norm in reading.layer_grad_norm.items():
            self.layer_grad_norm.setdefault(label, []).append(norm)
        self.lr.append(lrs[0])
        for name, lr in zip(self.group_lr, lrs):
            self.group_lr[name].append(lr)
        self.examples.append(examples)
        self.tokens.append(tokens)

    @classmethod
    def from_dict(cls, data: dict) -> "Trace":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def add_event(self, step: int, what: str, parameter: str | None) -> None:
        if len(self.nonfinite) < MAX_EVENTS:
            self.nonfinite.append({"step": step, "what": what, "parameter": parameter})

    def summary(self) -> dict:
        seconds = sum(self.step_time)
        finite_norms = [g for g in self.grad_norm if math.isfinite(g)]
        return {
            "steps": len(self.loss),
            "mean_step_time_s": seconds / len(self.step_time) if self.step_time else None,
            # a Trainer's steps (StanceCallback) count no tokens: then none, not 0 per second
            "examples_per_s": sum(self.examples) / seconds if seconds and self.examples else None,
            "tokens_per_s": sum(self.tokens) / seconds if seconds and self.tokens else None,
            "max_grad_norm": max(finite_norms) if finite_norms else None,
            "peak_memory_bytes": self.peak_memory.get("bytes"),
            "peak_memory_kind": self.peak_memory.get("kind"),
            "first_nonfinite": self.nonfinite[0] if self.nonfinite else None,
            "skipped_steps": len(self.skipped_steps),
            "halted_at": self.halted_at,
            "interference_by_epoch": self.interference_by_epoch(),
        }

    def interference_by_epoch(self) -> list[dict]:
        """Mean interference cosine per epoch over the steps where it was defined."""
        epochs: dict[int, list] = {}
        for entry in self.interference:
            epochs.setdefault(entry["epoch"], []).append(entry["cosine"])
        out = []
        for epoch, values in sorted(epochs.items()):
            defined = [v for v in values if v is not None]
            out.append({"epoch": epoch, "mean_cosine": sum(defined) / len(defined) if defined else None,
                        "steps": len(defined), "undefined_steps": len(values) - len(defined)})
        return out

    def as_dict(self) -> dict:
        return asdict(self)



@dataclass
class StepReading:
    loss: float
    grad_norm: float  # global, before clipping
    layer_grad_norm: dict[str, float]
    bad_grad: str | None  # first trained tensor (raw name) with a non-finite gradient
    bad_weight: str | None  # first trained tensor with a non-finite weight
    weight_norm: float = math.nan  # global norm of the trained tensors the step started from


class StepProbe:
    """Device-side measurements over the trained tensors, in a fixed order."""

    def __init__(self, named_params: list[tuple[str, object]], labels: list[str]):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.labels = labels  # layer label per tensor (L0, ..., embed, head)

    def grad_norms(self):
        """Each tensor's grad norm; 0 for a tensor with no gradient this step (frozen by a schedule)."""
        grads = [p.grad for p in self.params]
        present = [g.detach() for g in grads if g is not None]
        norms = iter(torch._foreach_norm(present)) if present else iter(())
        zero = torch.zeros((), device=self.device)
        return torch.stack([next(norms).float().to(self.device) if g is not None else zero for g in grads])

    @property
    def device(self):
        """Where the readings gather: the first tensor's device (a sharded model spans several)."""
        return self.params[0].device

    def weight_norms(self):
        return torch.stack([n.float().to(self.device) for n in torch._foreach_norm([p.detach() for p in self.params])])

    def first_nonfinite(self, norms: list[float]) -> str | None:
        """Raw name of the first trained tensor whose norm is not finite."""
        return next((name for name, v in zip(self.names, norms) if not math.isfinite(v)), None)

    def first_nonfinite_weight(self) -> str | None:
        """Raw name of the first trained tensor with a non-finite weight (one host sync)."""
        return self.first_nonfinite(self.weight_norms().tolist())

    def clip_(self, grad_norms, max_norm: float | None):
        """Scale gradients so their global norm is at most max_norm, without a host sync."""
        total = grad_norms.pow(2).sum().sqrt()
        grads = [p.grad for p in self.params if p.grad is not None]
        if max_norm is not None and grads:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            coef = torch.where(torch.isfinite(coef), coef, torch.ones_like(coef))
            for device in {g.device for g in grads}:  # one scale per device of a sharded model
                torch._foreach_mul_([g for g in grads if g.device == device], coef.to(device))
        return total

    def read(self, loss, grad_norms, total, weight_norms) -> StepReading:
        """The one host sync of a step."""
        values = torch.cat([loss.detach().float().view(1), total.view(1), grad_norms, weight_norms]).tolist()
        n = len(self.params)
        loss_v, total_v, g, w = values[0], values[1], values[2 : 2 + n], values[2 + n :]
        per_layer: dict[str, float] = {}
        for label, norm in zip(self.labels, g):
            per_layer[label] = per_layer.get(label, 0.0) + norm * norm
        return StepReading(loss_v, total_v, {k: math.sqrt(v) for k, v in per_layer.items()},
                           self.first_nonfinite(g), self.first_nonfinite(w), math.sqrt(math.fsum(x * x for x in w)))


# Collapse without a NaN (a full fine-tune at an absurd rate, unclipped): the loss climbs to the
# uniform level, every gradient is exactly 0 from then on, the weights grow by orders of magnitude.
LOSS_RISE = 0.5  # the loss above its first step's by this share of it
UNIFORM_MARGIN = 0.05  # within this share of the uniform level's loss
WEIGHT_GROWTH = 10.0  # the trained weights' norm this many times its start
VANISHED_STEPS = 2  # every gradient exactly 0 for this many steps, to the end of the run


def health_events(trace: "Trace", loss_rise: float = LOSS_RISE, weight_growth: float = WEIGHT_GROWTH,
                  uniform_margin: float = UNIFORM_MARGIN, vanished_steps: int = VANISHED_STEPS) -> list[dict]:
    """The first step of each kind of collapse the trace shows, as events {step, what, detail}."""
    events = []
    loss, norms, weights = trace.loss, trace.grad_norm, trace.weight_norm
    finite = [(s, v) for s, v in enumerate(loss) if math.isfinite(v)]
    if finite:
        start = finite[0][1]
        rise = next(((s, v) for s, v in finite[1:] if v > start + loss_rise * abs(start)), None)
        if rise:
            events.append({"step": rise[0], "what": "loss rise",
                           "detail": f"loss {rise[1]:.4g} against {start:.4g} at the start (allowed +{loss_rise:.0%})"})
        if trace.uniform_loss:
            level = trace.uniform_loss * (1 - uniform_margin)
            uniform = next(((s, v) for s, v in finite[1:] if v >= level and start < level), None)
            if uniform:
                events.append({"step": uniform[0], "what": "uniform loss",
                               "detail": f"loss {uniform[1]:.4g} reached the uniform level ln(classes) = "
                                         f"{trace.uniform_loss:.4g}"})
    zero_from = None
    for s in range(len(norms) - 1, -1, -1):
        if norms[s] != 0:
            break
        zero_from = s
    if zero_from is not None and len(norms) - zero_from >= vanished_steps and any(n > 0 for n in norms[:zero_from]):
        events.append({"step": zero_from, "what": "vanished gradients",
                       "detail": f"every gradient exactly 0 from step {zero_from} to the end ({len(norms) - zero_from} steps)"})
    if weights and math.isfinite(weights[0]) and weights[0] > 0:
        grown = next(((s, w) for s, w in enumerate(weights) if math.isfinite(w) and w > weight_growth * weights[0]), None)
        if grown:
            events.append({"step": max(0, grown[0] - 1), "what": "weight growth",
                           "detail": f"the trained weights' norm {grown[1]:.4g} is {grown[1] / weights[0]:.3g}x its start "
                                     f"(allowed {weight_growth:g}x)"})
    return sorted(events, key=lambda e: e["step"])


def release_freed_memory() -> None:
    """Hand memory that training freed (activations, optimizer state) back to the OS. glibc keeps
    freed heap in its arenas, so without this a process's RSS only ever grows from run to run."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc (musl): nothing to trim


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20
# Mapping each large allocation returns freed activations to the OS (RSS near the floor at real
# size) but costs page faults: 15% per step on SmolLM2-135M's MLP shapes measured here. Only a
# base this large makes the memory worth the time.
MAP_LARGE_FROM = 1 << 30


def map_large_allocations() -> None:
    """Give every allocation of 1 MiB or more its own mapping, returned to the OS when freed. glibc
    otherwise raises its mmap threshold (up to 32 MiB) each time a mapped block is freed, so after
    the first step a step's activations come from the heap, and RSS keeps what they freed (measured
    on Qwen2-0.5B's shapes: 0.9 GiB after a full fine-tune's backward pass). Setting it also ends
    glibc's adjustment. A no-op off glibc."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        except (OSError, AttributeError):
            pass  # not glibc (musl)


def reset_peak_memory(device) -> None:
    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> dict:
    """CUDA max allocated on GPU; the process's peak RSS (a high-water mark for the whole process) on CPU."""
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
    with torch.no_grad():
        norms = []
        for label, params in (("first", group_a), ("second", group_b)):  # before any forward pass
            grads = [p.grad for p in params]
            if not params or any(g is None for g in grads):
                return None, f"the {label} group has no gradient at this step"
            grad_norm = torch.stack(torch._foreach_norm(grads)).norm()
            if not torch.isfinite(grad_norm) or grad_norm == 0:
                return None, f"the {label} group's gradient is zero or non-finite"
            norms.append(grad_norm)
        base = forward().float()
        changes = []
        for params, grad_norm in zip((group_a, group_b), norms):
            grads = [p.grad for p in params]
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
