"""Feature extraction (seed 002): the network frozen, only the output head trains.

When the head is tied to the input embeddings, it is untied first (its own Parameter; the
loop gives it its own storage before training), so training the head leaves the embeddings,
and so every feature, untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stance_harness.core.errors import HarnessError
from stance_harness.runs.methods.base import (
    Method,
    MethodConfig,
    params_where,
    register_method,
    set_trainable,
    tied_head,
)


@dataclass(frozen=True)
class FeatureExtractionConfig(MethodConfig):
    train_final_norm: bool = field(default=False, metadata={"help": "also train the final norm before the head"})


@register_method
class FeatureExtraction(Method):
    """Everything frozen but the output head (untied from the embeddings if shared) (seed 002)."""

    name = "feature-extraction"
    config_cls = FeatureExtractionConfig

    def prepare(self, model, ctx):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise HarnessError(f"feature-extraction: the {ctx.anatomy.model_type} model has no output head to train")
        if tied_head(model):
            head.weight = torch.nn.Parameter(head.weight.detach())  # untied; un-shared by the loop
            model.config.tie_word_embeddings = False
        roles = {"head"} | ({"final_norm"} if ctx.config.train_final_norm else set())
        names = params_where(model, ctx.anatomy, lambda p: p.layer is None and p.kind.split(".")[0] in roles)
        set_trainable(model, names)
        return model
