"""Calibration of class probabilities: ECE, MCE, Brier score, Acc@1 and reliability bins.

Sums and means run in float64. Bin membership is decided exactly as torchmetrics'
`multiclass_calibration_error` decides it, so ECE and MCE agree with it on every input:
`torch.bucketize(confidences, torch.linspace(0, 1, n_bins + 1), right=True) - 1`, with the
confidences and edges in float32 as torchmetrics has them. In words:

* bins are closed on the left and open on the right: bin i holds confidences in
  [i/n_bins, (i+1)/n_bins), so a confidence of exactly 0 goes to the first bin and one
  exactly on an inner edge goes to the bin above that edge;
* a confidence of exactly 1.0 lies past the last half-open bin and gets a bin of its own,
  [1, 1]: `reliability_bins` returns n_bins + 1 bins, the last one degenerate. Merging it
  into the top bin would change ECE whenever both hold samples.
* "exactly on an edge" is judged in float32, against torch's float32 linspace, whose
  edges are not all the nearest float32 to i/n_bins: with 15 bins, edges 3/15, 6/15 and
  7/15 sit one float32 step high, so a confidence of exactly 0.2 (uniform over 5 classes),
  0.4 or 7/15 falls in the bin *below* that edge, as it does in torchmetrics. Likewise a
  float64 confidence within float32 rounding of an edge is placed as its float32 value is.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch
from scipy import stats

DEFAULT_BINS = 15
PROB_TOL = 1e-5  # how far a row of probabilities may sum from 1 (float32 softmax rounding)


@dataclass(frozen=True)
class ReliabilityBin:
    """One bin of a reliability diagram; confidence and accuracy are None when it is empty."""

    lower: float
    upper: float
    count: int
    confidence: float | None  # mean confidence of the bin's samples
    accuracy: float | None  # fraction of the bin's samples predicted correctly


@dataclass(frozen=True)
class Calibration:
    ece: float  # Σ_bins (count / n) · |accuracy − confidence|
    mce: float  # max over non-empty bins of |accuracy − confidence|
    brier: float  # multiclass: mean over samples of Σ_c (p_c − onehot_c)², in [0, 2]
    acc1: float  # fraction of samples whose argmax is the label
    n: int
    n_bins: int  # as asked for; `bins` holds n_bins + 1 (the last is [1, 1])
    bins: tuple[ReliabilityBin, ...]

    def as_dict(self) -> dict:
        """JSON-ready: plain floats and ints, bins as a list of dicts."""
        out = asdict(self)
        out["bins"] = [asdict(b) for b in self.bins]
        return out


def _check_n_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    return n_bins


def _bin_index(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin of each confidence, 0..n_bins (n_bins only for 1.0), placed as torchmetrics places it.

    float32 on purpose: torchmetrics casts confidences to float32 and buckets them against a
    float32 linspace; the same comparison here makes the bins, and so ECE, identical.
    """
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32)
    return torch.bucketize(conf.to(torch.float32), edges, right=True) - 1


