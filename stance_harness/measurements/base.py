"""What a measurement is: a registered spec, computed over a narrow context of one run.

A measurement module registers one `MeasurementSpec`: its name (`run.measure(name)`), the key its
value is kept under for given parameters, its analysis stage (the time limit's name, see
core/stages.py), `compute(ctx, **params)`, the metrics it publishes (declared with their
directions when it registers), its per-unit values for paired claims, the key its report
renderer is found by in report/sections.py, and optionally its check helper, which the top
package exports by name. Adding a measurement is one module (see reply_length.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from stance_harness.core.errors import HarnessError
from stance_harness.core.metrics import declare_metric
from stance_harness.core.registry import Registry

if TYPE_CHECKING:
    from stance_harness.models import Anatomy, LoadedModel
    from stance_harness.runs.batches import Framing
    from stance_harness.runs.instruments import Trace
    from stance_harness.runs.methods import Method
    from stance_harness.runs.recipe import Recipe
    from stance_harness.runs.tasks import Task
    from stance_harness.stances import Stance

PREFIX = ":"  # a paired metric name ending in ":" takes any suffix: "judge:" answers judge:embedding


@dataclass(frozen=True)
class Metric:
    """A metric a measurement publishes: its bare name, which way is better, what it is."""

    name: str
    direction: str  # core.metrics.LOWER or HIGHER
    description: str
    wall_clock: bool = False  # a time the clock measured: it depends on the machine and its load


@dataclass(eq=False)
class MeasureContext:
    """What a measurement may read of one run: the adapted model, its base side, the stance, the
    framing, the task and the method with its trained tensors, and the run's cache. Not the Run:
    no store, no test record, no report."""

    run_id: str
    loaded: "LoadedModel"  # the session's base, never written to: its tokenizer and shared weights
    stance: "Stance"
    task: "Task"
    method: "Method"
    anatomy: "Anatomy"
    before: dict  # starting values of the trained tensors
    frozen_digests: dict
    framing: "Framing"
    recipe: "Recipe"
    trace: "Trace"
    examples: int  # training examples
    model_of: Callable[[], Any]  # the adapted model (rebuilt when it was released)
    cached: Callable[..., Any]  # the run's cache: cached(key, compute, stage=None, keep=True)
    base_cache: dict  # what was measured on the shared base, by key

    @property
    def model(self):
        return self.model_of()

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def measured(self, key: str, compute: Callable[[], Any], stage: str | None = None, keep: bool = True):
        """`compute()` once per run under stage `stage`'s time limit; keep=False: in memory only."""
        return self.cached(key, compute, stage=stage, keep=keep)

    def measure(self, name: str, **params):
        """Another registered measurement of the same run (cached like every other)."""
        return measure(self, name, **params)

    def on_base(self, key: tuple, measure_fn: Callable[[Any], Any]):
        """`measure_fn(model)` on the model this run is compared with: the session's shared base
        (computed once per base), or where the method says so, the run's own (QLoRA's 4-bit base)."""
        own = self.method.own_base(self.model)
        if own is not None:
            with own as base:
                return measure_fn(base)
        if key not in self.base_cache:
            self.base_cache[key] = measure_fn(self.loaded.base)
        return self.base_cache[key]


