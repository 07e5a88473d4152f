"""The full-precision base released under the run-memory budget (issue 30, item 1): a session that
mixes methods drops the base when the budget needs room and nothing holds its storage (a run
sharing it goes first; QLoRA's own 4-bit model does not hold it), and loads it again, bit-identical,
when a method or a measurement reads it."""

from pathlib import Path

import pytest
import torch

import stance_harness.models.loading as loading
import stance_harness.runs.training as training
from stance_harness.models import ModelArgs, load_model
from stance_harness.models.loading import share_frozen_weights
from stance_harness.runs.from_model import loaded_from_object
from stance_harness.runs.residency import ResidentModels
from stance_harness.runs.run import Run
from stance_harness.session import HarnessOptions, HarnessSession

RECIPE = {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5, "seed": 0}  # 2 steps


@pytest.fixture
def base_while_training(monkeypatch):
    """(method, whether the base was loaded when training began, and when it ended), per run trained."""
    seen = []
    real = training.train_run

    def train_run(request, loaded, stance, progress=None, accelerator=None):
        began = loaded.base_loaded
        run = real(request, loaded, stance, progress, accelerator)
        seen.append((request.method, began, loaded.base_loaded))
        return run

    monkeypatch.setattr(training, "train_run", train_run)
    return seen


def session(loaded, store: Path, **options) -> HarnessSession:
    harness = HarnessSession(HarnessOptions("tiny-qwen2", ModelArgs(), [], None, Path("."), [], run_cache=store,
                                            **options))
    harness.use_model(loaded)
    return harness


def base_pointers(loaded) -> set:
    return {p.data_ptr() for p in loaded.base.parameters()}


# -- LoadedModel.release_base -------------------------------------------------------------------
def test_a_released_base_loads_again_bit_identical_with_its_digests_made_again(counted_loads):
    loaded = load_model("tiny-qwen2")
    assert loaded.release_base() is False and counted_loads == []  # never loaded: nothing to release
    weights = {n: p.clone() for n, p in loaded.base.named_parameters()}
    name, first = next(iter(loaded.base.named_parameters()))
    digest = loaded.base_digest(first)
    del first
    assert loaded.release_base() is True
    assert not loaded.base_loaded and loaded._digests == {} and list(loaded.base_parameters()) == []
    assert {p.device.type for p in loaded.skeleton.parameters()} == {"meta"}  # shapes still answer
    again = dict(loaded.base.named_parameters())
    assert counted_loads == [loaded.path, loaded.path]
    assert again.keys() == weights.keys() and all(torch.equal(again[n], weights[n]) for n in weights)
    assert loaded.base_digest(again[name]) == digest
    assert not any(p.requires_grad for p in again.values()) and not loaded.base.training


def test_a_base_whose_storage_something_else_holds_is_kept(counted_loads):
    loaded = load_model("tiny-qwen2")
    base = loaded.base
    before = next(base.parameters()).detach()  # as a full fine-tune's "before" side holds it
    assert loaded.release_base() is False and loaded.base is base
    del before
    model = share_frozen_weights(base)  # as a run built on the base holds it
    assert loaded.release_base() is False and loaded.base is base
    del model
    assert loaded.release_base() is True and counted_loads == [loaded.path]


def test_a_released_base_still_held_as_a_module_is_taken_back_not_loaded_twice(counted_loads):
    loaded = load_model("tiny-qwen2")
    base = loaded.base
    assert loaded.release_base() is True and not loaded.base_loaded
    assert loaded.base is base and counted_loads == [loaded.path]  # the same object: no second copy
    del base
    assert loaded.release_base() is True
    _ = loaded.base  # loads it
    assert counted_loads == [loaded.path, loaded.path]


def test_a_base_handed_in_as_an_object_is_never_released():
    loaded = load_model("tiny-qwen2")
    given = loaded_from_object(loaded.base, loaded.tokenizer)
    assert not given.releasable and given.release_base() is False and given.base_loaded


def test_without_torchs_storage_count_the_base_counts_as_held(monkeypatch):
    loaded = load_model("tiny-qwen2")
    _ = loaded.base  # loads it
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    assert loaded.release_base() is False and loaded.base_loaded


