"""Calibration, behaviour and rank metrics against references: torchmetrics, sklearn, torch, hand computation."""

import json
import math

import pytest
import torch
from sklearn.metrics import brier_score_loss
from torchmetrics.functional.classification import multiclass_calibration_error

from stance_harness.analysis.behavior import (
    bootstrap_interval,
    contains_marker,
    effect_of,
    kl_divergence,
    marker_rate,
    mean_token_logprob,
)
from stance_harness.analysis.calibration import (
    DEFAULT_BINS,
    calibration,
    calibration_from_predictions,
    probs_from_logits,
    reliability_bins,
)
from stance_harness.analysis.rank import energy_rank, singular_values, stable_rank


def _reference(probs, labels, norm, n_bins=DEFAULT_BINS):
    return multiclass_calibration_error(probs, labels, num_classes=probs.shape[1], n_bins=n_bins, norm=norm).item()


def _row(confidence, num_classes):
    """A probability row whose max is `confidence` (class 0), the rest spread evenly."""
    rest = (1 - confidence) / (num_classes - 1)
    return [confidence] + [rest] * (num_classes - 1)


# -- calibration against torchmetrics ---------------------------------------------------

@pytest.mark.parametrize("num_classes", [2, 5, 10])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ece_and_mce_match_torchmetrics_on_random_inputs(seed, num_classes):
    g = torch.Generator().manual_seed(seed)
    scale = [0.5, 2.0, 8.0, 40.0][seed]  # from near-uniform to many confidences of exactly 1.0
    probs = probs_from_logits(scale * torch.randn(600, num_classes, generator=g, dtype=torch.float64))
    if seed % 2:
        labels = torch.multinomial(probs, 1, generator=g).squeeze(1)  # roughly calibrated
    else:
        labels = torch.randint(num_classes, (600,), generator=g)  # overconfident
    got = calibration(probs, labels)
    assert got.ece == pytest.approx(_reference(probs, labels, "l1"), abs=1e-6)
    assert got.mce == pytest.approx(_reference(probs, labels, "max"), abs=1e-6)
    assert got.n == 600 and got.n_bins == DEFAULT_BINS


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("edge", range(1, DEFAULT_BINS + 1))  # 0 cannot be a max probability
def test_ece_matches_torchmetrics_with_confidences_exactly_on_bin_edges(edge, dtype):
    confidence = edge / DEFAULT_BINS
    num_classes = 2 if confidence > 0.5 else 10 if confidence >= 0.1 else 20  # max prob >= 1 / C
    # Neighbours just above and below the edge, with other outcomes: ECE changes with the
    # side the edge sample is put on, so a wrong convention shows.
    above = min(confidence + 0.01, 1.0) if edge < DEFAULT_BINS else 0.995
    below = max(confidence - 0.01, 1 / num_classes)
    probs = torch.tensor([_row(c, num_classes) for c in (confidence, above, below, confidence)], dtype=dtype)
    labels = torch.tensor([0, 1, 0, 0])
    got = calibration(probs, labels)
    assert got.ece == pytest.approx(_reference(probs, labels, "l1"), abs=1e-6)
    assert got.mce == pytest.approx(_reference(probs, labels, "max"), abs=1e-6)


def test_binary_confidences_of_one_half_match_torchmetrics():
    # ties: argmax takes the first class, as torch.max does
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.52, 0.48], [0.48, 0.52]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0, 0])
    got = calibration(probs, labels)
    assert got.ece == pytest.approx(_reference(probs, labels, "l1"), abs=1e-6)
    assert got.mce == pytest.approx(_reference(probs, labels, "max"), abs=1e-6)
    assert got.acc1 == pytest.approx(2 / 5)


