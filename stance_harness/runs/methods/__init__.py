"""Adaptation methods, one module each; importing this package registers them all."""

# Registration happens on import; the order here is the order methods are listed in.
from stance_harness.runs.methods import (  # noqa: F401  # noqa: F401
                   discriminative,
                   feature_extraction,
                   full,
                   gradual,
                   hybrid,
                   lora,
                   peft_method,
                   qlora,
                   regularized,
                   replay,
                   selective,
                   surgical_lora,
)
from stance_harness.runs.methods.base import (
                   ENTRY_POINT_GROUP,
                   METHODS,
                   Method,
                   MethodConfig,
                   TrainingContext,
                   method_code,
                   method_config,
                   register_method,
)

__all__ = ["ENTRY_POINT_GROUP", "METHODS", "Method", "MethodConfig", "TrainingContext", "method_code",
           "method_config", "register_method"]
