"""The one training loop. Methods plug in parameter groups, extra loss terms and schedules.

The loop trains under the request's precision (devices.resolve_precision): autocast to bf16 or
fp16 around the forward pass, float32 master weights, and for fp16 a grad scaler whose overflowed
steps are skipped. Under a data-parallel launch (stance_harness/runs/distributed.py) the same loop runs in
every process: the model is wrapped by an accelerate Accelerator (DDP), each process takes its
share of every step's micro-batches, and the gradients are summed so a step equals the
single-process step over the same examples. `prepare` builds a run's model from a TrainingRequest (the method's freezing or adapters on a
copy of the base that shares its storage; whatever will train is un-shared first, so the base
is never written to); `train_run` trains it and returns the Run. The run store rebuilds a
released model through the same `prepare`.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch
from transformers import PreTrainedModel

from stance_harness.analysis.deltas import layer_label
from stance_harness.core.devices import autocast_dtype
from stance_harness.core.errors import HarnessError
from stance_harness.runs.instruments import (
    StepProbe,
    Trace,
    health_events,
    MAP_LARGE_FROM,
    map_large_allocations,
    output_change_cosine,
    peak_memory,
    release_freed_memory,
    reset_peak_memory,
)
from stance_harness.runs.master_weights import cast_at_boundaries, master_dtype
from stance_harness.runs.methods import METHODS, TrainingContext
from stance_harness.runs.methods.base import bitsandbytes_module
from stance_harness.runs.request import TrainingRequest
from stance_harness.runs.run import Run, frozen_digests
from stance_harness.runs.tasks import TASKS


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """Hugging Face's default: linear warm-up, then linear decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def plan(request: TrainingRequest, loaded, stance) -> tuple[TrainingContext, list]:
    """Everything about the run that is known before a model is built: the encoded data, the
    number of steps, and every check of the task and the method (so a run that cannot work is
    refused here, in seconds, whatever the model's size)."""
    method, task = METHODS.get(request.method), TASKS.get(request.task)
    recipe, config = request.recipe, request.config
    task.check(loaded)
    data = task.encode(request.framing_with(loaded.tokenizer), stance.training_examples(request.examples),
                       recipe.max_seq_length)
    batch = recipe.per_device_train_batch_size
    micro_per_epoch = math.ceil(len(data) / batch)
    micro_per_epoch += method.added_micro_batches(config, micro_per_epoch)
    # a data-parallel step takes gradient_accumulation_steps micro-batches in each process
    steps_per_epoch = math.ceil(micro_per_epoch / (recipe.gradient_accumulation_steps * request.processes))
    ctx = TrainingContext(loaded, config, recipe, steps_per_epoch * recipe.num_train_epochs, steps_per_epoch,
                          task=task, anatomy=task.anatomy(loaded), precision=request.precision)
    if loaded.sharded and not method.trains_sharded:
        raise HarnessError(
            f"method {request.method!r} cannot train on a base sharded by --model-args device_map="
            f"{loaded.args.device_map}: it trains or copies the base's own weights, which a device_map spreads "
            f"over devices because they do not fit on one. Methods that train only adapters on a frozen base "
            f"can: {', '.join(n for n in METHODS.names() if METHODS.get(n).trains_sharded)}")
    if recipe.warmup_steps >= ctx.total_steps:
        raise HarnessError(
            f"recipe: warmup_steps={recipe.warmup_steps} is not shorter than the run ({ctx.total_steps} steps), "
            f"so the learning rate would never reach its peak")
    method.check(ctx)
    return ctx, data