@dataclass(frozen=True)
class MeasurementSpec:
    """One registered measurement. `compute(ctx, **params)` returns a JSON-ready value (kept=True:
    persisted with the run and reported) or anything (kept=False: in memory only)."""

    name: str
    compute: Callable[..., Any]
    description: str
    stage: str | Callable[..., str] | None = None  # the analysis stage (or stage(**params)); None: the name
    key: Callable[..., str] | None = None  # key(ctx, **params): the cache key; None: the name
    check_params: Callable[..., None] | None = None  # refuses bad params before anything runs
    metrics: tuple[Metric, ...] = ()
    # paired metric name -> per_unit(ctx, metric) -> (unit, values); a name ending in ":" is a prefix
    paired: dict[str, Callable[..., tuple[str, list]]] = field(default_factory=dict)
    unit_ids: Callable[..., list[str] | None] | None = None  # (ctx, metric, unit, values) -> ids; None: by unit
    # the report: report(key, value) -> what the report keeps of the value under `key` (None: nothing),
    # shown under `renderer`, the key report/sections.py finds its table renderer by (several keys'
    # dict views merge: behaviour by metric, judged by judge); without a renderer of its own there,
    # a measurement gets one row of its numbers
    renderer: str | None = None
    report: Callable[[str, Any], Any] | None = None
    shows: str = "all"  # in the report: "all" its keys, or "last": the key last asked for (rank at one energy)
    kept: bool = True
    checks: tuple[str, ...] = ()  # names of its check helpers (check_X, in stance_harness.checks; exported by stance_harness)

    def __post_init__(self):
        if self.shows not in ("all", "last"):
            raise ValueError(f"measurement {self.name!r}: shows must be 'all' or 'last', not {self.shows!r}")
        if isinstance(self.checks, str) or not all(isinstance(c, str) and c.startswith("check_") for c in self.checks):
            raise TypeError(f"measurement {self.name!r}: checks are the names of its check helpers "
                            f"(check_X, in stance_harness.checks), got {self.checks!r}")
        for metric in self.metrics:
            if not isinstance(metric, Metric):
                raise TypeError(f"measurement {self.name!r}: metrics must be Metric(name, direction, "
                                f"description), got {metric!r}")

    def key_for(self, ctx: "MeasureContext", **params) -> str:
        return self.key(ctx, **params) if self.key is not None else self.name

    def stage_for(self, **params) -> str:
        return (self.stage(**params) if callable(self.stage) else self.stage) or self.name

    def publishes(self, metric: str) -> bool:
        return any(metric.startswith(name) and metric != name if name.endswith(PREFIX) else metric == name
                   for name in self.paired)

    def per_unit(self, metric: str):
        for name, values in self.paired.items():
            if metric.startswith(name) and metric != name if name.endswith(PREFIX) else metric == name:
                return values
        raise KeyError(metric)


MEASUREMENTS: Registry[MeasurementSpec] = Registry("measurement")


def register_measurement(spec: MeasurementSpec) -> MeasurementSpec:
    """Register `spec` and declare the metrics it publishes (their directions, for baselines)."""
    if not isinstance(spec, MeasurementSpec):
        raise TypeError(f"register_measurement takes a MeasurementSpec, got {type(spec).__name__}")
    known = MEASUREMENTS._items.get(spec.name)
    if known is not None and _origin(known) != _origin(spec):  # the same module imported again is no clash
        raise ValueError(f"measurement {spec.name!r} is already registered (computed by {'.'.join(_origin(known))})")
    for other_name, other in MEASUREMENTS._items.items():  # a paired metric has one producer
        clash = set(spec.paired) & set(other.paired) if other_name != spec.name else set()
        if clash:
            raise ValueError(f"measurement {spec.name!r}: paired metric(s) {', '.join(sorted(clash))} already "
                             f"come from measurement {other_name!r}")
    for metric in spec.metrics:
        declare_metric(metric.name, metric.direction, metric.description, metric.wall_clock)
    MEASUREMENTS.register(spec.name, spec)
    return spec


def _origin(spec: MeasurementSpec) -> tuple[str, str]:
    return getattr(spec.compute, "__module__", ""), getattr(spec.compute, "__qualname__", "")


def measure(ctx: MeasureContext, name: str, **params):
    """The registered measurement `name` of the run behind `ctx`, computed once per key."""
    spec = MEASUREMENTS.get(name)
    if spec.check_params is not None:
        spec.check_params(ctx, **params)
    key = spec.key_for(ctx, **params)
    return ctx.measured(key, lambda: spec.compute(ctx, **params), stage=spec.stage_for(**params), keep=spec.kept)


def paired_metrics(prefixes: bool = True) -> list[str]:
    """Every metric a paired comparison takes: the paired metrics of the registered measurements, in
    registration order; a prefix such as judge: is shown as judge:<judge name> (prefixes=False: left out)."""
    return [f"{n}<{n[:-1]} name>" if n.endswith(PREFIX) else n for spec in MEASUREMENTS._loaded().values()
            for n in spec.paired if prefixes or not n.endswith(PREFIX)]


def producer_of(metric: str) -> MeasurementSpec:
    """The measurement whose units a paired comparison of `metric` reads; an error lists the valid names."""
    if isinstance(metric, str):
        for spec in MEASUREMENTS._loaded().values():
            if spec.publishes(metric):
                return spec
    raise HarnessError(f"no per-unit values for metric {metric!r}; paired comparisons take "
                       f"{', '.join(paired_metrics())}")


def measurement_checks() -> dict[str, str]:
    """{check helper name: measurement name} for the checks the registered measurements name."""
    return {check: name for name, spec in MEASUREMENTS._loaded().items() for check in spec.checks}


def without_units(value):
    """A measurement as the report keeps it: per-probe and per-window lists stay in the run store."""
    if isinstance(value, dict):
        return {k: without_units(v) for k, v in value.items() if k not in ("per_probe", "per_window")}
    if isinstance(value, list):
        return [without_units(v) for v in value]
    return value
