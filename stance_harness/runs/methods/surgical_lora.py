"""Surgical LoRA (seed 000): LoRA on a few chosen layers only, at a higher rank."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from stance_harness.core.errors import HarnessError
from stance_harness.runs.methods.base import register_method
from stance_harness.runs.methods.lora import Lora, LoraMethodConfig


@dataclass(frozen=True)
class SurgicalLoraConfig(LoraMethodConfig):
    method: ClassVar[str] = "surgical-lora"

    r: int = field(default=32, metadata={"help": "rank of the update (seed 000: 32)"})
    alpha: float = field(default=64, metadata={"help": "lora_alpha; the update is scaled by alpha / r"})

    def __post_init__(self):
        super().__post_init__()
        if not self.layers:
            raise HarnessError("surgical-lora: `layers` must name the layers to adapt, e.g. layers=[13, 15]")


@register_method
class SurgicalLora(Lora):
    """LoRA on chosen layers only (rank 32 by default) (seed 000)."""

    name = "surgical-lora"
    config_cls = SurgicalLoraConfig
