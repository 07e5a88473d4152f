"""The paired comparison helpers: three verdicts on constructed data with a known answer, the
one-seed test against scipy's exact permutation test, seeds crossed with units, pairing by unit
id, ECE as a statistic, and real runs."""

import numpy as np
import pytest
from scipy import stats

from stance_harness import (HarnessError, HypothesisFailed, HypothesisInconclusive, assert_greater, assert_less,
                     check_equivalent, check_greater, check_less, check_not_worse)
from stance_harness.analysis.replication import CROSSED, RUN_LEVEL
from stance_harness.analysis.calibration import calibration_from_predictions, ece_of_items
from stance_harness.report.records import TestRecord


class Measured:
    """A stand-in run: per-unit values of each metric, as Run.unit_values gives them."""

    def __init__(self, label, unit="probe", **metrics):
        self.label, self.unit, self.metrics, self.sinks = label, unit, metrics, []

    def unit_values(self, metric):
        return self.unit, list(self.metrics[metric])

    def unit_ids(self, metric):
        return self.metrics.get("ids") or [f"{self.unit} {i}" for i in range(len(self.metrics[metric]))]


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


def test_no_difference_has_no_informative_unit_and_noise_is_inconclusive():
    same = Measured("a", behavior_shift=BASE), Measured("b", behavior_shift=BASE)
    result = check_greater(*same, metric="behavior_shift")
    assert result.verdict == "inconclusive" and result.metrics["informative"] == 0
    assert "0 informative probes (non-zero differences) are too few" in result.summary
    noisy = Measured("a", behavior_shift=BASE + rng.normal(0.05, 1.0, 40)), Measured("b", behavior_shift=BASE)
    result = check_greater(*noisy, metric="behavior_shift")
    assert result.verdict == "inconclusive" and not result.passed
    assert "neither support nor refute a - b > 0" in result.summary and "would settle it" not in result.summary
    assert result.summary.split(": ", 1)[1].startswith(RUN_LEVEL) and result.metrics["scope"] == RUN_LEVEL
    with pytest.raises(HypothesisInconclusive, match="inconclusive") as info:
        assert_greater(*noisy, metric="behavior_shift")
    assert not isinstance(info.value, AssertionError)  # inconclusive is no refutation


def test_non_inferiority_takes_the_metrics_direction_and_needs_a_margin():
    ece_like = BASE ** 2
    slightly_worse = Measured("lora", brier=ece_like + 0.01), Measured("full", brier=ece_like)
    assert check_not_worse(*slightly_worse, metric="brier", margin=0.05).verdict == "supported"
    assert check_not_worse(*slightly_worse, metric="brier", margin=0.005).verdict == "refuted"
    with pytest.raises(HarnessError, match="assert_not_worse needs margin="):
        check_not_worse(*slightly_worse, metric="brier")
    with pytest.raises(HarnessError, match="not_worse with margin 0 is a superiority test"):
        check_not_worse(*slightly_worse, metric="brier", margin=0.0)
    higher_better = Measured("lora", acc1=np.ones(40) * 0.9), Measured("full", acc1=np.ones(40))
    assert check_not_worse(*higher_better, metric="acc1", margin=0.2).verdict == "supported"
    assert check_not_worse(*higher_better, metric="acc1", margin=0.05).verdict == "refuted"


def test_no_shift_is_an_equivalence_test():
    close = Measured("a", kl=BASE + rng.normal(0, 0.05, 40)), Measured("b", kl=BASE)
    assert check_equivalent(*close, metric="kl", margin=0.1).verdict == "supported"
    assert check_equivalent(*close, metric="kl", margin=0.001).verdict == "inconclusive"
    with pytest.raises(HarnessError, match="assert_equivalent needs margin="):
        check_equivalent(*close, metric="kl")


def test_one_seed_is_scipys_exact_sign_flip_test():
    x, y = BASE[:12] + rng.normal(0.3, 0.5, 12), BASE[:12]
    result = check_greater(Measured("a", kl=x), Measured("b", kl=y), metric="kl")
    reference = stats.permutation_test((x - y,), np.mean, permutation_type="samples", alternative="greater",
                                       n_resamples=np.inf)
    assert result.metrics["p_value"] == pytest.approx(reference.pvalue, rel=1e-9)
    assert result.metrics["method"] == "exact sign-flip" and result.metrics["estimate"] == pytest.approx(np.mean(x - y))
    assert (result.verdict == "supported") == (reference.pvalue <= 0.025) == (result.metrics["low"] > 0)


def test_binary_units_use_mcnemar():
    a, b = (rng.random(120) < 0.8).astype(float), (rng.random(120) < 0.5).astype(float)
    result = check_greater(Measured("a", "prediction", acc1=a), Measured("b", "prediction", acc1=b), metric="acc1")
    up, down = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    assert result.metrics["method"] == "McNemar exact"
    assert result.metrics["p_value"] == pytest.approx(stats.binomtest(up, up + down, alternative="greater").pvalue)


def test_several_seeds_are_the_unit_of_replication():
    seeds_a = [Measured("lora", forgetting=BASE + 0.5 + 0.01 * s + rng.normal(0, 0.1, 40)) for s in range(7)]
    seeds_b = [Measured("full", forgetting=BASE + 1.0 + rng.normal(0, 0.1, 40)) for _ in range(7)]
    result = check_less(seeds_a, seeds_b, metric="forgetting")
    assert result.metrics["n"] == 40 and result.metrics["seeds_a"] == 7 and result.metrics["method"] == CROSSED
    assert result.verdict == "supported" and result.metrics["scope"] == "method-level"
    assert "lora x7 vs full x7" in result.summary and "7 seeds per arm x 40 probes" in result.summary
    assert RUN_LEVEL not in result.summary
    assert check_less(seeds_a, seeds_b[:3], metric="forgetting").metrics["seeds_b"] == 3  # crossed: counts may differ
    with pytest.raises(HarnessError, match="give one run per arm"):
        check_less(seeds_a, seeds_b[:1], metric="forgetting")


