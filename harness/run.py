"""A Run: one adaptation of one base model, and its analyses computed lazily and once."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property


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
    def anatomy(self):
        return self.loaded.anatomy

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
            "params_per_example": trainable / self.examples,
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
            **self._layer_tables(),
        }

    def _layer_tables(self) -> dict:
        """Per-layer tables for the report; an analysis that fails or overruns is reported, not raised."""
        try:
            return {"layers": {"effective": self.layer_table("effective"), "adapter": self.layer_table("adapter")}}
        except Exception as exc:  # one run's broken analysis must not cost the session its report
            return {"layers": {"effective": [], "adapter": []}, "analysis_error": f"{type(exc).__name__}: {exc}"}