def reliability_bins(confidences, correct, n_bins: int = DEFAULT_BINS) -> tuple[ReliabilityBin, ...]:
    """Bin samples by confidence: n_bins equal-width bins [i/n, (i+1)/n), then [1, 1].

    `confidences`: [N] values in [0, 1]; `correct`: [N] booleans (or 0/1). A confidence of
    exactly 0 goes to the first bin, exactly 1.0 to the extra last bin; edges are judged as
    torchmetrics judges them (see the module docstring). Bin confidence and accuracy are
    float64 means; `lower`/`upper` are the nominal edges i/n.
    """
    n_bins = _check_n_bins(n_bins)
    conf = torch.as_tensor(confidences).detach().to(torch.float64).cpu()
    hits = torch.as_tensor(correct).detach().cpu()
    if conf.ndim != 1 or hits.ndim != 1:
        raise ValueError(f"confidences and correct must be 1-D, got shapes {tuple(conf.shape)} and {tuple(hits.shape)}")
    if conf.shape != hits.shape:
        raise ValueError(f"confidences and correct differ in length: {conf.numel()} vs {hits.numel()}")
    if conf.numel() == 0:
        raise ValueError("reliability bins need at least one sample, got empty input")
    if not torch.isfinite(conf).all() or conf.min() < 0 or conf.max() > 1:
        raise ValueError("confidences must be finite and lie in [0, 1]")
    if hits.dtype != torch.bool and not ((hits == 0) | (hits == 1)).all():
        raise ValueError("correct must hold booleans or 0/1 values")
    hits = hits.to(torch.float64)

    index = _bin_index(conf, n_bins)
    slots = n_bins + 1
    counts = torch.bincount(index, minlength=slots)
    conf_sum = torch.zeros(slots, dtype=torch.float64).scatter_add_(0, index, conf)
    hit_sum = torch.zeros(slots, dtype=torch.float64).scatter_add_(0, index, hits)

    bins = []
    for i, (count, c_sum, h_sum) in enumerate(zip(counts.tolist(), conf_sum.tolist(), hit_sum.tolist())):
        lower, upper = (i / n_bins, (i + 1) / n_bins) if i < n_bins else (1.0, 1.0)  # nominal edges
        if count:
            bins.append(ReliabilityBin(lower, upper, count, c_sum / count, h_sum / count))
        else:
            bins.append(ReliabilityBin(lower, upper, 0, None, None))
    return tuple(bins)


def ece_of_items(items, n_bins: int = DEFAULT_BINS) -> float:
    """ECE of rows (confidence, correct), binned exactly as `reliability_bins` bins them: a light
    form for resampling (a bootstrap computes it thousands of times)."""
    x = np.asarray(items, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2 or len(x) == 0:
        raise ValueError(f"items must be rows of (confidence, correct), got shape {x.shape}")
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32).numpy()
    index = np.searchsorted(edges, x[:, 0].astype(np.float32), side="right") - 1  # bucketize(right=True)
    gaps = np.bincount(index, weights=x[:, 0] - x[:, 1], minlength=n_bins + 1)
    return float(np.abs(gaps).sum() / len(x))


