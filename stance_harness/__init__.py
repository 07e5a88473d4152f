"""stance-harness: hypotheses about fine-tuning, as pytest tests.

The public names import lazily, so loading the pytest plugin does not import torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "check_change_concentrated": "stance_harness.checks.weights",
    "check_only_targets_changed": "stance_harness.checks.weights",
    "check_change_spread": "stance_harness.checks.weights",
    "check_gradients_stable": "stance_harness.checks.training",
    "check_behavior_shift": "stance_harness.checks.behavior",
    "check_no_forgetting": "stance_harness.checks.behavior",
    "check_ece": "stance_harness.checks.calibration",
    "check_ece_not_worse": "stance_harness.checks.calibration",
    "check_low_rank_update": "stance_harness.checks.weights",
    "check_greater": "stance_harness.checks.comparisons",
    "check_less": "stance_harness.checks.comparisons",
    "check_not_worse": "stance_harness.checks.comparisons",
    "assert_greater": "stance_harness.checks.comparisons",
    "assert_less": "stance_harness.checks.comparisons",
    "assert_not_worse": "stance_harness.checks.comparisons",
    "check_equivalent": "stance_harness.checks.comparisons",
    "assert_equivalent": "stance_harness.checks.comparisons",
    "RunSet": "stance_harness.runs.runset",
    "runset": "stance_harness.runs.runset",
    "behavior_effect": "stance_harness.checks.behavior",
    "check_bounded": "stance_harness.checks.behavior",
    "assert_bounded": "stance_harness.checks.behavior",
    "plan_claim": "stance_harness.analysis.replication",
    "HypothesisInconclusive": "stance_harness.checks.common",
    "assert_all": "stance_harness.checks.common",
    "assert_training_healthy": "stance_harness.checks.training",
    "check_training_healthy": "stance_harness.checks.training",
    "check_behavior_localized": "stance_harness.checks.behavior",
    "assert_behavior_localized": "stance_harness.checks.behavior",
    "check_few_intruders": "stance_harness.checks.weights",
    "assert_few_intruders": "stance_harness.checks.weights",
    "check_layer_profiles_agree": "stance_harness.checks.weights",
    "assert_layer_profiles_agree": "stance_harness.checks.weights",
    "check_negation_reverses": "stance_harness.checks.behavior",
    "assert_negation_reverses": "stance_harness.checks.behavior",
    "declare_metric": "stance_harness.core.metrics",
    "declare_metrics": "stance_harness.core.metrics",
    "TrainingRequest": "stance_harness.runs.request",
    "assert_change_concentrated": "stance_harness.checks.weights",
    "assert_only_targets_changed": "stance_harness.checks.weights",
    "assert_change_spread": "stance_harness.checks.weights",
    "assert_gradients_stable": "stance_harness.checks.training",
    "assert_behavior_shift": "stance_harness.checks.behavior",
    "assert_no_forgetting": "stance_harness.checks.behavior",
    "assert_ece": "stance_harness.checks.calibration",
    "assert_ece_not_worse": "stance_harness.checks.calibration",
    "assert_low_rank_update": "stance_harness.checks.weights",
    "HypothesisFailed": "stance_harness.checks.common",
    "CheckResult": "stance_harness.core.results",
    "Recipe": "stance_harness.runs.recipe",
    "HarnessError": "stance_harness.core.errors",
    "load_model": "stance_harness.models",
    "load_stance": "stance_harness.stances",
    "METHODS": "stance_harness.runs.methods",
    "Method": "stance_harness.runs.methods",
    "MethodConfig": "stance_harness.runs.methods",
    "TrainingContext": "stance_harness.runs.methods",
    "register_method": "stance_harness.runs.methods",
    "MODELS": "stance_harness.models",
    "JUDGES": "stance_harness.judges",
    "Judge": "stance_harness.judges",
    "register_judge": "stance_harness.judges",
    "relative_depth_analog": "stance_harness.models",
    "run_from_model": "stance_harness.runs.from_model",
    "StanceCallback": "stance_harness.callback",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name.startswith(("check_", "assert_")):  # a check added to stance_harness/checks/ (a new measurement's)
        found = importlib.import_module("stance_harness.checks").check_helper(name)
        if found is not None:
            return found
    raise AttributeError(f"module 'stance_harness' has no attribute {name!r}")
