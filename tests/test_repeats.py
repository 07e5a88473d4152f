"""--repeat's grouping: repetitions of one test share its id without the repeat part."""

import pytest

import stance_harness.checks  # noqa: F401 - declares the helpers' metrics (ece), as a session does
from stance_harness.report.gate import compare
from stance_harness.core.metrics import metrics_from_payload
from stance_harness.outcome import with_repeats
from stance_harness.report.records import repeat_base


@pytest.mark.parametrize("nodeid, base", [
    ("s.py::test_x[repeat0]", "s.py::test_x"),
    ("s.py::test_x[repeat1-lora]", "s.py::test_x[lora]"),  # pytest puts the plugin's parameter first
    ("s.py::test_x[lora-repeat12]", "s.py::test_x[lora]"),
    ("s.py::test_x[domain-cpp-repeat1-lr0.001]", "s.py::test_x[domain-cpp-lr0.001]"),
    ("s.py::test_x[lora]", "s.py::test_x[lora]"),
    ("s.py::test_x", "s.py::test_x"),
])
def test_repeat_base_strips_only_the_repeat_part(nodeid, base):
    assert repeat_base(nodeid) == base


def test_repeated_parametrized_tests_are_compared_by_their_mean():
    tests = with_repeats([{"nodeid": f"s.py::test_x[repeat{i}-lora]", "metrics": {"lora.ece": v}}
                          for i, v in enumerate([0.5, 0.6])])
    assert tests[0]["repeats"]["base_nodeid"] == "s.py::test_x[lora]"
    assert tests[0]["repeats"]["metrics"]["lora.ece"]["mean"] == pytest.approx(0.55)
    now = metrics_from_payload({"tests": tests})
    assert list(now) == ["s.py::test_x[lora]"]
    result = compare({"s.py::test_x[lora]": {"lora.ece": 0.05}}, now, ["ece:+0.01"])
    assert [row.verdict for row in result.rows] == ["REGRESSION"] and not result.passed
