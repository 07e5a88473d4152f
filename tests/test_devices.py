"""Where runs execute: device=auto, the recipe's bf16 / fp16, sharded loading (device_map=auto) and
one GPU per xdist worker. No GPU here: CUDA paths are reached by faking torch.cuda's answers."""

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest
import torch

import stance_harness
from stance_harness.core.devices import (assign_worker_gpu, check_device_name, count_gpus, resolve_device, resolve_precision,
                             worker_visible_devices)
from stance_harness.runs.methods.qlora import resolve_compute_dtype
from stance_harness.models import ModelArgs, load_model
from stance_harness.runs.recipe import Recipe
from stance_harness.core.errors import HarnessError
from stance_harness.runs.request import TrainingRequest
from stance_harness.runs.training import plan, train_run

from conftest import QUICK


def fake_cuda(monkeypatch, bf16: bool = True, count: int = 1):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


# -- device=auto -----------------------------------------------------------------------------
def test_device_auto_is_the_default_and_resolves_to_the_cpu_here(tiny_qwen2):
    assert ModelArgs().device == "auto" and not torch.cuda.is_available()
    assert tiny_qwen2.args.device == "cpu"  # load_model resolved it
    assert tiny_qwen2.provenance()["device"] == "cpu" and tiny_qwen2.identity()["args"]["device"] == "cpu"


def test_device_auto_picks_the_first_cuda_device_where_there_is_one(monkeypatch):
    assert resolve_device("auto") == "cpu"
    fake_cuda(monkeypatch)
    assert (resolve_device("auto"), resolve_device("cuda"), resolve_device("cuda:1"), resolve_device("cpu")) == \
        ("cuda:0", "cuda:0", "cuda:1", "cpu")


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_that_are_allowed(name):
    check_device_name(name)
    assert ModelArgs.parse(f"device={name}").device == name


@pytest.mark.parametrize("name", ["tpu", "cuda:", "cuda:x", "cuda:-1", "CPU", "mps"])
def test_device_names_that_are_refused(name):
    with pytest.raises(HarnessError, match=rf"device={name!r} is not allowed; use auto, cpu, cuda, cuda:N"):
        ModelArgs(device=name)


# -- bf16 / fp16 -------------------------------------------------------------------------------
@pytest.mark.parametrize("bf16, fp16, device, supported, expected", [
    ("auto", False, "cpu", True, "fp32"),  # auto is off on the CPU: today's CPU numbers do not move
    ("auto", False, "cuda:0", True, "bf16"),
    ("auto", False, "cuda:0", False, "fp32"),  # a GPU without bf16 (V100, T4)
    ("auto", True, "cuda:0", True, "fp16"),
    (True, False, "cpu", True, "bf16"),  # CPU autocast to bfloat16
    (True, False, "cuda:0", True, "bf16"),
    (False, False, "cuda:0", True, "fp32"),
    (False, True, "cuda:0", False, "fp16"),
])
def test_precision_resolves_like_training_arguments(monkeypatch, bf16, fp16, device, supported, expected):
    fake_cuda(monkeypatch, bf16=supported)
    assert resolve_precision(bf16, fp16, device) == expected


@pytest.mark.parametrize("bf16, fp16, device, message", [
    ("auto", True, "cpu", r"fp16=True on the CPU \(device cpu\): float16 autocast with a grad scaler is "
                          r"for CUDA; on the CPU use bf16=True, or neither"),
    (True, True, "cuda:0", "bf16=True and fp16=True are both set; choose one"),
    (True, False, "cuda:0", "bf16=True, but cuda:0 does not support bfloat16; use fp16=True there"),
])
def test_precision_refusals(monkeypatch, bf16, fp16, device, message):
    fake_cuda(monkeypatch, bf16=False)
    with pytest.raises(HarnessError, match=message):
        resolve_precision(bf16, fp16, device)


@pytest.mark.parametrize("values, message", [
    ({"bf16": "yes"}, "recipe: bf16 must be True, False or 'auto', got 'yes'"),
    ({"fp16": 1}, "recipe: fp16 must be True or False, got 1"),
    ({"bf16": True, "fp16": True}, "recipe: bf16=True and fp16=True are both set; choose one"),
])
def test_recipe_checks_its_precision_fields(values, message):
    with pytest.raises(HarnessError, match=message):
        Recipe.of(values)


def test_fp16_on_the_cpu_is_refused_when_the_request_is_built(tiny_qwen2, stance):
    with pytest.raises(HarnessError, match="recipe: fp16=True on the CPU"):
        TrainingRequest.build(tiny_qwen2, stance, "lora", examples=10, recipe={**QUICK, "fp16": True})


