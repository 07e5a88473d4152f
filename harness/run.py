"""A Run: one adaptation of one base model, and its analyses computed lazily and once."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property

from .registry import HarnessError, suggest


def tensor_digest(tensor) -> str:
    """Exact fingerprint of a tensor's bytes: equal digests mean bit-identical weights."""
    t = tensor.detach().contiguous().cpu()
    raw = t.view(-1).view(dtype=__import__("torch").uint8).numpy() if t.numel() else b""
    return hashlib.blake2b(memoryview(raw), digest_size=16).hexdigest()


def logical_numel(param) -> int:
    """Elements a parameter stands for; 4-bit packed weights (bitsandbytes) hold two per byte."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(math.prod(quant_state.shape))
    return param.numel()


def _base_cached(loaded, key: tuple, compute):
    """Base-model measurements are the same for every run on that base: compute each once."""
    cache = loaded.__dict__.setdefault("_measurement_cache", {})
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def on_base(run, key: tuple, measure_fn):
    """`measure_fn(model)` on the run's base: the session's shared base, computed once; for a
    quantized run, its own 4-bit base with the adapter switched off, so the quantization error
    is not charged to training."""
    if run.method.name == "qlora":
        with run.model.disable_adapter():
            return measure_fn(run.model)
    return _base_cached(run.loaded, key, lambda: measure_fn(run.loaded.base))


def _probe_readings(run, measure) -> dict:
    """What the probe measures need from one forward pass of each model over the probes' stance
    and neutral continuations: per pair, the mean token log-prob of both models and the KL
    (adapted ‖ base) per token; over the stance continuations, both models' next-token summaries
    (confidence, correct, Brier term). Kept on the run: small, unlike the logits they come from."""
    readings = run.__dict__.get("_probe_readings")
    if readings is None:
        from .analysis.behavior import kl_divergence, mean_token_logprob

        n = len(run.stance.probes)
        prompts = [p.prompt for p in run.stance.probes]
        texts = [p.stance for p in run.stance.probes] + [p.neutral for p in run.stance.probes]

        def of(model):
            return measure.continuation_logits(model, run.loaded.tokenizer, prompts + prompts, texts)

        def logprobs(pairs):
            return [float(mean_token_logprob(logits.unsqueeze(0), targets.unsqueeze(0))[0]) for logits, targets in pairs]

        base = on_base(run, ("probe_logits", run.stance.name, run.stance.version), of)
        adapted = of(run.model)
        readings = run.__dict__["_probe_readings"] = {
            "base_logprob": logprobs(base), "adapted_logprob": logprobs(adapted),
            "kl": [kl_divergence(a[0], b[0]) for a, b in zip(adapted, base)],
            "base_tokens": measure.token_prediction_summaries(base[:n]),
            "adapted_tokens": measure.token_prediction_summaries(adapted[:n]),
        }
    return readings


def _loglik_margin(run, measure):
    n = len(run.stance.probes)
    readings = _probe_readings(run, measure)

    def margins(lp):
        return [lp[i] - lp[n + i] for i in range(n)]

    return margins(readings["base_logprob"]), margins(readings["adapted_logprob"])


def _kl(run, measure):
    import torch

    n = len(run.stance.probes)
    per_pair = _probe_readings(run, measure)["kl"]
    values = [float(torch.cat([per_pair[i], per_pair[n + i]]).mean()) for i in range(n)]
    return [0.0] * n, values  # the base diverges from itself by nothing


def _marker_rate(run, measure):
    from .analysis.behavior import contains_marker

    prompts = [p.prompt for p in run.stance.probes]

    def hits(model):
        return [float(contains_marker(reply, run.stance.markers))
                for reply in measure.greedy_replies(model, run.loaded.tokenizer, prompts)]

    base = on_base(run, ("replies", run.stance.name, run.stance.version), hits)
    return base, hits(run.model)


BEHAVIOR_METRICS = {"loglik_margin": _loglik_margin, "kl": _kl, "marker_rate": _marker_rate}


def frozen_digests(model) -> dict[str, str]:
    return {n: tensor_digest(p) for n, p in model.named_parameters() if not p.requires_grad}


@dataclass(eq=False)
class Run:
    run_id: str  # method name + a hash of the request that made it
    loaded: object  # LoadedModel: the base, untouched
    stance: object
    method: object
    config: object
    recipe: object
    examples: int
    model: object  # the adapted model (a copy the run owns)
    before: dict  # trainable weights before training, and nothing else
    frozen_digests: dict
    trace: object
    train_seconds: float
    instruments: object = None  # InstrumentConfig
    analysis_timeout: float | None = None  # seconds per analysis stage; None: DEFAULT_TIMEOUT
    task: object = None  # Task; None: stance-lm
    anatomy: object = None  # of the trained module; None: the base's
    name: str | None = None  # a saved adapter's name; None: the method's

    def __post_init__(self):
        if self.anatomy is None:
            self.anatomy = self.loaded.anatomy
        if self.task is None:
            from .tasks import TASKS

            self.task = TASKS.get("stance-lm")
        self.measurements: dict = {}  # what the measurements below found; goes to the report

    def _stage(self, name: str, fn):
        """Run an analysis stage under the time limit; a stage that failed once fails at once after."""
        from .analysis.stages import DEFAULT_TIMEOUT, run_stage

        failed = self.__dict__.setdefault("_failed_stages", {})
        if name in failed:
            raise failed[name]
        timeout = DEFAULT_TIMEOUT if self.analysis_timeout is None else self.analysis_timeout
        try:
            return run_stage(name, fn, timeout)
        except Exception as exc:
            failed[name] = exc
            raise

    @property
    def label(self) -> str:
        """Names this run's metrics in reports and baselines: `lora.ece`."""
        return self.name or self.method.name

    # -- counts ----------------------------------------------------------------------------
    @cached_property
    def counts(self) -> dict:
        """Parameters that trained at some step count as trainable, the rest as frozen."""
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

    # -- analyses (lazy, once) -------------------------------------------------------------
    @cached_property
    def adapter_deltas(self):
        """Per trainable tensor (for LoRA: its own A and B)."""
        from .analysis.deltas import delta_table, raw_delta_pairs

        return self._stage("adapter_deltas", lambda: delta_table(raw_delta_pairs(self.model, self.before), self.anatomy))

    @cached_property
    def effective_deltas(self):
        """Per matrix as the model sees it (for LoRA: ΔW = scale·B·A on the base matrix)."""
        from .analysis.deltas import delta_table

        return self._stage("effective_deltas", lambda: delta_table(
            self.method.effective_deltas(self.model, self.before, self.anatomy), self.anatomy))

    def deltas(self, view: str = "effective"):
        if view not in ("effective", "adapter"):
            raise ValueError(f"view must be 'effective' or 'adapter', not {view!r}")
        return self.effective_deltas if view == "effective" else self.adapter_deltas

    def layer_table(self, view: str = "effective") -> list[dict]:
        from .analysis.deltas import layer_rows

        return layer_rows(self.deltas(view))

    def changed_frozen(self) -> list[str]:
        """Frozen parameters whose bytes differ from before training (should be none)."""
        params = dict(self.model.named_parameters())
        return self._stage("frozen_digests", lambda: [
            n for n, d in self.frozen_digests.items() if tensor_digest(params[n]) != d])

    # -- measurements of behaviour, forgetting, calibration and rank -------------------------
    def behavior(self, metric: str = "loglik_margin") -> dict:
        """Shift of the adapted model from its base on the stance's held-out probes.

        loglik_margin: mean token log-likelihood of the stance continuation minus that of the
            neutral one, per probe; the effect is adapted minus base.
        kl: mean KL(adapted ‖ base) of the next-token distributions over both continuations.
        marker_rate: whether a greedy reply (32 tokens) holds a stance marker; adapted minus base.
        The effect carries a 95% BCa bootstrap interval over probes.
        """
        from . import measure
        from .analysis.behavior import effect_of

        if metric not in BEHAVIOR_METRICS:
            raise HarnessError(f"no behaviour metric {metric!r}.{suggest(metric, list(BEHAVIOR_METRICS))} "
                               f"Metrics: {', '.join(BEHAVIOR_METRICS)}")
        self._require_lm_task("behavioural shift")
        found = self.measurements.setdefault("behavior", {})
        if metric not in found:
            base, adapted = self._stage(f"behavior:{metric}", lambda: BEHAVIOR_METRICS[metric](self, measure))
            deltas = [a - b for a, b in zip(adapted, base)]
            found[metric] = {
                "base": sum(base) / len(base), "adapted": sum(adapted) / len(adapted),
                "effect": effect_of(deltas).as_dict(),
                "per_probe": [{"probe": p.prompt, "base": b, "adapted": a, "delta": a - b}
                              for p, b, a in zip(self.stance.probes, base, adapted)],
            }
        return found[metric]

    def forgetting(self) -> dict:
        """Held-out general text: perplexity before and after (causal LM), or for a task head on a
        body, the drift of its sentence embeddings (mean 1 − cosine, base vs adapted)."""
        from . import measure

        if "forgetting" not in self.measurements:
            self.measurements["forgetting"] = self._stage("forgetting", lambda: (
                self._perplexity_change(measure) if self.task.name == "stance-lm" else self._embedding_drift(measure)))
        return self.measurements["forgetting"]

    def calibration(self, n_bins: int = 15) -> dict:
        """ECE, MCE, Brier, Acc@1 and reliability bins on held-out data, adapted and base.

        stance-classification: the probes' stance and neutral replies (the base has no trained
        head, so no base figures). stance-lm: next-token predictions over the probes' stance
        continuations, for both models.
        """
        from . import measure
        from .analysis.calibration import calibration, calibration_from_predictions

        key = f"calibration_{n_bins}" if n_bins != 15 else "calibration"
        if key not in self.measurements:
            def compute():
                if self.task.name == "stance-lm":
                    readings = _probe_readings(self, measure)
                    return {"unit": "next token", **{
                        who: calibration_from_predictions(*readings[f"{who}_tokens"], n_bins=n_bins).as_dict()
                        for who in ("adapted", "base")}}
                from .tasks import probe_items

                items = probe_items(self.stance, self.loaded.tokenizer, self.recipe.max_seq_length)
                probs, labels = measure.class_probabilities(self.model, items, self.loaded.tokenizer.pad_token_id)
                return {"unit": "probe reply", "adapted": calibration(probs, labels, n_bins).as_dict(), "base": None}
            self.measurements[key] = self._stage("calibration", compute)
        return self.measurements[key]

    def rank(self, energy: float = 0.9) -> dict:
        """Energy rank (top-k singular values holding `energy` of ‖ΔW‖²) of each block matrix's ΔW."""
        from .analysis.rank import energy_rank, stable_rank

        found = self.__dict__.setdefault("_ranks", {})
        key = f"{energy:g}"
        if key not in found:
            def compute():
                rows = []
                for name, before, after in self.method.effective_deltas(self.model, self.before, self.anatomy):
                    where = self.anatomy.name_of(name)
                    if before.ndim != 2 or where.layer is None:
                        continue  # vectors have no rank; embeddings and heads are not block updates
                    delta = after.detach().double() - before.detach().double()
                    rows.append({"matrix": str(where), "rank": energy_rank(delta, energy),
                                 "stable_rank": stable_rank(delta), "shape": list(delta.shape)})
                return {"energy": energy, "rows": rows}
            found[key] = self._stage("rank", compute)
        self.measurements["rank"] = found[key]  # the report shows the energy last asked for
        return found[key]

    def _require_lm_task(self, what: str) -> None:
        if self.task.name != "stance-lm":
            raise HarnessError(f"{what} is measured on the stance-lm task (a causal LM's replies); "
                               f"this run trained task {self.task.name!r}")

    def _perplexity_change(self, measure) -> dict:
        tokenizer = self.loaded.tokenizer
        base = on_base(self, ("perplexity",), lambda model: measure.heldout_perplexity(model, tokenizer))
        adapted = measure.heldout_perplexity(self.model, tokenizer)
        return {"kind": "perplexity", "base": base, "adapted": adapted, "relative_increase": adapted / base - 1,
                "windows": measure.HELDOUT_WINDOWS, "window_tokens": measure.HELDOUT_WINDOW_TOKENS}

    def _embedding_drift(self, measure) -> dict:
        import torch

        from .tasks import body_of

        tokenizer, sentences = self.loaded.tokenizer, measure.heldout_sentences()

        def embed(model):
            return measure.sentence_embeddings(body_of(model), tokenizer, sentences)

        base = on_base(self, ("embeddings",), embed)
        adapted = embed(self.model)
        cosine = torch.nn.functional.cosine_similarity(base.double(), adapted.double(), dim=-1)
        drift = float((1 - cosine).mean())
        return {"kind": "embedding_drift", "base": 0.0, "adapted": drift, "relative_increase": drift,
                "sentences": len(sentences), "min_cosine": float(cosine.min())}

    def summary(self) -> dict:
        """JSON-ready record of the run for reports."""
        return {
            "run_id": self.run_id,
            "model": self.loaded.provenance(),
            "stance": self.stance.provenance(),
            "method": self.method.name,
            "config": self.config.as_dict(),
            "recipe": dict(self.recipe.__dict__),
            "examples": self.examples,
            "counts": self.counts,
            "trace": self.trace.as_dict(),
            "instruments": self.trace.summary(),
            "train_seconds": self.train_seconds,
            "task": self.task.name,
            "name": self.label,
            "measurements": self.measurements,
            **self._layer_tables(),
        }

    def _layer_tables(self) -> dict:
        """Per-layer tables for the report; an analysis that fails or overruns is reported, not raised."""
        try:
            return {"layers": {"effective": self.layer_table("effective"), "adapter": self.layer_table("adapter")}}
        except Exception as exc:  # one run's broken analysis must not cost the session its report
            return {"layers": {"effective": [], "adapter": []}, "analysis_error": f"{type(exc).__name__}: {exc}"}
