"""The run store on an object store: a real S3-compatible server (moto in server mode) started on
this machine, reached over HTTP by s3fs exactly as S3 would be. Write, read, two writers of one
key, a writer killed midway, a corrupted object, the cache command, and two pytest sessions
sharing the store."""

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from conftest import detached
from stance_harness.cli import main
from stance_harness.models import ModelArgs
from stance_harness.runs.runstore import MANIFEST, RUN, TENSORS, RunStore, StoreError, StoreWarning, is_remote
from stance_harness.session import HarnessOptions, HarnessSession

RECIPE = {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5, "seed": 0}
BUCKET = "runs"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free local port; boto (under s3fs) finds it through AWS_ENDPOINT_URL_S3,
    which pytester's subprocesses inherit."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'moto[server]')")
    s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install s3fs)")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            env.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            env.delenv(name, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # an instance made before would talk to another endpoint
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture
def url(s3, request):
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').replace(']', '')}"


@pytest.fixture(scope="module")
def trained(harness):
    """One trained run (in the test session's local store), saved into each test's remote store."""
    run = harness.train("lora", examples=10, recipe=RECIPE, r=4)
    run.behavior("loglik_margin")  # a measurement that must travel with the entry
    return run


def new_session(loaded, store) -> HarnessSession:
    session = HarnessSession(HarnessOptions("tiny-qwen2", ModelArgs(), [], None, Path("."), [], run_cache=store))
    session.use_model(loaded)
    return session


def entry_objects(fs, url, run_id) -> list[str]:
    root = url.removeprefix("s3://")
    return sorted(name.removeprefix(f"{root}/{run_id}/") for name in fs.find(f"{root}/{run_id}"))


# -- write and read ------------------------------------------------------------------------------
def test_a_run_saved_to_s3_loads_with_its_measurements_and_rebuilds_identical(s3, url, trained, tiny_qwen2, stance):
    store = RunStore(url)
    assert store.remote is not None and store.root == url
    store.save(trained)
    objects = entry_objects(s3, url, trained.run_id)
    manifest = json.loads(s3.cat_file(f"{url.removeprefix('s3://')}/{trained.run_id}/{MANIFEST}"))
    folder = manifest["folder"]
    assert objects == sorted([MANIFEST, f"{folder}/{TENSORS}", f"{folder}/{RUN}", f"{folder}/measurements.json"])

    loaded = RunStore(url).load(trained.request, tiny_qwen2, stance)  # a new store: nothing cached locally
    assert loaded.origin == "loaded" and loaded.trace.loss == trained.trace.loss
    key = "behavior:loglik_margin"  # measured once, in the session that trained it: it travels with the entry
    assert json.loads(json.dumps(loaded.measurements[key])) == json.loads(json.dumps(trained.measurements[key]))
    weights = dict(trained.model.named_parameters())
    rebuilt = new_session(tiny_qwen2, url).train("lora", examples=10, recipe=RECIPE, r=4)
    assert rebuilt.origin == "loaded"
    assert all(torch.equal(p, weights[n]) for n, p in rebuilt.model.named_parameters())


def test_measurements_made_on_a_loaded_run_are_written_into_its_folder(s3, url, trained, tiny_qwen2):
    RunStore(url).save(detached(trained))  # a copy holds no measurements (an init=False field)
    again = new_session(tiny_qwen2, url).train("lora", examples=10, recipe=RECIPE, r=4)
    assert again.origin == "loaded" and "forgetting" not in again.measurements
    value = again.forgetting()
    third = new_session(tiny_qwen2, url).train("lora", examples=10, recipe=RECIPE, r=4)
    assert third.measurements["forgetting"] == value and not third.model_resident


def test_the_lock_of_a_remote_store_is_on_this_machine(url, trained):
    """xdist workers on one machine still train a run once: the lock is a local file, one per store URL."""
    from stance_harness.models.tiny import cache_root
    from stance_harness.core.errors import HarnessError

    store, other = RunStore(url), RunStore(url)
    assert store.local_dir == other.local_dir and store.local_dir.is_relative_to(cache_root() / "remote-stores")
    assert RunStore(url + "-elsewhere").local_dir != store.local_dir
    with store.lock(trained.run_id):
        with pytest.raises(HarnessError, match=rf"run store entry {trained.run_id}: .* is still held by another "
                                               rf"process after 0.1s"):
            with other.lock(trained.run_id, timeout=0.1):
                pass


