"""stance-harness: hypotheses about fine-tuning, as pytest tests.

The public names import lazily, so loading the pytest plugin does not import torch.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "check_change_concentrated": "harness.assertions",
    "check_only_targets_changed": "harness.assertions",
    "check_change_spread": "harness.assertions",
    "check_gradients_stable": "harness.assertions",
    "check_behavior_shift": "harness.assertions",
    "check_no_forgetting": "harness.assertions",
    "check_ece": "harness.assertions",
    "check_ece_not_worse": "harness.assertions",
    "check_low_rank_update": "harness.assertions",
    "check_greater": "harness.assertions",
    "check_less": "harness.assertions",
    "check_not_worse": "harness.assertions",
    "assert_greater": "harness.assertions",
    "assert_less": "harness.assertions",
    "assert_not_worse": "harness.assertions",
    "check_equivalent": "harness.assertions",
    "assert_equivalent": "harness.assertions",
    "RunSet": "harness.run",
    "runset": "harness.run",
    "behavior_effect": "harness.assertions",
    "check_bounded": "harness.assertions",
    "assert_bounded": "harness.assertions",
    "plan_claim": "harness.analysis.replication",
    "HypothesisInconclusive": "harness.assertions",
    "assert_all": "harness.assertions",
    "assert_training_healthy": "harness.assertions",
    "check_training_healthy": "harness.assertions",
    "check_behavior_localized": "harness.assertions",
    "assert_behavior_localized": "harness.assertions",
    "check_few_intruders": "harness.assertions",
    "assert_few_intruders": "harness.assertions",
    "check_layer_profiles_agree": "harness.assertions",
    "assert_layer_profiles_agree": "harness.assertions",
    "check_negation_reverses": "harness.assertions",
    "assert_negation_reverses": "harness.assertions",
    "declare_metric": "harness.report.metrics",
    "declare_metrics": "harness.report.metrics",
    "TrainingRequest": "harness.request",
    "assert_change_concentrated": "harness.assertions",
    "assert_only_targets_changed": "harness.assertions",
    "assert_change_spread": "harness.assertions",
    "assert_gradients_stable": "harness.assertions",
    "assert_behavior_shift": "harness.assertions",
    "assert_no_forgetting": "harness.assertions",
    "assert_ece": "harness.assertions",
    "assert_ece_not_worse": "harness.assertions",
    "assert_low_rank_update": "harness.assertions",
    "HypothesisFailed": "harness.assertions",
    "CheckResult": "harness.report.records",
    "Recipe": "harness.recipe",
    "HarnessError": "harness.registry",
    "load_model": "harness.models",
    "load_stance": "harness.stances",
    "METHODS": "harness.methods",
    "Method": "harness.methods",
    "MethodConfig": "harness.methods",
    "TrainingContext": "harness.methods",
    "register_method": "harness.methods",
    "MODELS": "harness.models",
    "JUDGES": "harness.judges",
    "Judge": "harness.judges",
    "register_judge": "harness.judges",
    "relative_depth_analog": "harness.models",
    "run_from_model": "harness.from_model",
    "StanceCallback": "harness.callback",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