def ece_interval(confidences, correct, n_bins: int = DEFAULT_BINS, confidence: float = 0.95,
                 resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """BCa bootstrap interval of ECE over predictions (ECE is biased upward under resampling,
    which BCa corrects; percentile where BCa is not finite). The resamples are scipy.stats.bootstrap's
    own draws, `default_rng(seed).integers(0, n, (batch, n))`, binned all at once here; the bias
    correction and acceleration are scipy's. The same seed gives the same interval."""
    n_bins = _check_n_bins(n_bins)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    items = np.column_stack([np.asarray(confidences, dtype=np.float64), np.asarray(correct, dtype=np.float64)])
    n = len(items)
    if n == 0:
        raise ValueError("ECE needs at least one prediction, got none")
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32).numpy()
    index = np.searchsorted(edges, items[:, 0].astype(np.float32), side="right") - 1  # as ece_of_items bins them
    gaps, slots = items[:, 0] - items[:, 1], n_bins + 1
    rng, batch = np.random.default_rng(seed), max(1, (1 << 22) // n)  # a bounded index matrix per batch
    eces = np.empty(resamples)
    for start in range(0, resamples, batch):
        draws = rng.integers(0, n, (min(batch, resamples - start), n))
        flat = (np.arange(len(draws))[:, None] * slots + index[draws]).ravel()
        sums = np.bincount(flat, weights=gaps[draws].ravel(), minlength=len(draws) * slots)
        eces[start:start + len(draws)] = np.abs(sums.reshape(len(draws), slots)).sum(axis=1) / n

    def ece(i):
        return ece_of_items(items[np.asarray(i, dtype=int)], n_bins)

    if n < 2 or np.ptp(eces) == 0:
        value = ece(np.arange(n))
        return value, value  # every resample alike (one prediction, or all in one state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a degenerate BCa warns; the percentile interval is the fallback
        found = stats.bootstrap((np.arange(n),), ece, n_resamples=0, vectorized=False, method="BCa",
                                bootstrap_result=SimpleNamespace(bootstrap_distribution=eces),
                                confidence_level=confidence).confidence_interval
    if np.isfinite(found.low) and np.isfinite(found.high):
        return float(found.low), float(found.high)
    tail = (1 - confidence) / 2
    return tuple(float(v) for v in np.quantile(eces, [tail, 1 - tail]))


def probs_from_logits(logits) -> torch.Tensor:
    """Softmax over the last dimension, in float64."""
    x = torch.as_tensor(logits).detach()
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty last (class) dimension, got shape {tuple(x.shape)}")
    return torch.softmax(x.to(torch.float64), dim=-1)


def _check_probs_labels(probs, labels) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(probs).detach().cpu()
    y = torch.as_tensor(labels).detach().cpu()
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, C] class probabilities, got shape {tuple(p.shape)}")
    if y.ndim != 1:
        raise ValueError(f"labels must be [N] class indices, got shape {tuple(y.shape)}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"probs and labels differ in N: {p.shape[0]} vs {y.shape[0]}")
    if p.shape[0] == 0:
        raise ValueError("calibration needs at least one sample, got empty input")
    if p.shape[1] < 2:
        raise ValueError(f"probs need at least 2 classes, got {p.shape[1]}")
    if not p.is_floating_point():
        raise ValueError(f"probs must be floating point, got {p.dtype}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {y.dtype}")
    p = p.to(torch.float64)
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError("probs must be finite and non-negative (pass logits through probs_from_logits)")
    worst = (p.sum(dim=1) - 1).abs().max().item()
    if worst > PROB_TOL:
        raise ValueError(f"probs rows must sum to 1 (within {PROB_TOL}); the worst row is off by {worst:.3g}")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must lie in [0, {p.shape[1] - 1}], got range [{y.min().item()}, {y.max().item()}]")
    return p, y.long()


def calibration(probs, labels, n_bins: int = DEFAULT_BINS) -> Calibration:
    """ECE, MCE, multiclass Brier and Acc@1 of [N, C] probabilities against [N] labels.

    Confidence is the max probability, the prediction its argmax (the first index on ties,
    as torch.max), correct = prediction == label. Binning: see `reliability_bins`.
    Brier is the multiclass form Σ_c (p_c − onehot_c)², averaged over samples, in [0, 2];
    for two classes it is twice sklearn's binary `brier_score_loss`.
    """
    p, y = _check_probs_labels(probs, labels)
    confidence, prediction = p.max(dim=1)
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(torch.float64)
    return calibration_from_predictions(confidence, prediction == y, ((p - onehot) ** 2).sum(dim=1), n_bins)


def calibration_from_predictions(confidences, correct, brier_terms, n_bins: int = DEFAULT_BINS) -> Calibration:
    """The same measures from per-prediction summaries: max probability, whether the argmax was
    right, and each row's Brier term Σ_c (p_c − onehot_c)². For language models, where a
    [tokens, vocabulary] probability matrix would not fit, the caller reduces each row first."""
    n_bins = _check_n_bins(n_bins)
    conf = torch.as_tensor(confidences, dtype=torch.float64).flatten()
    hit = torch.as_tensor(correct).flatten().bool()
    brier = torch.as_tensor(brier_terms, dtype=torch.float64).flatten()
    if not (conf.numel() == hit.numel() == brier.numel()) or conf.numel() == 0:
        raise ValueError(f"need the same non-zero number of confidences, correct flags and Brier terms, "
                         f"got {conf.numel()}, {hit.numel()}, {brier.numel()}")
    bins = reliability_bins(conf.clamp(max=1.0), hit, n_bins)
    gaps = [(b.count, abs(b.accuracy - b.confidence)) for b in bins if b.count]
    return Calibration(ece=sum(c * g for c, g in gaps) / conf.numel(), mce=max(g for _, g in gaps),
                       brier=brier.mean().item(), acc1=hit.to(torch.float64).mean().item(),
                       n=conf.numel(), n_bins=n_bins, bins=bins)
