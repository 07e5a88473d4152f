"""train(..., seeds=N) and --seeds: N runs that differ only in the training seed, as one RunSet
that comparative checks take as an arm (a claim about the methods) and single-run checks apply
to seed by seed; --plan counts each seed as a request."""

import json

import pytest

from stance_harness.report.verdicts import interval_of

P = ("-p", "no:cacheprovider")
QUICK = '{"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5, "seed": 0}'

SUITE = '''
import pytest
from stance_harness import RunSet, behavior_effect, check_behavior_shift, check_less, check_training_healthy

QUICK = {quick}


def test_seeds(train):
    lora, full = train("lora", seeds=2, examples=10, recipe=QUICK), train("full", seeds=2, examples=10, recipe=QUICK)
    assert isinstance(lora, RunSet) and len(lora) == 2 and lora.seeds == [0, 1]
    assert [r.recipe.seed for r in full] == [0, 1] and lora[0].run_id != lora[1].run_id
    result = check_less(lora, full, metric="behavior_shift")
    assert result.metrics["seeds_a"] == 2 and result.metrics["scope"] == "method-level"
    assert "crossed seed x unit ANOVA" in result.summary and "2 seeds per arm x 16 probes" in result.summary
    assert check_training_healthy(lora).passed
    shift = check_behavior_shift(lora, min_effect=1e9)  # the seeds pooled: one claim about the method
    assert not shift.passed and shift.verdict == "refuted" and shift.summary.startswith("lora x2 loglik_margin shift ")
    assert "required > +1e+09: refuted" in shift.summary and shift.metrics["seeds"] == 2
    assert behavior_effect(lora)["seeds"] == 2 and behavior_effect(lora[0])["seeds"] == 1


def test_the_mark_sets_the_default(train, stance_report):
    runs = train("lora", examples=10, recipe=QUICK)
    assert isinstance(runs, RunSet) and len(runs) == {marked}
    assert stance_report.seeds == len(runs)  # what the recorded verdict says the claim rests on


def test_default_from_the_option(train):
    runs = train("lora", examples=10, recipe=QUICK)
    assert isinstance(runs, RunSet) and len(runs) == 2
    one = train("lora", seeds=1, examples=10, recipe=QUICK)
    assert isinstance(one, RunSet) and len(one) == 1


def test_bad_seeds(train):
    train("lora", seeds=0)
'''


def test_train_with_seeds_gives_a_runset_every_check_accepts(pytester):
    pytester.makepyfile(test_s=SUITE.replace("{marked}", "2").format(quick=QUICK))
    result = pytester.runpytest_subprocess(*P, "--no-reports", "--seeds", "2", "-rf")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*_ test_bad_seeds _*", "stance-harness: train(seeds=...) must be an integer >= 1, got 0"])


def test_a_seeds_mark_sets_the_default_and_the_option_overrides_it(pytester):
    marked = "import pytest\npytestmark = pytest.mark.seeds(2)\n" + SUITE.replace("{marked}", "2").format(quick=QUICK)
    pytester.makepyfile(test_s=marked)
    result = pytester.runpytest_subprocess(*P, "--no-reports", "-k", "mark")
    result.assert_outcomes(passed=1)
    pytester.makepyfile(test_s=marked.replace("len(runs) == 2\n", "len(runs) == 1\n"))
    result = pytester.runpytest_subprocess(*P, "--no-reports", "-k", "mark", "--seeds", "1")
    result.assert_outcomes(passed=1)
    pytester.makepyfile(test_s=marked.replace("seeds(2)", "seeds(0)"))
    result = pytester.runpytest_subprocess(*P, "--no-reports", "-k", "mark")
    result.assert_outcomes(errors=1)  # at the train fixture's set-up
    result.stdout.fnmatch_lines(["*@pytest.mark.seeds(n) needs an integer n >= 1, got 0*"])


def test_plan_counts_each_seed_as_a_request(pytester):
    pytester.makepyfile(test_p='''
from stance_harness import RunSet

def test_p(train):
    runs = train("lora", seeds=3, examples=10)
    assert isinstance(runs, RunSet) and len(runs) == 3
    runs[0].trace  # reading a planned run skips the test
''')
    result = pytester.runpytest_subprocess(*P, "--no-reports", "--plan")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*--plan: 3 distinct training requests checked*"])


def test_the_recorded_interval_says_what_it_rests_on():
    checks = [{"metrics": {"estimate": 0.1, "low": 0.05, "high": 0.15, "metric": "kl", "n": 16, "unit": "probe",
                           "rests_on": "1 seed per arm x 16 probes (16 informative), exact sign-flip, one-sided p = 0.01",
                           "scope": "run-level (one seed per arm): a claim about two runs, not about the methods"}}]
    text = interval_of(checks)
    assert "exact sign-flip, one-sided p = 0.01" in text and "run-level (one seed per arm)" in text
    checks[0]["metrics"]["scope"] = "method-level"
    assert "run-level" not in interval_of(checks)
    assert json.dumps(text)


class _Seed:
    """A stand-in run: one seed's per-probe shifts, what the pooled shift check reads."""

    def __init__(self, seed, shifts):
        self.label, self.sinks, self.run_id = "lora", (), f"lora-{seed}"
        self.recipe = type("R", (), {"seed": seed})()
        self.shifts = list(shifts)

    def unit_values(self, metric):
        return "probe", self.shifts

    def unit_ids(self, metric):
        return [f"p{i}" for i in range(len(self.shifts))]


