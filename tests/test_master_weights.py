"""The base's dtype (per device unless --model-args dtype= says) and master weights: whatever the
base loads in, what a run trains and its optimizer state are float32; frozen tensors keep the
base's dtype and its storage. No GPU here: the CUDA default is tested through `resolve_dtype`."""

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from stance_harness.analysis.digest import tensor_digest
from stance_harness.core.errors import HarnessError
from stance_harness.models import ModelArgs, load_model
from stance_harness.models.dtypes import checkpoint_dtype, resolve_dtype
from stance_harness.runs import training
from stance_harness.runs.master_weights import cast_at_boundaries
from stance_harness.runs.request import TrainingRequest
from stance_harness.session import HarnessOptions, HarnessSession

from test_methods import TEST_CASES

QUICK = {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5, "seed": 0}


# -- which dtype the base loads in ---------------------------------------------------------------
def test_the_cpu_default_is_float32_and_the_run_key_is_unchanged(tiny_qwen2):
    assert ModelArgs().dtype is None and ModelArgs.parse("") == ModelArgs()
    assert tiny_qwen2.args.dtype == "float32" and tiny_qwen2.provenance()["dtype"] == "float32"
    # pinned: every CPU run's key hashes these bytes
    assert json.dumps(tiny_qwen2.identity()["args"], sort_keys=True) == \
        '{"device": "cpu", "dtype": "float32", "revision": null, "trust_remote_code": false}'
    assert load_model("tiny-qwen2", ModelArgs(dtype="float32")).identity() == tiny_qwen2.identity()
    assert {p.dtype for p in tiny_qwen2.base.parameters()} == {torch.float32}


@pytest.mark.parametrize("given, device, checkpoint, expected", [
    (None, "cuda:0", "bfloat16", "bfloat16"),  # CUDA: the checkpoint's own
    (None, "cuda:1", "float16", "float16"),
    (None, "cuda:0", None, "float32"),  # a checkpoint that records none: float32, as transformers reads it
    (None, "cpu", "bfloat16", "float32"),  # the CPU: float32 whatever the checkpoint says
    ("float32", "cuda:0", "bfloat16", "float32"),  # given: it wins
    ("bfloat16", "cpu", "float32", "bfloat16"),
    ("float16", "cuda:0", "bfloat16", "float16"),
    ("auto", "cpu", "bfloat16", "bfloat16"),  # auto: the checkpoint's own, on any device
    ("auto", "cuda:0", None, "float32"),
])
def test_the_dtype_resolves_per_device_unless_given(given, device, checkpoint, expected):
    assert resolve_dtype(given, device, checkpoint) == expected


@pytest.mark.parametrize("given, device, checkpoint, message", [
    (None, "cuda:0", "float64", r"the checkpoint records dtype 'float64', which the harness does not load \(the "
                                r"default on cuda:0 takes the checkpoint's own\); pass --model-args dtype= one of "
                                r"float32, bfloat16, float16"),
    ("auto", "cuda:0", "int8", r"records dtype 'int8'.*\(--model-args dtype=auto takes the checkpoint's own\)"),
    ("auto", "cpu", "float16", r"dtype=float16 \(the checkpoint's own, from dtype=auto\) on the CPU: float16 does "
                               r"not train on the CPU"),
    ("float16", "cpu", None, r"--model-args dtype=float16 on the CPU: float16 does not train"),
    ("half", "cpu", None, r"--model-args dtype='half' is not allowed; use one of float32, bfloat16, float16, auto"),
])
def test_dtypes_that_cannot_load_are_refused(given, device, checkpoint, message):
    with pytest.raises(HarnessError, match=message):
        resolve_dtype(given, device, checkpoint)


