"""Every method, in the style of peft's test_only_params_are_updated: exactly the intended
parameters change, every other one stays bit-identical. Plus schedules and invalid configs.

Runs are 5 optimizer steps (10 examples, batch 2) on tiny-qwen2 (24 layers, tied head).
"""

import pytest

from stance_harness import assert_only_targets_changed
from stance_harness.runs.methods import METHODS, method_config
from stance_harness.runs.methods.gradual import GradualConfig, unfrozen_at
from stance_harness.runs.methods.hybrid import HybridConfig, active_groups
from stance_harness.core.errors import HarnessError
from stance_harness.runs.recipe import Recipe

from direct_training import train_direct

RECIPE = Recipe.of(learning_rate=1e-3, num_train_epochs=1, per_device_train_batch_size=2, seed=0)
STEPS = 5


def qv(p):
    return p.kind in ("q_proj", "v_proj")


def norm(p):
    return p.kind in ("attn_norm", "mlp_norm", "final_norm")


# method, options, which canonical parameters (ParamName) must change
TEST_CASES = [
    ("full", {}, lambda p: True),
    ("lora", {}, lambda p: p.leaf.startswith("lora_") and qv(p)),
    ("lora", {"target_modules": ["mlp"], "layers": [0]}, lambda p: p.leaf.startswith("lora_") and p.layer == 0),
    ("surgical-lora", {"layers": [13, 15]}, lambda p: p.leaf.startswith("lora_") and qv(p) and p.layer in (13, 15)),
    ("selective", {"layers": [13, 15]}, lambda p: p.layer in (13, 15) and qv(p)),
    ("selective", {"layers": [13, 15], "biases": False}, lambda p: p.layer in (13, 15) and qv(p) and p.leaf == "weight"),
    ("selective", {"layers": [2], "kinds": ["norm"]}, lambda p: p.layer == 2 and norm(p)),
    ("feature-extraction", {}, lambda p: p.kind == "head"),
    ("feature-extraction", {"train_final_norm": True}, lambda p: p.kind in ("head", "final_norm")),
    # top block from step 0, one more every 2 steps: L23 (0-1), L22 (2-3), L21 (4)
    ("gradual", {"every_steps": 2}, lambda p: (p.layer is not None and p.layer >= 21) or p.kind == "final_norm"),
    ("discriminative", {"decay": 0.8}, lambda p: True),
    ("l2sp", {"alpha": 0.01}, lambda p: True),
    ("ewc", {"lambda_ewc": 100.0, "fisher_batches": 2}, lambda p: True),
    ("replay", {"ratio": 0.5}, lambda p: True),
    ("hybrid", {"freeze_lora_steps": 1, "alternate_every": 2}, lambda p: (p.leaf.startswith("lora_") and qv(p)) or norm(p)),
]


@pytest.fixture(scope="module")
def method_run(harness):
    def make(method, options):
        return harness.train(method, examples=10, recipe=RECIPE, **options)

    return make


@pytest.mark.parametrize("method,options,should_change", TEST_CASES,
                         ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'defaults'}" for m, o, _ in TEST_CASES])
def test_only_params_are_updated(method_run, method, options, should_change):
    run = method_run(method, options)
    assert run.trace.halted_at is None and len(run.trace.loss) >= STEPS
    anatomy = run.anatomy
    expected = {str(anatomy.name_of(n)) for n, _ in run.model.named_parameters() if should_change(anatomy.name_of(n))}
    changed = {r.name for r in run.adapter_deltas if r.moments.total_abs > 0}
    assert expected, "the test case expects some change"
    assert changed == expected, (sorted(expected - changed)[:5], sorted(changed - expected)[:5])
    assert_only_targets_changed(run)  # and everything outside the snapshot is bit-identical
    counts = run.counts
    assert counts["trainable"] == sum(t.numel() for t in run.before.values())
    assert counts["trainable"] + counts["frozen"] >= sum(p.numel() for p in run.loaded.base.parameters())
    assert 0 < counts["stance_bytes"] <= counts["full_weights_bytes"] * 1.2


def test_every_registered_method_has_a_test_case():
    assert {m for m, _, _ in TEST_CASES} >= set(METHODS.names()) - {"qlora", "peft"}  # tests/test_qlora.py, test_peft_method.py


def test_parameter_counts_match_seed_style_report(method_run):
    run = method_run("selective", {"layers": [13, 15]})
    # q_proj 64x64 + 64 bias, v_proj 32x64 + 32 bias, in two layers
    assert run.counts["trainable"] == 2 * (64 * 64 + 64 + 32 * 64 + 32)
    assert run.counts["trainable_pct"] == pytest.approx(100 * run.counts["trainable"] / 956480)
    assert run.counts["stance_bytes"] == run.counts["trainable"] * 4