def test_confidence_of_exactly_one_gets_its_own_bin():
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.95, 0.05]], dtype=torch.float64)
    labels = torch.tensor([1, 0, 0])
    got = calibration(probs, labels)
    # [1, 1]: 2 samples, confidence 1, accuracy 1/2; [14/15, 1): 1 sample at 0.95, correct.
    # Merged into one bin the ECE would be |2/3 - 2.95/3| = 0.3167 instead.
    assert got.ece == pytest.approx(2 / 3 * 0.5 + 1 / 3 * 0.05)
    assert got.mce == pytest.approx(0.5)
    assert got.ece == pytest.approx(_reference(probs, labels, "l1"), abs=1e-6)
    last, top = got.bins[-1], got.bins[-2]
    assert (last.lower, last.upper, last.count, last.confidence, last.accuracy) == (1.0, 1.0, 2, 1.0, 0.5)
    assert top.count == 1 and top.confidence == pytest.approx(0.95)


# -- Brier, Acc@1 and bins by hand --------------------------------------------------------

def test_binary_brier_is_twice_sklearns():
    g = torch.Generator().manual_seed(7)
    p1 = torch.rand(200, generator=g, dtype=torch.float64)
    y = torch.randint(2, (200,), generator=g)
    probs = torch.stack([1 - p1, p1], dim=1)
    # multiclass Brier sums both classes: (p0 - [y=0])² + (p1 - [y=1])², and since
    # p0 = 1 - p1 the two terms are equal; sklearn's binary score counts one of them.
    expected = brier_score_loss(y.numpy(), p1.numpy())
    assert calibration(probs, y).brier == pytest.approx(2 * expected, rel=1e-12)


def test_multiclass_brier_and_acc1_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.3, 0.3, 0.4]])
    labels = torch.tensor([0, 2, 1])
    got = calibration(probs, labels)
    # (0.3² + 0.2² + 0.1²) + (0.1² + 0.5² + 0.6²) + (0.3² + 0.7² + 0.4²) = 0.14 + 0.62 + 0.74
    assert got.brier == pytest.approx(1.5 / 3, abs=1e-7)  # float32 input
    assert got.acc1 == pytest.approx(1 / 3)  # only the first argmax is right


def test_reliability_bins_acc1_ece_and_mce_by_hand():
    probs = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.2, 0.8], [0.9, 0.1], [1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0, 1])  # right, wrong, right, right, wrong
    got = calibration(probs, labels, n_bins=4)
    counts = [b.count for b in got.bins]
    assert counts == [0, 0, 2, 2, 1]  # [0,.25) [.25,.5) [.5,.75) [.75,1) [1,1]
    assert [(b.lower, b.upper) for b in got.bins] == [(0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0), (1.0, 1.0)]
    assert got.bins[0].confidence is None and got.bins[0].accuracy is None
    assert got.bins[2].confidence == pytest.approx(0.65) and got.bins[2].accuracy == pytest.approx(0.5)
    assert got.bins[3].confidence == pytest.approx(0.85) and got.bins[3].accuracy == pytest.approx(1.0)
    assert got.bins[4].confidence == pytest.approx(1.0) and got.bins[4].accuracy == pytest.approx(0.0)
    assert got.acc1 == pytest.approx(3 / 5)
    assert got.ece == pytest.approx((2 * 0.15 + 2 * 0.15 + 1 * 1.0) / 5)
    assert got.mce == pytest.approx(1.0)
    assert got.ece == pytest.approx(_reference(probs, labels, "l1", n_bins=4), abs=1e-6)


def test_reliability_bins_put_edges_in_the_bin_above():
    bins = reliability_bins(torch.tensor([0.0, 0.25, 0.5, 0.74, 0.75, 1.0]), torch.tensor([1, 0, 1, 1, 0, 1]), 4)
    assert [b.count for b in bins] == [1, 1, 2, 1, 1]
    assert bins[2].confidence == pytest.approx(0.62) and bins[2].accuracy == pytest.approx(1.0)


def test_calibration_as_dict_is_json_ready():
    got = calibration(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0]), n_bins=3)
    data = json.loads(json.dumps(got.as_dict()))
    assert data["n"] == 2 and data["n_bins"] == 3 and len(data["bins"]) == 4
    assert data["bins"][0] == {"lower": 0.0, "upper": 1 / 3, "count": 0, "confidence": None, "accuracy": None}