# -- under the run-memory budget ------------------------------------------------------------------
def measured_on_the_base(run) -> dict:
    """Measurements that read the base (its logits, its held-out text, its weights), made afresh."""
    run.measurements.clear()
    run._scratch.clear()
    run.loaded.measurement_cache.clear()
    return {"behavior": run.behavior("loglik_margin"), "forgetting": run.forgetting(),
            "deltas": run.measure("deltas", view="effective"), "frozen_changed": run.changed_frozen()}


def test_a_mixed_session_releases_the_base_for_qlora_and_loads_it_again_for_lora(tmp_path, counted_loads,
                                                                                   base_while_training,
                                                                                   monkeypatch):
    loaded = load_model("tiny-qwen2")
    # room for the base and both runs' models, not for anything beside QLoRA's training footprint
    harness = session(loaded, tmp_path / "store", run_memory=3 * loaded.base_bytes)
    lora = harness.train("lora", examples=10, recipe=RECIPE, r=4)
    first = measured_on_the_base(lora)
    weights = {n: p.detach().clone() for n, p in lora.model.named_parameters()}
    assert counted_loads == [loaded.path] and harness.resident.base_released == 0

    qlora = harness.train("qlora", examples=10, recipe=RECIPE, r=4)
    assert base_while_training == [("lora", False, True), ("qlora", False, False)]
    assert (harness.resident.released, harness.resident.base_released) == (1, 1)
    assert not lora.model_resident and not loaded.base_loaded
    qlora.behavior("loglik_margin")  # measured on its own 4-bit base, adapters off
    assert qlora.model_resident and not loaded.base_loaded and counted_loads == [loaded.path]

    assert measured_on_the_base(lora) == first  # rebuilt on a base loaded again: the same values
    assert counted_loads == [loaded.path, loaded.path] and loaded.base_loaded
    new = base_pointers(loaded)
    rebuilt = dict(lora.model.named_parameters())
    assert rebuilt.keys() == weights.keys() and all(torch.equal(p, weights[n]) for n, p in rebuilt.items())
    frozen = [p for p in rebuilt.values() if not p.requires_grad]
    assert frozen and all(p.data_ptr() in new for p in frozen)  # it shares the new base
    assert harness.resident.base_released == 1
    del rebuilt, frozen  # the test's own hold on the base's storage

    # everything must go: the runs sharing the base first, then the base, QLoRA's model where it falls
    order = []
    release_model, release_base = Run.release_model, loaded.release_base
    monkeypatch.setattr(Run, "release_model", lambda run: order.append(run.method.name) or release_model(run))
    monkeypatch.setattr(loaded, "release_base", lambda **how: order.append("base") or release_base(**how))
    _ = qlora.model  # the most recent
    harness.resident.make_room(10 * harness.resident.budget)
    assert order == ["lora", "base", "qlora"]
    assert not loaded.base_loaded and harness.resident.held_bytes() == 0
    assert (harness.resident.released, harness.resident.base_released) == (3, 2)


def test_with_room_for_everything_the_base_is_never_released(tmp_path, counted_loads, base_while_training):
    loaded = load_model("tiny-qwen2")
    harness = session(loaded, tmp_path / "store", run_memory=2**40)
    lora = harness.train("lora", examples=10, recipe=RECIPE, r=4)
    qlora = harness.train("qlora", examples=10, recipe=RECIPE, r=4)
    lora.behavior("loglik_margin"), qlora.behavior("loglik_margin")
    assert base_while_training == [("lora", False, True), ("qlora", True, True)]
    assert (harness.resident.released, harness.resident.base_released) == (0, 0)
    assert counted_loads == [loaded.path] and lora.model_resident and qlora.model_resident
    assert harness.resident.held_bytes() == (loaded.base_bytes + lora.resident_bytes() + qlora.resident_bytes())


