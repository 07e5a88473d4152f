"""Shared, session-scoped fixtures for the harness's own tests: tiny models, few steps."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _pin_model_cache():
    # pytester points HOME at a temp dir; pin the cache so its runs reuse the built tiny models.
    from harness.models.tiny import cache_root

    os.environ["STANCE_HARNESS_CACHE"] = str(cache_root())


_pin_model_cache()

pytest_plugins = ["pytester"]

QUICK = {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5, "seed": 0}


@pytest.fixture(scope="session")
def tiny_qwen2():
    from harness.models import load_model

    return load_model("tiny-qwen2")


@pytest.fixture(scope="session")
def stance():
    from harness.stances import load_stance

    return load_stance("curious-uncertainty")


@pytest.fixture(scope="session")
def quick_run(tiny_qwen2, stance):
    """`quick_run(method, **options)`: a 1-epoch, 10-example run, trained once per session."""
    from harness.methods import method_config
    from harness.training import Recipe, run_training

    cache = {}

    def make(method, **options):
        key = (method, tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in cache:
            config = method_config(method, options)
            cache[key] = run_training(tiny_qwen2, stance, method, config, Recipe.of(QUICK), examples=10)
        return cache[key]

    return make


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    # The harness's own tests write no reports/; pytester runs inside them choose for themselves.
    from harness.plugin import SESSION_KEY

    config.stash[SESSION_KEY].options.reports_dir = None
