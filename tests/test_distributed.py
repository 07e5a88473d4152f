"""Data-parallel training of one run: two gloo processes through accelerate against one process
taking the same examples per optimizer step."""

import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stance_harness.models import ModelArgs
from stance_harness.core.errors import HarnessError
from stance_harness.session import HarnessOptions, HarnessSession
from stance_harness.runs.training import rank_share

from conftest import QUICK

# Two processes summing their gradients over gloo against one process accumulating the same two
# micro-batches: the same arithmetic in another order. After two AdamW steps at lr 1e-3 the weights
# agree to this (each step moves a weight by up to ~1e-3).
WEIGHT_TOLERANCE = 1e-5


@given(st.integers(1, 9), st.integers(1, 4), st.data())
def test_rank_shares_cover_the_step_once_and_are_the_same_length(size, ranks, data):
    group = list(range(size))
    shares = [rank_share(group, ranks, rank) for rank in range(ranks)]
    assert len({len(s) for s in shares}) == 1  # one backward each: DDP waits for every process
    real = sorted(m for s in shares for m, w in s if w == 1.0)
    assert real == group
    assert all(w == 0.0 and m == group[0] for s in shares for m, w in s if w != 1.0)


@pytest.fixture(scope="module")
def store_session(tiny_qwen2, tmp_path_factory):
    session = HarnessSession(HarnessOptions("tiny-qwen2", ModelArgs(), [], None, Path("."), [],
                                            run_cache=tmp_path_factory.mktemp("ddp-store")))
    session.use_model(tiny_qwen2)
    return session


def test_two_gloo_processes_train_the_weights_of_one_process_with_the_same_global_batch(store_session):
    # 20 examples in micro-batches of 5: each of the 2 steps takes one micro-batch per process,
    # the single process accumulates the same two
    parallel = store_session.train("lora", examples=20, recipe=QUICK, launcher="accelerate", num_processes=2)
    single = store_session.train("lora", examples=20, recipe={**QUICK, "gradient_accumulation_steps": 2})
    assert parallel.request.processes == 2 and parallel.run_id != single.run_id
    assert parallel.origin == "loaded"  # rank 0 stored it; this process loaded it
    assert len(parallel.trace.loss) == len(single.trace.loss) == 2
    assert parallel.trace.loss == pytest.approx(single.trace.loss, abs=1e-5)
    trained = {n: p for n, p in parallel.model.named_parameters() if p.requires_grad}
    reference = dict(single.model.named_parameters())
    assert trained.keys() == {n for n, p in single.model.named_parameters() if p.requires_grad}
    moved = max((reference[n] - single.before[n]).abs().max().item() for n in trained)
    worst = max((p - reference[n]).abs().max().item() for n, p in trained.items())
    assert moved > 100 * WEIGHT_TOLERANCE  # the runs trained: the comparison is not of two starts
    print(f"2 processes vs 1: largest weight difference {worst:.3g}, largest weight change {moved:.3g}")
    assert worst <= WEIGHT_TOLERANCE


def test_a_failed_launch_says_why(store_session, monkeypatch):
    import stance_harness.runs.distributed as distributed

    monkeypatch.setattr(distributed, "launch_command", lambda spec, n: [sys.executable, "-c", "raise SystemExit('boom')"])
    with pytest.raises(HarnessError, match=r"the data-parallel launch of lora-\w+ failed \(exit 1\); its last "
                                           r"lines:\nboom"):
        store_session.train("lora", examples=10, recipe=QUICK, launcher="accelerate", num_processes=2)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_processes": 2}, "num_processes=2 needs launcher='accelerate'"),
    ({"launcher": "deepspeed", "num_processes": 2}, "launcher='deepspeed' is not one of accelerate"),
    ({"launcher": "accelerate", "num_processes": 0}, "num_processes must be an integer >= 1, got 0"),
])
def test_launcher_arguments_are_checked(store_session, kwargs, message):
    with pytest.raises(HarnessError, match=message):
        store_session.train("lora", examples=10, recipe=QUICK, **kwargs)


def test_a_data_parallel_run_is_planned_with_its_global_batch(store_session):
    # 20 examples, micro-batches of 5: 4 steps in one process, 2 when two processes take one each
    assert store_session.planned_steps("lora", examples=20, recipe=QUICK) == 4
    assert store_session.planned_steps("lora", examples=20, recipe=QUICK, launcher="accelerate", num_processes=2) == 2
    assert store_session.check_request("lora", examples=20, recipe=QUICK, launcher="accelerate",
                                       num_processes=2).processes == 2


def test_the_worker_refuses_a_spec_whose_key_it_cannot_rebuild(store_session, tiny_qwen2, stance):
    from stance_harness.runs.distributed import launch_spec
    from stance_harness.runs.request import TrainingRequest

    request = store_session.request("lora", examples=10, recipe=QUICK, processes=2)
    spec = launch_spec(request, "tiny-qwen2", ModelArgs(), "curious-uncertainty", [], store_session.store)
    assert TrainingRequest.from_spec(spec, tiny_qwen2, stance, "launcher").key == request.key
    with pytest.raises(HarnessError, match=r"worker: the request rebuilt from lora-\w+'s spec has key \w+, not "):
        TrainingRequest.from_spec({**spec, "examples": 5}, tiny_qwen2, stance, "launcher")
