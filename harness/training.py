"""The one training loop. Methods plug in parameter groups, extra loss terms and schedules."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

from .registry import HarnessError, suggest

_RECIPE_ALIASES = {"lr": "learning_rate", "epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size"}


@dataclass(frozen=True)
class Recipe:
    """Hyperparameters under Hugging Face TrainingArguments' names."""

    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps (then linear decay to 0)"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "clip threshold; None disables"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    num_train_epochs: int = field(default=3, metadata={"help": "passes over the examples"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "examples per micro-batch"})
    seed: int = field(default=42, metadata={"help": "seeds init, shuffling and dropout"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per example, truncated beyond"})

    def __post_init__(self):
        checks = [
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("max_grad_norm", self.max_grad_norm is None or self.max_grad_norm > 0, "> 0 or None"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, ">= 1"),
            ("num_train_epochs", self.num_train_epochs >= 1, ">= 1"),
            ("per_device_train_batch_size", self.per_device_train_batch_size >= 1, ">= 1"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("max_seq_length", self.max_seq_length >= 8, ">= 8"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise HarnessError(f"recipe: {name} must be {rule}, got {getattr(self, name)!r}")

    @classmethod
    def of(cls, value: "Recipe | dict | None" = None, **overrides) -> "Recipe":
        if isinstance(value, Recipe):
            base = asdict(value)
        elif value is None:
            base = {}
        elif isinstance(value, dict):
            base = dict(value)
        else:
            raise HarnessError(f"recipe must be a Recipe or a dict, got {type(value).__name__}")
        base.update(overrides)
        allowed = [f.name for f in fields(cls)]
        normalised = {}
        for key, v in base.items():
            key = _RECIPE_ALIASES.get(key, key)
            if key not in allowed:
                raise HarnessError(f"recipe has no field {key!r}.{suggest(key, allowed)} Fields: {', '.join(allowed)}")
            normalised[key] = v
        return cls(**normalised)


@dataclass
class Trace:
    """What happened at each optimizer step."""

    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)  # before clipping
    lr: list[float] = field(default_factory=list)  # the first group's
    group_lr: dict[str, list[float]] = field(default_factory=dict)  # every named group's
    schedule: list[dict] = field(default_factory=list)  # what the method's schedule set, per step
    step_time: list[float] = field(default_factory=list)
    halted_at: int | None = None
    halt_reason: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def encode_examples(tokenizer, examples, max_len: int):
    """prompt + response + eos; the loss counts only the response tokens."""
    eos = tokenizer.eos_token or ""
    encoded = []
    for example in examples:
        prompt_ids = tokenizer(example.prompt + "\n", add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(example.response + eos, add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + response_ids)[:max_len]
        labels = ([-100] * len(prompt_ids) + response_ids)[:max_len]
        if all(label == -100 for label in labels):
            raise HarnessError(
                f"max_seq_length={max_len} cuts off the whole response of the example "
                f"starting {example.prompt[:40]!r}; raise recipe.max_seq_length"
            )
        encoded.append((ids, labels))
    return encoded


def collate(items, pad_id: int, device):
    import torch

    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """Hugging Face's default: linear warm-up, then linear decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def describe_request(loaded, stance, method_name: str, config, recipe: Recipe, examples: int) -> dict:
    """Everything that decides a run's outcome; equal descriptions train once per session."""
    return {"model": loaded.model_id, "revision": loaded.revision, "model_args": asdict(loaded.args),
            "stance": stance.name, "stance_version": stance.version, "examples": examples,
            "method": method_name, "config": config.as_dict(), "recipe": asdict(recipe)}


def request_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_training(loaded, stance, method_name: str, config, recipe: Recipe, examples: int | None = None,
                 progress: Callable[[str], None] | None = None):
    """Train a fresh copy of `loaded`'s base with one method; return the Run."""
    import torch

    from .methods import METHODS
    from .methods.base import TrainingContext
    from .run import Run, frozen_digests

    method = METHODS.get(method_name)
    chosen = stance.training_examples(examples)
    data = encode_examples(loaded.tokenizer, chosen, recipe.max_seq_length)
    batch = recipe.per_device_train_batch_size
    micro_per_epoch = math.ceil(len(data) / batch)
    micro_per_epoch += method.added_micro_batches(config, micro_per_epoch)
    steps_per_epoch = math.ceil(micro_per_epoch / recipe.gradient_accumulation_steps)
    ctx = TrainingContext(loaded, config, recipe, steps_per_epoch * recipe.num_train_epochs, steps_per_epoch)
    method.check(ctx)

    torch.manual_seed(recipe.seed)
    model = method.prepare(method.load(ctx), ctx)
    model.train()
    ctx.model = model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise HarnessError(f"method {method_name!r} with {config.as_dict()} left no parameter trainable")
    ctx.before = {n: p.detach().clone() for n, p in trainable.items()}  # trainable weights only
    digests = frozen_digests(model)
    method.setup(ctx)

    groups = method.param_groups(ctx)
    optimizer = torch.optim.AdamW(groups, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(recipe.warmup_steps, ctx.total_steps))
    params = list(trainable.values())
    pad_id = loaded.tokenizer.pad_token_id
    device = next(model.parameters()).device
    shuffler = torch.Generator().manual_seed(recipe.seed)
    trace = Trace(group_lr={g.get("name", str(i)): [] for i, g in enumerate(optimizer.param_groups)})
    started = time.perf_counter()
    step = 0
    for epoch in range(recipe.num_train_epochs):
        order = torch.randperm(len(data), generator=shuffler).tolist()
        micro_batches = [[data[i] for i in order[s : s + batch]] for s in range(0, len(order), batch)]
        micro_batches = method.mix_batches(ctx, micro_batches, epoch)
        for first in range(0, len(micro_batches), recipe.gradient_accumulation_steps):
            group = micro_batches[first : first + recipe.gradient_accumulation_steps]
            step_started = time.perf_counter()
            scheduled = method.schedule(ctx, step)
            if scheduled is not None:
                trace.schedule.append({"step": step, **scheduled})
            loss_sum = torch.zeros((), device=device)
            for micro in group:
                loss = model(**collate(micro, pad_id, device)).loss
                extra = method.extra_loss(ctx, step)
                if extra is not None:
                    loss = loss + extra
                (loss / len(group)).backward()
                loss_sum += loss.detach() / len(group)
            clip = recipe.max_grad_norm if recipe.max_grad_norm is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
            loss_value, norm_value = torch.stack([loss_sum, grad_norm.to(loss_sum)]).tolist()  # one sync
            trace.loss.append(loss_value)
            trace.grad_norm.append(norm_value)
            lrs = scheduler.get_last_lr()
            trace.lr.append(lrs[0])
            for name, lr in zip(trace.group_lr, lrs):
                trace.group_lr[name].append(lr)
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                trace.halted_at, trace.halt_reason = step, "non-finite loss or gradient"
                trace.step_time.append(time.perf_counter() - step_started)
                break
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            trace.step_time.append(time.perf_counter() - step_started)
            step += 1
            if progress and (step == ctx.total_steps or step % max(1, ctx.total_steps // 4) == 0):
                progress(f"  {method_name} step {step}/{ctx.total_steps} loss {loss_value:.4f}")
        if trace.halted_at is not None:
            break
    model.eval()
    return Run(
        run_id=f"{method_name}-{request_key(describe_request(loaded, stance, method_name, config, recipe, len(chosen)))}",
        loaded=loaded, stance=stance, method=method, config=config, recipe=recipe,
        examples=len(chosen), model=model, before=ctx.before, frozen_digests=digests, trace=trace,
        train_seconds=time.perf_counter() - started,
    )