def test_runs_measured_on_different_units_are_refused():
    with pytest.raises(HarnessError, match="not measured on the same probes"):
        check_less(Measured("a", kl=[1, 2, 3]), Measured("b", kl=[1, 2]), metric="kl")
    # same length, other probes: lengths alone do not pair
    a = Measured("a", kl=list(range(8)), ids=[f"probe p{i}" for i in range(8)])
    b = Measured("b", kl=list(range(8)), ids=[f"probe q{i}" for i in range(8)])
    with pytest.raises(HarnessError, match=r"a and b were not measured on the same probes.*first \['probe p0'\]"
                                           r".*first \['probe q0'\]"):
        check_less(a, b, metric="kl")
    reordered = Measured("b", kl=list(range(8))[::-1], ids=[f"probe p{i}" for i in range(8)][::-1])
    assert check_less(a, reordered, metric="kl").metrics["estimate"] == 0.0


def test_ece_is_compared_as_a_statistic():
    conf = rng.uniform(0.5, 1.0, 300)
    calibrated = np.stack([conf, rng.uniform(size=300) < conf], axis=1)
    overconfident = np.stack([np.minimum(conf + 0.3, 1.0), calibrated[:, 1]], axis=1)
    a, b = Measured("warm", "prediction", ece=calibrated.tolist()), Measured("base", "prediction", ece=overconfident.tolist())
    result = check_less(a, b, metric="ece")
    assert result.verdict == "supported" and result.metrics["method"].startswith("paired-swap randomization")
    assert result.metrics["estimate"] == pytest.approx(ece_of_items(calibrated) - ece_of_items(overconfident))
    assert result.metrics["high"] < 0 and result.metrics["p_value"] == pytest.approx(1 / 2000)  # no swap reaches it
    same = check_less(a, Measured("warm2", "prediction", ece=calibrated.tolist()), metric="ece")
    assert same.verdict == "inconclusive" and same.metrics["informative"] == 0
    seeds_a = [Measured("warm", "prediction", ece=np.stack([conf, rng.uniform(size=300) < conf], 1).tolist())
               for _ in range(4)]
    seeds_b = [Measured("base", "prediction", ece=np.stack([np.minimum(conf + 0.2 + 0.05 * s, 1.0), calibrated[:, 1]],
                                                           1).tolist()) for s in range(3)]
    result = check_less(seeds_a, seeds_b, metric="ece")
    values_a, values_b = ([ece_of_items(np.asarray(r.metrics["ece"])) for r in arm] for arm in (seeds_a, seeds_b))
    reference = stats.ttest_ind(values_a, values_b, equal_var=False, alternative="less")
    assert result.metrics["method"] == "Welch t over per-seed values"
    assert result.metrics["p_value"] == pytest.approx(reference.pvalue)


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
    assert RUN_LEVEL in result.summary
    steps = check_less(quick_run("feature-extraction"), full, metric="step_time")
    assert steps.metrics["unit"].endswith("-step block") and "autocorrelated" in steps.metrics["note"]


class Options:
    """A config or recipe stand-in: what Run.config / Run.recipe give the report (as_dict)."""

    def __init__(self, **values):
        self.values = values

    def as_dict(self):
        return dict(self.values)


def _hybrid(forgetting, run_id, lr=1e-3, seed=0, **config):
    run = Measured("hybrid", forgetting=forgetting)
    run.run_id = run_id
    run.config = Options(r=8, freeze_lora_steps=0, alternate_every=0, order="lora-first", **config)
    run.recipe = Options(learning_rate=lr, seed=seed)
    return run


def test_two_arms_of_one_method_are_named_by_the_options_that_differ():
    """Not "hybrid vs hybrid": the config or recipe fields that tell the arms apart name them."""
    warm = _hybrid(BASE, "hybrid-aaaa")
    warm.config.values["freeze_lora_steps"] = 4
    base = _hybrid(BASE + 1.0, "hybrid-bbbb")
    result = check_less(warm, base, metric="forgetting")
    assert result.summary.startswith("hybrid[freeze_lora_steps=4] vs hybrid[freeze_lora_steps=0], forgetting "
                                     "(a = hybrid[freeze_lora_steps=4], b = hybrid[freeze_lora_steps=0])")
    assert "hybrid vs hybrid" not in result.summary and result.headers[1:3] == ["hybrid[freeze_lora_steps=4]",
                                                                               "hybrid[freeze_lora_steps=0]"]
    # several seeds per arm: the arms' first runs are compared (the seed differs within an arm, not between)
    fast = [_hybrid(BASE + 0.01 * s, f"hybrid-f{s}", lr=1e-3, seed=s) for s in range(3)]
    slow = [_hybrid(BASE + 1.0 + 0.01 * s, f"hybrid-s{s}", lr=2e-4, seed=s) for s in range(3)]
    assert check_less(fast, slow, metric="forgetting").summary.startswith("hybrid[lr=0.001] x3 vs hybrid[lr=0.0002] x3")
    # alike in every option: their run ids; two methods: their names alone
    twin = _hybrid(BASE + 1.0, "hybrid-cccc")
    assert check_less(base, twin, metric="forgetting").summary.startswith("hybrid[hybrid-bbbb] vs hybrid[hybrid-cccc]")
    assert check_less(Measured("lora", forgetting=BASE), base, metric="forgetting").summary.startswith("lora vs hybrid,")
