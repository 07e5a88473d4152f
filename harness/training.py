"""The one training loop. Methods plug in parameter groups, extra loss terms and schedules."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

from .registry import HarnessError, suggest

DEFAULT_TASK = "stance-lm"
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
        for f in fields(self):
            value = getattr(self, f.name)
            integer = f.type == "int"
            if value is None and f.name == "max_grad_norm":
                continue
            if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
                kind = "an integer" if integer else "a number"
                raise HarnessError(f"recipe: {f.name} must be {kind}, got {value!r}")
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
    grad_norm: list[float] = field(default_factory=list)  # global, before clipping
    layer_grad_norm: dict[str, list[float]] = field(default_factory=dict)  # per layer label, before clipping
    lr: list[float] = field(default_factory=list)  # the first group's
    group_lr: dict[str, list[float]] = field(default_factory=dict)  # every named group's
    schedule: list[dict] = field(default_factory=list)  # what the method's schedule set, per step
    step_time: list[float] = field(default_factory=list)
    examples: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    nonfinite: list[dict] = field(default_factory=list)  # events: step, what, parameter
    interference: list[dict] = field(default_factory=list)  # step, epoch, cosine or reason
    skipped_steps: list[int] = field(default_factory=list)
    peak_memory: dict = field(default_factory=dict)
    halted_at: int | None = None
    halt_reason: str | None = None

    def add_reading(self, reading, lrs: list[float], examples: int, tokens: int) -> None:
        self.loss.append(reading.loss)
        self.grad_norm.append(reading.grad_norm)
        for label, norm in reading.layer_grad_norm.items():
            self.layer_grad_norm.setdefault(label, []).append(norm)
        self.lr.append(lrs[0])
        for name, lr in zip(self.group_lr, lrs):
            self.group_lr[name].append(lr)
        self.examples.append(examples)
        self.tokens.append(tokens)

    def add_event(self, step: int, what: str, parameter: str | None) -> None:
        from .instruments import MAX_EVENTS

        if len(self.nonfinite) < MAX_EVENTS:
            self.nonfinite.append({"step": step, "what": what, "parameter": parameter})

    def summary(self) -> dict:
        seconds = sum(self.step_time)
        finite_norms = [g for g in self.grad_norm if math.isfinite(g)]
        return {
            "steps": len(self.loss),
            "mean_step_time_s": seconds / len(self.step_time) if self.step_time else None,
            "examples_per_s": sum(self.examples) / seconds if seconds else None,
            "tokens_per_s": sum(self.tokens) / seconds if seconds else None,
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


def pad_batch(id_lists, pad_id: int) -> dict:
    """Right-padded input_ids and attention_mask (on the CPU) for token id lists."""
    import torch

    width = max(len(ids) for ids in id_lists)
    input_ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(id_lists), width), dtype=torch.long)
    for row, ids in enumerate(id_lists):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def collate(items, pad_id: int, device):
    """(ids, labels) items as a causal-LM batch; label -100 marks tokens the loss skips."""
    import torch

    batch = pad_batch([ids for ids, _ in items], pad_id)
    labels = torch.full_like(batch["input_ids"], -100)
    for row, (_, labs) in enumerate(items):
        labels[row, : len(labs)] = torch.tensor(labs)
    batch["labels"] = labels
    return {k: v.to(device) for k, v in batch.items()}


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """Hugging Face's default: linear warm-up, then linear decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def describe_request(loaded, stance, method_name: str, config, recipe: Recipe, examples: int, instruments=None,
                     task: str = DEFAULT_TASK) -> dict:
    """Everything that decides a run's outcome; equal descriptions train once per session."""
    return {"model": loaded.model_id, "revision": loaded.revision, "model_args": asdict(loaded.args),
            "task": task, "stance": stance.name, "stance_version": stance.version, "examples": examples,
            "method": method_name, "config": config.as_dict(), "recipe": asdict(recipe),
            "instruments": asdict(instruments) if instruments is not None else None}


