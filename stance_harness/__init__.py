"""stance-harness: hypotheses about fine-tuning, as pytest tests.

The public names import lazily, so loading the pytest plugin does not import torch.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "check_change_concentrated": "stance_harness.assertions",
    "check_only_targets_changed": "stance_harness.assertions",
    "check_change_spread": "stance_harness.assertions",
    "check_gradients_stable": "stance_harness.assertions",
    "check_behavior_shift": "stance_harness.assertions",
    "check_no_forgetting": "stance_harness.assertions",
    "check_ece": "stance_harness.assertions",
    "check_ece_not_worse": "stance_harness.assertions",
    "check_low_rank_update": "stance_harness.assertions",
    "check_greater": "stance_harness.assertions",
    "check_less": "stance_harness.assertions",
    "check_not_worse": "stance_harness.assertions",
    "assert_greater": "stance_harness.assertions",
    "assert_less": "stance_harness.assertions",
    "assert_not_worse": "stance_harness.assertions",
    "check_equivalent": "stance_harness.assertions",
    "assert_equivalent": "stance_harness.assertions",
    "RunSet": "stance_harness.runs.run",
    "runset": "stance_harness.runs.run",
    "behavior_effect": "stance_harness.assertions",
    "check_bounded": "stance_harness.assertions",
    "assert_bounded": "stance_harness.assertions",
    "plan_claim": "stance_harness.analysis.replication",
    "HypothesisInconclusive": "stance_harness.assertions",
    "assert_all": "stance_harness.assertions",
    "assert_training_healthy": "stance_harness.assertions",
    "check_training_healthy": "stance_harness.assertions",
    "check_behavior_localized": "stance_harness.assertions",
    "assert_behavior_localized": "stance_harness.assertions",
    "check_few_intruders": "stance_harness.assertions",
    "assert_few_intruders": "stance_harness.assertions",
    "check_layer_profiles_agree": "stance_harness.assertions",
    "assert_layer_profiles_agree": "stance_harness.assertions",
    "check_negation_reverses": "stance_harness.assertions",
    "assert_negation_reverses": "stance_harness.assertions",
    "declare_metric": "stance_harness.core.metrics",
    "declare_metrics": "stance_harness.core.metrics",
    "TrainingRequest": "stance_harness.runs.request",
    "assert_change_concentrated": "stance_harness.assertions",
    "assert_only_targets_changed": "stance_harness.assertions",
    "assert_change_spread": "stance_harness.assertions",
    "assert_gradients_stable": "stance_harness.assertions",
    "assert_behavior_shift": "stance_harness.assertions",
    "assert_no_forgetting": "stance_harness.assertions",
    "assert_ece": "stance_harness.assertions",
    "assert_ece_not_worse": "stance_harness.assertions",
    "assert_low_rank_update": "stance_harness.assertions",
    "HypothesisFailed": "stance_harness.assertions",
    "CheckResult": "stance_harness.report.records",
    "Recipe": "stance_harness.runs.recipe",
    "HarnessError": "stance_harness.core.registry",
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
    "StanceCallback": "stance_harness.runs.callback",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stance_harness' has no attribute {name!r}")
