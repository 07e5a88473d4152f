"""train(..., seeds=N) and --seeds: N runs that differ only in the training seed, as one RunSet
that comparative checks take as an arm (a claim about the methods) and single-run checks apply
to seed by seed; --plan counts each seed as a request."""

import json

from harness.report.verdicts import interval_of

P = ("-p", "no:cacheprovider")
QUICK = '{"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5, "seed": 0}'

SUITE = '''
import pytest
from harness import RunSet, check_behavior_shift, check_less, check_training_healthy

QUICK = {quick}


def test_seeds(train):
    lora, full = train("lora", seeds=2, examples=10, recipe=QUICK), train("full", seeds=2, examples=10, recipe=QUICK)
    assert isinstance(lora, RunSet) and len(lora) == 2 and lora.seeds == [0, 1]
    assert [r.recipe.seed for r in full] == [0, 1] and lora[0].run_id != lora[1].run_id
    result = check_less(lora, full, metric="behavior_shift")
    assert result.metrics["seeds_a"] == 2 and result.metrics["scope"] == "method-level"
    assert "crossed seed x unit ANOVA" in result.summary and "2 seeds per arm x 16 probes" in result.summary
    assert check_training_healthy(lora).passed
    shift = check_behavior_shift(lora, min_effect=1e9)
    assert not shift.passed and shift.summary.startswith("fails for 2 of 2 seeds: seed 0: ")
    assert shift.metrics["failing_seeds"] == [0, 1]


def test_default_from_the_option(train):
    runs = train("lora", examples=10, recipe=QUICK)
    assert isinstance(runs, RunSet) and len(runs) == 2
    one = train("lora", seeds=1, examples=10, recipe=QUICK)
    assert isinstance(one, RunSet) and len(one) == 1


def test_bad_seeds(train):
    train("lora", seeds=0)
'''


def test_train_with_seeds_gives_a_runset_every_check_accepts(pytester):
    pytester.makepyfile(test_s=SUITE.format(quick=QUICK))
    result = pytester.runpytest_subprocess(*P, "--no-reports", "--seeds", "2", "-rf")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*_ test_bad_seeds _*", "stance-harness: train(seeds=...) must be an integer >= 1, got 0"])


def test_plan_counts_each_seed_as_a_request(pytester):
    pytester.makepyfile(test_p='''
from harness import RunSet

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
