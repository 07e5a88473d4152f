"""What a method is: a validated config plus the pieces it plugs into the one training loop.

A method never owns a loop. The loop calls, in order:
  check(ctx)          before anything heavy: reject configs that cannot work for this run
  load(ctx)           a fresh model (QLoRA loads it quantized)
  prepare(model, ctx) freeze or wrap; every parameter that may train at any step ends
                      with requires_grad=True (these are snapshotted)
  setup(ctx)          after the snapshot (EWC estimates its Fisher here)
  mix_batches(...)    per epoch: the micro-batch stream (replay adds general text)
  schedule(ctx, step) per optimizer step: switch groups on or off; returns what it set
  extra_loss(ctx, step) a penalty added to the task loss, differentiated by autograd
  penalty_gradient(ctx, step) once per step, after the backward passes: a penalty whose gradient
                      is known in closed form, added to .grad in place (L2-SP, EWC: no graph
                      over the weights, so no copy of them)
  after_optimizer_step(ctx, step) after the update, before gradients are cleared (AdaLoRA's budget)
and asks for param_groups(ctx) (per-group learning rates) and effective_deltas (its view).
After training, stance_harness.where asks for change_units (what can be kept, reverted or scaled) and
intruders (per matrix, by the cheapest exact route).

Methods from outside the harness register the same way: `register_method` in a conftest.py, or
an entry point in the group `stance_harness.runs.methods` (loaded when METHODS is first looked into).
Their code identity (module, package, version, source hash) goes into the run key and the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from dataclasses import dataclass, field, fields
from functools import lru_cache
from importlib import metadata
from typing import Any, ClassVar

import torch

from stance_harness.analysis.deltas import raw_delta_pairs
from stance_harness.analysis.geometry import intruder_dimensions
from stance_harness.analysis.rank import singular_values
from stance_harness.core.config import build_config, config_fields, plain
from stance_harness.core.registry import HarnessError, Registry, load_entry_points
from stance_harness.models import Anatomy, LoadedModel, share_frozen_weights
from stance_harness.runs.recipe import Recipe
from stance_harness.runs.tasks import DEFAULT_TASK, TASKS, Task


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


@dataclass(eq=False)
class ChangeUnit:
    """One part of a run's change, kept or reverted as a whole: a trained tensor, or a LoRA adapter.

    `revert`: (parameter, its value before training) pairs that reverting the unit restores;
    `scale`: the pairs whose change a dose λ scales (θ₀ + λ·(θ − θ₀)); for a LoRA adapter that
    started at B = 0 only B, so its ΔW = scale·B·A is scaled by exactly λ."""

    name: str  # canonical: L3.q_proj.weight (a tensor), L3.q_proj (an adapter)
    layer: int | None
    kind: str
    revert: list
    scale: list


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
    # Left out of repr: the model and tensors would fill a failure report (see Run.__repr__).
    model: Any = field(default=None, repr=False)
    before: dict = field(default_factory=dict, repr=False)  # starting values of every parameter that may train
    state: dict = field(default_factory=dict, repr=False)  # the method's own (Fisher, ...)
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
    """A fine-tuning method: subclass, set `name` and `config_cls`, decorate with `@register_method`.

    The class docstring's first line is the method's one-line description. Override `prepare`
    (freeze or wrap the model; whatever may train ends with requires_grad=True) and, where the
    defaults do not fit, the other steps the module docstring lists."""

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

    def penalty_gradient(self, ctx: TrainingContext, step: int):
        """Add a penalty's closed-form gradient to the trained tensors' .grad in place and return
        its value (a 0-dim tensor, added to the step's loss), or None. Called once per optimizer
        step, after every micro-batch's backward and before clipping."""
        return None

    def after_optimizer_step(self, ctx: TrainingContext, step: int) -> None:
        """Called after each optimizer step, while the step's gradients still exist."""

    def storage_bytes(self, model, before: dict) -> int:
        """Bytes needed to store the stance: every parameter the method trains."""
        params = dict(model.named_parameters())
        return sum(params[n].numel() * params[n].element_size() for n in before)

    def effective_deltas(self, model, before: dict, anatomy):
        """(name, W_before, W_after) per matrix as the model sees it, one at a time (a generator may
        build each pair when asked, so a whole model's worth never exists at once); default: the raw params."""
        return raw_delta_pairs(model, before)

    def change_units(self, model, before: dict, anatomy) -> list[ChangeUnit]:
        """The parts of the change a localisation keeps or reverts; default: each trained tensor."""
        return tensor_units(model, before, anatomy)

    def intruders(self, model, before: dict, anatomy, top_k: int = 10, epsilon: float = 0.5):
        """(name, IntruderResult) per changed 2-D block matrix, one matrix at a time."""
        for name, start, end in self.effective_deltas(model, before, anatomy):
            if start.ndim == 2 and anatomy.name_of(name).layer is not None and not torch.equal(start, end):
                yield name, intruder_dimensions(start.detach(), end.detach(), top_k=top_k, epsilon=epsilon)

    def delta_spectra(self, model, before: dict, anatomy):
        """(name, shape, singular values of ΔW) per 2-D block matrix, one matrix at a time, in float32
        (float64 changed no energy rank in a measured comparison; see analysis/rank.py)."""
        for name, start, end in self.effective_deltas(model, before, anatomy):
            yield from block_spectrum(name, start, end, anatomy)


ENTRY_POINT_GROUP = "stance_harness.runs.methods"


def peft_module():
    """peft, imported at first use: it imports bitsandbytes, which takes seconds and prints to
    stderr, while the registry of methods is read where no PEFT model is made (the CLI, planning)."""
    import peft  # why: see the docstring

    return peft


def bitsandbytes_module():
    """bitsandbytes, imported at first use (see `peft_module`): QLoRA and the 8-bit optimizer need it."""
    import bitsandbytes  # why: see peft_module

    return bitsandbytes


def load_plugin_methods(group: str = ENTRY_POINT_GROUP) -> None:
    """Load each entry point of `group`: a module whose import registers its methods, or a
    Method subclass (registered here if its module did not)."""
    load_entry_points(group, "method", Method, register_method,
                      lambda cls: cls.name in METHODS and type(METHODS.get(cls.name)) is cls)


METHODS: Registry[Method] = Registry("method", load_plugins=load_plugin_methods)


def method_config(method: str, options: dict | None = None) -> MethodConfig:
    """The validated config of a registered method from keyword options."""
    return METHODS.get(method).config_cls.from_options(method, options or {})


def register_method(cls: type[Method]) -> type[Method]:
    """Register a Method subclass under its `name` (a class decorator). The same class defined
    again (a conftest.py imported twice) replaces the first; another class of that name is an error."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method takes a Method subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name`")
    if not (dataclasses.is_dataclass(cls.config_cls) and issubclass(cls.config_cls, MethodConfig)):
        raise TypeError(f"{cls.__name__}.config_cls must be a MethodConfig dataclass")
    METHODS.register(cls.name, cls())
    return cls


def is_builtin(method: Method) -> bool:
    return type(method).__module__.split(".")[0] == "stance_harness"


def method_code(method: Method) -> dict | None:
    """A method from outside the harness: its module, package and version, and a hash of the source
    of its classes (and their config's) not in the harness. None for the harness's own methods,
    whose code the training-code fingerprint already covers."""
    if is_builtin(method):
        return None
    return dict(_code_identity(type(method)))


@lru_cache(maxsize=None)
def _code_identity(cls: type) -> tuple:
    classes = [c for c in (*cls.__mro__, *cls.config_cls.__mro__)
               if c.__module__.split(".")[0] not in ("stance_harness", "builtins")]
    digest = hashlib.sha256()
    for path in sorted({inspect.getsourcefile(c) or "" for c in classes} - {""}):
        with open(path, "rb") as handle:
            digest.update(handle.read())
    top = cls.__module__.split(".")[0]
    package = next(iter(metadata.packages_distributions().get(top, [])), None)
    version = metadata.version(package) if package else None
    return (("module", cls.__module__), ("package", package), ("version", version),
            ("source", digest.hexdigest()[:12]))


def block_spectrum(name: str, start, end, anatomy):
    """(name, shape, float32 singular values of end − start) for a 2-D matrix inside a block;
    nothing for vectors (no rank), embeddings and heads (not block updates)."""
    if start.ndim == 2 and anatomy.name_of(name).layer is not None:
        yield name, tuple(start.shape), singular_values(end.detach().float() - start.detach().float(), torch.float32)


def tensor_units(model, before: dict, anatomy, skip=frozenset()) -> list[ChangeUnit]:
    """One ChangeUnit per trained parameter named in `before` (less `skip`)."""
    units = []
    for name, param in model.named_parameters():
        if name in before and name not in skip:
            where = anatomy.name_of(name)
            units.append(ChangeUnit(str(where), where.layer, where.kind, [(param, before[name])], [(param, before[name])]))
    return units


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
