"""A Run: one adaptation of one base model, the record of its training, and what was measured on it.

Every measurement is a registered module (stance_harness.measurements): `run.measure(name,
**params)` computes it once, over the run's narrow MeasureContext, under the analysis time limit,
and keeps it in `measurements` (JSON-ready, so the run store persists it and a warm session never
recomputes it). What is only worth keeping in memory (the probe readings behind several
measurements, failed stages) sits in a scratch dict behind the same cache. The named accessors
(`run.behavior(...)`, `run.calibration()`, ...) are thin wrappers over `measure`.

What a Run asks of whoever holds it (a session: the run store, the memory budget, the test's
record, progress) is one object, its `RunServices`, given at construction or by `attach`.

The adapted model shares every weight it did not train with the session's base. It may be
released to keep memory bounded and is rebuilt on demand from base + stored tensors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from stance_harness.analysis.deltas import MatrixDelta, layer_rows
from stance_harness.analysis.digest import tensor_digest
from stance_harness.analysis.replication import unit_id
from stance_harness.analysis.ability import DEFAULT_PROBESET
from stance_harness.core.stages import DEFAULT_TIMEOUT, run_stage
from stance_harness.measurements import MEASUREMENTS, MeasureContext, measure, producer_of
from stance_harness.measurements.counts import logical_numel  # noqa: F401 (imported from here by callers)
from stance_harness.runs.batches import Framing
# re-exported: RunSet is torch-free, in its own module so the plugin's train fixture imports it at load
from stance_harness.runs.runset import RunSet, runset  # noqa: F401
from stance_harness.runs.services import RunServices
from stance_harness.core.errors import HarnessError

if TYPE_CHECKING:
    from stance_harness.runs.instruments import InstrumentConfig, Trace
    from stance_harness.runs.methods import Method, MethodConfig
    from stance_harness.models import Anatomy, LoadedModel
    from stance_harness.runs.request import Recipe, TrainingRequest
    from stance_harness.stances import Stance
    from stance_harness.runs.tasks import Task

# trained in this session, loaded from the run store, a saved adapter, a model trained elsewhere (run_from_model)
ORIGINS = ("trained", "loaded", "adapter", "model")
SLOW_MEASUREMENT = 5.0  # seconds: a measurement that took longer is reported as progress


def frozen_digests(model, loaded: "LoadedModel") -> dict[str, str]:
    """Digest of every frozen parameter; those sharing the base's storage reuse the base's digest."""
    return {n: loaded.base_digest(p) or tensor_digest(p) for n, p in model.named_parameters() if not p.requires_grad}


def owned_bytes(model, loaded: "LoadedModel") -> int:
    """Bytes of the model's parameters and buffers that are not the base's own storage."""
    base = loaded.base if loaded.base_loaded else None  # an unloaded base shares nothing
    shared = {t.data_ptr() for t in (*base.parameters(), *base.buffers())} if base is not None else set()
    seen, total = set(), 0
    for tensor in (*model.parameters(), *model.buffers()):
        ptr = tensor.data_ptr()
        if ptr not in shared and ptr not in seen:
            seen.add(ptr)
            total += tensor.numel() * tensor.element_size()
    return total


@dataclass(eq=False)
class Run:
    run_id: str  # the request's method-key, or a saved adapter's name and digest
    loaded: "LoadedModel"  # the session's base, never written to
    stance: "Stance"
    method: "Method"
    config: "MethodConfig"
    recipe: "Recipe"
    task: "Task"
    anatomy: "Anatomy"  # of the trained module (a task head may wrap the model)
    examples: int
    model: Any  # the adapted model (a property below: released and rebuilt on demand)
    before: dict  # starting values of the trained tensors; for weights of the base, the base's own tensors
    frozen_digests: dict[str, str]
    trace: "Trace"
    train_seconds: float
    instruments: "InstrumentConfig"
    request: "TrainingRequest | None" = None  # None for a saved adapter
    name: str | None = None  # a saved adapter's name; None: the method's
    origin: str = "trained"
    framing: Framing | None = None  # how probes and generation frame text; None: plain
    services: RunServices | None = None  # the store, memory budget, test record and progress; None: none
    measurements: dict = field(default_factory=dict, init=False)
    _scratch: dict = field(default_factory=dict, init=False, repr=False)

    def __repr__(self) -> str:
        # The generated repr would print every tensor of `before`, the base model and the trace:
        # pytest formats a failing test's arguments with repr, which took minutes per failure.
        return (f"Run({self.run_id!r}, model={self.loaded.name!r}, stance={self.stance.name!r}, "
                f"origin={self.origin!r}, steps={len(self.trace.loss)})")

    def __post_init__(self):
        if self.origin not in ORIGINS:
            raise ValueError(f"origin must be one of {ORIGINS}, not {self.origin!r}")
        if self.framing is None:
            self.framing = Framing(self.loaded.tokenizer, chat=False)
        if self.services is None:
            self.services = RunServices()

    def attach(self, services: RunServices) -> "Run":
        """Hand the run to `services` (a session holding a run that training or the store made)."""
        if not isinstance(services, RunServices):
            raise TypeError(f"Run.attach takes a RunServices, got {type(services).__name__}")
        self.services = services
        return self

    @property
    def sinks(self) -> list:
        """Where checks on this run are recorded (a test's record): the services' list."""
        return self.services.sinks

    @property
    def rebuild(self) -> Callable[[], Any] | None:
        """What makes the model again after `release_model`, or None."""
        return self.services.rebuilder(self)

    @property
    def analysis_timeout(self) -> float | None:
        return self.services.analysis_timeout

    # -- the model ---------------------------------------------------------------------------
    def _get_model(self):
        if self.__dict__.get("_model") is None:
            rebuild = self.rebuild
            if rebuild is None:
                raise HarnessError(f"run {self.run_id}: its model was released and it has no way to rebuild it")
            self._set_model(rebuild())
        self.services.model_used(self)
        return self.__dict__["_model"]

    def _set_model(self, model) -> None:
        self.__dict__["_model"], self.__dict__["_owned_bytes"] = model, None

    @property
    def model_resident(self) -> bool:
        return self.__dict__.get("_model") is not None

    def release_model(self) -> int:
        """Drop the adapted model (its trained tensors stay in the store); returns the bytes freed."""
        if self.rebuild is None or not self.model_resident:
            return 0
        freed = self.resident_bytes()
        self.__dict__["_model"] = self.__dict__["_owned_bytes"] = None
        return freed

    def resident_bytes(self) -> int:
        """What holding the model costs beyond the base: the tensors it does not share with it."""
        model = self.__dict__.get("_model")
        if model is None:
            return 0
        if self.__dict__.get("_owned_bytes") is None:
            self.__dict__["_owned_bytes"] = owned_bytes(model, self.loaded)
        return self.__dict__["_owned_bytes"]

    @property
    def label(self) -> str:
        """Names this run's metrics in reports and baselines: `lora.ece`."""
        return self.name or self.method.name

    # -- the one caching path ------------------------------------------------------------------
    def measured(self, key: str, compute: Callable[[], Any], stage: str | None = None, keep: bool = True):
        """`compute()` once, under the time limit of analysis stage `stage` (default: the key).

        keep=True: the value is a measurement (JSON-ready; reported and persisted);
        keep=False: it stays in memory only. A stage that failed once fails at once after."""
        found = self.measurements if keep else self._scratch
        if key in found:
            return found[key]
        stage = stage or key.split(":")[0]
        failed = self._scratch.setdefault("failed", {})
        if stage in failed:
            raise failed[stage]
        timeout = DEFAULT_TIMEOUT if self.analysis_timeout is None else self.analysis_timeout
        started = time.perf_counter()
        try:
            value = run_stage(stage, compute, timeout)
        except Exception as exc:
            failed[stage] = exc
            raise
        found[key] = value
        if keep:
            seconds = time.perf_counter() - started
            if seconds >= SLOW_MEASUREMENT:
                self.services.progress(f"measured {key} on {self.run_id} in {seconds:.1f}s")
            self.services.measured(self)
        return value

    @property
    def context(self) -> MeasureContext:
        """What a measurement may read of this run (stance_harness.measurements)."""
        found = self._scratch.get("context")
        if found is None:
            found = self._scratch["context"] = MeasureContext(
                run_id=self.run_id, loaded=self.loaded, stance=self.stance, task=self.task, method=self.method,
                anatomy=self.anatomy, before=self.before, frozen_digests=self.frozen_digests,
                framing=self.framing, recipe=self.recipe, trace=self.trace, examples=self.examples,
                model_of=lambda: self.model, cached=self.measured,
                base_cache=self.services.base_cache(self.loaded))
        return found

    def measure(self, name: str, **params):
        """The registered measurement `name` (stance_harness.measurements) with `params`, once per key."""
        value = measure(self.context, name, **params)
        spec = MEASUREMENTS.get(name)
        if spec.shows == "last":  # the report shows the key last asked for
            self._scratch.setdefault("asked", {})[name] = spec.key_for(self.context, **params)
        return value

    # -- the named measurements: thin wrappers over `measure` -----------------------------------
    @property
    def counts(self) -> dict:
        """Parameters that trained at some step count as trainable, the rest as frozen."""
        return self.measure("counts")

    def deltas(self, view: str = "effective") -> list[MatrixDelta]:
        """effective: per matrix as the model sees it (for LoRA, ΔW = scale·B·A on the base matrix);
        adapter: per trained tensor (for LoRA, its own A and B)."""
        if view not in ("effective", "adapter"):
            raise ValueError(f"view must be 'effective' or 'adapter', not {view!r}")
        rows = self.measure("deltas", view=view)
        return self.measured(f"delta_rows:{view}", lambda: [MatrixDelta.from_dict(r) for r in rows], keep=False)

    @property
    def effective_deltas(self) -> list[MatrixDelta]:
        return self.deltas("effective")

    @property
    def adapter_deltas(self) -> list[MatrixDelta]:
        return self.deltas("adapter")

    def layer_table(self, view: str = "effective") -> list[dict]:
        return layer_rows(self.deltas(view))

    def changed_frozen(self) -> list[str]:
        """Frozen parameters whose bytes differ from before training (should be none)."""
        return self.measure("frozen_changed")

    def behavior(self, metric: str = "loglik_margin") -> dict:
        """Shift of the adapted model from its base on the stance's held-out probes.

        loglik_margin: mean token log-likelihood of the stance continuation minus that of the
            neutral one, per probe; the effect is adapted minus base.
        kl: mean KL(adapted ‖ base) of the next-token distributions over both continuations.
        marker_rate: whether a greedy reply (32 tokens) holds a stance marker; adapted minus base.
        The effect carries a 95% BCa bootstrap interval over probes.
        """
        return self.measure("behavior", metric=metric)

    def forgetting(self) -> dict:
        """Held-out general text: perplexity before and after (causal LM), or for a task head on a
        body, the drift of its sentence embeddings (mean 1 − cosine, base vs adapted)."""
        return self.measure("forgetting")

    def replies(self) -> dict:
        """Each probe's greedy reply, base and adapted side by side: rows of probe, base_reply,
        adapted_reply, base_marker, adapted_marker, margin_change (the probe's loglik-margin shift)
        and changed, in probe order."""
        return self.measure("replies")

    def general_ability(self, probeset: str = DEFAULT_PROBESET) -> dict:
        """Forgetting in continual learning's terms, on a general-ability probe set (factual,
        arithmetic, instruction prompts checked by rules): accuracy base and adapted, retention per
        family, backward transfer, regressions with both replies, a pattern name; per_unit is
        adapted − base correctness per probe (see stance_harness.analysis.ability)."""
        return self.measure("general_ability", probeset=probeset)

    def judged(self, judge: str = "embedding", **options) -> dict:
        """Each probe's greedy reply (from `replies()`), base and adapted, scored for the stance in
        [0, 1] by the registered judge `judge` (built with `options`, e.g. model="smollm2-135m");
        the effect is adapted minus base per probe. Keyed by the judge's identity; with the judge's
        calibration and its agreement with the stance's labelled replies (see stance_harness.judges)."""
        return self.measure("judged", judge=judge, **options)

    def calibration(self, n_bins: int = 15) -> dict:
        """ECE, MCE, Brier, Acc@1 and reliability bins on held-out data, adapted and base (see the task)."""
        return self.measure("calibration", n_bins=n_bins)

    def rank(self, energy: float = 0.9) -> dict:
        """Energy rank (top-k singular values holding `energy` of ‖ΔW‖²) and stable rank of each
        block matrix's ΔW, one matrix at a time (for LoRA, from its factors). The report shows the
        energy last asked for."""
        return self.measure("rank", energy=energy)

    # -- where the behaviour lives (stance_harness.where) ---------------------------------------------
    def localization(self) -> dict:
        """How much of the loglik-margin shift survives when only part of the change is kept (the
        rest reverted to the base), per layer third, kind group (attention, MLP, norm), single
        layer and, for LoRA, adapter: rows of (set, shift, retained = (kept − none)/(full − none))."""
        return self.measure("localization")

    def localized(self, layers=None, kinds=None) -> dict:
        """Shift and retained fraction with only `layers` x `kinds` of the change kept; None: any."""
        return self.measure("localized", layers=layers, kinds=kinds)

    def localization_ends(self) -> dict:
        """Per probe: the base's margin, and the run's with all and with none of its change kept."""
        return self.measure("localization_ends")

    def dose_response(self) -> dict:
        """Shift and forgetting with the whole change scaled by λ in where.DOSES (−1: negated)."""
        return self.measure("dose_response")

    def geometry(self) -> dict:
        """Intruder dimensions (k=10, ε=0.5), DoRA's ΔM/ΔD and their correlation, and per-layer
        linear CKA of base vs adapted hidden states on held-out text (see stance_harness.where)."""
        return self.measure("geometry")

    # -- per-unit values, for paired comparisons between runs ----------------------------------
    def unit_values(self, metric: str) -> tuple[str, list]:
        """(unit, values) of `metric` per unit this run was measured on: the same probes, windows,
        predictions or steps for every run of one stance, so two runs' values pair up.

        A paired metric is one a registered measurement gives unit values for
        (stance_harness.measurements.paired_metrics()): behavior_shift, loglik_margin, marker_rate:
        per probe, adapted minus base; kl: per probe; forgetting: per held-out window, the NLL
        increase (per sentence, the embedding drift, on a task head); brier, acc1: per held-out
        prediction; ece: rows (confidence, correct) per prediction, compared as a statistic;
        step_time: seconds per optimizer step; intruders: per layer; general_ability: per ability
        probe; judge:NAME (a registered judge): per probe, the judge's score adapted minus base."""
        return producer_of(metric).per_unit(metric)(self.context, metric)

    def unit_ids(self, metric: str) -> list[str]:
        """One id per unit of `unit_values(metric)`, what pairing two runs checks: a probe by its
        text, a window by its index, length and tokenizer, a prediction by its index among the
        stance's probes under this tokenizer and framing, a step or a layer by its index."""
        spec = producer_of(metric)
        unit, values = self.unit_values(metric)
        if spec.unit_ids is not None:
            return spec.unit_ids(self.context, metric, unit, values)
        if unit == "probe":
            return [f"probe {unit_id(p.prompt)}" for p in self.stance.probes]
        return [f"{unit} {i}" for i in range(len(values))]

    # -- the record --------------------------------------------------------------------------
    def report_measurements(self) -> dict:
        """The measurements as the reports read them: each registered measurement's own report
        view (behaviour by metric, calibration and forgetting without their per-unit rows, the
        rank last asked for, ...), keyed by the name its renderer is found by."""
        view: dict = {}
        asked = self._scratch.get("asked", {})
        for key, value in self.measurements.items():
            name = key.partition(":")[0]
            spec = MEASUREMENTS._items.get(name)
            if spec is None or spec.report is None or spec.renderer is None \
                    or (spec.shows == "last" and asked.get(name) != key):
                continue
            shown = spec.report(key, value)
            if shown is None:
                continue
            if isinstance(shown, dict) and isinstance(view.get(spec.renderer), dict):
                view[spec.renderer].update(shown)  # behaviour by metric, judged by judge
            else:
                view[spec.renderer] = shown
        return view

    def summary(self) -> dict:
        """JSON-ready record of the run for reports."""
        return {
            "run_id": self.run_id,
            "origin": self.origin,
            "model": self.loaded.provenance(),
            "stance": self.stance.provenance(),
            "method": self.method.name,
            "config": self.config.as_dict(),
            "recipe": self.recipe.as_dict(),
            "precision": self.request.precision if self.request is not None else None,
            "examples": self.examples,
            "counts": self.counts,
            "trace": self.trace.as_dict(),
            "instruments": self.trace.summary(),
            "train_seconds": self.train_seconds,
            "task": self.task.name,
            "framing": self.framing.identity(),
            "name": self.label,
            "measurements": self.report_measurements(),
            **self._layer_tables(),
        }

    def measure_reported(self) -> None:
        """Measure now what `summary` reads of the model (its counts and per-layer change in both
        views): a training worker does it while the model is in memory, and stores the values with
        the run, so the session's report need not rebuild the model. A failure is left for
        `summary`, which meets it again and reports it."""
        try:
            _ = self.counts
        except Exception:  # noqa: BLE001 - summary() measures it again and reports the error
            pass
        self._layer_tables()

    def _layer_tables(self) -> dict:
        """Per-layer tables for the report; an analysis that fails or overruns is reported, not raised."""
        try:
            return {"layers": {"effective": self.layer_table("effective"), "adapter": self.layer_table("adapter")}}
        except Exception as exc:  # one run's broken analysis must not cost the session its report
            return {"layers": {"effective": [], "adapter": []}, "analysis_error": f"{type(exc).__name__}: {exc}"}


# `model` is an init field (so `dataclasses.replace(run, model=...)` works) kept outside the
# dataclass's fields, so a released model can be rebuilt on first use.
Run.model = property(Run._get_model, Run._set_model)  # type: ignore[assignment]
