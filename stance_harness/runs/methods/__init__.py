"""Adaptation methods, one module each; importing this package registers them all."""

# Registration happens on import; the order here is the order methods are listed in.
from stance_harness.runs.methods import full, lora, surgical_lora, qlora, peft_method, selective, feature_extraction, gradual, discriminative  # noqa: F401
from stance_harness.runs.methods import regularized, replay, hybrid  # noqa: F401
from stance_harness.runs.methods.base import (ENTRY_POINT_GROUP, METHODS, Method, MethodConfig, TrainingContext, method_code, method_config,
                   register_method)

__all__ = ["ENTRY_POINT_GROUP", "METHODS", "Method", "MethodConfig", "TrainingContext", "method_code",
           "method_config", "register_method"]
