"""Master weights: whatever dtype the base loads in, every tensor a run trains is float32, and so
is its optimizer state (AdamW makes its moments like the parameter), as peft keeps its adapters
and the HF Trainer its weights. Frozen tensors keep the base's dtype and share its storage.

On a half-precision base (bfloat16 or float16: the default on CUDA, see models/dtypes.py) a run
that trains some tensors and not others holds both dtypes, and one matmul takes one. So each
module that owns a trained tensor computes in float32: its half-precision floating inputs are cast
up and its float32 outputs cast back to the base's dtype, so the frozen modules around it see the
dtype they were loaded in (peft does the same around a LoRA adapter; peft's own layers are left to
it); a task's fresh head (the classifier) keeps its float32 logits. This holds in training and in
every measurement after it; under the recipe's autocast (bf16 or fp16) autocast still decides
what each matmul runs in. A frozen half-precision tensor owned by
the same module as a trained one (a bias left frozen beside its trained weight) gets a float32
copy of its own, for the same reason. On a float32 base none of this does anything.
"""

from __future__ import annotations

import sys
from collections import Counter

import torch

HALF = (torch.bfloat16, torch.float16)
MASTER = torch.float32


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a trained tensor of `dtype` trains in: float32 for a half-precision one, else its own."""
    return MASTER if dtype in HALF else dtype


def stream_dtype(model, trained_ids: set) -> torch.dtype | None:
    """The half dtype most of the model's frozen floating parameters hold (the base's), or None
    when none is half precision (a float32 base, or a run that trains everything)."""
    counts = Counter(p.dtype for p in model.parameters() if id(p) not in trained_ids and p.dtype in HALF)
    return counts.most_common(1)[0][0] if counts else None


def _peft_owned(model) -> set:
    """ids of the modules inside peft's tuner layers (peft casts around its adapters itself)."""
    peft = sys.modules.get("peft")  # no peft imported: no peft layer can exist
    if peft is None:
        return set()
    tuner = peft.tuners.tuners_utils.BaseTunerLayer
    return {id(inner) for module in model.modules() if isinstance(module, tuner) for inner in module.modules()}


def _cast(value, to: torch.dtype, source: tuple):
    """`value` with each floating tensor of a dtype in `source` cast to `to`, inside tuples and lists."""
    if torch.is_tensor(value):
        return value.to(to) if value.dtype in source else value
    if type(value) in (tuple, list):
        return type(value)(_cast(item, to, source) for item in value)
    return value


def cast_at_boundaries(model, trained: dict, heads=()) -> list:
    """On a model holding frozen half-precision parameters, make each module that owns a trained
    (float32) parameter of `trained` (name -> parameter) compute in float32 between the base's
    dtype outside it: see the module's docstring. A module owning only `heads` parameters (a
    task's fresh head, whose output is the model's) keeps its float32 output. Returns the hooks'
    handles (none on a float32 base)."""
    trained_ids, head_ids = {id(p) for p in trained.values()}, {id(p) for p in heads}
    stream = stream_dtype(model, trained_ids)
    if stream is None:
        return []
    skipped = _peft_owned(model)
    handles = []

    def inputs_up(module, args, kwargs):
        return _cast(args, MASTER, HALF), {k: _cast(v, MASTER, HALF) for k, v in kwargs.items()}

    def outputs_down(module, args, output):
        return _cast(output, stream, (MASTER,))

    for module in model.modules():
        own = list(module.named_parameters(recurse=False))
        if id(module) in skipped or not any(id(p) in trained_ids for _, p in own):
            continue
        for _, param in own:
            if id(param) not in trained_ids and param.dtype in HALF:
                param.data = param.data.to(MASTER)  # frozen, but beside a trained tensor in one matmul
        handles.append(module.register_forward_pre_hook(inputs_up, with_kwargs=True))
        if not all(id(p) in head_ids for _, p in own):
            handles.append(module.register_forward_hook(outputs_down))
    return handles