def test_a_full_fine_tune_keeps_the_base_as_its_before_side(tmp_path, counted_loads, base_while_training):
    loaded = load_model("tiny-qwen2")
    harness = session(loaded, tmp_path / "store", run_memory=2 * loaded.base_bytes)
    full = harness.train("full", examples=10, recipe=RECIPE)
    harness.train("qlora", examples=10, recipe=RECIPE, r=4)
    # its model went, but "before" is the base's own tensors: releasing it would free nothing
    assert not full.model_resident and harness.resident.released == 1
    assert harness.resident.base_released == 0 and loaded.base_loaded
    assert base_while_training == [("full", False, True), ("qlora", True, True)]
    assert all(t.data_ptr() in base_pointers(loaded) for t in full.before.values())
    assert counted_loads == [loaded.path]


class OwnModel:
    """A run whose model does not share the base (as QLoRA's 4-bit copy does not), of `size` bytes."""

    def __init__(self, loaded, size: int):
        self.loaded, self.before, self.size, self._model = loaded, {}, size, torch.nn.Linear(2, 2)
        self.rebuild = object  # it can be rebuilt, so it can be released

    def resident_bytes(self) -> int:
        return self.size if self._model is not None else 0

    def release_model(self) -> int:
        freed, self._model = self.resident_bytes(), None
        return freed


def test_a_base_held_outside_the_runs_is_kept_and_collected_for_once_per_model_released(monkeypatch):
    loaded = load_model("tiny-qwen2")
    held = next(loaded.base.parameters()).detach()  # a caller's hold on the base's storage
    collections = []
    monkeypatch.setattr(loading.gc, "collect", lambda: collections.append(1))
    budget = ResidentModels(loaded.base_bytes + 5)  # the base and nothing beside it
    a, b = OwnModel(loaded, 10), OwnModel(loaded, 10)
    budget.touch(a)
    budget.touch(a)  # past the budget at each use: the base is asked again, without collecting again
    assert loaded.base_loaded and budget.base_released == 0 and len(collections) == 1
    budget.touch(b)  # a goes (b is in use); the base was asked before it, in the same round
    assert (budget.released, len(collections)) == (1, 1) and a._model is None
    budget.touch(b)  # a model went since the last failure: collect once more
    assert loaded.base_loaded and len(collections) == 2
    del held
    budget.touch(b)
    assert not loaded.base_loaded and budget.base_released == 1 and len(collections) == 2
    assert budget.held_bytes() == 10 <= budget.budget


def test_a_budget_that_knows_no_run_on_a_base_leaves_the_base_alone():
    budget = ResidentModels(0)
    loaded = load_model("tiny-qwen2")
    _ = loaded.base  # loads it
    budget.make_room(1)  # it knows no run, so no base
    assert loaded.base_loaded and budget.base_released == 0 and budget.held_bytes() == 0


# -- through the plugin: --run-memory ---------------------------------------------------------------
MIXED = '''
import os

RECIPE = {recipe!r}


def afresh(run):
    """Measurements that read the base, made again (not read from what was kept)."""
    run.measurements.clear()
    run._scratch.clear()
    run.loaded.measurement_cache.clear()
    return run.behavior("loglik_margin"), run.forgetting()


def test_lora_then_qlora_then_lora_again(train, base_model, harness_session):
    budget = harness_session.resident
    assert budget.budget == int(os.environ["BUDGET"])
    lora = train("lora", examples=10, recipe=RECIPE, r=4)
    first = afresh(lora)
    assert base_model.base_loaded and budget.base_released == 0  # lora's model is built on it
    qlora = train("qlora", examples=10, recipe=RECIPE, r=4)
    qlora.behavior("loglik_margin")
    assert qlora.model_resident and not base_model.base_loaded and budget.base_released == 1
    assert afresh(lora) == first and base_model.base_loaded and budget.base_released == 1
'''


def test_run_memory_releases_the_base_in_a_pytest_session(pytester, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    budget = load_model("tiny-qwen2").base_bytes  # the base alone: a run's model beside it is past it
    monkeypatch.setenv("BUDGET", str(budget))
    pytester.makepyfile(test_mixed=MIXED.format(recipe=RECIPE))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--model", "tiny-qwen2",
                                           f"--run-memory={budget}")
    result.assert_outcomes(passed=1)