# -- schedules ----------------------------------------------------------------------------
def test_gradual_schedule_by_hand():
    config = GradualConfig(every_steps=2, start_layers=1, layers_per_stage=2, unfreeze_embeddings=True)
    assert [unfrozen_at(s, 4, config, 10)[0] for s in range(6)] == [[3], [3], [1, 2, 3], [1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]
    # all four blocks at stage 2 (step 4), embeddings one stage later (step 6)
    assert [unfrozen_at(s, 4, config, 10)[1] for s in (4, 5, 6)] == [False, False, True]
    by_epoch = GradualConfig(every_epochs=1)
    assert [len(unfrozen_at(s, 4, by_epoch, 3)[0]) for s in range(7)] == [1, 1, 1, 2, 2, 2, 3]


def test_gradual_run_records_and_obeys_its_schedule(method_run):
    run = method_run("gradual", {"every_steps": 2})
    assert [entry["unfrozen_layers"] for entry in run.trace.schedule] == [[23], [23], [22, 23], [22, 23], [21, 22, 23]]
    assert [entry["step"] for entry in run.trace.schedule] == list(range(STEPS))
    changed_blocks = {r.layer for r in run.adapter_deltas if r.moments.total_abs > 0 and r.layer is not None}
    assert changed_blocks == {21, 22, 23}  # L20 and below never unfroze


def test_hybrid_schedule_by_hand():
    warm_then_alt = HybridConfig(freeze_lora_steps=2, alternate_every=3)
    assert [active_groups(s, warm_then_alt) for s in range(10)] == (
        [("norm",)] * 2 + [("norm",)] * 3 + [("lora",)] * 3 + [("norm",)] * 2)
    norm_first = HybridConfig(alternate_every=2, order="norm-first")
    assert [active_groups(s, norm_first)[0] for s in range(6)] == ["lora", "lora", "norm", "norm", "lora", "lora"]
    assert active_groups(7, HybridConfig(freeze_lora_steps=3)) == ("lora", "norm")


def test_hybrid_run_records_the_active_group_per_step(method_run):
    run = method_run("hybrid", {"freeze_lora_steps": 1, "alternate_every": 2})
    assert [e["active"] for e in run.trace.schedule] == [["norm"], ["norm"], ["norm"], ["lora"], ["lora"]]
    assert set(run.trace.group_lr) == {"lora", "norm"}


def test_discriminative_lr_per_group_is_recorded(method_run):
    run = method_run("discriminative", {"decay": 0.8})
    lrs = {name: values[0] for name, values in run.trace.group_lr.items()}
    top = lrs["L23"]
    assert lrs["L22"] == pytest.approx(top * 0.8)
    assert lrs["L0"] == pytest.approx(top * 0.8**23)
    assert lrs["embed"] == pytest.approx(top * 0.8**24)
    assert lrs["final_norm"] == pytest.approx(top)
    assert all(len(v) == len(run.trace.loss) for v in run.trace.group_lr.values())


def test_replay_adds_general_text_steps(method_run):
    run = method_run("replay", {"ratio": 0.5})
    assert len(run.trace.loss) == 5 + 3  # 5 task micro-batches + 0.5 * 5 = 2.5 -> 3 replay ones (half up)


def test_ewc_estimates_a_fisher_and_penalises_drift(tiny_qwen2, stance):
    import torch

    from stance_harness.runs.methods.base import TrainingContext

    method = METHODS.get("ewc")
    config = method.config_cls(lambda_ewc=10.0, fisher_batches=2)
    ctx = TrainingContext(tiny_qwen2, config, RECIPE, 5, 5)
    ctx.model = method.prepare(tiny_qwen2.fresh(), ctx)
    ctx.before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    method.setup(ctx)
    fisher = ctx.state["fisher"]
    assert set(fisher) == set(ctx.before) and all((f >= 0).all() for f in fisher.values())
    assert method.penalty_gradient(ctx, 0).item() == 0.0  # no drift yet
    params = dict(ctx.model.named_parameters())
    assert all(p.grad is not None and not p.grad.any() for p in params.values())
    name = "model.layers.3.mlp.up_proj.weight"
    with torch.no_grad():
        params[name] += 0.1
    ctx.model.zero_grad(set_to_none=True)
    expected = 0.5 * 10.0 * (fisher[name] * 0.01).sum().item()
    assert method.penalty_gradient(ctx, 0).item() == pytest.approx(expected, rel=1e-4)
    torch.testing.assert_close(params[name].grad, 10.0 * fisher[name] * 0.1, rtol=1e-4, atol=1e-12)
    assert not params["model.layers.2.mlp.up_proj.weight"].grad.any()


def _autograd_penalty(pairs, weights, scale):
    """scale * Σ w (θ − θ0)² and its gradients, by autograd on copies (the reference)."""
    leaves = [p.detach().clone().requires_grad_(True) for p, _ in pairs]
    total = sum(((leaf - p0) ** 2 * (1 if w is None else w)).sum() for leaf, (_, p0), w in zip(leaves, pairs, weights))
    (scale * total).backward()
    return (scale * total).item(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("chunk", [1 << 22, 7])  # one chunk per tensor; many, with a ragged last one
def test_l2sp_penalty_gradient_equals_autograd_and_adds_to_the_gradient(tiny_qwen2, monkeypatch, chunk):
    import torch

    from stance_harness.runs.methods import regularized
    from stance_harness.runs.methods.base import TrainingContext

    monkeypatch.setattr(regularized, "CHUNK", chunk)
    method = METHODS.get("l2sp")
    ctx = TrainingContext(tiny_qwen2, method.config_cls(alpha=0.5), RECIPE, 5, 5)
    ctx.model = method.prepare(tiny_qwen2.fresh(), ctx)
    ctx.before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    params = dict(ctx.model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    names = ["model.layers.0.self_attn.q_proj.bias", "model.layers.1.mlp.down_proj.weight"]
    with torch.no_grad():
        for name in names:
            params[name] += 0.01 * torch.randn(params[name].shape, generator=generator)
    existing = torch.full_like(params[names[1]], 0.25)
    params[names[1]].grad = existing.clone()  # a task gradient already there: the penalty's adds to it
    value = method.penalty_gradient(ctx, 0)
    want, grads = _autograd_penalty([(params[n], ctx.before[n]) for n in names], [None, None], 0.5)
    assert value.item() == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(params[names[0]].grad, grads[0], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(params[names[1]].grad, existing + grads[1], rtol=1e-5, atol=1e-9)
    assert not params["model.layers.2.mlp.up_proj.weight"].grad.any()  # no drift, no penalty gradient


def test_l2sp_penalty_by_hand(tiny_qwen2):
    import torch

    from stance_harness.runs.methods.base import TrainingContext

    method = METHODS.get("l2sp")
    ctx = TrainingContext(tiny_qwen2, method.config_cls(alpha=0.5), RECIPE, 5, 5)
    ctx.model = method.prepare(tiny_qwen2.fresh(), ctx)
    ctx.before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    bias = dict(ctx.model.named_parameters())["model.layers.0.self_attn.q_proj.bias"]
    with torch.no_grad():
        bias[:4] += 2.0
    assert method.penalty_gradient(ctx, 0).item() == pytest.approx(0.5 * 4 * 2.0**2, rel=1e-5)
    assert bias.grad[:4].tolist() == pytest.approx([2 * 0.5 * 2.0] * 4) and not bias.grad[4:].any()


# -- invalid combinations ------------------------------------------------------------------
@pytest.mark.parametrize("method,options,message", [
    ("gradual", {}, "give exactly one of every_steps or every_epochs"),
    ("gradual", {"every_steps": 2, "every_epochs": 1}, "give exactly one of every_steps or every_epochs"),
    ("gradual", {"every_steps": 2, "layers_per_stage": 0}, "a stage with no layers never unfreezes anything"),
    ("gradual", {"every_steps": 0}, "must be an integer >= 1"),
    ("discriminative", {"decay": -0.5}, r"decay must be in \(0, 1\], got -0.5"),
    ("selective", {}, "`layers` must name at least one layer"),
    ("surgical-lora", {}, "`layers` must name the layers to adapt"),
    ("hybrid", {"order": "lora-last"}, "order must be one of lora-first, norm-first"),
    ("replay", {"ratio": 0}, r"ratio must be in \(0, 4\]"),
    ("ewc", {"lambda_ewc": -1}, "lambda_ewc must be >= 0"),
    ("l2sp", {"alpha": -1}, "alpha must be >= 0"),
])
def test_invalid_configs_are_refused(method, options, message):
    with pytest.raises(HarnessError, match=message):
        method_config(method, options)


@pytest.mark.parametrize("method,options,message", [
    ("hybrid", {"freeze_lora_steps": 5}, r"freeze_lora_steps=5 covers the whole run \(5 steps\), so LoRA would never train"),
    ("hybrid", {"freeze_lora_steps": 1, "alternate_every": 4}, "so the groups would never alternate"),
    ("gradual", {"every_steps": 9, "start_layers": 0}, "the first stage comes at step 9, but the run has only 5 steps"),
    ("selective", {"layers": [30]}, r"layer 30 does not exist in this qwen2 model: it has 24 layers, 0\.\.23"),
    ("selective", {"layers": [1], "kinds": ["qkv_proj"]}, "module kind 'qkv_proj' does not exist in this qwen2 model"),
])
def test_configs_that_cannot_fit_the_run_fail_before_training(tiny_qwen2, stance, method, options, message):
    config = method_config(method, options)
    with pytest.raises(HarnessError, match=message):
        train_direct(tiny_qwen2, stance, method, config, RECIPE, examples=10)


def test_gradual_embeddings_stage_that_never_comes_is_refused(tiny_qwen2, stance):
    config = method_config("gradual", {"every_steps": 1, "start_layers": 24, "unfreeze_embeddings": True})
    assert unfrozen_at(1, 24, config, 5) == (list(range(24)), True)  # reachable in a longer run
    config = method_config("gradual", {"every_steps": 2, "unfreeze_embeddings": True})
    with pytest.raises(HarnessError, match="the embeddings' stage comes after the run's 5 steps"):
        train_direct(tiny_qwen2, stance, "gradual", config, RECIPE, examples=10)
