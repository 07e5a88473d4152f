"""Memory at real size (issue 30): the recipe's gradient_checkpointing and optim, the stance-lm loss
that projects logits only where a label is, and what a run's models hold."""

import pytest
import torch

from stance_harness.runs.methods import method_config
from stance_harness.runs.recipe import OPTIMIZERS, Recipe
from stance_harness.core.errors import HarnessError
from stance_harness.runs.request import TrainingRequest
from stance_harness.runs.tasks import TASKS
from stance_harness.runs.training import build_optimizer

from direct_training import train_direct

QUICK = dict(learning_rate=1e-3, num_train_epochs=1, per_device_train_batch_size=5, seed=0)


@pytest.mark.parametrize("options,message", [
    ({"gradient_checkpointing": "yes"}, "recipe: gradient_checkpointing must be True or False, got 'yes'"),
    ({"optim": "sgd"}, "recipe: optim must be one of adamw_torch_fused, adamw_torch, adamw_8bit, got 'sgd'"),
    ({"optim": None}, "recipe: optim must be a string, got None"),
])
def test_recipe_memory_options_are_validated(options, message):
    with pytest.raises(HarnessError, match=message):
        Recipe.of(options)


def test_recipe_memory_options_default_to_transformers_defaults():
    from transformers import TrainingArguments

    recipe, hf = Recipe.of(), TrainingArguments(output_dir="unused", report_to="none")
    assert recipe.gradient_checkpointing is hf.gradient_checkpointing is False
    assert recipe.optim == str(getattr(hf.optim, "value", hf.optim)) == "adamw_torch_fused"


def test_run_key_changes_with_the_memory_options(tiny_qwen2, stance):
    keys = {TrainingRequest.build(tiny_qwen2, stance, "full", recipe=Recipe.of(QUICK, **options), examples=5).key
            for options in ({}, {"gradient_checkpointing": True}, {"optim": "adamw_torch"}, {"optim": "adamw_8bit"})}
    assert len(keys) == 4


@pytest.fixture
def mlp_forwards(tiny_qwen2):
    """Calls of any decoder layer's MLP (a checkpointed layer runs it again in the backward pass).
    A global pre-hook: patching the layer class's forward would switch transformers' checkpointing off, and
    a recompute stops early, inside the MLP, so a hook after the forward would not see it."""
    mlp_class = type(tiny_qwen2.base.model.layers[0].mlp)
    calls = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: calls.append(1) if type(module) is mlp_class else None)
    yield calls
    handle.remove()


@pytest.mark.parametrize("method,options", [("full", {}), ("lora", {"r": 4}), ("qlora", {"r": 4})])
def test_gradient_checkpointing_recomputes_every_layer_and_changes_no_number(tiny_qwen2, stance, mlp_forwards,
                                                                             method, options):
    calls = mlp_forwards
    config = method_config(method, options)
    plain = train_direct(tiny_qwen2, stance, method, config, Recipe.of(QUICK), examples=5)
    plain_calls = len(calls)
    checkpointed = train_direct(tiny_qwen2, stance, method, config, Recipe.of(QUICK, gradient_checkpointing=True),
                                examples=5)
    layers = tiny_qwen2.anatomy.num_layers
    assert plain_calls == layers and len(calls) - plain_calls == 2 * layers  # one micro-batch: forward, recompute
    assert checkpointed.trace.loss == pytest.approx(plain.trace.loss, rel=1e-5)
    assert checkpointed.trace.grad_norm == pytest.approx(plain.trace.grad_norm, rel=1e-4)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in tiny_qwen2.base.modules())  # base untouched


def test_gradient_checkpointing_is_refused_where_the_model_has_none(tiny_qwen2, stance, monkeypatch):
    monkeypatch.setattr(type(tiny_qwen2.base), "supports_gradient_checkpointing", False)
    with pytest.raises(HarnessError, match=r"recipe: gradient_checkpointing=True, but tiny-qwen2 \(Qwen2ForCausalLM\) "
                                           r"does not support transformers' gradient checkpointing"):
        train_direct(tiny_qwen2, stance, "full", method_config("full"), Recipe.of(QUICK, gradient_checkpointing=True),
                     examples=5)