def test_the_resolved_precision_is_part_of_the_run_key(tiny_qwen2, stance):
    fp32 = TrainingRequest.build(tiny_qwen2, stance, "lora", examples=10, recipe=QUICK)
    auto = TrainingRequest.build(tiny_qwen2, stance, "lora", examples=10, recipe={**QUICK, "bf16": False})
    bf16 = TrainingRequest.build(tiny_qwen2, stance, "lora", examples=10, recipe={**QUICK, "bf16": True})
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16") and bf16.describe()["precision"] == "bf16"
    assert bf16.key != fp32.key
    assert auto.precision == "fp32"


class LinearOutputs:
    """The dtypes nn.Linear layers return while it is installed (a global forward hook)."""

    def __enter__(self):
        self.dtypes = set()
        self.handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def _hook(self, module, inputs, output):
        if isinstance(module, torch.nn.Linear) and torch.is_tensor(output):
            self.dtypes.add(output.dtype)

    def __exit__(self, *exc):
        self.handle.remove()


def test_bf16_autocasts_inside_the_loop_and_keeps_fp32_master_weights(tiny_qwen2, stance):
    bf16 = TrainingRequest.build(tiny_qwen2, stance, "lora", examples=5, recipe={**QUICK, "bf16": True})
    fp32 = TrainingRequest.build(tiny_qwen2, stance, "lora", examples=5, recipe=QUICK)
    with LinearOutputs() as on:
        run = train_run(bf16, tiny_qwen2, stance)
    with LinearOutputs() as off:
        reference = train_run(fp32, tiny_qwen2, stance)
    assert on.dtypes == {torch.bfloat16} and off.dtypes == {torch.float32}
    trained = [p for p in run.model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    # the same run, computed in bf16: close to the fp32 losses, not equal to them
    assert run.trace.loss != reference.trace.loss
    assert run.trace.loss == pytest.approx(reference.trace.loss, rel=0.02)


def test_fp16_trains_through_a_grad_scaler(tiny_qwen2, stance, monkeypatch):
    # fp16 is refused on the CPU; the loop's scaler path is reached here by building the request past that check
    calls = []

    class CountingScaler(torch.amp.GradScaler):
        def unscale_(self, optimizer):
            calls.append("unscale")
            return super().unscale_(optimizer)

        def step(self, optimizer, *args, **kwargs):
            calls.append("step")
            return super().step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp, "GradScaler", CountingScaler)
    request = dataclasses.replace(TrainingRequest.build(tiny_qwen2, stance, "lora", examples=5, recipe=QUICK),
                                  precision="fp16")
    with LinearOutputs() as seen:
        run = train_run(request, tiny_qwen2, stance)
    assert seen.dtypes == {torch.float16}
    assert len(run.trace.loss) == 1 and calls == ["unscale", "step"]
    assert all(torch.isfinite(torch.tensor(run.trace.loss))) and run.trace.skipped_steps == []
    assert all(p.dtype == torch.float32 for p in run.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("given, precision, expected", [
    ("auto", "fp16", "float16"), ("auto", "bf16", "bfloat16"), ("auto", "fp32", "bfloat16"),
    ("float32", "bf16", "float32"), ("float16", "fp32", "float16"),
])
def test_qlora_compute_dtype_follows_the_precision(given, precision, expected):
    assert resolve_compute_dtype(given, precision) == expected


def test_qlora_builds_its_4bit_layers_in_the_runs_precision(tiny_qwen2, stance):
    from stance_harness.runs.methods.qlora import Qlora

    request = dataclasses.replace(TrainingRequest.build(tiny_qwen2, stance, "qlora", examples=10, recipe=QUICK),
                                  precision="fp16")
    ctx, _ = plan(request, tiny_qwen2, stance)
    assert ctx.precision == "fp16"
    layer = Qlora().load(ctx).model.layers[0].self_attn.q_proj
    assert layer.compute_dtype == torch.float16


# -- device_map=auto -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded():
    return load_model("tiny-qwen2", ModelArgs.parse("device_map=auto"))


def test_device_map_auto_loads_on_the_cpu_and_records_the_placement(sharded, tiny_qwen2):
    assert sharded.sharded and sharded.args.device == "cpu"
    placement = sharded.provenance()["device_map"]
    assert placement == {"cpu": sum(p.numel() for p in tiny_qwen2.base.parameters())}
    assert sharded.identity() != tiny_qwen2.identity()  # a sharded load is a different run key
    for a, b in zip(sharded.base.parameters(), tiny_qwen2.base.parameters()):
        assert torch.equal(a, b)


def test_lora_trains_on_a_sharded_base(sharded, stance):
    run = train_run(TrainingRequest.build(sharded, stance, "lora", examples=10, recipe=QUICK), sharded, stance)
    assert len(run.trace.loss) == 2 and run.changed_frozen() == []


@pytest.mark.parametrize("method", ["full", "selective", "l2sp", "ewc", "hybrid"])
def test_methods_that_train_the_base_refuse_a_sharded_one_before_training(sharded, stance, method):
    options = {"layers": [0]} if method == "selective" else {}
    request = TrainingRequest.build(sharded, stance, method, examples=10, recipe=QUICK, options=options)
    with pytest.raises(HarnessError, match=rf"method {method!r} cannot train on a base sharded by --model-args "
                                           rf"device_map=auto: .* can: lora, surgical-lora, qlora$"):
        plan(request, sharded, stance)


@pytest.mark.parametrize("text, message", [
    ("device_map=balanced", "device_map='balanced' is not allowed; use auto"),
    ("device_map=auto,device=cuda:1", "device_map=auto places the model itself; drop device=cuda:1"),
])
def test_device_map_refusals(text, message):
    with pytest.raises(HarnessError, match=message):
        ModelArgs.parse(text)


# -- one GPU per xdist worker ------------------------------------------------------------------
def four():
    return 4


@pytest.mark.parametrize("worker, visible, expected", [
    ("gw0", None, "0"), ("gw3", None, "3"), ("gw5", None, "1"),  # round-robin over the 4 GPUs
    ("gw0", "2,5", "2"), ("gw1", "2,5", "5"), ("gw2", "2,5", "2"),  # the user's restriction, kept
    ("gw1", "GPU-aa, GPU-bb", "GPU-bb"),  # UUIDs as written
    ("gw1", "5", "5"),  # already one device: kept (so a second call changes nothing)
    ("gw0", "", None), ("gw0", "-1", None),  # the user hid every GPU
    (None, None, None), ("master", None, None),  # not a worker
])
def test_worker_device_mapping(worker, visible, expected):
    assert worker_visible_devices(worker, visible, four) == expected


def test_no_gpus_leaves_the_workers_alone():
    assert worker_visible_devices("gw1", None, lambda: 0) is None


def test_assign_worker_gpu_sets_the_variable_once():
    environ = {"PYTEST_XDIST_WORKER": "gw2"}
    assert assign_worker_gpu(environ, four, modules={}) == "2" and environ["CUDA_VISIBLE_DEVICES"] == "2"
    assert assign_worker_gpu(environ, four, modules={}) == "2" and environ["CUDA_VISIBLE_DEVICES"] == "2"


def test_assign_worker_gpu_refuses_once_cuda_is_initialised():
    class Torch:
        class cuda:
            is_initialized = staticmethod(lambda: True)

    environ = {"PYTEST_XDIST_WORKER": "gw1"}
    with pytest.raises(HarnessError, match=r"xdist worker gw1: CUDA was initialised before the harness could give "
                                           r"this worker its GPU \(1\)"):
        assign_worker_gpu(environ, four, modules={"torch": Torch})
    assert "CUDA_VISIBLE_DEVICES" not in environ


def test_count_gpus_reads_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-1)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-2)'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert count_gpus() == 2
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert count_gpus() == 0


WORKER_CONFTEST = '''
import json, os, sys

def pytest_configure(config):
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        cuda = sys.modules["torch"].cuda.is_initialized() if "torch" in sys.modules else False
        with open(f"seen-{worker}.json", "w") as handle:
            json.dump({"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "cuda_initialised": cuda}, handle)
'''


def test_each_xdist_worker_gets_its_own_device_from_the_users_list(pytester, monkeypatch):
    pytest.importorskip("xdist")
    pytester.makeconftest(WORKER_CONFTEST)
    pytester.makepyfile(test_one="def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,7")
    monkeypatch.setenv("PYTHONPATH", str(Path(stance_harness.__file__).resolve().parent.parent))  # this checkout's harness
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--no-reports")
    result.assert_outcomes(passed=2)
    seen = {w: json.loads((pytester.path / f"seen-{w}.json").read_text()) for w in ("gw0", "gw1")}
    assert seen == {"gw0": {"visible": "3", "cuda_initialised": False},
                    "gw1": {"visible": "7", "cuda_initialised": False}}
