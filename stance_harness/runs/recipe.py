"""The recipe: a run's hyperparameters, under Hugging Face TrainingArguments' names."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from stance_harness.core.config import build_config
from stance_harness.core.errors import HarnessError

PRECISION_FIELDS = ("bf16", "fp16")  # resolved against the device by devices.resolve_precision
# TrainingArguments' optim names the loop builds (training.build_optimizer); adamw_torch_fused is
# TrainingArguments' own default on torch >= 2.8: one kernel per step, no temporaries the size of a tensor.
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "adamw_8bit")
_NOT_NUMBERS = (*PRECISION_FIELDS, "gradient_checkpointing", "optim")
_RECIPE_ALIASES = {"lr": "learning_rate", "epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size"}


@dataclass(frozen=True)
class Recipe:
    """Hyperparameters under Hugging Face TrainingArguments' names."""

    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps (then linear decay to 0)"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "clip threshold; None disables"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    num_train_epochs: int = field(default=3, metadata={"help": "passes over the examples"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "examples per micro-batch"})
    seed: int = field(default=42, metadata={"help": "seeds init, shuffling and dropout"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per example, truncated beyond"})
    bf16: bool | str = field(default="auto", metadata={
        "help": "autocast to bfloat16 (fp32 master weights); auto: on where the device supports it, off on the CPU"})
    fp16: bool = field(default=False, metadata={
        "help": "autocast to float16 with a grad scaler (fp32 master weights); CUDA only"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each block's activations in the backward pass instead of keeping them"})
    optim: str = field(default="adamw_torch_fused", metadata={
        "help": f"optimizer: {', '.join(OPTIMIZERS)} (bitsandbytes' 8-bit AdamW: moments in 8 bits)"})

    def __post_init__(self):
        if not (isinstance(self.bf16, bool) or self.bf16 == "auto"):
            raise HarnessError(f"recipe: bf16 must be True, False or 'auto', got {self.bf16!r}")
        if not isinstance(self.fp16, bool):
            raise HarnessError(f"recipe: fp16 must be True or False, got {self.fp16!r}")
        if self.fp16 and self.bf16 is True:
            raise HarnessError("recipe: bf16=True and fp16=True are both set; choose one")
        if not isinstance(self.gradient_checkpointing, bool):
            raise HarnessError(f"recipe: gradient_checkpointing must be True or False, got {self.gradient_checkpointing!r}")
        if self.optim not in OPTIMIZERS:
            raise HarnessError(f"recipe: optim must be one of {', '.join(OPTIMIZERS)}, got {self.optim!r}")
        for f in fields(self):
            if f.name in _NOT_NUMBERS:
                continue
            value = getattr(self, f.name)
            integer = f.type == "int"
            if value is None and f.name == "max_grad_norm":
                continue
            if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
                kind = "an integer" if integer else "a number"
                raise HarnessError(f"recipe: {f.name} must be {kind}, got {value!r}")
        checks = [
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("max_grad_norm", self.max_grad_norm is None or self.max_grad_norm > 0, "> 0 or None"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, ">= 1"),
            ("num_train_epochs", self.num_train_epochs >= 1, ">= 1"),
            ("per_device_train_batch_size", self.per_device_train_batch_size >= 1, ">= 1"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("max_seq_length", self.max_seq_length >= 8, ">= 8"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise HarnessError(f"recipe: {name} must be {rule}, got {getattr(self, name)!r}")

    @classmethod
    def of(cls, value: "Recipe | dict | None" = None, **overrides) -> "Recipe":
        return build_config(cls, value, what="recipe", unknown="recipe has no field", aliases=_RECIPE_ALIASES,
                            **overrides)

    def as_dict(self) -> dict:
        return asdict(self)