def _adam_steps(optim: str, steps: int = 3):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(96, 96))
    optimizer = build_optimizer([{"name": "all", "params": [param]}], Recipe.of(learning_rate=1e-2, optim=optim))
    for step in range(steps):
        param.grad = torch.sin(torch.arange(param.numel(), dtype=torch.float32) * (step + 1)).view_as(param)
        optimizer.step()
    return param.detach(), optimizer


def test_optimizers_are_adamw_and_the_8bit_one_keeps_8bit_moments():
    reference, _ = _adam_steps("adamw_torch")
    fused, optimizer = _adam_steps("adamw_torch_fused")
    assert optimizer.defaults["fused"] is True
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)  # the same update, one kernel
    eight, optimizer = _adam_steps("adamw_8bit")
    state = next(iter(optimizer.state.values()))
    assert {state["state1"].dtype, state["state2"].dtype} == {torch.uint8}  # moments quantized to 8 bits
    moved = (reference - _adam_steps("adamw_torch", steps=0)[0]).abs().mean()
    assert (eight - reference).abs().mean() < 0.1 * moved  # close to AdamW's update, not equal to it
    assert not torch.equal(eight, reference)
    assert set(OPTIMIZERS) == {"adamw_torch_fused", "adamw_torch", "adamw_8bit"}


def test_a_run_trains_with_the_8bit_optimizer(tiny_qwen2, stance):
    plain = train_direct(tiny_qwen2, stance, "full", method_config("full"), Recipe.of(QUICK), examples=10)
    eight = train_direct(tiny_qwen2, stance, "full", method_config("full"), Recipe.of(QUICK, optim="adamw_8bit"),
                         examples=10)
    assert eight.trace.loss[0] == pytest.approx(plain.trace.loss[0], rel=1e-6)  # the same start
    assert eight.trace.loss[1] < eight.trace.loss[0]
    name = "model.layers.3.mlp.up_proj.weight"
    moved = {run: (dict(run.model.named_parameters())[name] - run.before[name]).detach() for run in (plain, eight)}
    assert not torch.equal(moved[plain], moved[eight])  # the 8-bit moments round differently ...
    assert (moved[eight] - moved[plain]).abs().mean() < 0.02 * moved[plain].abs().mean()  # ... to nearly AdamW's


def _batch(loaded, stance, n=3):
    from stance_harness.runs.batches import Framing, encode_examples

    items = encode_examples(Framing(loaded.tokenizer, chat=False), stance.training_examples(n), 128)
    return TASKS.get("stance-lm").collate(items, loaded.tokenizer.pad_token_id, "cpu")


