"""Verdicts through real pytest runs: three outcomes, --inconclusive, the per-model record of
what each hypothesis found (record, pass, change, fail with the table), the Holm correction,
and what counts as a refutation."""

import json

import pytest

from stance_harness.analysis.paired import holm

CLAIMS = '''
import numpy as np
from stance_harness import assert_greater, assert_less

rng = np.random.default_rng(1)
BASE = rng.normal(0, 1, 40)
SHIFT = {shift}


class Measured:
    def __init__(self, label, values):
        self.label, self.values, self.sinks, self.run_id = label, values, [], label

    def unit_values(self, metric):
        return "probe", list(self.values)

    def unit_ids(self, metric):
        return ["probe %d" % i for i in range(len(self.values))]


def test_supported(stance_report):
    a, b = stance_report.use_run(Measured("lora", BASE)), stance_report.use_run(Measured("full", BASE + 1))
    assert_less(a, b, metric="forgetting")


def test_refuted(stance_report):
    a, b = stance_report.use_run(Measured("lora", BASE + SHIFT)), stance_report.use_run(Measured("full", BASE))
    assert_less(a, b, metric="forgetting")


def test_inconclusive(stance_report):
    noisy = BASE + rng.normal(0.05, 1.0, 40)
    a, b = stance_report.use_run(Measured("warm", noisy)), stance_report.use_run(Measured("base", BASE))
    assert_greater(a, b, metric="behavior_shift")
'''
P = ("-p", "no:cacheprovider")


def claims(pytester, shift=1.0):
    pytester.makepyfile(test_claims=CLAIMS.format(shift=shift))


def report(pytester) -> dict:
    latest = (pytester.path / "reports" / "latest").read_text().strip()
    return json.loads((pytester.path / "reports" / latest / "report.json").read_text())


def test_three_verdicts_reach_the_report_and_inconclusive_fails_by_default(pytester):
    claims(pytester)
    result = pytester.runpytest_subprocess(*P)
    result.assert_outcomes(passed=1, failed=2)
    verdicts = {t["nodeid"].split("::")[1]: t["verdict"] for t in report(pytester)["tests"]}
    assert verdicts == {"test_supported": "supported", "test_refuted": "refuted", "test_inconclusive": "inconclusive"}
    result.stdout.fnmatch_lines(["*FAIL*test_inconclusive*inconclusive*run-level (one seed per arm)*"])
    assert report(pytester)["multiplicity"][0]["p (Holm)"] >= report(pytester)["multiplicity"][0]["p"]


@pytest.mark.parametrize("choice, outcomes", [("skip", {"passed": 1, "failed": 1, "skipped": 1}),
                                              ("pass", {"passed": 2, "failed": 1})])
def test_inconclusive_is_what_the_option_says(pytester, choice, outcomes):
    claims(pytester)
    result = pytester.runpytest_subprocess(*P, "--inconclusive", choice)
    result.assert_outcomes(**outcomes)
    assert {t["verdict"] for t in report(pytester)["tests"]} == {"supported", "refuted", "inconclusive"}


def test_recorded_verdicts_round_trip_and_a_change_fails_with_the_table(pytester):
    claims(pytester)
    pytester.runpytest_subprocess(*P, "--record-verdicts").assert_outcomes(passed=1, failed=2)
    record = json.loads((pytester.path / "verdicts" / "tiny-qwen2.json").read_text())
    assert record["model"] == "tiny-qwen2" and record["provenance"]["name"] == "tiny-qwen2"
    entries = {k.split("::")[1]: v for k, v in record["tests"].items()}
    assert {k: v["verdict"] for k, v in entries.items()} == {
        "test_supported": "supported", "test_refuted": "refuted", "test_inconclusive": "inconclusive"}
    assert "refuted" in entries["test_refuted"]["reason"] and entries["test_refuted"]["interval"].startswith("+1")

    # the same findings again: what was recorded is what it found, so the session passes
    again = pytester.runpytest_subprocess(*P)
    again.assert_outcomes(passed=1, xfailed=2)
    again.stdout.fnmatch_lines(["*XFAIL*test_refuted*"])
    assert again.ret == 0

    # recording again judges afresh, and the reason is the finding's, not the earlier record's
    pytester.runpytest_subprocess(*P, "--record-verdicts").assert_outcomes(passed=1, failed=2)
    rerecorded = json.loads((pytester.path / "verdicts" / "tiny-qwen2.json").read_text())["tests"]
    assert {k: v["reason"] for k, v in rerecorded.items()} == {k: v["reason"] for k, v in record["tests"].items()}

    # the refuted claim now holds: a changed verdict fails, naming both and the record's reason
    claims(pytester, shift=-1.0)
    changed = pytester.runpytest_subprocess(*P)
    changed.assert_outcomes(passed=1, failed=1, xfailed=1)
    changed.stdout.fnmatch_lines(["*the verdict on tiny-qwen2 changed: recorded refuted, now supported*",
                                  "*hypothesis*recorded*now*interval*",
                                  "*test_refuted*refuted*supported*",
                                  "*the record said: *refuted*"])


def test_only_the_tests_own_assertions_refute(pytester):
    pytester.makepyfile(library_code="def check():\n    assert False, 'Torch not compiled with CUDA enabled'\n")
    pytester.makepyfile(test_faults='''
import pytest
import library_code


@pytest.mark.expected_outcome("refuted", reason="expected", on="any")
def test_a_library_assertion_is_an_error(stance_report):
    library_code.check()


@pytest.mark.expected_outcome("refuted", reason="expected", on="any")
def test_the_tests_own_assertion_refutes(stance_report):
    assert 1 == 2
''')
    result = pytester.runpytest_subprocess(*P)
    result.assert_outcomes(failed=1, xfailed=1)
    result.stdout.fnmatch_lines(["*RuntimeError: an AssertionError raised inside *library_code.py*not a refutation*"])
    verdicts = {t["nodeid"].split("::")[1]: t["verdict"] for t in report(pytester)["tests"]}
    assert verdicts == {"test_a_library_assertion_is_an_error": None, "test_the_tests_own_assertion_refutes": "refuted"}


def test_holm_against_a_hand_computation():
    # sorted p: 0.01, 0.02, 0.03, 0.04 with m = 4: 4*0.01, 3*0.02, 2*0.03, 1*0.04, kept monotone
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
