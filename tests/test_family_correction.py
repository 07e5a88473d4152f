"""Holm's correction over the claims of one test file decides: claims that pass alone and fail
jointly fail, in the terminal, the report, the recorded verdicts and --verdict-json."""

import json

import pytest

from stance_harness.report.records import TestRecord
from stance_harness.report.verdicts import correct_families, correct_for_multiplicity

P = ("-p", "no:cacheprovider")

# each claim alone: exact sign-flip p = 2/256 (only the identity and flipping the -0.5 reach the
# observed sum), below 0.025; four of them: Holm's adjusted p = 4 * 2/256 = 0.03125 > 0.025
FAMILY = '''
import numpy as np
from stance_harness import assert_greater

D = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, -0.5])


class Measured:
    def __init__(self, label, values):
        self.label, self.values, self.sinks, self.run_id = label, values, [], label

    def unit_values(self, metric):
        return "probe", list(self.values)

    def unit_ids(self, metric):
        return ["probe %d" % i for i in range(len(self.values))]


def claim(stance_report, shift):
    base = np.linspace(0, 1, 8)
    a = stance_report.use_run(Measured("a%d" % shift, base + D * (1 + shift)))
    b = stance_report.use_run(Measured("b%d" % shift, base))
    assert_greater(a, b, metric="kl")


def test_one(stance_report):
    claim(stance_report, 0)


def test_two(stance_report):
    claim(stance_report, 1)


def test_three(stance_report):
    claim(stance_report, 2)


def test_four(stance_report):
    claim(stance_report, 3)
'''


def report(pytester) -> dict:
    latest = (pytester.path / "reports" / "latest").read_text().strip()
    return json.loads((pytester.path / "reports" / latest / "report.json").read_text())


def test_claims_that_pass_alone_fail_jointly(pytester):
    pytester.makepyfile(test_family=FAMILY)
    alone = pytester.runpytest_subprocess(*P, "-k", "test_one")
    alone.assert_outcomes(passed=1)
    assert alone.ret == 0 and report(pytester)["tests"][0]["verdict"] == "supported"

    joint = pytester.runpytest_subprocess(*P, "--record-verdicts", "--verdict-json", "verdict.json")
    joint.assert_outcomes(failed=4)
    assert joint.ret == 1
    joint.stdout.fnmatch_lines(["FAIL*test_family.py::test_one*inconclusive*Holm*",
                                "*4 comparative claims in 1 families*0 supported after the correction*"])
    tests = {t["nodeid"].split("::")[1]: t for t in report(pytester)["tests"]}
    assert {name: (t["outcome"], t["verdict"]) for name, t in tests.items()} == {
        name: ("failed", "inconclusive") for name in ("test_one", "test_two", "test_three", "test_four")}
    check = tests["test_one"]["checks"][0]
    assert check["p_holm"] == pytest.approx(4 * 2 / 256) and check["metrics"]["p_value"] == pytest.approx(2 / 256)
    assert check["verdict_before_correction"] == "supported" and check["verdict"] == "inconclusive"
    assert "after Holm's correction over the 4 claims of test_family.py" in tests["test_one"]["message"]
    record = json.loads((pytester.path / "verdicts" / "tiny-qwen2.json").read_text())["tests"]
    assert {v["verdict"] for v in record.values()} == {"inconclusive"}
    verdict = json.loads((pytester.path / "verdict.json").read_text())
    assert verdict["passed"] is False and verdict["tests"] == {"total": 4, "failed": 4}

    # judged by that record, the corrected verdict is what was recorded: expected failures
    again = pytester.runpytest_subprocess(*P)
    again.assert_outcomes(xfailed=4)
    assert again.ret == 0
    # run alone, test_one survives its (one-claim) family: the recorded inconclusive changed
    changed = pytester.runpytest_subprocess(*P, "-k", "test_one")
    changed.assert_outcomes(failed=1)
    changed.stdout.fnmatch_lines(["*recorded inconclusive, now supported after Holm's correction*"])


def _record(nodeid, p, verdict="supported"):
    record = TestRecord(nodeid, outcome="passed" if verdict == "supported" else "failed", verdict=verdict)
    record.checks.append({"check": "assert_greater", "summary": "s", "verdict": verdict,
                          "metrics": {"p_value": p, "level": 0.025}})
    return record


def test_the_family_is_one_test_file_by_hand():
    # file a: p 0.01 and 0.02 -> Holm 0.02, 0.02: both hold; file b: 0.01, 0.02, 0.03 -> 0.03, 0.04, 0.04: none
    records = [_record("a.py::t1", 0.01), _record("a.py::t2", 0.02),
               _record("b.py::t1", 0.01), _record("b.py::t2", 0.02), _record("b.py::t3", 0.03, "inconclusive")]
    failed = correct_families(records)
    assert failed == ["b.py::t1", "b.py::t2"]
    assert [r.verdict for r in records] == ["supported", "supported", "inconclusive", "inconclusive", "inconclusive"]
    assert [r.checks[0]["p_holm"] for r in records] == pytest.approx([0.02, 0.02, 0.03, 0.04, 0.04])
    rows = correct_for_multiplicity([r.as_dict() for r in records])
    assert [row["note"] != "" for row in rows] == [False, False, True, True, False]
    skipped = [_record("c.py::t1", 0.02), _record("c.py::t2", 0.02)]
    assert correct_families(skipped, inconclusive="skip") == [] and skipped[0].outcome == "skipped"
