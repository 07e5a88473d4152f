"""A Run: one adaptation of one base model, the record of its training, and what was measured on it.

Every measurement goes through `Run.measured(key, compute)`, the one caching path: each is
computed once, under the analysis time limit, and kept in `measurements` (JSON-ready, so the
run store persists it and a warm session never recomputes it). What is only worth keeping in
memory (the probe readings behind several measurements, failed stages) sits in a scratch dict
behind the same call. Whatever differs by task or by method is asked of the task or the method.

The adapted model shares every weight it did not train with the session's base. It may be
released to keep memory bounded and is rebuilt on demand from base + stored tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from stance_harness.analysis.ability import DEFAULT_PROBESET, load_probeset
from stance_harness.analysis.deltas import MatrixDelta, delta_table, layer_rows, raw_delta_pairs
from stance_harness.analysis.digest import tensor_digest
from stance_harness.core.stages import DEFAULT_TIMEOUT, run_stage
from stance_harness import where
from stance_harness.runs.batches import Framing
from stance_harness.core.errors import HarnessError
from stance_harness.core.metrics import HIGHER, LOWER, declare_metrics

if TYPE_CHECKING:
    from stance_harness.runs.instruments import InstrumentConfig, Trace
    from stance_harness.runs.methods import Method, MethodConfig
    from stance_harness.models import Anatomy, LoadedModel
    from stance_harness.runs.request import Recipe, TrainingRequest
    from stance_harness.stances import Stance
    from stance_harness.runs.tasks import Task

# What a run's counts give a suite to publish and gate.
declare_metrics([
    ("trainable_params", LOWER, "trainable parameter count"),
    ("params_per_example", LOWER, "trainable parameters per training example"),
    ("stance_bytes", LOWER, "bytes needed to store the stance"),
    ("general_ability", HIGHER, "share of general-ability probes answered correctly (adapted minus base, per probe)"),
    ("backward_transfer", HIGHER, "mean over general-ability families of adapted minus base accuracy"),
])

PAIRED_METRICS = ("behavior_shift", "loglik_margin", "kl", "marker_rate", "forgetting", "brier", "acc1", "ece",
                  "step_time", "intruders", "general_ability")
# trained in this session, loaded from the run store, a saved adapter, a model trained elsewhere (run_from_model)
ORIGINS = ("trained", "loaded", "adapter", "model")


def logical_numel(param) -> int:
    """Elements a parameter stands for; 4-bit packed weights (bitsandbytes) hold two per byte."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(math.prod(quant_state.shape))
    return param.numel()


def frozen_digests(model, loaded: "LoadedModel") -> dict[str, str]:
    """Digest of every frozen parameter; those sharing the base's storage reuse the base's digest."""
    return {n: loaded.base_digest(p) or tensor_digest(p) for n, p in model.named_parameters() if not p.requires_grad}