def test_calibration_from_per_row_summaries_equals_calibration():
    g = torch.Generator().manual_seed(4)
    probs = probs_from_logits(3 * torch.randn(300, 6, generator=g, dtype=torch.float64))
    labels = torch.randint(6, (300,), generator=g)
    confidence, prediction = probs.max(dim=1)
    p_label = probs.gather(1, labels[:, None]).squeeze(1)
    brier_terms = (probs * probs).sum(1) - 2 * p_label + 1  # Σ_c (p_c − y_c)² without a one-hot
    direct = calibration(probs, labels, n_bins=10)
    summary = calibration_from_predictions(confidence, prediction == labels, brier_terms, n_bins=10)
    for key in ("ece", "mce", "brier", "acc1", "n", "n_bins"):
        assert getattr(summary, key) == pytest.approx(getattr(direct, key), abs=1e-12), key
    assert summary.bins == direct.bins


def test_probs_from_logits_is_float64_softmax():
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float32)
    probs = probs_from_logits(logits)
    assert probs.dtype == torch.float64
    assert probs.tolist()[0] == pytest.approx([0.25, 0.75], abs=1e-7)


@pytest.mark.parametrize("probs, labels, n_bins, message", [
    (torch.tensor([[0.5, 0.5]]), torch.tensor([0, 1]), 15, "differ in N"),
    (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 15, "empty"),
    (torch.tensor([[0.6, 0.6]]), torch.tensor([0]), 15, "sum to 1"),
    (torch.tensor([[1.2, -0.2]]), torch.tensor([0]), 15, "non-negative"),
    (torch.tensor([0.5, 0.5]), torch.tensor([0]), 15, r"\[N, C\]"),
    (torch.tensor([[0.5, 0.5]]), torch.tensor([2]), 15, r"labels must lie in \[0, 1\]"),
    (torch.tensor([[0.5, 0.5]]), torch.tensor([0.0]), 15, "integer class indices"),
    (torch.tensor([[0.5, 0.5]]), torch.tensor([0]), 0, "n_bins must be an integer >= 1"),
    (torch.tensor([[0.5, 0.5]]), torch.tensor([0]), 2.5, "n_bins must be an integer >= 1"),
])
def test_calibration_rejects_bad_input(probs, labels, n_bins, message):
    with pytest.raises(ValueError, match=message):
        calibration(probs, labels, n_bins=n_bins)


def test_reliability_bins_reject_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        reliability_bins(torch.tensor([0.5, 0.6]), torch.tensor([1]), 15)
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        reliability_bins(torch.tensor([1.5]), torch.tensor([1]), 15)
    with pytest.raises(ValueError, match="0/1"):
        reliability_bins(torch.tensor([0.5]), torch.tensor([2]), 15)


# -- KL -----------------------------------------------------------------------------------

def test_kl_by_hand():
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    q = torch.tensor([0.25, 0.75], dtype=torch.float64)
    # softmax(log p) = p, so log-probabilities serve as logits
    got = kl_divergence(p.log(), q.log())
    assert got.item() == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), rel=1e-12)
    reverse = kl_divergence(q.log(), p.log())
    assert reverse.item() == pytest.approx(0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5), rel=1e-12)
    assert reverse.item() != pytest.approx(got.item())  # KL is not symmetric


def test_kl_matches_torch_kl_div_per_position():
    g = torch.Generator().manual_seed(3)
    p_logits = torch.randn(4, 7, 11, generator=g)
    q_logits = p_logits + 0.5 * torch.randn(4, 7, 11, generator=g)
    got = kl_divergence(p_logits, q_logits)
    assert got.shape == (4, 7) and got.dtype == torch.float64
    log_p = torch.log_softmax(p_logits.double(), -1)
    log_q = torch.log_softmax(q_logits.double(), -1)
    # F.kl_div(input, target) = Σ target · (log target − input) = KL(target ‖ input): Q goes first
    expected = torch.nn.functional.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_kl_where_p_has_zero_mass_is_finite():
    p_logits = torch.tensor([0.0, -math.inf, 0.0])  # P = [1/2, 0, 1/2]
    q_logits = torch.tensor([0.0, 0.0, 0.0])
    assert kl_divergence(p_logits, q_logits).item() == pytest.approx(math.log(3 / 2))