def prepare(request: TrainingRequest, loaded, stance, unshare: bool = True) -> tuple[TrainingContext, list]:
    """The method's model for `request`, ready to train, and the encoded training data.

    `ctx.before` holds the starting value of every tensor that may train: the base's own tensor
    where the run's parameter shared it, else a copy. With unshare=True each of those
    parameters gets its own float32 storage (runs/master_weights.py); the run store passes False
    and puts stored values in."""
    ctx, data = plan(request, loaded, stance)
    method, task, recipe, config = METHODS.get(request.method), ctx.task, request.recipe, request.config
    torch.manual_seed(recipe.seed)
    model = method.prepare(task.wrap(method.load(ctx), loaded), ctx)
    if recipe.gradient_checkpointing:
        enable_gradient_checkpointing(model, loaded)
    for head in task.head_parameters(model):
        head.requires_grad_(True)
    ctx.model = model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise HarnessError(f"method {request.method!r} with {config.as_dict()} left no parameter trainable")
    ctx.before = _starting_values(trainable, loaded, unshare)
    cast_at_boundaries(model, trainable, task.head_parameters(model))
    return ctx, data


def enable_gradient_checkpointing(model, loaded) -> None:
    """Turn on transformers' gradient checkpointing in the Hugging Face model inside `model` (a peft
    or task wrapper around it). Non-reentrant, so a frozen embedding needs no input gradients."""
    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if inner is None or not inner.supports_gradient_checkpointing:
        raise HarnessError(
            f"recipe: gradient_checkpointing=True, but {loaded.name} ({type(loaded.skeleton).__name__}) does not "
            f"support transformers' gradient checkpointing; set gradient_checkpointing=False")
    enable = getattr(inner, "activation_checkpointing_enable", None)  # transformers 5's name
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@contextlib.contextmanager
def sparse_tied_embedding(model, ranks: int):
    """While a run trains an input embedding tied to the output head, its lookup's gradient is
    sparse rows, which autograd adds in place to the head's dense gradient of the same tensor:
    otherwise the lookup's backward makes a second dense vocabulary × hidden tensor (0.5 GiB for
    Qwen2-0.5B) just before the step, when every other gradient exists. Not under DDP, whose
    gradient buckets take dense gradients only."""
    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    embedding = inner.get_input_embeddings() if inner is not None else None
    head = inner.get_output_embeddings() if inner is not None else None
    tied = (type(embedding) is torch.nn.Embedding and head is not None and getattr(head, "weight", None) is
            embedding.weight and embedding.weight.requires_grad and embedding.max_norm is None and ranks == 1)
    if not tied:
        yield
        return
    was = embedding.sparse
    embedding.sparse = True
    try:
        yield
    finally:
        embedding.sparse = was