def owned_bytes(model, loaded: "LoadedModel") -> int:
    """Bytes of the model's parameters and buffers that are not the base's own storage."""
    shared = {t.data_ptr() for t in (*loaded.base.parameters(), *loaded.base.buffers())}
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
    analysis_timeout: float | None = None  # seconds per analysis stage; None: DEFAULT_TIMEOUT
    rebuild: Callable[[], Any] | None = None  # makes the model again after `release_model`
    on_measured: Callable[["Run"], None] | None = None  # the run store persists new measurements
    on_model_use: Callable[["Run"], None] | None = None  # residency keeps its LRU order
    framing: Framing | None = None  # how probes and generation frame text; None: plain
    measurements: dict = field(default_factory=dict, init=False)
    sinks: list = field(default_factory=list, init=False)  # where checks on this run are recorded (a test's record)
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

    # -- the model ---------------------------------------------------------------------------
    def _get_model(self):
        if self.__dict__.get("_model") is None:
            if self.rebuild is None:
                raise HarnessError(f"run {self.run_id}: its model was released and it has no way to rebuild it")
            self._set_model(self.rebuild())
        if self.on_model_use is not None:
            self.on_model_use(self)
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
        try:
            value = run_stage(stage, compute, timeout)
        except Exception as exc:
            failed[stage] = exc
            raise
        found[key] = value
        if keep and self.on_measured is not None:
            self.on_measured(self)
        return value

    def on_base(self, key: tuple, measure_fn: Callable[[Any], Any]):
        """`measure_fn(model)` on the model this run is compared with: the session's shared base
        (computed once per base), or where the method says so, the run's own (QLoRA's 4-bit base)."""
        own = self.method.own_base(self.model)
        if own is not None:
            with own as base:
                return measure_fn(base)
        cache = self.loaded.measurement_cache
        if key not in cache:
            cache[key] = measure_fn(self.loaded.base)
        return cache[key]

    # -- counts ----------------------------------------------------------------------------
    @property
    def counts(self) -> dict:
        """Parameters that trained at some step count as trainable, the rest as frozen."""
        def compute():
            trainable = sum(t.numel() for t in self.before.values())
            total = sum(logical_numel(p) for p in self.model.parameters())
            full_bytes = sum(p.numel() * p.element_size() for p in self.loaded.base.parameters())
            return {
                "trainable": trainable, "frozen": total - trainable,
                "trainable_pct": 100.0 * trainable / total if total else 0.0,
                "stance_bytes": self.method.storage_bytes(self.model, self.before),
                "full_weights_bytes": full_bytes,
                "examples": self.examples,
                "params_per_example": trainable / self.examples if self.examples else None,
            }
        return self.measured("counts", compute)

    # -- weight deltas ---------------------------------------------------------------------
    def deltas(self, view: str = "effective") -> list[MatrixDelta]:
        """effective: per matrix as the model sees it (for LoRA, ΔW = scale·B·A on the base matrix);
        adapter: per trained tensor (for LoRA, its own A and B)."""
        if view not in ("effective", "adapter"):
            raise ValueError(f"view must be 'effective' or 'adapter', not {view!r}")

        def compute():
            pairs = (self.method.effective_deltas(self.model, self.before, self.anatomy) if view == "effective"
                     else raw_delta_pairs(self.model, self.before))
            return [row.as_dict() for row in delta_table(pairs, self.anatomy)]

        rows = self.measured(f"deltas:{view}", compute, stage=f"{view}_deltas")
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
        def compute():
            params = dict(self.model.named_parameters())
            return [n for n, d in self.frozen_digests.items() if tensor_digest(params[n]) != d]
        return self.measured("frozen_changed", compute, stage="frozen_digests")

    # -- behaviour, forgetting, calibration, rank ---------------------------------------------
    def behavior(self, metric: str = "loglik_margin") -> dict:
        """Shift of the adapted model from its base on the stance's held-out probes.

        loglik_margin: mean token log-likelihood of the stance continuation minus that of the
            neutral one, per probe; the effect is adapted minus base.
        kl: mean KL(adapted ‖ base) of the next-token distributions over both continuations.
        marker_rate: whether a greedy reply (32 tokens) holds a stance marker; adapted minus base.
        The effect carries a 95% BCa bootstrap interval over probes.
        """
        from stance_harness.analysis.behavior import effect_of

        self.task.check_behavior_metric(metric)

        def compute():
            base, adapted = self.task.behavior_values(self, metric)
            deltas = [a - b for a, b in zip(adapted, base)]
            return {
                "base": sum(base) / len(base), "adapted": sum(adapted) / len(adapted),
                "effect": effect_of(deltas).as_dict(),
                "per_probe": [{"probe": p.prompt, "base": b, "adapted": a, "delta": a - b}
                              for p, b, a in zip(self.stance.probes, base, adapted)],
            }
        return self.measured(f"behavior:{metric}", compute)

    def forgetting(self) -> dict:
        """Held-out general text: perplexity before and after (causal LM), or for a task head on a
        body, the drift of its sentence embeddings (mean 1 − cosine, base vs adapted)."""
        return self.measured("forgetting", lambda: self.task.forgetting(self))

    def replies(self) -> dict:
        """Each probe's greedy reply, base and adapted side by side: rows of probe, base_reply,
        adapted_reply, base_marker, adapted_marker, margin_change (the probe's loglik-margin shift)
        and changed, in probe order."""
        return self.measured("replies", lambda: self.task.replies(self))

    def general_ability(self, probeset: str = DEFAULT_PROBESET) -> dict:
        """Forgetting in continual learning's terms, on a general-ability probe set (factual,
        arithmetic, instruction prompts checked by rules): accuracy base and adapted, retention per
        family, backward transfer, regressions with both replies, a pattern name; per_unit is
        adapted − base correctness per probe (see stance_harness.analysis.ability)."""
        found = load_probeset(probeset)
        key = "general_ability" if probeset == DEFAULT_PROBESET else f"general_ability:{found.name}"
        return self.measured(key, lambda: self.task.general_ability(self, found), stage="general_ability")

    def judged(self, judge: str = "embedding", **options) -> dict:
        """Each probe's greedy reply (from `replies()`), base and adapted, scored for the stance in
        [0, 1] by the registered judge `judge` (built with `options`, e.g. model="smollm2-135m");
        the effect is adapted minus base per probe. Keyed by the judge's identity; with the judge's
        calibration and its agreement with the stance's labelled replies (see stance_harness.judges)."""
        from stance_harness.judges import judge_key, judged_values, make_judge

        found = make_judge(judge, **options)
        return self.measured(judge_key(found, self.stance), lambda: judged_values(self, found),
                             stage=f"judged:{judge}")  # one judge failing does not fail the others

    def calibration(self, n_bins: int = 15) -> dict:
        """ECE, MCE, Brier, Acc@1 and reliability bins on held-out data, adapted and base (see the task)."""
        key = "calibration" if n_bins == 15 else f"calibration:{n_bins}"
        return self.measured(key, lambda: self.task.calibration(self, n_bins))

    def rank(self, energy: float = 0.9) -> dict:
        """Energy rank (top-k singular values holding `energy` of ‖ΔW‖²) and stable rank of each
        block matrix's ΔW, one matrix at a time (for LoRA, from its factors)."""
        from stance_harness.analysis.rank import energy_rank_from_singular_values, stable_rank_from_singular_values

        def compute():
            rows = []
            for name, shape, values in self.method.delta_spectra(self.model, self.before, self.anatomy):
                rows.append({"matrix": str(self.anatomy.name_of(name)),
                             "rank": energy_rank_from_singular_values(values, energy),
                             "stable_rank": stable_rank_from_singular_values(values), "shape": list(shape)})
            return {"energy": energy, "rows": rows}
        found = self.measured(f"rank:{energy:g}", compute, stage="rank")
        self._scratch["rank_shown"] = f"rank:{energy:g}"  # the report shows the energy last asked for
        return found

    # -- where the behaviour lives (stance_harness.where) ---------------------------------------------
    def localization(self) -> dict:
        """How much of the loglik-margin shift survives when only part of the change is kept (the
        rest reverted to the base), per layer third, kind group (attention, MLP, norm), single
        layer and, for LoRA, adapter: rows of (set, shift, retained = (kept − none)/(full − none))."""
        self.task.check_behavior_metric("loglik_margin")
        return self.measured("localization", lambda: where.localization(self))

    def localized(self, layers=None, kinds=None) -> dict:
        """Shift and retained fraction with only `layers` x `kinds` of the change kept; None: any."""
        self.task.check_behavior_metric("loglik_margin")
        return where.localized(self, layers, kinds)

    def localization_ends(self) -> dict:
        """Per probe: the base's margin, and the run's with all and with none of its change kept."""
        self.task.check_behavior_metric("loglik_margin")
        return where.ends(self)

    def dose_response(self) -> dict:
        """Shift and forgetting with the whole change scaled by λ in where.DOSES (−1: negated)."""
        self.task.check_behavior_metric("loglik_margin")
        return self.measured("dose_response", lambda: where.dose_response(self))

    def geometry(self) -> dict:
        """Intruder dimensions (k=10, ε=0.5), DoRA's ΔM/ΔD and their correlation, and per-layer
        linear CKA of base vs adapted hidden states on held-out text (see stance_harness.where)."""
        return self.measured("geometry", lambda: where.geometry(self))

    # -- per-unit values, for paired comparisons between runs ----------------------------------
    def unit_values(self, metric: str) -> tuple[str, list]:
        """(unit, values) of `metric` per unit this run was measured on: the same probes, windows,
        predictions or steps for every run of one stance, so two runs' values pair up.

        behavior_shift, loglik_margin, marker_rate: per probe, adapted minus base; kl: per probe;
        forgetting: per held-out window, the NLL increase (per sentence, the embedding drift, on a
        task head); brier, acc1: per held-out prediction; ece: rows (confidence, correct) per
        prediction, compared as a statistic; step_time: seconds per optimizer step; judge:NAME (a
        registered judge, e.g. judge:embedding): per probe, the judge's score adapted minus base."""
        name = {"behavior_shift": "loglik_margin"}.get(metric, metric)
        if name in ("loglik_margin", "marker_rate", "kl"):
            rows = self.behavior(name)["per_probe"]
            return "probe", [r["adapted"] if name == "kl" else r["delta"] for r in rows]
        if name == "forgetting":
            found = self.forgetting()
            return found["unit"], found["per_unit"]
        if name in ("brier", "acc1", "ece"):
            items = self.calibration()["items"]
            if name == "ece":
                return "prediction", [list(r) for r in zip(items["confidence"], items["correct"])]
            return "prediction", items["brier"] if name == "brier" else items["correct"]
        if name == "step_time":
            return "step", list(self.trace.step_time)
        if name == "general_ability":
            found = self.general_ability()
            return found["unit"], found["per_unit"]
        if name.startswith("judge:"):  # judge:embedding: a judge's score per probe, adapted minus base
            return "probe", [r["delta"] for r in self.judged(name.partition(":")[2])["per_probe"]]
        if name == "intruders":
            return "layer", where.intruders_per_layer(self.geometry())
        raise HarnessError(f"no per-unit values for metric {metric!r}; paired comparisons take "
                           f"{', '.join(PAIRED_METRICS)}, judge:<judge name>")

    def unit_ids(self, metric: str) -> list[str]:
        """One id per unit of `unit_values(metric)`, what pairing two runs checks: a probe by its
        text, a window by its index, length and tokenizer, a prediction by its index among the
        stance's probes under this tokenizer and framing, a step or a layer by its index."""
        from stance_harness.analysis.replication import unit_id

        unit, values = self.unit_values(metric)
        name = {"behavior_shift": "loglik_margin"}.get(metric, metric)
        if name == "general_ability":  # its own probe set, which names its probes
            return [f"ability probe {i}" for i in self.general_ability()["unit_ids"]]
        tokenizer = self.loaded.tokenizer
        vocab = f"{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}"
        if unit == "probe":
            return [f"probe {unit_id(p.prompt)}" for p in self.stance.probes]
        if unit == "window":
            tokens = self.forgetting().get("window_tokens")
            return [f"window {i} ({tokens} tokens, tokenizer {unit_id(vocab)})" for i in range(len(values))]
        if unit == "sentence":
            from stance_harness.measure import heldout_sentences

            # by place and text: the held-out text repeats a sentence or two
            return [f"sentence {i} {unit_id(s)}" for i, s in enumerate(heldout_sentences(len(values)))]
        if name in ("brier", "acc1", "ece"):
            probes = unit_id(*(p.prompt for p in self.stance.probes), vocab, self.framing.identity())
            return [f"prediction {i} on probes {probes}" for i in range(len(values))]
        return [f"{unit} {i}" for i in range(len(values))]

    # -- the record --------------------------------------------------------------------------
    def report_measurements(self) -> dict:
        """The measurements as the reports read them: behaviour by metric, calibration,
        forgetting, and the rank last asked for."""
        view: dict = {}
        for key, value in self.measurements.items():
            kind, _, detail = key.partition(":")
            if kind == "behavior":
                view.setdefault("behavior", {})[detail] = value
            elif kind == "judged":  # whole: the prompts and raw outputs of a model judge belong in the report
                view.setdefault("judged", {})[detail.partition(":")[0]] = value
            elif kind in ("calibration", "forgetting") and not detail:
                # per-prediction rows stay in the run store; the report keeps the summary
                view[kind] = {k: v for k, v in value.items() if k != "items"} if isinstance(value, dict) else value
        for kind in ("localization", "dose_response", "geometry", "replies"):
            if kind in self.measurements:
                view[kind] = _without_units(self.measurements[kind])
        if "general_ability" in self.measurements:  # the report lists regressions and gains, not every probe
            view["general_ability"] = {k: v for k, v in self.measurements["general_ability"].items()
                                       if k not in ("rows", "per_unit", "unit_ids")}
        shown = self._scratch.get("rank_shown")
        if shown in self.measurements:
            view["rank"] = self.measurements[shown]
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

    def _layer_tables(self) -> dict:
        """Per-layer tables for the report; an analysis that fails or overruns is reported, not raised."""
        try:
            return {"layers": {"effective": self.layer_table("effective"), "adapter": self.layer_table("adapter")}}
        except Exception as exc:  # one run's broken analysis must not cost the session its report
            return {"layers": {"effective": [], "adapter": []}, "analysis_error": f"{type(exc).__name__}: {exc}"}


