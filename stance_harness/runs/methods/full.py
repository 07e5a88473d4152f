"""Full fine-tuning: every weight trains; storing the stance means storing all of them."""

from dataclasses import dataclass

from stance_harness.runs.methods.base import Method, MethodConfig, register_method


@dataclass(frozen=True)
class FullConfig(MethodConfig):
    pass


@register_method
class FullFineTuning(Method):
    """Every parameter trains (seed 000, 002)."""

    name = "full"
    config_cls = FullConfig

    def prepare(self, model, ctx):
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