def build_optimizer(param_groups: list[dict], recipe):
    """The recipe's optimizer (TrainingArguments' `optim` names) over `param_groups`."""
    if recipe.optim == "adamw_8bit":
        return bitsandbytes_module().optim.AdamW8bit(param_groups, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(param_groups, lr=recipe.learning_rate, weight_decay=recipe.weight_decay,
                             fused=recipe.optim == "adamw_torch_fused" or None)


def _starting_values(trainable: dict, loaded, unshare: bool) -> dict:
    """Each trainable tensor's starting value, un-sharing it from the base when asked. What trains
    is float32 (master weights): a half-precision tensor trains in a float32 copy, while its
    starting value stays the base's own tensor, which that copy equals exactly."""
    base_tensors = {p.data_ptr(): p for _, p in loaded.base_parameters()}
    before = {}
    for name, param in trainable.items():
        owner = base_tensors.get(param.data_ptr())
        if owner is not None and owner.shape == param.shape and owner.dtype == param.dtype:
            before[name] = owner.detach()  # the base's own tensor: no second copy
            if unshare:
                param.data = param.data.to(master_dtype(param.dtype), copy=True)
        else:
            param.data = param.data.to(master_dtype(param.dtype))
            before[name] = param.detach().clone()  # new tensors (adapters, a fresh head)
    return before


def rank_share(group: list, ranks: int, rank: int) -> list[tuple[object, float]]:
    """This process's micro-batches of one optimizer step, with weight 1, padded to the same count
    on every process by weight-0 repeats of the step's first (DDP needs one backward per process)."""
    mine = [(micro, 1.0) for micro in group[rank::ranks]]
    slots = math.ceil(len(group) / ranks)
    return mine + [(group[0], 0.0)] * (slots - len(mine))


def train_run(request: TrainingRequest, loaded, stance, progress: Callable[[str], None] | None = None,
              accelerator=None) -> Run:
    """Train `request` on `loaded`'s base and return the Run. With an accelerate `accelerator`
    (one process of a data-parallel launch), this process trains its share of each step."""
    method, recipe, instruments = METHODS.get(request.method), request.recipe, request.instruments
    ctx, data = prepare(request, loaded, stance)
    model, task_obj = ctx.model, ctx.task
    model.train()
    ranks = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    forward = accelerator.prepare_model(model) if ranks > 1 else model  # DDP: it syncs gradients in backward
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    digests = frozen_digests(model, loaded)
    method.setup(ctx)
    batch = recipe.per_device_train_batch_size
    method_name = request.method

    anatomy = ctx.anatomy
    probe = StepProbe(list(trainable.items()), [layer_label(anatomy.name_of(n)) for n in trainable])
    param_groups = method.param_groups(ctx)
    grouped = {id(p) for g in param_groups for p in g["params"]}
    head = [p for p in task_obj.head_parameters(model) if id(p) not in grouped]
    if head:  # a method that names its own groups (hybrid) does not know the task's head
        param_groups.append({"name": "head", "params": head})
    interference_groups = _interference_groups(param_groups, instruments)
    optimizer = build_optimizer(param_groups, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(recipe.warmup_steps, ctx.total_steps))
    pad_id = loaded.tokenizer.pad_token_id
    device = next(model.parameters()).device  # a sharded model's first layers: the inputs go there
    autocast_to = autocast_dtype(request.precision)
    scaler = torch.amp.GradScaler(device.type) if request.precision == "fp16" else None
    shuffler = torch.Generator().manual_seed(recipe.seed)
    trace = Trace(group_lr={g.get("name", str(i)): [] for i, g in enumerate(optimizer.param_groups)})
    reset_peak_memory(device)
    if device.type == "cpu" and loaded.base_bytes >= MAP_LARGE_FROM:
        map_large_allocations()
    sparse_embedding = contextlib.ExitStack()  # closed after the loop (the model is this run's own copy)
    sparse_embedding.enter_context(sparse_tied_embedding(model, ranks))
    weights_logged: set[str] = set()  # raw names whose non-finite weight is already an event
    started = time.perf_counter()
    step = 0

    def skip_step(step_started: float) -> None:
        """The step's update is not applied: its gradients are dropped and the schedule moves on."""
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        trace.skipped_steps.append(step)
        trace.step_time.append(time.perf_counter() - step_started)

    for epoch in range(recipe.num_train_epochs):
        order = torch.randperm(len(data), generator=shuffler).tolist()
        micro_batches = [[data[i] for i in order[s : s + batch]] for s in range(0, len(order), batch)]
        micro_batches = method.mix_batches(ctx, micro_batches, epoch)
        per_step = recipe.gradient_accumulation_steps * ranks
        for first in range(0, len(micro_batches), per_step):
            group = micro_batches[first : first + per_step]
            step_started = time.perf_counter()
            scheduled = method.schedule(ctx, step)
            if scheduled is not None:
                trace.schedule.append({"step": step, **scheduled})
            weight_norms = probe.weight_norms()  # the weights this step starts from
            loss_sum = torch.zeros((), device=device)
            for micro, weight in rank_share(group, ranks, rank) if ranks > 1 else [(m, 1.0) for m in group]:
                with torch.autocast(device.type, dtype=autocast_to, enabled=autocast_to is not None):
                    loss = task_obj.loss(forward, task_obj.collate(micro, pad_id, device), loaded)
                    extra = method.extra_loss(ctx, step)
                    if extra is not None:
                        loss = loss + extra
                # DDP averages over processes; scaled by their number, the step sums every micro-batch
                share = loss / len(group) if ranks == 1 else loss * (weight * ranks) / len(group)
                (share if scaler is None else scaler.scale(share)).backward()
                loss_sum += loss.detach().float().to(device) * weight / len(group)
            if ranks > 1:
                torch.distributed.all_reduce(loss_sum)  # the step's loss over every process's share
            if scaler is not None:
                scaler.unscale_(optimizer)  # the probe and the clip see the true gradients
            penalty = method.penalty_gradient(ctx, step)  # after DDP's sum: counted once, as extra_loss is
            if penalty is not None:
                loss_sum += penalty.detach().float().to(device)
            if interference_groups and step % instruments.interference_every == 0:
                # the instrument's forward passes are not the step's cost: its time leaves step_started
                measured_at = time.perf_counter()
                _trace_interference(trace, model, task_obj.collate(group[-1], pad_id, device), interference_groups, step, epoch)
                step_started += time.perf_counter() - measured_at
            grad_norms = probe.grad_norms()
            total = probe.clip_(grad_norms, recipe.max_grad_norm)
            reading = probe.read(loss_sum, grad_norms, total, weight_norms)  # the step's one host sync
            trace.add_reading(reading, scheduler.get_last_lr(), sum(len(m) for m in group),
                              sum(len(ids) for m in group for ids, _ in m))
            event = _first_nonfinite(reading, step, anatomy, weights_logged)
            if scaler is not None and event is not None and event[1] == "gradient":
                # the scaled fp16 gradients overflowed: the scaler skips this step and lowers its scale
                scaler.step(optimizer)
                scaler.update()
                skip_step(step_started)
                step += 1
                continue
            if event is not None:
                trace.add_event(*event)
                when, what, where = event
                if instruments.nonfinite == "halt" or (what == "weight" and instruments.nonfinite == "skip_step"):
                    # skip_step cannot undo a non-finite weight: the step that made it is past
                    trace.halted_at, trace.halt_reason = when, f"non-finite {what} in {where}" if where else f"non-finite {what}"
                    trace.step_time.append(time.perf_counter() - step_started)
                    break
                if instruments.nonfinite == "skip_step":
                    skip_step(step_started)
                    step += 1
                    continue
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            method.after_optimizer_step(ctx, step)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            trace.step_time.append(time.perf_counter() - step_started)
            step += 1
            if rank == 0:
                report_step(progress, method_name, step, ctx.total_steps, reading.loss)
        if trace.halted_at is not None:
            break
    sparse_embedding.close()
    if trace.halted_at is None:
        bad_weight = probe.first_nonfinite_weight()
        if bad_weight is not None and bad_weight not in weights_logged:  # made by the final update
            trace.add_event(step - 1, "weight", str(anatomy.name_of(bad_weight)))
    trace.weight_norm.append(math.sqrt(math.fsum(x * x for x in probe.weight_norms().tolist())))  # as the run ended
    trace.uniform_loss = task_obj.uniform_loss(loaded)
    trace.health = health_events(trace)
    trace.peak_memory = peak_memory(device)
    for param in trainable.values():
        param.grad = None  # a run keeps its weights, not its last gradients
    model.eval()
    # Released here; rebound, not deleted, because skip_step's closure names them.
    optimizer = scheduler = probe = scaler = forward = None
    release_freed_memory()
    run = Run(
        run_id=request.run_id, request=request, loaded=loaded, task=task_obj, anatomy=ctx.anatomy, stance=stance,
        method=method, config=request.config, recipe=recipe, examples=request.examples, model=model,
        before=ctx.before, frozen_digests=digests, trace=trace, train_seconds=time.perf_counter() - started,
        instruments=instruments, framing=request.framing_with(loaded.tokenizer),
    )
    _ = run.counts  # cheap, and every report needs them: measured while the model is at hand
    return run


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