def request_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_id_for(loaded, stance, method_name: str, config, recipe: Recipe, examples: int, instruments,
               task: str = DEFAULT_TASK) -> str:
    """Method name + a hash of everything that decides the run: the cache key and the run's id."""
    request = describe_request(loaded, stance, method_name, config, recipe, examples, instruments, task)
    return f"{method_name}-{request_key(request)}"


def run_training(loaded, stance, method_name: str, config, recipe: Recipe, examples: int | None = None,
                 progress: Callable[[str], None] | None = None, instruments=None, task: str = DEFAULT_TASK):
    """Train a fresh copy of `loaded`'s base with one method on one task; return the Run."""
    import torch

    from .analysis.deltas import layer_label
    from .instruments import InstrumentConfig, StepProbe, peak_memory, reset_peak_memory
    from .methods import METHODS
    from .methods.base import TrainingContext
    from .run import Run, frozen_digests
    from .tasks import TASKS

    method = METHODS.get(method_name)
    task_obj = TASKS.get(task)
    task_obj.check(loaded)
    instruments = InstrumentConfig.of(instruments)
    chosen = stance.training_examples(examples)
    data = task_obj.encode(loaded.tokenizer, chosen, recipe.max_seq_length)
    batch = recipe.per_device_train_batch_size
    micro_per_epoch = math.ceil(len(data) / batch)
    micro_per_epoch += method.added_micro_batches(config, micro_per_epoch)
    steps_per_epoch = math.ceil(micro_per_epoch / recipe.gradient_accumulation_steps)
    ctx = TrainingContext(loaded, config, recipe, steps_per_epoch * recipe.num_train_epochs, steps_per_epoch,
                          task=task_obj, anatomy=task_obj.anatomy(loaded))
    if recipe.warmup_steps >= ctx.total_steps:
        raise HarnessError(
            f"recipe: warmup_steps={recipe.warmup_steps} is not shorter than the run ({ctx.total_steps} steps), "
            f"so the learning rate would never reach its peak")
    method.check(ctx)

    torch.manual_seed(recipe.seed)
    model = method.prepare(task_obj.wrap(method.load(ctx), loaded), ctx)
    for head in task_obj.head_parameters(model):
        head.requires_grad_(True)
    model.train()
    ctx.model = model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise HarnessError(f"method {method_name!r} with {config.as_dict()} left no parameter trainable")
    ctx.before = {n: p.detach().clone() for n, p in trainable.items()}  # trainable weights only
    digests = frozen_digests(model)
    method.setup(ctx)

    anatomy = ctx.anatomy
    probe = StepProbe(list(trainable.items()), [layer_label(anatomy.name_of(n)) for n in trainable])
    param_groups = method.param_groups(ctx)
    grouped = {id(p) for g in param_groups for p in g["params"]}
    head = [p for p in task_obj.head_parameters(model) if id(p) not in grouped]
    if head:  # a method that names its own groups (hybrid) does not know the task's head
        param_groups.append({"name": "head", "params": head})
    interference_groups = _interference_groups(param_groups, instruments)
    optimizer = torch.optim.AdamW(param_groups, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(recipe.warmup_steps, ctx.total_steps))
    pad_id = loaded.tokenizer.pad_token_id
    device = next(model.parameters()).device
    shuffler = torch.Generator().manual_seed(recipe.seed)
    trace = Trace(group_lr={g.get("name", str(i)): [] for i, g in enumerate(optimizer.param_groups)})
    reset_peak_memory(device)
    weights_logged: set[str] = set()  # raw names whose non-finite weight is already an event
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
            weight_norms = probe.weight_norms()  # the weights this step starts from
            loss_sum = torch.zeros((), device=device)
            for micro in group:
                loss = model(**task_obj.collate(micro, pad_id, device)).loss
                extra = method.extra_loss(ctx, step)
                if extra is not None:
                    loss = loss + extra
                (loss / len(group)).backward()
                loss_sum += loss.detach() / len(group)
            if interference_groups:
                _trace_interference(trace, model, task_obj.collate(group[-1], pad_id, device), interference_groups, step, epoch)
            grad_norms = probe.grad_norms()
            total = probe.clip_(grad_norms, recipe.max_grad_norm)
            reading = probe.read(loss_sum, grad_norms, total, weight_norms)  # the step's one host sync
            trace.add_reading(reading, scheduler.get_last_lr(), sum(len(m) for m in group),
                              sum(len(ids) for m in group for ids, _ in m))
            event = _first_nonfinite(reading, step, anatomy, weights_logged)
            if event is not None:
                trace.add_event(*event)
                when, what, where = event
                if instruments.nonfinite == "halt" or (what == "weight" and instruments.nonfinite == "skip_step"):
                    # skip_step cannot undo a non-finite weight: the step that made it is past
                    trace.halted_at, trace.halt_reason = when, f"non-finite {what} in {where}" if where else f"non-finite {what}"
                    trace.step_time.append(time.perf_counter() - step_started)
                    break
                if instruments.nonfinite == "skip_step":
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    trace.skipped_steps.append(step)
                    trace.step_time.append(time.perf_counter() - step_started)
                    step += 1
                    continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            trace.step_time.append(time.perf_counter() - step_started)
            step += 1
            report_step(progress, method_name, step, ctx.total_steps, reading.loss)
        if trace.halted_at is not None:
            break
    if trace.halted_at is None:
        bad_weight = probe.first_nonfinite_weight()
        if bad_weight is not None and bad_weight not in weights_logged:  # made by the final update
            trace.add_event(step - 1, "weight", str(anatomy.name_of(bad_weight)))
    trace.peak_memory = peak_memory(device)
    model.eval()
    return Run(
        run_id=run_id_for(loaded, stance, method_name, config, recipe, len(chosen), instruments, task),
        loaded=loaded, task=task_obj, anatomy=ctx.anatomy, stance=stance, method=method, config=config, recipe=recipe,
        examples=len(chosen), model=model, before=ctx.before, frozen_digests=digests, trace=trace,
        train_seconds=time.perf_counter() - started, instruments=instruments,
    )


