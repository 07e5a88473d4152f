"""What a method is: a validated config plus the pieces it plugs into the one training loop.

A method never owns a loop. The loop calls, in order:
  check(ctx)          before anything heavy: reject configs that cannot work for this run
  load(ctx)           a fresh model (QLoRA loads it quantized)
  prepare(model, ctx) freeze or wrap; every parameter that may train at any step ends
                      with requires_grad=True (these are snapshotted)
  setup(ctx)          after the snapshot (EWC estimates its Fisher here)
  mix_batches(...)    per epoch: the micro-batch stream (replay adds general text)
  schedule(ctx, step) per optimizer step: switch groups on or off; returns what it set
  extra_loss(ctx, step) a penalty added to the task loss (L2-SP, EWC)
and asks for param_groups(ctx) (per-group learning rates) and effective_deltas (its view).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from ..analysis.deltas import raw_delta_pairs
from ..analysis.rank import singular_values
from ..config import build_config, config_fields, plain
from ..models import share_frozen_weights
from ..models import Anatomy, LoadedModel
from ..recipe import Recipe
from ..registry import HarnessError, Registry
from ..tasks import DEFAULT_TASK, TASKS, Task


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config. Fields carry `metadata={"help": ...}`."""

    @classmethod
    def from_options(cls, method: str, options: dict) -> "MethodConfig":
        return build_config(cls, options, what=f"method {method!r} options", unknown=f"method {method!r} has no option")

    def as_dict(self) -> dict:
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def describe(cls) -> list[tuple[str, object, str]]:
        return config_fields(cls)


@dataclass
class TrainingContext:
    """What a method sees of the run it is part of."""

    loaded: "LoadedModel"
    config: MethodConfig
    recipe: "Recipe"
    total_steps: int
    steps_per_epoch: int
    task: Task | None = None  # None: stance-lm
    anatomy: Anatomy | None = None  # of the module being trained (a task head may wrap the model); None: the base's
    model: Any = None
    before: dict = field(default_factory=dict)  # starting values of every parameter that may train
    state: dict = field(default_factory=dict)  # the method's own (Fisher, ...)
    precision: str = "fp32"  # devices.PRECISIONS: the autocast the loop trains under

    def __post_init__(self):
        self.task = self.task or TASKS.get(DEFAULT_TASK)
        self.anatomy = self.anatomy or self.loaded.anatomy

    @property
    def task_name(self) -> str:
        return self.task.name

    def require_lm_task(self, method: str, why: str) -> None:
        """Methods that mix in or measure on general text need the causal-LM task."""
        if self.task_name != "stance-lm":
            raise HarnessError(f"{method}: {why}, so it needs task='stance-lm', not {self.task_name!r}")


class Method:
    """Subclass, set `name` and `config_cls`, and decorate with `@register_method`.

    The class docstring's first line is the method's one-line description."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    # True where the method trains only new tensors (adapters) on a frozen base, so the base may be
    # sharded over devices (--model-args device_map=auto); a method that trains or copies the base's
    # own weights needs them whole on one device.
    trains_sharded: ClassVar[bool] = False

    def check(self, ctx: TrainingContext) -> None:
        """Reject configs that cannot work for this run's length or model."""

    def load(self, ctx: TrainingContext):
        """The model this run adapts: by default a structural copy of the session's base whose
        parameters share the base's storage (the loop un-shares whatever comes to train)."""
        return share_frozen_weights(ctx.loaded.base)

    def own_base(self, model):
        """A context manager yielding the model this run's "before" side is measured on, or None
        for the session's shared base. (QLoRA measures its own 4-bit base, adapter off.)"""
        return None

    def prepare(self, model, ctx: TrainingContext):
        raise NotImplementedError

    def setup(self, ctx: TrainingContext) -> None:
        pass

    def param_groups(self, ctx: TrainingContext) -> list[dict]:
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        return [{"name": "all", "params": params}]

    def added_micro_batches(self, config, task_micro_batches: int) -> int:
        """How many micro-batches mix_batches adds per epoch (so the LR schedule knows the length)."""
        return 0

    def mix_batches(self, ctx: TrainingContext, micro_batches: list, epoch: int) -> list:
        return micro_batches

    def schedule(self, ctx: TrainingContext, step: int) -> dict | None:
        return None

    def extra_loss(self, ctx: TrainingContext, step: int):
        return None

    def storage_bytes(self, model, before: dict) -> int:
        """Bytes needed to store the stance: every parameter the method trains."""
        params = dict(model.named_parameters())
        return sum(params[n].numel() * params[n].element_size() for n in before)

    def effective_deltas(self, model, before: dict, anatomy):
        """(name, W_before, W_after) per matrix as the model sees it, one at a time (a generator may
        build each pair when asked, so a whole model's worth never exists at once); default: the raw params."""
        return raw_delta_pairs(model, before)

    def delta_spectra(self, model, before: dict, anatomy):
        """(name, shape, singular values of ΔW) per 2-D block matrix, one matrix at a time, in float32
        (float64 changed no energy rank in a measured comparison; see analysis/rank.py)."""
        for name, start, end in self.effective_deltas(model, before, anatomy):
            yield from block_spectrum(name, start, end, anatomy)


METHODS: Registry[Method] = Registry("method")


def method_config(method: str, options: dict | None = None) -> MethodConfig:
    """The validated config of a registered method from keyword options."""
    return METHODS.get(method).config_cls.from_options(method, options or {})


def register_method(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name`")
    if not (dataclasses.is_dataclass(cls.config_cls) and issubclass(cls.config_cls, MethodConfig)):
        raise TypeError(f"{cls.__name__}.config_cls must be a MethodConfig dataclass")
    METHODS.register(cls.name, cls())
    return cls


def block_spectrum(name: str, start, end, anatomy):
    """(name, shape, float32 singular values of end − start) for a 2-D matrix inside a block;
    nothing for vectors (no rank), embeddings and heads (not block updates)."""
    if start.ndim == 2 and anatomy.name_of(name).layer is not None:
        yield name, tuple(start.shape), singular_values(end.detach().float() - start.detach().float(), torch.float32)


def set_trainable(model, names) -> int:
    """Freeze everything, then unfreeze the named parameters; returns how many."""
    wanted = set(names)
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)
        count += name in wanted
    return count


def tied_head(model) -> bool:
    """Whether the output head shares its matrix with the input embeddings."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return head is not None and embeddings is not None and head.weight is embeddings.weight


def params_where(model, anatomy, predicate) -> list[str]:
    """Raw names of parameters whose canonical name satisfies `predicate(ParamName)`."""
    return [n for n, _ in model.named_parameters() if predicate(anatomy.name_of(n))]
