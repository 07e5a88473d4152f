"""Real-size sessions on tiny models: frozen weights shared with the base, the run store on disk,
bounded residency, and crash safety."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stance_harness.analysis.digest import tensor_digest
from stance_harness.runs.methods import METHODS
from stance_harness.models import ModelArgs
from stance_harness.runs.request import TrainingRequest
from stance_harness.runs.runstore import RunStore, StoreWarning
from stance_harness.session import HarnessOptions, HarnessSession

from test_methods import RECIPE as METHOD_RECIPE
from test_methods import TEST_CASES

RECIPE = {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5, "seed": 0}


def new_session(loaded, store: Path, **options) -> HarnessSession:
    session = HarnessSession(HarnessOptions("tiny-qwen2", ModelArgs(), [], None, Path("."), [], run_cache=store,
                                            **options))
    session.use_model(loaded)
    return session


@pytest.fixture
def store_dir(tmp_path):
    return tmp_path / "runs"


# -- frozen weights are shared, never copied --------------------------------------------------
@pytest.mark.parametrize("method, options", [("lora", {}), ("selective", {"layers": [13, 15]})])
def test_a_frozen_parameter_shares_the_base_storage(quick_run, tiny_qwen2, method, options):
    run = quick_run(method, **options)
    base = {p.data_ptr() for p in tiny_qwen2.base.parameters()}
    frozen = [p for p in run.model.parameters() if not p.requires_grad]
    trained = [p for p in run.model.parameters() if p.requires_grad]
    assert frozen and all(p.data_ptr() in base for p in frozen)
    assert trained and not any(p.data_ptr() in base for p in trained)
    # the whole model costs what it trains: adapters (LoRA) or two layers' q/v (selective)
    assert run.resident_bytes() == sum(p.numel() * p.element_size() for p in trained)


def test_full_finetuning_compares_against_the_base_itself(quick_run, tiny_qwen2):
    run = quick_run("full")
    base = {p.data_ptr() for p in tiny_qwen2.base.parameters()}
    assert all(t.data_ptr() in base for t in run.before.values())  # "before" is no second copy


def test_a_run_prints_as_a_line_without_its_tensors(quick_run, tiny_qwen2):
    # pytest prints a failing test's arguments with repr; the generated one printed every tensor
    run = quick_run("full")
    for shown in (repr(run), repr(run.loaded), repr(run.trace)):
        assert len(shown) < 200 and "tensor(" not in shown, shown
    assert run.run_id in repr(run) and "tiny-qwen2" in repr(run)


_CASES = {method: options for method, options, _ in reversed(TEST_CASES)}  # one case per method


@pytest.mark.parametrize("method", sorted(METHODS.names()))
def test_the_base_is_bit_identical_after_every_method(harness, tiny_qwen2, method):
    before = {n: tensor_digest(p) for n, p in tiny_qwen2.base.named_parameters()}
    options = _CASES.get(method, {"target_modules": ["qv"]} if method == "qlora" else {})
    if method == "peft":  # OLoRA's init subtracts from the base matrix in place, in peft
        options = {"config": {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "init_lora_weights": "olora"}}
    run = harness.train(method, examples=10, recipe=METHOD_RECIPE, **options)  # test_methods' runs, shared
    assert run.trace.loss and any(r.moments.total_abs > 0 for r in run.adapter_deltas)  # it trained
    assert {n: tensor_digest(p) for n, p in tiny_qwen2.base.named_parameters()} == before


# -- the store's key ---------------------------------------------------------------------------
def _request(loaded, stance, **changes):
    arguments = {"method": "lora", "examples": 10, "recipe": RECIPE, "options": {"r": 4}, "task": "stance-lm"}
    arguments.update(changes)
    return TrainingRequest.build(loaded, stance, arguments.pop("method"), **arguments)


@pytest.mark.parametrize("change", [
    {"method": "surgical-lora", "options": {"layers": [13]}},
    {"options": {"r": 8}},
    {"recipe": {**RECIPE, "learning_rate": 2e-3}},
    {"recipe": {**RECIPE, "seed": 1}},
    {"examples": 11},
    {"task": "stance-classification"},
    {"instruments": {"nonfinite": "record"}},
    {"seed_offset": 1},
], ids=["method", "config", "recipe", "seed", "examples", "task", "instruments", "repeat"])
def test_the_key_changes_with_each_ingredient(tiny_qwen2, stance, change):
    assert _request(tiny_qwen2, stance, **change).key != _request(tiny_qwen2, stance).key


def test_the_key_changes_with_the_model_stance_and_code(tiny_qwen2, stance):
    reference = _request(tiny_qwen2, stance)
    other_args = dataclasses.replace(tiny_qwen2, args=ModelArgs(dtype="bfloat16"))
    other_revision = dataclasses.replace(tiny_qwen2, revision="another-build")
    edited = dataclasses.replace(stance, examples=stance.examples[::-1])  # same name and version, other content
    assert len({reference.key, _request(other_args, stance).key, _request(other_revision, stance).key,
                _request(tiny_qwen2, edited).key, dataclasses.replace(reference, code="0" * 12).key}) == 5


def test_the_key_ignores_argument_order_and_the_reports_directory(tiny_qwen2, stance, tmp_path):
    a = _request(tiny_qwen2, stance, recipe=dict(reversed(list(RECIPE.items()))))
    b = _request(tiny_qwen2, stance)
    assert a == b and a.key == b.key
    one = new_session(tiny_qwen2, tmp_path / "s").request("lora", examples=10, recipe=RECIPE, r=4)
    other = HarnessSession(HarnessOptions("tiny-qwen2", ModelArgs(), [], tmp_path / "reports", tmp_path, ["-x"],
                                          run_cache=tmp_path / "t"))
    other.use_model(tiny_qwen2)
    assert one.run_id == other.request("lora", examples=10, recipe=RECIPE, r=4).run_id


def test_a_local_directory_is_named_by_its_weights(tmp_path, tiny_qwen2):
    from stance_harness.models.loading import local_weights_hash

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"weights " + name.encode())
    assert local_weights_hash(tmp_path / "a") != local_weights_hash(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").write_bytes(b"weights a")
    assert local_weights_hash(tmp_path / "a") == local_weights_hash(tmp_path / "b")


# -- stored, loaded, released, rebuilt ---------------------------------------------------------
def test_a_second_session_loads_instead_of_training(tiny_qwen2, store_dir):
    first = new_session(tiny_qwen2, store_dir).train("lora", examples=10, recipe=RECIPE, r=4)
    shift = first.behavior("loglik_margin")
    assert first.origin == "trained"
    again = new_session(tiny_qwen2, store_dir).train("lora", examples=10, recipe=RECIPE, r=4)
    assert again.origin == "loaded" and again.run_id == first.run_id
    assert again.trace.loss == first.trace.loss and again.counts == first.counts
    assert again.behavior("loglik_margin") == shift
    assert not again.model_resident  # the stored measurement needed no model
    summary = again.summary()
    assert summary["origin"] == "loaded" and summary["run_id"] == first.run_id


PISSA = {"config": {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "layers_to_transform": [0, 5],
                    "init_lora_weights": "pissa"}}  # rebuilt, its base matrices are rewritten again


@pytest.mark.parametrize("method, options", [("lora", {"r": 4}), ("full", {}), ("feature-extraction", {}),
                                             ("peft", PISSA)], ids=["lora", "full", "feature-extraction", "peft-pissa"])
def test_release_then_rebuild_gives_identical_weights_and_measurements(tiny_qwen2, store_dir, method, options):
    session = new_session(tiny_qwen2, store_dir)
    run = session.train(method, examples=10, recipe=RECIPE, **options)
    weights = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    measured = run.forgetting()
    assert run.release_model() > 0 and not run.model_resident
    fresh = new_session(tiny_qwen2, store_dir).train(method, examples=10, recipe=RECIPE, **options)
    for rebuilt in (run.model, fresh.model):  # the same session's, and a new session's from the store
        assert {n: p for n, p in rebuilt.named_parameters()}.keys() == weights.keys()
        assert all(torch.equal(p, weights[n]) for n, p in rebuilt.named_parameters())
    fresh.measurements.pop("forgetting")
    assert fresh.forgetting() == measured
    base = {p.data_ptr() for p in tiny_qwen2.base.parameters()}
    assert any(p.data_ptr() in base for p in run.model.parameters()) == (method != "full")


def test_models_past_the_memory_budget_are_released_least_recent_first(tiny_qwen2, store_dir):
    session = new_session(tiny_qwen2, store_dir, run_memory=1)  # room for the model in use only
    a = session.train("lora", examples=10, recipe=RECIPE, r=2)
    b = session.train("lora", examples=10, recipe=RECIPE, r=4)
    assert b.model_resident and not a.model_resident
    a.forgetting()  # needs a's model: rebuilt, and b's released in turn
    assert a.model_resident and not b.model_resident
    assert session.resident.released == 2
    generous = new_session(tiny_qwen2, store_dir, run_memory=2**30)
    c, d = generous.train("lora", examples=10, recipe=RECIPE, r=2), generous.train("lora", examples=10, recipe=RECIPE, r=4)
    _ = c.model, d.model  # touching .model rebuilds a released model
    assert c.model_resident and d.model_resident and generous.resident.released == 0


def test_a_corrupt_entry_is_trained_again_with_a_warning(tiny_qwen2, store_dir):
    first = new_session(tiny_qwen2, store_dir).train("lora", examples=10, recipe=RECIPE, r=4)
    tensors = store_dir / first.run_id / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.warns(StoreWarning, match=rf"{first.run_id}.*does not match its checksum.*training it again"):
        again = new_session(tiny_qwen2, store_dir).train("lora", examples=10, recipe=RECIPE, r=4)
    assert again.origin == "trained" and again.trace.loss == first.trace.loss
    (store_dir / first.run_id / "manifest.json").unlink()
    with pytest.warns(StoreWarning, match="no manifest"):
        assert new_session(tiny_qwen2, store_dir).train("lora", examples=10, recipe=RECIPE, r=4).origin == "trained"


def test_retrain_trains_even_what_the_store_holds(tiny_qwen2, store_dir):
    new_session(tiny_qwen2, store_dir).train("lora", examples=10, recipe=RECIPE, r=4)
    assert new_session(tiny_qwen2, store_dir, retrain=True).train(
        "lora", examples=10, recipe=RECIPE, r=4).origin == "trained"


def test_cache_list_show_and_prune(tiny_qwen2, store_dir, capsys):
    from stance_harness.cli import main

    run = new_session(tiny_qwen2, store_dir).train("lora", examples=10, recipe=RECIPE, r=4)
    assert main(["cache", "list", "--run-cache", str(store_dir)]) == 0
    out = capsys.readouterr().out
    assert run.run_id in out and "tiny-qwen2" in out and "1 entries" in out
    assert main(["cache", "show", run.run_id, "--run-cache", str(store_dir)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["problem"] is None and shown["request"]["method"] == "lora" and "tensors.safetensors" in shown["files"]
    assert main(["cache", "show", run.run_id[:-1], "--run-cache", str(store_dir)]) == 2
    assert "Did you mean" in capsys.readouterr().err
    assert main(["cache", "prune", "--older-than", "1", "--run-cache", str(store_dir)]) == 0
    assert (store_dir / run.run_id).is_dir()  # a fresh entry is kept
    assert main(["cache", "prune", "--run-cache", str(store_dir)]) == 0
    assert not (store_dir / run.run_id).exists()


# -- crash safety --------------------------------------------------------------------------------
KILLED_WRITE = textwrap.dedent('''
    import os, signal, sys
    import safetensors.torch
    from stance_harness.models import load_model
    from stance_harness.runs.runstore import RunStore
    from stance_harness.session import HarnessOptions, HarnessSession
    from stance_harness.models import ModelArgs
    from pathlib import Path

    def half_then_die(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)

    session = HarnessSession(HarnessOptions("tiny-qwen2", ModelArgs(), [], None, Path("."), [], run_cache=Path(sys.argv[1])))
    safetensors.torch.save_file = half_then_die
    session.train("lora", examples=10, recipe={"learning_rate": 1e-3, "num_train_epochs": 1,
                                               "per_device_train_batch_size": 5, "seed": 0}, r=4)
''')


def test_a_store_write_killed_midway_leaves_nothing_that_loads(tiny_qwen2, stance, store_dir, tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED_WRITE)
    done = subprocess.run([sys.executable, str(script), str(store_dir)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "STANCE_HARNESS_THREADS": "1"})
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    request = TrainingRequest.build(tiny_qwen2, stance, "lora", examples=10, recipe=RECIPE, options={"r": 4})
    store = RunStore(store_dir)
    assert not store.entry(request.run_id).exists()  # only a dot-named temporary is left
    assert [p.name for p in store_dir.iterdir() if p.name.startswith(f".{request.run_id}.tmp-")]
    assert store.load(request, tiny_qwen2, stance) is None
    # the lock died with its holder: the next session takes it at once and trains
    assert new_session(tiny_qwen2, store_dir).train("lora", examples=10, recipe=RECIPE, r=4).origin == "trained"


# -- workers share the store -----------------------------------------------------------------
SAME_REQUEST = '''
RECIPE = {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5, "seed": 0}


def test_first(train):
    assert train("lora", examples=10, recipe=RECIPE, r=2).trace.loss


def test_second(train):
    assert train("lora", examples=10, recipe=RECIPE, r=2).trace.loss
'''


def test_two_workers_asking_for_one_request_train_it_once(pytester):
    pytester.makepyfile(test_same=SAME_REQUEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--dist", "each", "-v")
    result.assert_outcomes(passed=4)  # --dist each: both workers run both tests
    folder = pytester.path / "reports" / (pytester.path / "reports" / "latest").read_text().strip()
    payload = json.loads((folder / "report.json").read_text())
    (run,) = payload["runs"].values()
    store = Path(os.environ["STANCE_HARNESS_RUN_CACHE"])
    assert (store / run["run_id"] / "manifest.json").is_file()
    # one worker trained it; the other waited on the lock and loaded it
    assert sorted(run["origins"]) == ["loaded", "trained"]


def test_measurements_by_other_measuring_code_are_made_again(tiny_qwen2, store_dir, monkeypatch):
    import stance_harness.runs.runstore

    first = new_session(tiny_qwen2, store_dir).train("lora", examples=10, recipe=RECIPE, r=4)
    first.forgetting()
    assert "forgetting" in new_session(tiny_qwen2, store_dir).train("lora", examples=10, recipe=RECIPE, r=4).measurements
    monkeypatch.setattr(stance_harness.runs.runstore, "measuring_code_version", lambda: "other-code")
    again = new_session(tiny_qwen2, store_dir).train("lora", examples=10, recipe=RECIPE, r=4)
    assert again.origin == "loaded" and "forgetting" not in again.measurements  # tensors kept, measured anew
    assert again.forgetting() == first.forgetting()


def test_the_code_fingerprint_ignores_comments_docstrings_and_where_imports_sit():
    from stance_harness.runs.request import code_logic

    inline = '"""Doc."""\nimport os\n\n\ndef f(x):\n    """Doc."""\n    import torch  # why\n    return torch.zeros(x)\n'
    hoisted = "import torch\nimport os\n\n\ndef f(x):\n    # a new comment\n    return torch.zeros(x)\n"
    assert code_logic(inline) == code_logic(hoisted)
    assert code_logic(hoisted) != code_logic(hoisted.replace("zeros", "ones"))  # what it does is kept
    assert code_logic(hoisted) != code_logic(hoisted.replace("import torch", "import numpy as torch"))


def test_the_code_fingerprint_ignores_how_imports_are_grouped():
    from stance_harness.runs.request import code_logic

    split = "from math import exp\nfrom math import log\nimport os, sys\n\n\ndef f(x):\n    return exp(log(x))\n"
    merged = "import sys\nimport os\nfrom math import exp, log\n\n\ndef f(x):\n    return exp(log(x))\n"
    assert code_logic(split) == code_logic(merged)
    # what is imported, from where and under which name still counts
    assert code_logic(merged) != code_logic(merged.replace("exp, log", "exp, log as ln"))
    assert code_logic(merged) != code_logic(merged.replace("from math", "from cmath"))
    assert code_logic(merged) != code_logic(merged.replace("from math", "from .math"))
    assert code_logic(merged) != code_logic(merged.replace("import os", "import os.path"))
