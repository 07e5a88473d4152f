"""QLoRA: the base loaded 4-bit (bitsandbytes nf4) and frozen; LoRA adapters train on top."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import BitsAndBytesConfig
from transformers.pytorch_utils import Conv1D

from stance_harness.core.devices import resolve_device
from stance_harness.core.errors import HarnessError
from stance_harness.runs.instruments import MAP_LARGE_FROM, map_large_allocations
from stance_harness.runs.methods.base import bitsandbytes_module, peft_module, register_method
from stance_harness.runs.methods.lora import Lora, LoraMethodConfig, target_paths

COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")


def resolve_compute_dtype(compute_dtype: str, precision: str) -> str:
    """The dtype the 4-bit layers compute in: as given, or for "auto" the run's precision (float16
    under fp16, bfloat16 under bf16), and QLoRA's own bfloat16 when the run trains in fp32."""
    if compute_dtype != "auto":
        return compute_dtype
    return "float16" if precision == "fp16" else "bfloat16"


@dataclass(frozen=True)
class QloraConfig(LoraMethodConfig):
    method: ClassVar[str] = "qlora"

    r: int = field(default=16, metadata={"help": "rank of the update"})
    alpha: float = field(default=32, metadata={"help": "lora_alpha; the update is scaled by alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "lora_dropout"})
    target_modules: tuple = field(default=("q_proj", "k_proj", "v_proj", "o_proj"), metadata={
        "help": "module kinds or groups (q_proj, v_proj, attention, mlp, ...); each must be a linear layer"})
    layers: tuple | None = field(default=None, metadata={"help": "layer indices; None means every layer"})
    compute_dtype: str = field(default="auto", metadata={
        "help": f"dtype the 4-bit layers dequantize to for their matmuls: {', '.join(COMPUTE_DTYPES)}; auto: "
                f"the recipe's precision (float16 under fp16, else bfloat16)"})
    double_quant: bool = field(default=False, metadata={
        "help": "also quantize the per-block scales (bnb_4bit_use_double_quant)"})

    def __post_init__(self):
        super().__post_init__()
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise HarnessError(
                f"qlora: compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if not isinstance(self.double_quant, bool):
            raise HarnessError(f"qlora: double_quant must be True or False, got {self.double_quant!r}")


@contextlib.contextmanager
def _adapter_off(model):
    with model.disable_adapter():
        yield model


def is_quantizable(module) -> bool:
    """What transformers' replace_with_bnb_linear converts: exact nn.Linear, and Conv1D (transposed)."""
    return type(module) is torch.nn.Linear or isinstance(module, Conv1D)


@register_method
class Qlora(Lora):
    """LoRA adapters on a base loaded 4-bit (bitsandbytes nf4) and frozen (seed 001)."""

    name = "qlora"
    config_cls = QloraConfig

    def check(self, ctx):
        # Decided on the base's modules without its weights (the skeleton), before any 4-bit copy is
        # made; paths are the raw model's (a task head, wrapped on later, adds its own prefix).
        anatomy = ctx.loaded.anatomy
        modules = dict(ctx.loaded.skeleton.named_modules())
        refused = {}
        for path in target_paths(anatomy, ctx.config):
            module = modules.get(path)
            if module is None or not is_quantizable(module):
                kind = anatomy.name_of(f"{path}.weight").kind
                refused.setdefault(kind, type(module).__name__ if module is not None else "missing")
        if refused:
            listed = ", ".join(f"{kind} ({cls})" for kind, cls in refused.items())
            linear_kinds = [kind for kind in anatomy.kinds
                            if all(is_quantizable(modules.get(p)) for p in anatomy.module_paths([0], [kind]))]
            raise HarnessError(
                f"qlora cannot quantize the targets of this {anatomy.model_type} model: {listed} "
                f"are not linear layers, and bitsandbytes quantizes only torch.nn.Linear (and transformers' "
                f"Conv1D) to 4-bit, so the adapters would sit on a full-precision base. "
                f"Its linear kinds: {', '.join(linear_kinds) or 'none'}; or use method 'lora'."
            )

    def load(self, ctx):
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=getattr(torch, resolve_compute_dtype(ctx.config.compute_dtype, ctx.precision)),
            bnb_4bit_use_double_quant=ctx.config.double_quant,
        )
        # Without a device_map transformers puts 4-bit models on cuda:0 whenever CUDA exists; a
        # sharded base is sharded again the same way.
        device_map = ctx.loaded.args.device_map or {"": resolve_device(ctx.loaded.args.device)}
        if device_map == {"": "cpu"} and ctx.loaded.base_bytes >= MAP_LARGE_FROM:
            # The load reads each matrix in float32 and frees it once quantized; with glibc's adaptive
            # threshold the freed blocks stay in the heap (Qwen2-0.5B's shapes: 2.5 GiB of RSS, not 1.2).
            map_large_allocations()
        model = ctx.loaded.fresh(quantization_config=quantization, device_map=device_map)
        linear_4bit = bitsandbytes_module().nn.Linear4bit
        four_bit = {name for name, module in model.named_modules() if isinstance(module, linear_4bit)}
        for name in four_bit:
            # On CPUs with AVX512-BF16, an eval-mode no-grad forward repacks the 4-bit weight in
            # place (new bytes, new shape): frozen weights would look changed and dequantize wrongly.
            model.get_submodule(name).support_avx512bf16_for_cpu = False
        unquantized = [path for path in target_paths(ctx.loaded.anatomy, ctx.config) if path not in four_bit]
        if unquantized:
            raise HarnessError(
                f"qlora: transformers left {len(unquantized)} target modules of this {ctx.loaded.anatomy.model_type} "
                f"model unquantized (first: {unquantized[0]}); the adapters would sit on a full-precision base"
            )
        return model

    def own_base(self, model):
        """Its own 4-bit base with the adapter switched off, so the quantization error is not
        charged to training."""
        return _adapter_off(model)

    def prepare(self, model, ctx):
        linear_4bit = bitsandbytes_module().nn.Linear4bit
        # Freezes the base and upcasts its fp16/bf16 non-4-bit parameters (norms, embeddings) to float32;
        # turns on the recipe's gradient checkpointing (non-reentrant, as the loop does for every method).
        model = peft_module().prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=ctx.recipe.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        for module in model.modules():
            if isinstance(module, linear_4bit) and module.bias is not None:
                # Linear4bit.forward casts its bias to the compute dtype in place on first use; done
                # here, before the frozen snapshot, frozen biases stay bit-identical through training.
                module.bias.data = module.bias.data.to(module.compute_dtype)
        return self.wrap(model, ctx.anatomy, ctx.config)

    @staticmethod
    def base_weight(module):
        """The frozen base matrix under a LoRA layer, dequantized from 4-bit, in float32.

        float32 because effective_deltas adds ΔW in this dtype: in bf16 a small ΔW would round away.
        """
        bnb = bitsandbytes_module()
        weight = module.get_base_layer().weight
        if isinstance(weight, bnb.nn.Params4bit):
            return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
        return Lora.base_weight(module)
