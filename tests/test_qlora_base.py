"""The session's full-precision base loads on first use (issue 30, item 1): a QLoRA-only session
trains, stores, reloads and measures on its own 4-bit model and never builds it; a session that
mixes methods builds it once, when the first method that shares it runs."""

from pathlib import Path


from stance_harness.models import ModelArgs, load_model
from stance_harness.session import HarnessOptions, HarnessSession

QLORA = {"r": 16, "alpha": 32, "target_modules": ["attention", "mlp"]}  # the locus suite's qlora request
RECIPE = {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5, "seed": 0}  # 2 steps

# Run in a fresh process through the plugin, so the tensors counted are this session's alone.
QLORA_ONLY = '''
import gc
import math
import os

import torch
from bitsandbytes.nn import Linear4bit

from stance_harness import assert_only_targets_changed
from stance_harness.checks.behavior import check_behavior_shift
from stance_harness.runs.methods.lora import target_paths

QLORA = {qlora!r}
RECIPE = {recipe!r}


def live_float_tensors(shapes):
    """Float tensors holding memory (not the meta skeleton's) with one of `shapes`."""
    gc.collect()
    return [tuple(t.shape) for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.is_floating_point()
            and t.device.type != "meta" and tuple(t.shape) in shapes]


def test_qlora_only(train, base_model):
    run = train("qlora", examples=10, recipe=RECIPE, **QLORA)
    assert run.origin == os.environ["EXPECT_ORIGIN"]
    shift = check_behavior_shift(run, "loglik_margin")  # measured; 2 steps need not clear it
    assert math.isfinite(shift.metrics["base"]) and math.isfinite(shift.metrics["adapted"])
    assert_only_targets_changed(run)
    assert run.effective_deltas and all(d.moments.delta_norm > 0 for d in run.effective_deltas
                                   if d.kind in ("q_proj", "down_proj"))
    assert not base_model.base_loaded
    targets = target_paths(base_model.anatomy, run.config)
    quantized = {{n.removeprefix("base_model.model.").removesuffix(".base_layer"): m
                 for n, m in run.model.named_modules() if isinstance(m, Linear4bit)}}
    assert targets and all(path in quantized for path in targets)
    assert {{m.weight.dtype for m in quantized.values()}} == {{torch.uint8}}
    shapes = {{tuple(m.weight.quant_state.shape) for m in quantized.values()}}
    assert live_float_tensors(shapes) == []
    base_model.base  # the count sees a full-precision base once there is one
    assert len(live_float_tensors(shapes)) >= len(quantized)
'''


def test_a_qlora_only_session_trains_stores_reloads_and_measures_without_the_full_base(pytester, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    pytester.makepyfile(test_qlora_only=QLORA_ONLY.format(qlora=QLORA, recipe=RECIPE))
    for origin in ("trained", "loaded"):  # the second session loads the run the first stored
        monkeypatch.setenv("EXPECT_ORIGIN", origin)
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--model", "tiny-qwen2")
        result.assert_outcomes(passed=1)


def session(loaded, store) -> HarnessSession:
    harness = HarnessSession(HarnessOptions("tiny-qwen2", ModelArgs(), [], None, Path("."), [], run_cache=store))
    harness.use_model(loaded)
    return harness


def test_a_mixed_session_loads_the_base_once_when_the_first_method_that_shares_it_runs(counted_loads, tmp_path):
    loaded = load_model("tiny-qwen2")
    harness = session(loaded, tmp_path / "store")
    first = harness.train("qlora", examples=10, recipe=RECIPE, r=4)
    assert (loaded.base_loaded, counted_loads) == (False, [])
    lora = harness.train("lora", examples=10, recipe=RECIPE, r=4)
    assert loaded.base_loaded and counted_loads == [loaded.path]
    shared = {p.data_ptr() for p in loaded.base.parameters()}
    assert any(p.data_ptr() in shared for p in lora.model.parameters())  # lora's frozen weights are the base's
    second = harness.train("qlora", examples=10, recipe=RECIPE, r=8)
    lora.behavior("loglik_margin"), second.behavior("loglik_margin"), first.behavior("loglik_margin")
    assert counted_loads == [loaded.path]
    assert not any(p.data_ptr() in shared for p in second.model.parameters())  # its own 4-bit model


def test_the_skeleton_has_the_base_structure_without_its_weights():
    loaded = load_model("tiny-qwen2", ModelArgs(dtype="bfloat16"))
    skeleton = loaded.skeleton
    before = loaded.base_bytes
    assert not loaded.base_loaded and {p.device.type for p in skeleton.parameters()} == {"meta"}
    weight = next(p for p in skeleton.parameters())
    assert loaded.base_digest(weight) is None and list(loaded.base_parameters()) == []
    base = loaded.base
    assert loaded.base_loaded and loaded.skeleton is base and type(skeleton) is type(base)
    assert [(n, p.shape, p.dtype) for n, p in skeleton.named_parameters()] == \
           [(n, p.shape, p.dtype) for n, p in base.named_parameters()]
    assert before == loaded.base_bytes == sum(p.numel() * 2 for p in base.parameters())
    assert not any(p.requires_grad for p in base.parameters()) and not base.training
    assert loaded.is_causal_lm and len(list(loaded.base_parameters())) == len(list(base.parameters()))
    assert loaded.base_digest(next(base.parameters())) is not None
