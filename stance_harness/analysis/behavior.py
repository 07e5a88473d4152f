"""Behaviour measures: KL between output distributions, bootstrap effects, markers, token log-probs.

Everything numeric runs in float64, so that small effects are not rounding noise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

from stance_harness.analysis.paired import mean_interval

IGNORE_INDEX = -100  # the label value transformers uses for "no loss here"


def kl_divergence(p_logits, q_logits) -> torch.Tensor:
    """KL(P‖Q) over the last dimension, per position, from logits (float64).

    P = softmax(p_logits), Q = softmax(q_logits). Classes where P is 0 contribute 0;
    where P > 0 and Q is 0 the result is inf.
    """
    p_x = torch.as_tensor(p_logits).detach()
    q_x = torch.as_tensor(q_logits).detach()
    if p_x.shape != q_x.shape:
        raise ValueError(f"p_logits and q_logits must have the same shape, got {tuple(p_x.shape)} and {tuple(q_x.shape)}")
    if p_x.ndim < 1 or p_x.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty last (vocabulary) dimension, got shape {tuple(p_x.shape)}")
    log_p = torch.log_softmax(p_x.to(torch.float64), dim=-1)
    log_q = torch.log_softmax(q_x.to(torch.float64, copy=False).to(log_p.device), dim=-1)
    p = log_p.exp()
    # 0 · log(0 / q) = 0; without the where, -inf - -inf would make it NaN
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    # KL >= 0 exactly, but the sum of float terms can land at -1e-17 when P ≈ Q
    return terms.sum(dim=-1).clamp_min(0.0)


@dataclass(frozen=True)
class Effect:
    """A mean with a bootstrap interval of that mean (see `bootstrap_interval`)."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float
    values: tuple[float, ...]

    def as_dict(self) -> dict:
        out = asdict(self)
        out["values"] = list(self.values)
        return out


def _as_values(values) -> torch.Tensor:
    x = torch.as_tensor(values if isinstance(values, torch.Tensor) else list(values), dtype=torch.float64)
    x = x.detach().cpu()
    if x.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError("values are empty: an effect needs at least one value")
    if not torch.isfinite(x).all():
        raise ValueError("values must be finite (no NaN or inf)")
    return x


def _check_bootstrap_args(confidence: float, resamples: int) -> None:
    if not (0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be an integer >= 1, got {resamples!r}")


def bootstrap_interval(values, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the mean of `values`; the same seed gives the same interval.

    scipy.stats.bootstrap's BCa interval, or its percentile interval of the same resamples where
    BCa is non-finite (see `paired.mean_interval`). One value, or all values equal, gives (v, v).
    """
    _check_bootstrap_args(confidence, resamples)
    x = _as_values(values)
    iv = mean_interval(x.numpy(), confidence=confidence, resamples=resamples, seed=seed)
    return iv.low, iv.high


def effect_of(values, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> Effect:
    """Mean of `values` with its bootstrap interval (see `bootstrap_interval`)."""
    _check_bootstrap_args(confidence, resamples)
    x = _as_values(values)
    low, high = bootstrap_interval(x, confidence, resamples, seed)
    constant = bool((x == x[0]).all())  # the exact value, not a sum / n that is off by an ulp
    mean = x[0].item() if constant else x.mean().item()
    return Effect(mean=mean, low=low, high=high, n=x.numel(), confidence=confidence, values=tuple(x.tolist()))


_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'"})  # ’ and ‘, as typed by models and word processors
_SPACE = re.compile(r"\s+")


def _normalise(text: str) -> str:
    return _SPACE.sub(" ", text.translate(_APOSTROPHES).casefold())


def _normalised_markers(markers) -> list[str]:
    if isinstance(markers, str):
        markers = [markers]  # one marker, not its characters
    out = [_normalise(m) for m in markers]
    if not out:
        raise ValueError("markers are empty: give at least one marker phrase")
    if any(not m.strip() for m in out):
        raise ValueError("markers must not be blank: a blank marker would match every text")
    return out


def contains_marker(text: str, markers: str | Iterable[str]) -> bool:
    """Whether `text` contains any marker: case-insensitive, ’ ‘ read as ', runs of whitespace as one space."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    norm = _normalise(text)
    return any(m in norm for m in _normalised_markers(markers))


def marker_rate(texts: Sequence[str], markers: str | Iterable[str]) -> float:
    """Fraction of `texts` that contain a marker (see `contains_marker`)."""
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError("texts are empty: a marker rate needs at least one text")
    norm_markers = _normalised_markers(markers)
    for t in texts:
        if not isinstance(t, str):
            raise ValueError(f"texts must all be str, got {type(t).__name__}")
    hits = sum(any(m in _normalise(t) for m in norm_markers) for t in texts)
    return hits / len(texts)


def mean_token_logprob(logits, targets, mask=None) -> torch.Tensor:
    """Per-sequence mean log-probability of `targets` under `logits`, float64, shape [B].

    `logits` [B, T, V], `targets` [B, T]: logits at position t score targets[t]. The caller
    does the causal shift (logits[:, :-1] against input_ids[:, 1:]). Positions where `mask`
    is 0 or the target is -100 are left out; a sequence with none left gives NaN.
    """
    x = torch.as_tensor(logits).detach()
    t = torch.as_tensor(targets).detach().to(x.device)
    if x.ndim != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(x.shape)}")
    if t.shape != x.shape[:2]:
        raise ValueError(f"targets must be [B, T] = {tuple(x.shape[:2])}, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got {t.dtype}")
    keep = t != IGNORE_INDEX
    if mask is not None:
        m = torch.as_tensor(mask).detach().to(x.device)
        if m.shape != t.shape:
            raise ValueError(f"mask must be [B, T] = {tuple(t.shape)}, got shape {tuple(m.shape)}")
        keep = keep & (m != 0)
    vocab = x.shape[-1]
    kept = t[keep]
    if kept.numel() and (kept.min() < 0 or kept.max() >= vocab):
        raise ValueError(f"targets must be token ids in [0, {vocab - 1}] (or -100 to ignore)")
    log_p = torch.log_softmax(x.to(torch.float64), dim=-1)
    picked = log_p.gather(-1, torch.where(keep, t, 0).long().unsqueeze(-1)).squeeze(-1)
    picked = torch.where(keep, picked, torch.zeros_like(picked))
    count = keep.sum(dim=1).to(torch.float64)
    return picked.sum(dim=1) / count  # 0 / 0 = NaN for a sequence with nothing to score


def replies_in_order(rows: list[dict]) -> list[dict]:
    """Reply rows (see Run.replies) with the probes that moved most first: those whose reply changed,
    then by the size of their loglik-margin change; ties keep probe order."""
    return sorted(rows, key=lambda r: (not r["changed"], -abs(r["margin_change"])))