# -- two writers of one key ----------------------------------------------------------------------
def test_two_writers_of_one_key_leave_one_good_entry(s3, url, trained, tiny_qwen2, stance, monkeypatch):
    """Writer A puts its files, then waits while writer B saves whole; then A puts its manifest.
    Their records differ (as two trainings' timings do), so a manifest naming the other's files
    would fail its checksum: the entry must load, and be A's, the last to commit."""
    import stance_harness.runs.runstore as runstore

    a, b = RunStore(url), RunStore(url)
    run_a, run_b = detached(trained, train_seconds=1.0), detached(trained, train_seconds=2.0)
    files_in, b_done = threading.Event(), threading.Event()
    original = runstore._Remote.write

    def write(remote, data, *parts):
        if remote is a.remote and parts[-1] == MANIFEST:
            files_in.set()
            assert b_done.wait(60)
        original(remote, data, *parts)

    monkeypatch.setattr(runstore._Remote, "write", write)
    failures = []

    def save_a():
        try:
            a.save(run_a)
        except BaseException as exc:  # a thread's exception would not fail the test by itself
            failures.append(exc)
            files_in.set()

    writer = threading.Thread(target=save_a)
    writer.start()
    assert files_in.wait(60) and not failures  # A's files are in; its manifest is not
    b.save(run_b)
    assert RunStore(url).load(trained.request, tiny_qwen2, stance).train_seconds == 2.0  # B's entry, whole
    b_done.set()
    writer.join(60)
    assert not failures and not writer.is_alive()

    store = RunStore(url)
    assert store.problem(trained.run_id) is None
    assert store.load(trained.request, tiny_qwen2, stance).train_seconds == 1.0  # the last manifest wins
    folders = {name.split("/")[0] for name in entry_objects(s3, url, trained.run_id) if "/" in name}
    assert len(folders) == 2  # B's folder is an orphan now
    # prune keeps the entry and removes the orphan, once it is old enough not to be a write under way
    assert store.prune(older_than_days=1) == []
    monkeypatch.setattr(runstore, "STALE_SECONDS", -1)
    (removed,) = store.prune(older_than_days=1)
    assert str(removed).startswith(f"{url}/{trained.run_id}/")
    assert store.load(trained.request, tiny_qwen2, stance).train_seconds == 1.0


# -- a writer killed midway ----------------------------------------------------------------------
KILLED_WRITE = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path
    import stance_harness.runs.runstore as runstore
    from stance_harness.models import ModelArgs
    from stance_harness.session import HarnessOptions, HarnessSession

    original = runstore._Remote.write

    def die_before_the_manifest(remote, data, *parts):
        if parts[-1] == runstore.MANIFEST:
            os.kill(os.getpid(), signal.SIGKILL)  # the tensors and record are in, the manifest never
        original(remote, data, *parts)

    runstore._Remote.write = die_before_the_manifest
    # the run as the test session stored it locally (no training here), then written to S3
    session = HarnessSession(HarnessOptions("tiny-qwen2", ModelArgs(), [], None, Path("."), []))
    run = session.train("lora", examples=10, recipe={"learning_rate": 1e-3, "num_train_epochs": 1,
                                                     "per_device_train_batch_size": 5, "seed": 0}, r=4)
    assert run.origin == "loaded", run.origin
    runstore.RunStore(sys.argv[1]).save(run)