def _loss_and_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("path", ["chunked", "logits_to_keep"])
def test_stance_lm_loss_is_the_models_own_with_logits_only_where_a_label_is(tiny_qwen2, stance, monkeypatch, path):
    from stance_harness.runs import tasks

    monkeypatch.setattr(tasks, "LOSS_CHUNK", 50)  # several chunks, the last one short
    if path == "logits_to_keep":
        monkeypatch.setattr(tasks, "PLAIN_HEAD_MODELS", frozenset())
    model = tiny_qwen2.fresh()
    batch = _batch(tiny_qwen2, stance)
    widths = []
    model.lm_head.register_forward_hook(lambda module, args, out: widths.append(out.shape[1]))
    mine, mine_grads = _loss_and_grads(model, TASKS.get("stance-lm").loss(model, batch, tiny_qwen2))
    theirs, their_grads = _loss_and_grads(model, model(**batch).loss)
    labelled = int((batch["labels"][:, 1:] != -100).any(0).sum())
    assert labelled < batch["input_ids"].shape[1]
    assert widths == [0 if path == "chunked" else labelled, batch["input_ids"].shape[1]]
    assert mine == pytest.approx(theirs, rel=1e-6)
    for a, b in zip(mine_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_chunked_head_loss_equals_cross_entropy_under_bf16_autocast():
    from stance_harness.runs.tasks import ChunkedHeadLoss

    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight = torch.randn(300, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 300, (37,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine = ChunkedHeadLoss.apply(hidden, weight, targets, 8)
        theirs = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).float(), targets)
    assert mine.item() == pytest.approx(theirs.item(), rel=1e-6)  # the same bf16 logits, in float32
    mine_grads = torch.autograd.grad(mine, (hidden, weight))
    their_grads = torch.autograd.grad(theirs, (hidden, weight))
    for a, b in zip(mine_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02)  # their backward is in bf16, ours in float32
    assert ChunkedHeadLoss.apply(hidden[:0], weight, targets[:0], 8).isnan()  # no token: nan, as the mean


def test_stance_lm_loss_falls_back_to_the_models_loss_without_logits_to_keep(tiny_qwen2, stance, monkeypatch):
    from stance_harness.runs import tasks

    monkeypatch.setattr(tasks, "keeps_logits", lambda cls: False)
    model = tiny_qwen2.fresh()
    batch = _batch(tiny_qwen2, stance)
    widths = []
    model.lm_head.register_forward_hook(lambda module, args, out: widths.append(out.shape[1]))
    loss = TASKS.get("stance-lm").loss(model, batch, tiny_qwen2)
    assert widths == [batch["input_ids"].shape[1]] and loss.item() == pytest.approx(model(**batch).loss.item())


def test_keeps_logits_reads_the_forward_signature():
    from stance_harness.runs.tasks import keeps_logits

    class Old:
        def forward(self, input_ids, attention_mask=None, labels=None):
            return None

    class New:
        def forward(self, input_ids, logits_to_keep=0):
            return None

    assert keeps_logits(New) and not keeps_logits(Old)


def test_chunked_head_loss_into_grad_adds_the_weights_gradient_in_place():
    from stance_harness.runs.tasks import ChunkedHeadLoss

    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(9, 8, generator=generator, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(50, 8, generator=generator))
    targets = torch.randint(0, 50, (9,), generator=generator)
    want = torch.autograd.grad(ChunkedHeadLoss.apply(hidden, weight, targets, 4), weight)[0]
    weight.grad = torch.ones_like(weight)
    storage = weight.grad.data_ptr()
    ChunkedHeadLoss.apply(hidden, weight, targets, 4, True).backward()
    assert weight.grad.data_ptr() == storage  # written where it was, no second tensor
    torch.testing.assert_close(weight.grad, 1 + want)


def test_a_tied_embedding_trains_with_sparse_lookup_gradients_and_the_same_numbers(tiny_qwen2, stance, monkeypatch):
    import contextlib

    from stance_harness.runs import training

    model = tiny_qwen2.fresh()
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tiny-qwen2 is tied
    with training.sparse_tied_embedding(model, ranks=1):
        assert model.get_input_embeddings().sparse
    assert not model.get_input_embeddings().sparse
    with training.sparse_tied_embedding(model, ranks=2):  # DDP's buckets take dense gradients only
        assert not model.get_input_embeddings().sparse
    model.get_input_embeddings().weight.requires_grad_(False)
    with training.sparse_tied_embedding(model, ranks=1):  # nothing to train there
        assert not model.get_input_embeddings().sparse

    recipe = Recipe.of(QUICK, gradient_accumulation_steps=2, per_device_train_batch_size=3)
    sparse = train_direct(tiny_qwen2, stance, "full", method_config("full"), recipe, examples=10)
    monkeypatch.setattr(training, "sparse_tied_embedding", lambda model, ranks: contextlib.nullcontext())
    dense = train_direct(tiny_qwen2, stance, "full", method_config("full"), recipe, examples=10)
    assert sparse.trace.loss == pytest.approx(dense.trace.loss, rel=1e-5)
    assert sparse.trace.grad_norm == pytest.approx(dense.trace.grad_norm, rel=1e-4)
    name = "model.embed_tokens.weight"
    torch.testing.assert_close(dict(sparse.model.named_parameters())[name], dict(dense.model.named_parameters())[name],
                               rtol=1e-4, atol=1e-6)
    assert not sparse.model.get_input_embeddings().sparse  # restored after training


def test_map_large_allocations_sets_glibcs_mmap_threshold(monkeypatch):
    import ctypes
    import sys

    from stance_harness.runs import instruments

    calls = []

    class Libc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(sys, "platform", "linux")
    instruments.map_large_allocations()
    assert calls == [(-3, 1 << 20)]  # M_MMAP_THRESHOLD, 1 MiB
    monkeypatch.setattr(sys, "platform", "darwin")
    instruments.map_large_allocations()
    assert len(calls) == 1
