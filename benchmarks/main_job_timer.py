"""A pytest plugin that benchmarks/main_job.py loads (`-p main_job_timer`): the harness's own phases,
timed in the pytest process, written as JSON to $MAIN_JOB_TIMINGS when the session ends.

- tests: the wall time of the test loop (collection excluded);
- analyses: time inside the harness's analysis stages (Run.measured -> run_stage), outermost only;
- reporting: time inside pytest_sessionfinish (the harness writes report.json, .md and .html there).
Training and model building come from the harness's own records (report.json's runs, the cache's
stance_harness.json files), which main_job.py reads: they hold for runs trained in other processes too.
"""

from __future__ import annotations

import json
import os
import time

import pytest

TIMINGS: dict[str, float] = {"tests": 0.0, "analyses": 0.0, "reporting": 0.0}
_depth = [0]


def _timed_stage(original):
    def run_stage(stage, fn, timeout):
        _depth[0] += 1
        started = time.perf_counter()
        try:
            return original(stage, fn, timeout)
        finally:
            _depth[0] -= 1
            if _depth[0] == 0:  # a stage inside a stage is already counted by the outer one
                TIMINGS["analyses"] += time.perf_counter() - started

    return run_stage


def pytest_configure(config):
    import stance_harness.runs.run

    stance_harness.runs.run.run_stage = _timed_stage(stance_harness.runs.run.run_stage)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session):
    started = time.perf_counter()
    yield
    TIMINGS["tests"] += time.perf_counter() - started


@pytest.hookimpl(hookwrapper=True)
def pytest_sessionfinish(session, exitstatus):
    started = time.perf_counter()
    yield
    TIMINGS["reporting"] += time.perf_counter() - started
    target = os.environ.get("MAIN_JOB_TIMINGS")
    if target:
        with open(target, "w") as out:
            json.dump(TIMINGS, out)
