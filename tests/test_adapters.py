"""Saved stance adapters: save, gate on the right base, refuse the wrong one."""

import json

import pytest
import torch

from conftest import QUICK
from stance_harness.runs.adapters import load_adapter_run, save_adapter
from stance_harness.core.errors import HarnessError

LORA = {"r": 4, "alpha": 8, "target_modules": ["qv"]}


@pytest.fixture(scope="module")
def saved(harness, tmp_path_factory):
    run = harness.train("lora", examples=10, recipe=QUICK, **LORA)
    return run, save_adapter(run, tmp_path_factory.mktemp("adapters") / "curious-v1")


def test_a_saved_adapter_gates_like_the_run_that_made_it(harness, saved):
    run, path = saved
    assert (path / "adapter_model.safetensors").is_file() and (path / "stance_harness.json").is_file()
    gated = load_adapter_run(harness.model(), path, harness.stance)
    assert gated.label == "curious-v1" and gated.examples == 0
    ours = {r.name: r.moments.total_sq for r in run.effective_deltas}
    theirs = {r.name: r.moments.total_sq for r in gated.effective_deltas}
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert theirs[name] == pytest.approx(ours[name], rel=1e-6)
    assert gated.behavior("loglik_margin")["adapted"] == pytest.approx(run.behavior("loglik_margin")["adapted"], abs=1e-6)
    assert gated.changed_frozen() == []
    assert gated.summary()["counts"]["params_per_example"] is None


def test_an_adapter_for_another_base_is_refused(harness, saved):
    _, path = saved
    with pytest.raises(HarnessError, match=r"was trained for base tiny-qwen2 .*not for --model tiny-phi"):
        load_adapter_run(harness.model("tiny-phi"), path, harness.stance)


def test_without_provenance_the_shapes_decide(harness, saved, tmp_path):
    import shutil

    _, path = saved
    bare = tmp_path / "bare"
    shutil.copytree(path, bare)
    (bare / "stance_harness.json").unlink()
    config = json.loads((bare / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/else-7b"
    (bare / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(HarnessError, match="names base model 'someone/else-7b'"):
        load_adapter_run(harness.model(), bare, harness.stance)
    config["base_model_name_or_path"] = None
    (bare / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(HarnessError, match="does not fit the tiny-phi base"):
        load_adapter_run(harness.model("tiny-phi"), bare, harness.stance)


def test_pickled_and_missing_adapters_are_refused(harness, saved, tmp_path):
    _, path = saved
    with pytest.raises(HarnessError, match="no adapter_config.json"):
        load_adapter_run(harness.model(), tmp_path, harness.stance)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    torch.save({}, pickled / "adapter_model.bin")
    with pytest.raises(HarnessError, match=r"adapter_model.bin, a pickle, which is refused"):
        load_adapter_run(harness.model(), pickled, harness.stance)


def test_a_run_with_a_task_head_is_not_saved(harness, tmp_path):
    head = harness.train("feature-extraction", examples=10, recipe=QUICK, task="stance-classification")
    with pytest.raises(HarnessError, match=r"trained task stance-classification, a head on the body; only a causal LM"):
        save_adapter(head, tmp_path / "x")
    assert not (tmp_path / "x").exists()