def test_kl_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        kl_divergence(torch.zeros(2, 3), torch.zeros(2, 4))


# -- bootstrap ------------------------------------------------------------------------------

def test_bootstrap_interval_contains_the_mean_and_is_deterministic():
    g = torch.Generator().manual_seed(11)
    values = (torch.randn(60, generator=g, dtype=torch.float64) + 2.0).tolist()
    low, high = bootstrap_interval(values, seed=5)
    mean = sum(values) / len(values)
    assert low < mean < high
    assert bootstrap_interval(values, seed=5) == (low, high)
    assert bootstrap_interval(values, seed=6) != (low, high)


def test_bootstrap_interval_shrinks_like_one_over_root_n():
    widths = {}
    for n in (20, 200, 2000):
        values = [-1.0, 1.0] * (n // 2)  # mean 0, population sd exactly 1
        low, high = bootstrap_interval(values, confidence=0.95)
        widths[n] = high - low
        # normal approximation of the percentile interval: 2 · 1.96 · sd / sqrt(n)
        assert widths[n] == pytest.approx(2 * 1.959964 / math.sqrt(n), rel=0.15)
    assert widths[2000] < widths[200] < widths[20]


def test_bootstrap_confidence_widens_the_interval():
    values = [float(i % 7) for i in range(50)]
    low90, high90 = bootstrap_interval(values, confidence=0.9)
    low99, high99 = bootstrap_interval(values, confidence=0.99)
    assert low99 < low90 and high90 < high99


def test_constant_or_single_values_give_a_zero_width_interval():
    assert bootstrap_interval([0.1] * 30) == (0.1, 0.1)
    assert bootstrap_interval([3.5]) == (3.5, 3.5)
    effect = effect_of([0.1] * 3)
    assert (effect.mean, effect.low, effect.high, effect.n) == (0.1, 0.1, 0.1, 3)


def test_effect_of_reports_mean_interval_and_values():
    effect = effect_of([1.0, 2.0, 3.0, 4.0], confidence=0.9, resamples=500, seed=1)
    assert effect.mean == pytest.approx(2.5)
    assert (effect.low, effect.high) == bootstrap_interval([1.0, 2.0, 3.0, 4.0], 0.9, 500, 1)
    assert effect.low <= effect.mean <= effect.high
    data = json.loads(json.dumps(effect.as_dict()))
    assert data["values"] == [1.0, 2.0, 3.0, 4.0] and data["n"] == 4 and data["confidence"] == 0.9


@pytest.mark.parametrize("kwargs, message", [
    (dict(values=[]), "empty"),
    (dict(values=[1.0, math.nan]), "finite"),
    (dict(values=[1.0, 2.0], confidence=1.0), r"confidence must be in \(0, 1\)"),
    (dict(values=[1.0, 2.0], resamples=0), "resamples must be an integer >= 1"),
])
def test_bootstrap_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_interval(**kwargs)


# -- markers and token log-probabilities --------------------------------------------------

def test_marker_rate_with_curly_apostrophes_case_and_whitespace():
    texts = ["I don\u2019t know.", "i DON'T   KNOW", "I do know.", "Hmm, I\u2018m not\nsure", ""]
    markers = ["I don't know", "i\u2019m not sure"]
    assert marker_rate(texts, markers) == pytest.approx(3 / 5)
    assert [contains_marker(t, markers) for t in texts] == [True, True, False, True, False]


def test_a_single_marker_string_is_one_marker_not_its_letters():
    assert contains_marker("a b c", "abc") is False
    assert contains_marker("say ABC", "abc") is True


def test_marker_input_errors():
    with pytest.raises(ValueError, match="texts are empty"):
        marker_rate([], ["x"])
    with pytest.raises(ValueError, match="markers are empty"):
        marker_rate(["x"], [])
    with pytest.raises(ValueError, match="blank"):
        contains_marker("x", ["  "])


def test_mean_token_logprob_by_hand_with_mask_and_ignore_index():
    probs = torch.tensor([
        [[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]],
        [[0.2, 0.3, 0.5], [0.4, 0.4, 0.2], [0.6, 0.2, 0.2]],
        [[0.2, 0.3, 0.5], [0.4, 0.4, 0.2], [0.6, 0.2, 0.2]],
    ], dtype=torch.float64)
    targets = torch.tensor([[0, 1, 2], [2, -100, 0], [1, 1, 1]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    got = mean_token_logprob(probs.log() * 1.0 + 4.0, targets, mask)  # logits: log p up to a shift
    assert got[0].item() == pytest.approx((math.log(0.5) + math.log(0.8)) / 2, rel=1e-12)
    assert got[1].item() == pytest.approx((math.log(0.5) + math.log(0.6)) / 2, rel=1e-12)
    assert math.isnan(got[2].item())  # nothing left to score
    unmasked = mean_token_logprob(probs.log(), targets)
    assert unmasked[0].item() == pytest.approx((math.log(0.5) + math.log(0.8) + math.log(1 / 3)) / 3, rel=1e-12)


def test_mean_token_logprob_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"targets must be \[B, T\]"):
        mean_token_logprob(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must be \[B, T, V\]"):
        mean_token_logprob(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids in"):
        mean_token_logprob(torch.zeros(1, 2, 5), torch.tensor([[0, 5]]))


# -- rank -------------------------------------------------------------------------------------

def _with_singular_values(values, rows, cols, seed=0):
    """U diag(values) Vᵀ with random orthonormal U [rows, k] and V [cols, k]."""
    g = torch.Generator().manual_seed(seed)
    k = len(values)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


def test_singular_values_of_a_constructed_matrix():
    delta = _with_singular_values([3.0, 2.0, 1.0, 0.0, 0.0], rows=7, cols=5)
    torch.testing.assert_close(singular_values(delta), torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("energy, rank", [
    (0.5, 1),  # σ² = 9, 4, 1, 0, 0 of 14: top-1 holds 9/14 = 0.643
    (9 / 14, 1),  # exactly the top-1 share
    (0.9, 2),  # top-2 holds 13/14 = 0.929
    (13 / 14, 2),
    (0.95, 3),
    (1.0, 3),  # not 5: the null-space noise of the SVD counts as zero
])
def test_energy_rank_by_hand(energy, rank):
    delta = _with_singular_values([3.0, 2.0, 1.0, 0.0, 0.0], rows=7, cols=5)
    assert energy_rank(delta, energy) == rank


def test_rank_of_outer_products_and_zero():
    g = torch.Generator().manual_seed(2)
    a, b, c, d = (torch.randn(n, generator=g) for n in (6, 4, 6, 4))
    assert energy_rank(torch.outer(a, b), 1.0) == 1
    assert energy_rank(torch.outer(a, b) + torch.outer(c, d), 1.0) == 2
    assert energy_rank(torch.zeros(5, 3)) == 0
    assert stable_rank(torch.zeros(5, 3)) == 0.0
    assert stable_rank(torch.outer(a, b)) == pytest.approx(1.0)


def test_stable_rank_by_hand():
    delta = _with_singular_values([3.0, 2.0, 1.0], rows=6, cols=4)
    assert stable_rank(delta) == pytest.approx((9 + 4 + 1) / 9)
    assert stable_rank(torch.eye(4)) == pytest.approx(4.0)


def test_rank_input_errors():
    with pytest.raises(ValueError, match="rank needs a matrix"):
        energy_rank(torch.ones(5))
    with pytest.raises(ValueError, match="rank needs a matrix"):
        stable_rank(torch.ones(2, 2, 2))
    for bad in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"energy must be a fraction in \(0, 1\]"):
            energy_rank(torch.eye(3), bad)
    with pytest.raises(ValueError, match="non-finite"):
        singular_values(torch.tensor([[1.0, math.inf], [0.0, 1.0]]))