''')


def test_a_writer_killed_before_its_manifest_leaves_nothing_that_loads(s3, url, trained, tiny_qwen2, stance,
                                                                        tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED_WRITE)
    done = subprocess.run([sys.executable, str(script), url], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "STANCE_HARNESS_THREADS": "1", "TMPDIR": str(tmp_path)})  # its staging
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    objects = entry_objects(s3, url, trained.run_id)
    assert MANIFEST not in objects and any(name.endswith(TENSORS) for name in objects)  # it died between them

    store = RunStore(url)
    with pytest.warns(StoreWarning, match=rf"{trained.run_id} is not trusted \(it has no manifest"):
        assert store.load(trained.request, tiny_qwen2, stance) is None
    assert [e.complete for e in store.entries()] == [False]
    assert store.prune() == []  # young: it could be a write under way on another machine
    with pytest.warns(StoreWarning, match="no manifest"):
        again = new_session(tiny_qwen2, url).train("lora", examples=10, recipe=RECIPE, r=4)
    assert again.origin == "trained" and again.trace.loss == trained.trace.loss
    assert RunStore(url).load(trained.request, tiny_qwen2, stance).origin == "loaded"


# -- a corrupted object --------------------------------------------------------------------------
@pytest.mark.parametrize("name", [TENSORS, RUN])
def test_a_corrupted_object_is_detected_on_load_and_trained_again(s3, url, trained, tiny_qwen2, stance, name):
    RunStore(url).save(trained)
    (path,) = [n for n in s3.find(f"{url.removeprefix('s3://')}/{trained.run_id}") if n.endswith(f"/{name}")]
    data = bytearray(s3.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    s3.pipe_file(path, bytes(data))

    store = RunStore(url)
    assert store.problem(trained.run_id) == f"{name} does not match its checksum"
    with pytest.warns(StoreWarning, match=rf"{url}/{trained.run_id} is not trusted \({name} does not match"):
        assert store.load(trained.request, tiny_qwen2, stance) is None
    with pytest.warns(StoreWarning, match="does not match its checksum"):
        again = new_session(tiny_qwen2, url).train("lora", examples=10, recipe=RECIPE, r=4)
    assert again.origin == "trained"
    assert RunStore(url).problem(trained.run_id) is None  # the new entry replaced it


def test_a_missing_object_is_named(s3, url, trained):
    RunStore(url).save(trained)
    (path,) = [n for n in s3.find(f"{url.removeprefix('s3://')}/{trained.run_id}") if n.endswith(f"/{TENSORS}")]
    s3.rm(path)
    assert RunStore(url).problem(trained.run_id) == f"{TENSORS} is missing"


# -- the cache command ---------------------------------------------------------------------------
def test_cache_lists_shows_and_prunes_a_remote_store(s3, url, trained, capsys):
    assert main(["cache", "list", "--run-cache", url]) == 0
    assert capsys.readouterr().out.strip() == f"no runs in the run store {url}"
    RunStore(url).save(trained)
    assert main(["cache", "list", "--run-cache", url]) == 0
    out = capsys.readouterr().out
    assert f"run store {url}: 1 entries" in out and trained.run_id in out and "tiny-qwen2" in out
    assert main(["cache", "show", trained.run_id, "--run-cache", url]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["problem"] is None and shown["path"] == f"{url}/{trained.run_id}"
    assert shown["request"]["method"] == "lora" and "behavior:loglik_margin" in shown["measurements"]
    assert any(name.endswith(f"/{TENSORS}") for name in shown["files"])
    assert main(["cache", "show", trained.run_id[:-1], "--run-cache", url]) == 2
    assert f"no run store entry '{trained.run_id[:-1]}' in {url}" in capsys.readouterr().err
    assert main(["cache", "prune", "--older-than", "1", "--run-cache", url]) == 0
    assert "removed 0 entries" in capsys.readouterr().out
    assert main(["cache", "prune", "--run-cache", url]) == 0
    assert f"removed 1 entries from {url}" in capsys.readouterr().out
    assert entry_objects(s3, url, trained.run_id) == []


# -- two sessions share it -----------------------------------------------------------------------
TWO_RUNS = '''
RECIPE = {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5, "seed": 0}


def test_r2(train):
    assert train("lora", examples=5, recipe=RECIPE, r=2).trace.loss


def test_r4(train):
    assert train("lora", examples=5, recipe=RECIPE, r=4).trace.loss
