"""Anatomy: one naming scheme for the blocks and modules of every supported architecture.

`L15.v_proj.weight` names the same thing on Qwen2, Phi, Llama, GPT-2 and BERT. Parameters
outside the blocks are named by role: `embed.*`, `final_norm.*`, `head.*`.
LoRA parameters keep their role as the leaf: `L15.v_proj.lora_A`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from stance_harness.core.registry import HarnessError, Registry, suggest

# Module kinds, grouped. The group names select several kinds at once (kinds=["attention"]).
# "qv" is the query and value projections, or the fused projection that holds them (GPT-2).
KIND_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "norm": ("attn_norm", "mlp_norm"),
    "qv": ("q_proj", "v_proj", "qkv_proj"),
}


@dataclass(frozen=True)
class ArchitectureLayout:
    """Where the blocks live and what each block's submodules are, by kind."""

    blocks: tuple[str, ...]  # candidate dotted paths of the ModuleList of blocks
    kinds: dict[str, str]  # module path inside a block -> canonical kind
    outside: dict[str, str] = field(default_factory=dict)  # path prefix -> role, outside blocks


ARCHITECTURES: Registry[ArchitectureLayout] = Registry("architecture")

_DECODER_LAYOUT = dict(
    blocks=("model.layers", "layers"),
    kinds={
        "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
        "self_attn.v_proj": "v_proj", "self_attn.o_proj": "o_proj",
        "mlp.gate_proj": "gate_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "down_proj",
        "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
    },
    outside={"model.embed_tokens": "embed", "embed_tokens": "embed", "model.norm": "final_norm",
             "norm": "final_norm", "lm_head": "head", "classifier": "head"},
)
ARCHITECTURES.register("qwen2", ArchitectureLayout(**_DECODER_LAYOUT))
ARCHITECTURES.register("llama", ArchitectureLayout(**_DECODER_LAYOUT))
ARCHITECTURES.register("phi", ArchitectureLayout(
    blocks=("model.layers", "layers"),
    kinds={
        "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
        "self_attn.v_proj": "v_proj", "self_attn.dense": "o_proj",
        "mlp.fc1": "up_proj", "mlp.fc2": "down_proj",
        # Phi runs attention and MLP in parallel off one norm.
        "input_layernorm": "attn_norm",
    },
    outside={"model.embed_tokens": "embed", "model.final_layernorm": "final_norm",
             "lm_head": "head", "classifier": "head"},
))
ARCHITECTURES.register("gpt2", ArchitectureLayout(
    blocks=("transformer.h", "h"),
    kinds={
        "attn.c_attn": "qkv_proj", "attn.c_proj": "o_proj",
        "mlp.c_fc": "up_proj", "mlp.c_proj": "down_proj",
        "ln_1": "attn_norm", "ln_2": "mlp_norm",
    },
    outside={"transformer.wte": "embed", "transformer.wpe": "embed_pos", "wte": "embed",
             "wpe": "embed_pos", "transformer.ln_f": "final_norm", "ln_f": "final_norm",
             "lm_head": "head", "classifier": "head"},
))
ARCHITECTURES.register("bert", ArchitectureLayout(
    blocks=("bert.encoder.layer", "encoder.layer"),
    kinds={
        "attention.self.query": "q_proj", "attention.self.key": "k_proj",
        "attention.self.value": "v_proj", "attention.output.dense": "o_proj",
        "intermediate.dense": "up_proj", "output.dense": "down_proj",
        "attention.output.LayerNorm": "attn_norm", "output.LayerNorm": "mlp_norm",
    },
    outside={"bert.embeddings": "embed", "embeddings": "embed", "bert.pooler": "pooler",
             "pooler": "pooler", "cls": "head", "classifier": "head"},
))

# peft wraps names: "base_model.model.<name>", "<module>.base_layer.weight",
# "<module>.lora_A.<adapter>.weight". These patterns undo that.
_PEFT_PREFIX = "base_model.model."
_LORA_LEAF = re.compile(r"^(?P<module>.+)\.(?P<leaf>lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.[^.]+(\.weight)?$")
# any other tuner's parameter of the default adapter: "<module>.ia3_l.default", "<module>.lora_magnitude_vector.default.weight"
_ADAPTER_LEAF = re.compile(r"^(?P<module>.+)\.(?P<leaf>[A-Za-z0-9_]+)\.default(\.weight)?$")


@dataclass(frozen=True)
class ParamName:
    """Where one parameter sits: layer (None outside blocks), module kind or role, leaf."""

    layer: int | None
    kind: str
    leaf: str  # weight, bias, lora_A, lora_B

    @property
    def module(self) -> str:
        return f"L{self.layer}.{self.kind}" if self.layer is not None else self.kind

    def __str__(self) -> str:
        return f"{self.module}.{self.leaf}"