def test_the_checkpoint_dtype_is_read_from_config_json(tmp_path, tiny_qwen2):
    assert checkpoint_dtype(tiny_qwen2.path) == "float32"  # what the embedded model records
    for config, expected in [({"torch_dtype": "bfloat16"}, "bfloat16"), ({"dtype": "torch.float16"}, "float16"),
                             ({"dtype": "float32", "torch_dtype": "bfloat16"}, "float32"), ({}, None)]:
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert checkpoint_dtype(tmp_path) == expected
    (tmp_path / "config.json").write_text("[")
    assert checkpoint_dtype(tmp_path) is None and checkpoint_dtype(tmp_path / "missing") is None


def test_a_bfloat16_checkpoint_loads_float32_on_the_cpu_and_its_own_dtype_when_asked(tmp_path, tiny_qwen2):
    local = tmp_path / "bf16-checkpoint"
    local.mkdir()
    for file in tiny_qwen2.path.iterdir():
        if file.is_file() and file.name != "config.json":
            shutil.copy2(file, local / file.name)
    config = json.loads((tiny_qwen2.path / "config.json").read_text())
    (local / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    default, auto = load_model(str(local)), load_model(str(local), ModelArgs(dtype="auto"))
    assert default.args.dtype == "float32" and {p.dtype for p in default.base.parameters()} == {torch.float32}
    assert auto.args.dtype == "bfloat16" and {p.dtype for p in auto.base.parameters()} == {torch.bfloat16}
    assert auto.identity()["args"]["dtype"] == "bfloat16" and auto.identity() != default.identity()
    assert (auto.provenance()["dtype"], auto.provenance()["trained_dtype"]) == ("bfloat16", "float32")
    assert {p.dtype for p in auto.skeleton.parameters()} == {torch.bfloat16}  # the skeleton of an unloaded base
    assert {p.dtype for p in load_model(str(local), ModelArgs(dtype="auto")).skeleton.parameters()} == {torch.bfloat16}


# -- master weights ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_qwen2():
    return load_model("tiny-qwen2", ModelArgs(dtype="bfloat16"))


@pytest.fixture
def optimizers(monkeypatch):
    """The optimizers train_run builds, kept (the loop lets go of its own)."""
    built = []

    def keep(groups, recipe, build=training.build_optimizer):
        built.append(build(groups, recipe))
        return built[-1]

    monkeypatch.setattr(training, "build_optimizer", keep)
    return built


def _train(loaded, stance, method, **options):
    request = TrainingRequest.build(loaded, stance, method, examples=5, recipe=QUICK, options=options)
    return training.train_run(request, loaded, stance)


def _state_dtypes(optimizer) -> set:
    return {value.dtype for state in optimizer.state.values() for key, value in state.items() if key != "step"}


def test_full_finetuning_on_a_bfloat16_base_trains_float32_master_weights(bf16_qwen2, stance, optimizers):
    base = dict(bf16_qwen2.base.named_parameters())
    name = "model.layers.2.self_attn.q_proj.weight"
    digest = tensor_digest(base[name])
    run = _train(bf16_qwen2, stance, "full")
    params = dict(run.model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.float32} and all(p.requires_grad for p in params.values())
    assert _state_dtypes(optimizers[0]) == {torch.float32} and len(optimizers[0].state) == len(params)
    assert all(torch.isfinite(torch.tensor(run.trace.loss)))
    # "before" is the base's own bfloat16 tensor, which the float32 start equals exactly; the base is untouched
    assert run.before[name].data_ptr() == base[name].data_ptr() and run.before[name].dtype == torch.bfloat16
    assert tensor_digest(base[name]) == digest
    pairs = {n: (start, end) for n, start, end in run.method.effective_deltas(run.model, run.before, run.anatomy)}
    start, end = pairs[name]
    assert end.dtype == torch.float32 and not torch.equal(end, base[name].float())
    assert torch.equal(end.float() - start.float(), params[name].detach() - base[name].float())
    row = next(d for d in run.deltas() if d.raw_name == name)
    delta = params[name].detach().double() - base[name].double()
    assert row.moments.total_sq == pytest.approx(float((delta * delta).sum()), rel=1e-12)
    assert row.moments.total == pytest.approx(float(delta.sum()), rel=1e-9, abs=1e-12)
    assert row.moments.before_sq == pytest.approx(float((base[name].double() ** 2).sum()), rel=1e-12)


def test_selective_trains_float32_beside_frozen_bfloat16_layers_it_shares(bf16_qwen2, stance, optimizers):
    run = _train(bf16_qwen2, stance, "selective", layers=[2], kinds=["q_proj", "v_proj"], biases=False)
    base_ptrs = {p.data_ptr() for p in bf16_qwen2.base.parameters()}
    params = dict(run.model.named_parameters())
    trained = {n for n, p in params.items() if p.requires_grad}
    assert trained == {"model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.v_proj.weight"}
    assert all(params[n].dtype == torch.float32 and params[n].data_ptr() not in base_ptrs for n in trained)
    # a frozen bias computes in one matmul with its trained weight: it alone gets a float32 copy
    beside = {"model.layers.2.self_attn.q_proj.bias", "model.layers.2.self_attn.v_proj.bias"}
    assert all(params[n].dtype == torch.float32 and not params[n].requires_grad for n in beside)
    frozen = [p for n, p in params.items() if n not in trained | beside]
    assert frozen and all(p.dtype == torch.bfloat16 and p.data_ptr() in base_ptrs for p in frozen)
    assert _state_dtypes(optimizers[0]) == {torch.float32}
    assert all(torch.isfinite(torch.tensor(run.trace.loss)))
    # measured after training, outside any autocast: the mixed model runs and nothing frozen moved
    forgetting = run.forgetting()
    assert forgetting["kind"] == "perplexity" and forgetting["adapted"] != forgetting["base"]
    margin = run.behavior("loglik_margin")
    assert math.isfinite(forgetting["adapted"]) and math.isfinite(margin["adapted"]) and margin["per_probe"]
    assert run.changed_frozen() == []


def test_lora_adapters_are_float32_over_the_shared_bfloat16_base(bf16_qwen2, stance, optimizers):
    run = _train(bf16_qwen2, stance, "lora", r=4)
    base_ptrs = {p.data_ptr() for p in bf16_qwen2.base.parameters()}
    trained = [p for p in run.model.parameters() if p.requires_grad]
    frozen = [p for p in run.model.parameters() if not p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert frozen and all(p.dtype == torch.bfloat16 and p.data_ptr() in base_ptrs for p in frozen)
    assert _state_dtypes(optimizers[0]) == {torch.float32}
    assert all(torch.isfinite(torch.tensor(run.trace.loss)))
    # peft casts around its own adapters: no boundary casts are added inside its layers
    assert not any(m._forward_pre_hooks for n, m in run.model.named_modules() if "lora_" in n)


def test_float16_autocast_with_a_grad_scaler_trains_over_a_half_base(bf16_qwen2, stance, optimizers):
    # the scaler unscales float32 gradients; on the CPU the fp16 path is reached past the request's refusal
    request = TrainingRequest.build(bf16_qwen2, stance, "selective", examples=5, recipe=QUICK, options={"layers": [2]})
    run = training.train_run(replace(request, precision="fp16"), bf16_qwen2, stance)
    assert all(torch.isfinite(torch.tensor(run.trace.loss))) and run.trace.skipped_steps == []
    assert {p.dtype for p in run.model.parameters() if p.requires_grad} == {torch.float32}
    assert _state_dtypes(optimizers[0]) == {torch.float32}


def test_a_stored_run_round_trips_its_float32_tensors(bf16_qwen2, tmp_path):
    def session():
        made = HarnessSession(HarnessOptions("tiny-qwen2", ModelArgs(), [], None, Path("."), [],
                                             run_cache=tmp_path / "runs"))
        made.use_model(bf16_qwen2)
        return made

    run = session().train("selective", examples=10, recipe=QUICK, layers=[2])
    weights = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    assert run.release_model() > 0
    loaded = session().train("selective", examples=10, recipe=QUICK, layers=[2])
    assert loaded.origin == "loaded"
    for rebuilt in (run.model, loaded.model):
        params = dict(rebuilt.named_parameters())
        assert params.keys() == weights.keys()
        assert all(p.dtype == weights[n].dtype and torch.equal(p, weights[n]) for n, p in params.items())
        assert {params[n].dtype for n in run.before} == {torch.float32}


EVERY_METHOD = [(m, o) for m, o, _ in TEST_CASES] + [("qlora", {"r": 4}), ("peft", {"config": {
    "peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "layers_to_transform": [0, 5]}})]


@pytest.mark.parametrize("method, options", EVERY_METHOD,
                         ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items() if k != 'config') or 'defaults'}"
                              for m, o in EVERY_METHOD])
def test_every_method_trains_float32_on_a_bfloat16_base_and_is_measured(bf16_qwen2, stance, optimizers, method,
                                                                         options):
    request = TrainingRequest.build(bf16_qwen2, stance, method, examples=10,
                                    recipe={**QUICK, "per_device_train_batch_size": 2}, options=options)
    run = training.train_run(request, bf16_qwen2, stance)
    base_ptrs = {p.data_ptr() for p in bf16_qwen2.base.parameters()}
    params = dict(run.model.named_parameters())
    assert run.trace.halted_at is None and all(map(math.isfinite, run.trace.loss))
    assert {params[n].dtype for n in run.before} == {torch.float32}
    assert _state_dtypes(optimizers[0]) == {torch.float32}
    frozen = [p for n, p in params.items() if n not in run.before]
    if method != "qlora":  # its own 4-bit model shares nothing with the base
        assert all(p.data_ptr() in base_ptrs or p.dtype == torch.float32 for p in frozen)
        assert any(p.dtype == torch.bfloat16 and p.data_ptr() in base_ptrs for p in frozen) == bool(frozen)
    assert run.changed_frozen() == []
    assert math.isfinite(run.forgetting()["adapted"])


# -- the casts at a trained module's boundary -----------------------------------------------------
def _three_layers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(3))).to(torch.bfloat16)
    for param in model.parameters():
        param.requires_grad_(False)
    model[1].weight.data = model[1].weight.data.float()  # trained, float32; its bias stays frozen
    model[1].weight.requires_grad_(True)
    return model


def test_a_trained_module_computes_in_float32_between_half_precision_neighbours():
    model = _three_layers()
    x = torch.randn(2, 4).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="dtype"):  # one matmul, two dtypes
        model(x)
    bias = model[1].bias.detach().clone()
    assert len(cast_at_boundaries(model, {"1.weight": model[1].weight})) == 2
    assert model[1].bias.dtype == torch.float32 and torch.equal(model[1].bias, bias.float())
    hidden = model[0](x).float() @ model[1].weight.T + bias.float()
    expected = model[2](hidden.to(torch.bfloat16))
    out = model(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    out.float().sum().backward()
    assert model[1].weight.grad.dtype == torch.float32 and torch.isfinite(model[1].weight.grad).all()


def test_a_float32_model_gets_no_casts():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[0].weight.requires_grad_(False)
    assert cast_at_boundaries(model, {"1.weight": model[1].weight}) == []
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_a_task_head_keeps_its_float32_output():
    torch.manual_seed(0)
    body = torch.nn.Linear(4, 4).to(torch.bfloat16).requires_grad_(False)
    head = torch.nn.Linear(4, 2)  # a fresh float32 classifier: the model's output
    model = torch.nn.Sequential(body, head)
    x = torch.randn(3, 4).to(torch.bfloat16)
    trained = {"1.weight": head.weight, "1.bias": head.bias}
    assert len(cast_at_boundaries(model, trained, heads=trained.values())) == 1  # its inputs cast up, no more
    out = model(x)
    assert out.dtype == torch.float32 and torch.equal(out, head(body(x).float()))