'''


def origins(pytester) -> list[str]:
    folder = pytester.path / "reports" / (pytester.path / "reports" / "latest").read_text().strip()
    runs = json.loads((folder / "report.json").read_text())["runs"].values()
    return sorted(origin for run in runs for origin in run["origins"])


def test_a_second_session_on_the_remote_store_trains_nothing(pytester, url):
    pytester.makepyfile(test_two=TWO_RUNS)
    first = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--run-cache", url)
    first.assert_outcomes(passed=2)
    first.stdout.fnmatch_lines(["*plan: runs planned 2, stored 0, trained ahead 2*"])
    assert origins(pytester) == ["trained", "trained"]
    second = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--run-cache", url)
    second.assert_outcomes(passed=2)
    second.stdout.fnmatch_lines(["*plan: runs planned 2, stored 2, trained ahead 0*"])  # counted: none trained
    assert origins(pytester) == ["loaded", "loaded"]


def test_a_training_worker_stores_its_run_at_the_url(s3, url, trained, tiny_qwen2, stance):
    """What a plan-ahead worker process does with its spec (workers.train_spec), here in-process:
    the spec carries the store's URL as given, and the run lands in S3, loadable."""
    from stance_harness.runs import planning, workers
    from stance_harness.runs.planning import PlannedRequest

    store = RunStore(url)
    planned = PlannedRequest(trained.request, "tiny-qwen2", "curious-uncertainty", steps=len(trained.trace.loss))
    options = HarnessOptions("tiny-qwen2", ModelArgs(), [], None, Path("."), [], run_cache=url)
    spec = planning.spec_of(planned, options, store.root)
    assert spec["store"] == url
    workers.train_spec(spec, {("tiny-qwen2", json.dumps(dataclasses.asdict(ModelArgs()), sort_keys=True)): tiny_qwen2},
                       lambda _message: None)
    assert RunStore(url).load(trained.request, tiny_qwen2, stance).trace.loss == trained.trace.loss


# -- the URL itself ------------------------------------------------------------------------------
@pytest.mark.parametrize("location, message", [
    ("s4://bucket/runs", r"run store s4://bucket/runs: Protocol not known: s4; a run store is a local directory"),
    ("s3://", r"run store s3://: the URL names no bucket or folder \(e.g. s3://BUCKET/runs\)"),
])
def test_a_bad_url_is_named(location, message):
    with pytest.raises(StoreError, match=message):
        RunStore(location)


def test_a_store_that_cannot_be_written_is_named(s3, trained):
    store = RunStore("s3://no-such-bucket/runs")
    with pytest.raises(StoreError, match=rf"run store s3://no-such-bucket/runs: cannot write {trained.run_id}/"
                                         rf"[0-9a-f-]+/{TENSORS} \(.*bucket"):
        store.save(trained)


def test_a_url_made_into_a_path_is_refused():
    with pytest.raises(StoreError, match=r"run store s3:/bucket/runs: a URL made into a Path \(its // became /\); "
                                         r"pass the URL as a string, e.g. s3://bucket/runs"):
        RunStore(Path("s3://bucket/runs"))


def test_a_protocol_without_its_package_says_which(monkeypatch):
    import fsspec

    def missing(url, **kwargs):
        raise ImportError("Please install gcsfs to access Google Storage")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(StoreError, match=r"run store gs://b/runs: the gs:// protocol needs a package that is not "
                                         r"installed \(Please install gcsfs.*\); s3:// needs s3fs, gs:// needs gcsfs"):
        RunStore("gs://b/runs")


def test_a_bad_run_cache_url_is_a_usage_error(pytester):
    pytester.makepyfile(test_none="def test_nothing():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--run-cache", "s4://bucket/runs")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*stance-harness: run store s4://bucket/runs: Protocol not known: s4*"])


def test_file_urls_and_paths_are_the_local_store(tmp_path):
    assert not is_remote(tmp_path) and not is_remote(f"file://{tmp_path}") and is_remote("s3://b/runs")
    for location in (tmp_path, str(tmp_path), f"file://{tmp_path}"):
        store = RunStore(location)
        assert store.remote is None and store.root == tmp_path and store.local_dir == tmp_path


def test_a_local_store_imports_no_fsspec(tmp_path):
    code = ("import sys; from stance_harness.runs.runstore import RunStore; import stance_harness.session; "
            f"store = RunStore({str(tmp_path)!r}); store.entries(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fsspec', 's3fs', 'gcsfs')))")
    # not botocore: transformers imports accelerate, whose CLI config imports botocore wherever it is installed
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
