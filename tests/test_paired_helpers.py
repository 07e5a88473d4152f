"""The paired comparison helpers: three verdicts on constructed data with a known answer, the
intervals against a direct scipy reference, seeds as clusters, ECE as a resampled statistic,
and real runs."""

import numpy as np
import pytest
from scipy import stats

from harness import (HypothesisFailed, HypothesisInconclusive, assert_greater, assert_less, check_greater, check_less,
                     check_not_worse)
from harness.analysis.calibration import calibration_from_predictions, ece_of_items
from harness.report.records import TestRecord


class Measured:
    """A stand-in run: per-unit values of each metric, as Run.unit_values gives them."""

    def __init__(self, label, unit="probe", **metrics):
        self.label, self.unit, self.metrics, self.sinks = label, unit, metrics, []

    def unit_values(self, metric):
        return self.unit, list(self.metrics[metric])


rng = np.random.default_rng(7)
BASE = rng.normal(0.0, 1.0, 40)


def test_a_clear_difference_is_supported_and_its_reverse_refuted():
    a, b = Measured("lora", forgetting=BASE + 0.0), Measured("full", forgetting=BASE + 1.0)
    result = check_less(a, b, metric="forgetting")
    assert result.verdict == "supported" and result.passed
    assert result.metrics["high"] < 0 and result.metrics["n"] == 40 and result.metrics["unit"] == "probe"
    assert "lora vs full" in result.summary and "supported" in result.summary
    reverse = check_less(b, a, metric="forgetting")
    assert reverse.verdict == "refuted" and not reverse.passed
    with pytest.raises(HypothesisFailed, match="refuted"):
        assert_less(b, a, metric="forgetting")
    assert assert_less(a, b, metric="forgetting").passed


def test_no_difference_is_refuted_for_a_strict_claim_and_noise_is_inconclusive():
    same = Measured("a", behavior_shift=BASE), Measured("b", behavior_shift=BASE)
    assert check_greater(*same, metric="behavior_shift").verdict == "refuted"  # a - b is exactly 0, not above it
    noisy = Measured("a", behavior_shift=BASE + rng.normal(0.05, 1.0, 40)), Measured("b", behavior_shift=BASE)
    result = check_greater(*noisy, metric="behavior_shift")
    assert result.verdict == "inconclusive" and not result.passed
    assert "straddles" in result.summary and "would settle it" in result.summary
    assert result.metrics["n_needed"] > 40
    with pytest.raises(HypothesisInconclusive, match="inconclusive") as info:
        assert_greater(*noisy, metric="behavior_shift")
    assert not isinstance(info.value, AssertionError)  # inconclusive is no refutation


def test_non_inferiority_takes_the_metrics_direction():
    ece_like = BASE ** 2
    slightly_worse = Measured("lora", brier=ece_like + 0.01), Measured("full", brier=ece_like)
    assert check_not_worse(*slightly_worse, metric="brier", margin=0.05).verdict == "supported"
    assert check_not_worse(*slightly_worse, metric="brier", margin=0.0).verdict == "refuted"
    higher_better = Measured("lora", acc1=np.ones(40) * 0.9), Measured("full", acc1=np.ones(40))
    assert check_not_worse(*higher_better, metric="acc1", margin=0.2).verdict == "supported"
    assert check_not_worse(*higher_better, metric="acc1", margin=0.05).verdict == "refuted"


def test_the_interval_is_scipys_bca_bootstrap_of_the_mean_difference():
    x, y = BASE + rng.normal(0.3, 0.5, 40), BASE
    result = check_greater(Measured("a", kl=x), Measured("b", kl=y), metric="kl")
    reference = stats.bootstrap((x - y,), np.mean, n_resamples=9999, method="BCa", confidence_level=0.95,
                                rng=np.random.default_rng(0))
    assert result.metrics["low"] == pytest.approx(reference.confidence_interval.low, rel=1e-9)
    assert result.metrics["high"] == pytest.approx(reference.confidence_interval.high, rel=1e-9)
    assert result.metrics["estimate"] == pytest.approx(np.mean(x - y))


def test_several_seeds_are_the_unit_of_replication():
    seeds_a = [Measured("lora", forgetting=BASE + 0.5 + 0.01 * s) for s in range(7)]
    seeds_b = [Measured("full", forgetting=BASE + 1.0) for _ in range(7)]
    result = check_less(seeds_a, seeds_b, metric="forgetting")
    assert result.metrics["n"] == 7 and result.metrics["unit"] == "seed" and result.verdict == "supported"
    assert "lora x7 vs full x7" in result.summary
    with pytest.raises(ValueError, match="the same number of runs"):
        check_less(seeds_a, seeds_b[:3], metric="forgetting")


def test_runs_measured_on_different_units_are_refused():
    with pytest.raises(Exception, match="not measured on the same probes"):
        check_less(Measured("a", kl=[1, 2, 3]), Measured("b", kl=[1, 2]), metric="kl")


def test_ece_is_compared_as_a_resampled_statistic():
    conf = rng.uniform(0.5, 1.0, 300)
    calibrated = np.stack([conf, rng.uniform(size=300) < conf], axis=1)
    overconfident = np.stack([np.minimum(conf + 0.3, 1.0), calibrated[:, 1]], axis=1)
    a, b = Measured("warm", "prediction", ece=calibrated.tolist()), Measured("base", "prediction", ece=overconfident.tolist())
    result = check_less(a, b, metric="ece")
    assert result.verdict == "supported" and result.metrics["method"] in ("bca", "percentile")
    assert result.metrics["estimate"] == pytest.approx(ece_of_items(calibrated) - ece_of_items(overconfident))


def test_the_light_ece_equals_the_reference_calibration():
    conf = np.concatenate([rng.uniform(0, 1, 500), [0.0, 1.0, 0.2, 0.4, 7 / 15]])
    correct = rng.uniform(size=conf.size) < conf
    full = calibration_from_predictions(conf, correct, np.zeros(conf.size)).ece
    assert ece_of_items(np.stack([conf, correct], axis=1)) == pytest.approx(full, abs=1e-12)


def test_a_comparison_is_recorded_in_the_tests_that_hold_either_run():
    record = TestRecord("t")
    a, b = Measured("lora", forgetting=BASE), Measured("full", forgetting=BASE + 1.0)
    record.use_run(type("R", (), {"run_id": "x", "sinks": a.sinks})())
    check_less(a, b, metric="forgetting")
    assert [c["verdict"] for c in record.checks] == ["supported"]
    assert record.checks[0]["metrics"]["p_value"] < 0.05


def test_real_runs_lora_shifts_less_than_full_finetuning(quick_run):
    full, lora = quick_run("full"), quick_run("lora")
    result = check_less(lora, full, metric="behavior_shift")
    assert result.metrics["unit"] == "probe" and result.metrics["n"] == 16
    assert result.verdict in ("supported", "refuted", "inconclusive")
    steps = check_less(quick_run("feature-extraction"), full, metric="step_time")
    assert steps.metrics["unit"] == "step" and steps.metrics["n"] == len(full.trace.step_time)
