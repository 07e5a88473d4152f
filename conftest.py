"""Repo-level defaults for running the suites and tests from a checkout."""

import os

# Offline first: a run from a checkout never reaches a model hub, even if the shell forgot.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Heavy sweeps (@pytest.mark.slow) run only when asked for with -m."""
    if config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_configure(config):
    """One intra-op thread on the embedded tiny models: their 64-wide matrices gain nothing from a
    second thread (measured 0.096 s vs 0.096 s per step), and on a busy 2-core machine or under
    xdist, threads spinning against each other made steps 10-30x slower."""
    from stance_harness.models import resolve_model

    try:
        embedded = resolve_model(config.getoption("--model")).source == "embedded"
    except Exception:  # an unknown --model is reported by the plugin itself
        return
    if embedded and "STANCE_HARNESS_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)
