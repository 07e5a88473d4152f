"""Shared, session-scoped fixtures for the harness's own tests: tiny models, few steps."""

import atexit
import dataclasses
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _pin_model_cache():
    # pytester points HOME at a temp dir; pin the cache so its runs reuse the built tiny models.
    from stance_harness.models.tiny import cache_root

    os.environ["STANCE_HARNESS_CACHE"] = str(cache_root())


_pin_model_cache()
# A fresh run store for each test session, so every test trains what it asks for. xdist workers
# inherit the controller's, so a run one worker trained is loaded, not retrained, by the other.
if "PYTEST_XDIST_WORKER" not in os.environ or "STANCE_HARNESS_TEST_RUN_STORE" not in os.environ:
    os.environ["STANCE_HARNESS_TEST_RUN_STORE"] = tempfile.mkdtemp(prefix="stance-harness-runs-")
    atexit.register(shutil.rmtree, os.environ["STANCE_HARNESS_TEST_RUN_STORE"], ignore_errors=True)
os.environ["STANCE_HARNESS_RUN_CACHE"] = os.environ["STANCE_HARNESS_TEST_RUN_STORE"]
# The runs planned ahead train in the session's own process, as they did before planning, so
# the pytester sessions do not each start worker processes; test_plan_ahead.py asks for workers.
os.environ.setdefault("STANCE_HARNESS_TRAIN_WORKERS", "1")

pytest_plugins = ["pytester"]

QUICK = {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5, "seed": 0}


def detached(run, **changes):
    """A copy of a stored run to tamper with: it no longer writes its measurements into the run's
    store entry, which xdist workers share (a tampered copy once stored all-zero deltas there)."""
    import dataclasses

    return dataclasses.replace(run, **{"services": None, **changes})


@pytest.fixture(scope="session")
def tiny_qwen2():
    from stance_harness.models import load_model

    return load_model("tiny-qwen2")


@pytest.fixture(scope="session")
def stance():
    from stance_harness.stances import load_stance

    return load_stance("curious-uncertainty")


@pytest.fixture(scope="session")
def harness(tiny_qwen2):
    """A HarnessSession on tiny-qwen2: its train() is the request-keyed run cache the plugin uses."""
    from pathlib import Path

    from stance_harness.models import ModelArgs
    from stance_harness.session import HarnessOptions, HarnessSession

    session = HarnessSession(HarnessOptions("tiny-qwen2", ModelArgs(), [], None, Path("."), []))
    session.use_model(tiny_qwen2)
    return session


@pytest.fixture(scope="session")
def quick_run(harness):
    """`quick_run(method, **options)`: a 1-epoch, 10-example run, trained once per session."""

    def make(method, **options):
        return harness.train(method, examples=10, recipe=QUICK, **options)

    return make


@pytest.fixture
def counted_loads(monkeypatch):
    """How many times a full-precision base has been loaded from its files since the test began."""
    import stance_harness.models.loading as loading

    loads = []
    real = loading._load_base

    def load(path, args):
        loads.append(path)
        return real(path, args)

    monkeypatch.setattr(loading, "_load_base", load)
    return loads


@pytest.fixture(autouse=True)
def _own_run_store(request, monkeypatch, tmp_path):
    """Each pytester session gets its own run store: a run stored by one test is not loaded by the next.
    Nor is it an xdist worker when this session is run with -n: it must not read the outer worker's id."""
    if "pytester" in request.fixturenames:
        monkeypatch.setenv("STANCE_HARNESS_RUN_CACHE", str(tmp_path / "run-store"))
        for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
            monkeypatch.delenv(name, raising=False)


def pytest_collection_modifyitems(config, items):
    """The fresh-machine builds go first: on a cold cache they build each embedded model once, and
    the tests after them load it. real_model tests (tests/test_real_model.py: smollm2-135m, minutes
    on a CPU) run only when asked for: `-m real_model` (any -m naming the marker), or
    STANCE_HARNESS_REAL_MODEL=1."""
    items.sort(key=lambda item: "fresh_machine" not in item.keywords)  # stable: the rest keep their order
    if "real_model" in (config.getoption("markexpr") or "") or os.environ.get("STANCE_HARNESS_REAL_MODEL") == "1":
        return
    skip = pytest.mark.skip(reason="a real_model test: select it with -m real_model or STANCE_HARNESS_REAL_MODEL=1")
    for item in items:
        if "real_model" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    # The harness's own tests write no reports/; pytester runs inside them choose for themselves.
    from stance_harness.plugin import SESSION_KEY

    session = config.stash[SESSION_KEY]
    session.options = dataclasses.replace(session.options, reports_dir=None)
