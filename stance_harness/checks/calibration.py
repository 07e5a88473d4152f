"""Checks on calibration: a run's expected calibration error under a bound, and not worse than
another run's.
"""

from __future__ import annotations

from stance_harness.analysis.calibration import ece_interval
from stance_harness.checks.common import _names, asserting, conclude, takes_runs
from stance_harness.core.metrics import Estimate
from stance_harness.core.results import CheckResult


def _calibration_rows(found: dict) -> list[list]:
    rows = []
    for bin_ in found["adapted"]["bins"]:
        if bin_["count"]:
            rows.append([f"({bin_['lower']:.3f}, {bin_['upper']:.3f}]", bin_["count"], bin_["confidence"],
                         bin_["accuracy"], abs(bin_["accuracy"] - bin_["confidence"])])
    return rows


_CALIBRATION_HEADERS = ["bin", "count", "confidence", "accuracy", "gap"]


def _calibration_metrics(run, found: dict, n_bins: int) -> dict:
    adapted = found["adapted"]
    metrics = {f"{run.label}.{k}": adapted[k] for k in ("ece", "mce", "brier", "acc1")}
    items = found.get("items")
    if items and items.get("confidence"):  # ECE's bootstrap interval over the predictions, for --fail-on ...@ci
        metrics[f"{run.label}.ece"] = Estimate(adapted["ece"], *ece_interval(items["confidence"], items["correct"],
                                                                             n_bins))
    return metrics


@takes_runs("run")
def check_ece(run, max: float = 0.1, n_bins: int = 15) -> CheckResult:  # noqa: A002 - the issue's name
    """Expected calibration error on held-out data is at most `max` (15 equal-width bins)."""
    bound = max
    found = run.calibration(n_bins)
    adapted = found["adapted"]
    summary = (f"{run.label}: ECE {adapted['ece']:.4f} ({n_bins} bins, {adapted['n']} {found['unit']} predictions; "
               f"Acc@1 {adapted['acc1']:.3f}, MCE {adapted['mce']:.4f}, Brier {adapted['brier']:.4f}); "
               f"allowed {bound:.4f}")
    return conclude([run], CheckResult("assert_ece", adapted["ece"] <= bound, summary, _CALIBRATION_HEADERS,
                                 _calibration_rows(found), dict(adapted, bins=None)), _calibration_metrics(run, found, n_bins))


@takes_runs("run", "than")
def check_ece_not_worse(run, than, tol: float = 0.0, n_bins: int = 15) -> CheckResult:
    """ECE of `run` is at most that of `than` (another Run, e.g. a baseline method) plus `tol`."""
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    found, other = run.calibration(n_bins), than.calibration(n_bins)
    ece, reference = found["adapted"]["ece"], other["adapted"]["ece"]
    mine, theirs = _names([run], [than])  # two hybrid schedules: by the options that differ
    summary = (f"{mine} ECE {ece:.4f} vs {theirs} ECE {reference:.4f} (difference {ece - reference:+.4f}); "
               f"allowed at most {tol:+.4f}")
    rows = [[name, c["adapted"]["ece"], c["adapted"]["mce"], c["adapted"]["brier"], c["adapted"]["acc1"]]
            for name, c in ((mine, found), (theirs, other))]
    return conclude([run, than], CheckResult(
        "assert_ece_not_worse", ece <= reference + tol, summary, ["run", "ECE", "MCE", "Brier", "Acc@1"], rows,
        {"ece": ece, "reference_ece": reference, "difference": ece - reference},
    ), _calibration_metrics(run, found, n_bins))


assert_ece = asserting(check_ece)
assert_ece_not_worse = asserting(check_ece_not_worse)