class Anatomy:
    """Blocks and module kinds of one model instance, with canonical parameter names."""

    def __init__(self, model_type: str, num_layers: int, block_path: str, layout: ArchitectureLayout):
        self.model_type = model_type
        self.num_layers = num_layers
        self.block_path = block_path
        self.layout = layout
        self._block_re = re.compile(rf"^{re.escape(block_path)}\.(\d+)\.(.+)$")

    @classmethod
    def of(cls, model) -> "Anatomy":
        """Build the anatomy of a transformers model (plain or wrapped by peft)."""
        base = unwrap(model)
        model_type = getattr(base.config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise HarnessError(
                f"no anatomy for model_type {model_type!r}.{suggest(str(model_type), ARCHITECTURES.names())} "
                f"Supported: {', '.join(ARCHITECTURES.names())}"
            )
        layout = ARCHITECTURES.get(model_type)
        modules = dict(base.named_modules())
        for path in layout.blocks:
            blocks = modules.get(path)
            if blocks is not None and hasattr(blocks, "__len__"):
                return cls(model_type, len(blocks), path, layout)
        raise HarnessError(f"{model_type}: none of the block paths {layout.blocks} exist in the model")

    # -- names ---------------------------------------------------------------------------
    def name_of(self, param_name: str) -> ParamName:
        """Canonical name of a raw parameter name, with peft's wrapping removed."""
        name = param_name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
        leaf = None
        m = _LORA_LEAF.match(name) or _ADAPTER_LEAF.match(name)
        if m:
            name, leaf = m.group("module"), m.group("leaf")
        else:
            name, _, leaf = name.rpartition(".")
        block = self._block_re.match(name)
        if block:
            layer, inner = int(block.group(1)), block.group(2)
            return ParamName(layer, self.layout.kinds.get(inner, inner), leaf)
        for prefix, role in self.layout.outside.items():
            if name == prefix or name.startswith(prefix + "."):
                rest = name[len(prefix):].lstrip(".")
                return ParamName(None, f"{role}.{rest}" if rest else role, leaf)
        return ParamName(None, name, leaf)

    def module_paths(self, layers=None, kinds=None) -> list[str]:
        """Raw dotted module paths (in the unwrapped model) for chosen layers x kinds."""
        layer_list = self.check_layers(layers)
        kind_set = set(self.check_kinds(kinds))
        return [
            f"{self.block_path}.{i}.{inner}"
            for i in layer_list
            for inner, kind in self.layout.kinds.items()
            if kind in kind_set
        ]

    # -- validation ----------------------------------------------------------------------
    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.layout.kinds.values()))

    def check_layers(self, layers) -> list[int]:
        if layers is None:
            return list(range(self.num_layers))
        if isinstance(layers, (int, str)):
            raise HarnessError(f"layers must be a list of layer indices, e.g. [13, 15], not {layers!r}")
        out = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
                negative = (" (no negative indices: a layer is named by its position from the bottom, so "
                            f"the last is {self.num_layers - 1})") if isinstance(layer, int) and layer < 0 else ""
                raise HarnessError(
                    f"layer {layer!r} does not exist in this {self.model_type} model: "
                    f"it has {self.num_layers} layers, 0..{self.num_layers - 1}{negative}"
                )
            out.append(layer)
        return sorted(set(out))

    def check_kinds(self, kinds) -> list[str]:
        """Expand groups (attention, mlp, norm) and check each kind exists in this model."""
        if kinds is None:
            return list(self.kinds)
        if isinstance(kinds, str):
            kinds = [kinds]
        out: list[str] = []
        for kind in kinds:
            expanded = KIND_GROUPS.get(kind, (kind,))
            present = [k for k in expanded if k in self.kinds]
            if not present:
                known = list(self.kinds) + list(KIND_GROUPS)
                raise HarnessError(
                    f"module kind {kind!r} does not exist in this {self.model_type} model."
                    f"{suggest(kind, known)} It has: {', '.join(self.kinds)} "
                    f"(groups: {', '.join(KIND_GROUPS)})"
                )
            out.extend(k for k in present if k not in out)
        return out

    # -- relative depth ------------------------------------------------------------------
    def analog(self, layers, depth: int) -> list[int]:
        """Map layer indices of a `depth`-layer model to this model by relative depth."""
        return [relative_depth_analog(i, depth, self.num_layers) for i in layers]

    def locus(self, layer: int) -> str:
        """early / middle / late third of the network."""
        return locus_of(layer, self.num_layers)


def relative_depth_analog(layer: int, from_layers: int, to_layers: int) -> int:
    """The layer at the same relative depth: 13 of 24 -> 17 of 32; 15 of 24 -> 20 of 32."""
    if not 0 <= layer < from_layers:
        raise HarnessError(f"layer {layer} is out of range for a {from_layers}-layer model")
    return min(to_layers - 1, int(layer * to_layers / from_layers + 0.5))


def locus_of(layer: float, num_layers: int) -> str:
    position = (layer + 0.5) / num_layers
    return "early" if position < 1 / 3 else "middle" if position < 2 / 3 else "late"


def unwrap(model):
    """The transformers model inside a peft wrapper, or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
