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
from typing import ClassVar

from ..registry import HarnessError, Registry, suggest


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config. Fields carry `metadata={"help": ...}`."""

    @classmethod
    def from_options(cls, method: str, options: dict) -> "MethodConfig":
        allowed = [f.name for f in fields(cls)]
        for key in options:
            if key not in allowed:
                raise HarnessError(
                    f"method {method!r} has no option {key!r}.{suggest(key, allowed)} "
                    f"Its options: {', '.join(allowed) or 'none'}"
                )
        normalised = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        return cls(**normalised)

    def as_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def describe(cls) -> list[tuple[str, object, str]]:
        out = []
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append((f.name, default, f.metadata.get("help", "")))
        return out


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass
class TrainingContext:
    """What a method sees of the run it is part of."""

    loaded: object  # LoadedModel
    config: MethodConfig
    recipe: object  # Recipe
    total_steps: int
    steps_per_epoch: int
    model: object = None
    before: dict = field(default_factory=dict)  # starting values of every parameter that may train
    state: dict = field(default_factory=dict)  # the method's own (Fisher, ...)
    task: object = None  # Task; None: stance-lm
    anatomy: object = None  # of the module being trained (a task head may wrap the model)

    def __post_init__(self):
        if self.anatomy is None:
            self.anatomy = self.loaded.anatomy

    @property
    def task_name(self) -> str:
        return getattr(self.task, "name", "stance-lm")

    def require_lm_task(self, method: str, why: str) -> None:
        """Methods that mix in or measure on general text need the causal-LM task."""
        if self.task_name != "stance-lm":
            raise HarnessError(f"{method}: {why}, so it needs task='stance-lm', not {self.task_name!r}")


class Method:
    """Subclass, set `name` and `config_cls`, and decorate with `@register_method`."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    summary: ClassVar[str] = ""
    seed: ClassVar[str] = ""  # which seed document it comes from

    def check(self, ctx: TrainingContext) -> None:
        """Reject configs that cannot work for this run's length or model."""

    def load(self, ctx: TrainingContext):
        return ctx.loaded.fresh()

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
        """(name, W_before, W_after) per matrix as the model sees it; default: the raw params."""
        from ..analysis.deltas import raw_delta_pairs

        return raw_delta_pairs(model, before)


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