def report_step(progress, label: str, step: int, total: int, loss: float) -> None:
    """A progress bar where the writer draws one (`progress.step`), else a line at each quarter."""
    if progress is None:
        return
    on_step = getattr(progress, "step", None)
    if on_step is not None:
        on_step(label, step, total, loss)
    elif step == total or step % max(1, total // 4) == 0:
        progress(f"  {label} step {step}/{total} loss {loss:.4f}")


def _interference_groups(param_groups: list[dict], instruments):
    """The two named parameter groups to compare, or None; unknown names are an error."""
    if instruments.interference is None:
        return None
    by_name = {g.get("name"): g["params"] for g in param_groups}
    missing = [n for n in instruments.interference if n not in by_name]
    if missing:
        raise HarnessError(
            f"instruments: interference group {missing[0]!r} is not one of this method's parameter groups: "
            f"{', '.join(str(n) for n in by_name)}")
    return [by_name[n] for n in instruments.interference]


def _trace_interference(trace, model, inputs, groups, step: int, epoch: int) -> None:
    from .instruments import output_change_cosine

    def forward():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits

    was_training = model.training
    model.eval()  # no dropout noise in the comparison
    try:
        cosine, reason = output_change_cosine(forward, [p for p in groups[0] if p.requires_grad] or groups[0],
                                              [p for p in groups[1] if p.requires_grad] or groups[1])
    finally:
        model.train(was_training)
    trace.interference.append({"step": step, "epoch": epoch, "cosine": cosine, "reason": reason})


def _first_nonfinite(reading, step: int, anatomy, weights_logged: set):
    """(step, what, canonical parameter) of the first new non-finite value this step saw, or None.

    A non-finite weight at the start of step s was made by the update of step s - 1; each
    parameter's weight event is reported once, by the update that made it.
    """
    if reading.bad_weight is not None and reading.bad_weight not in weights_logged:
        weights_logged.add(reading.bad_weight)
        return (max(0, step - 1), "weight", str(anatomy.name_of(reading.bad_weight)))
    if not math.isfinite(reading.loss):
        return (step, "loss", None)
    if reading.bad_grad is not None or not math.isfinite(reading.grad_norm):
        where = reading.bad_grad
        return (step, "gradient", str(anatomy.name_of(where)) if where else None)
    return None