class RunSet(tuple):
    """Runs that differ only in the training seed (`train(..., seeds=N)`): a sequence of Run.

    Comparative checks take it as one arm, seeds as the unit of replication; single-run checks
    apply to each run (each must pass)."""

    def __new__(cls, runs):
        runs = tuple(runs)
        if not runs:
            raise HarnessError("a RunSet needs at least one run")
        return super().__new__(cls, runs)

    @property
    def label(self) -> str:
        return self[0].label

    @property
    def seeds(self) -> list:
        return [getattr(getattr(r, "recipe", None), "seed", i) for i, r in enumerate(self)]

    def __repr__(self) -> str:
        return f"RunSet({self.label!r}, seeds={self.seeds})"

    def each(self, measure) -> list:
        """`measure(run)` for each seed's run, in seed order."""
        return [measure(run) for run in self]

    def mean(self, measure) -> float:
        """The mean over seeds of `measure(run)` (a number per run): what a table shows for the arm."""
        values = [float(v) for v in self.each(measure)]
        return math.fsum(values) / len(values)


def runset(value) -> RunSet:
    """A RunSet from a RunSet, a list of runs (one per seed) or a single Run (one seed), so code that
    summarises an arm takes either."""
    return value if isinstance(value, RunSet) else RunSet(value if isinstance(value, (list, tuple)) else [value])


def _without_units(value):
    """A measurement as the report keeps it: per-probe and per-window lists stay in the run store."""
    if isinstance(value, dict):
        return {k: _without_units(v) for k, v in value.items() if k not in ("per_probe", "per_window")}
    if isinstance(value, list):
        return [_without_units(v) for v in value]
    return value


# `model` is an init field (so `dataclasses.replace(run, model=...)` works) kept outside the
# dataclass's fields, so a released model can be rebuilt on first use.
Run.model = property(Run._get_model, Run._set_model)  # type: ignore[assignment]