def test_the_pooled_shift_is_the_crossed_interval_computed_by_hand():
    import numpy as np
    from scipy import stats

    from stance_harness import check_behavior_shift

    rng = np.random.default_rng(3)
    X = 1.5 + rng.normal(0, 0.3, (4, 1)) + rng.normal(0, 1.0, (4, 12))  # seeds x probes
    runs = [_Seed(s, row) for s, row in enumerate(X)]
    k, n = X.shape
    seed_means, probe_means = X.mean(axis=1, keepdims=True), X.mean(axis=0, keepdims=True)
    ms_seed = n * ((seed_means - X.mean()) ** 2).sum() / (k - 1)
    ms_resid = ((X - seed_means - probe_means + X.mean()) ** 2).sum() / ((k - 1) * (n - 1))
    terms = [(probe_means.var(ddof=1) / n, n - 1)]
    if ms_seed > ms_resid:
        terms += [(ms_seed / (k * n), k - 1), (-ms_resid / (k * n), (k - 1) * (n - 1))]
    v = sum(t for t, _ in terms)
    df = v ** 2 / sum(t ** 2 / f for t, f in terms)
    half = stats.t.ppf(0.975, df) * v ** 0.5
    result = check_behavior_shift(runs, min_effect=0.0)
    assert result.metrics["mean"] == pytest.approx(X.mean())
    assert result.metrics["low"] == pytest.approx(X.mean() - half) and result.metrics["high"] == pytest.approx(X.mean() + half)
    assert result.passed and stats.t.sf(X.mean() / v ** 0.5, df) <= 0.025
    # "no shift" between -m and +m is two one-sided tests; the data are not within +-0.01
    tight = check_behavior_shift(runs, min_effect=-0.01, max_effect=0.01)
    assert not tight.passed and "upper bound: refuted" in tight.summary
    wide = check_behavior_shift(runs, min_effect=-50.0, max_effect=50.0)
    assert wide.passed and wide.verdict == "supported"


class _Predictions(_Seed):
    """A stand-in run: one seed's correct (1) / wrong (0) per held-out prediction."""

    def unit_values(self, metric):
        return "prediction", self.shifts


def test_above_chance_is_an_exact_sign_test_for_one_run_and_crossed_for_seeds():
    from scipy import stats

    from stance_harness import HypothesisFailed, assert_bounded, check_bounded

    correct = [1] * 13 + [0] * 3  # 13 of 16 right
    one = check_bounded(_Predictions(0, correct), "acc1", above=0.5)
    # (correct - 0.5) is +-0.5: the exact sign-flip test is the one-sided binomial sign test
    assert one.metrics["p_value"] == pytest.approx(stats.binomtest(13, 16, 0.5, alternative="greater").pvalue)
    assert one.verdict == "supported" and "One seed: a claim about this run" in one.summary
    assert one.metrics["mean"] == pytest.approx(13 / 16)
    weak = check_bounded(_Predictions(0, [1] * 10 + [0] * 6), "acc1", above=0.5)
    assert weak.verdict == "inconclusive" and weak.metrics["p_value"] == pytest.approx(
        stats.binomtest(10, 16, 0.5, alternative="greater").pvalue)
    seeds = [_Predictions(s, correct[s:] + correct[:s]) for s in range(3)]
    assert check_bounded(seeds, "acc1", above=0.5).metrics["seeds"] == 3
    with pytest.raises(HypothesisFailed, match=r"required > \+0.99: refuted"):
        assert_bounded(seeds, "acc1", above=0.99)
    with pytest.raises(Exception, match="give above=, below= or both"):
        check_bounded(seeds, "acc1")


def test_runset_summarises_an_arm_and_wraps_a_single_run():
    from stance_harness import RunSet, runset

    runs = [_Seed(s, [float(s), 1.0]) for s in range(3)]
    arm = runset(runs)
    assert isinstance(arm, RunSet) and arm.seeds == [0, 1, 2] and runset(arm) is arm
    assert arm.each(lambda r: r.shifts[0]) == [0.0, 1.0, 2.0]
    assert arm.mean(lambda r: r.shifts[0]) == pytest.approx(1.0)
    one = runset(runs[0])
    assert len(one) == 1 and one[0] is runs[0]


class _Steps(_Seed):
    """A stand-in run: one seed's seconds per optimizer step."""

    def unit_values(self, metric):
        return "step", self.shifts

    def unit_ids(self, metric):
        return [f"step {i}" for i in range(len(self.shifts))]


def test_step_times_over_seeds_compare_each_seeds_median_by_welch():
    import numpy as np
    from scipy import stats

    from stance_harness import check_less

    rng = np.random.default_rng(5)
    fast = [_Steps(s, 0.10 + rng.exponential(0.01, 15)) for s in range(4)]
    slow = [_Steps(s + 10, 0.13 + rng.exponential(0.01, 15)) for s in range(4)]
    for r in slow:
        r.label = "full"
    result = check_less(fast, slow, metric="step_time")
    medians = [[float(np.median(r.shifts)) for r in arm] for arm in (fast, slow)]
    welch = stats.ttest_ind(*medians, equal_var=False, alternative="less")
    assert result.metrics["p_value"] == pytest.approx(welch.pvalue)
    assert result.metrics["estimate"] == pytest.approx(np.mean(medians[0]) - np.mean(medians[1]))
    assert result.verdict == "supported" and "Welch" in result.summary


def test_a_recorded_verdict_says_how_many_seeds_it_rests_on():
    from stance_harness.report.verdicts import verdict_entries

    records = [{"nodeid": "suites/test_a.py::test_x", "verdict": "refuted", "message": "why", "checks": [], "seeds": 5},
               {"nodeid": "suites/test_a.py::test_y", "verdict": "supported", "message": None, "checks": []}]
    entries = verdict_entries(records)
    assert entries["suites/test_a.py::test_x"]["seeds"] == 5 and entries["suites/test_a.py::test_y"]["seeds"] is None
