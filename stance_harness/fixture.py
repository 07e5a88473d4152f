"""The work behind the plugin's fixtures: the `train` function a test is handed, what it returns
under --plan, and how bad input becomes one clear failure instead of a deep traceback."""

from __future__ import annotations

import pytest

from stance_harness.core.errors import HarnessError
from stance_harness.runs.runset import RunSet

SEEDS_MARK = "seeds"


def or_usage_error(fn, *args, **kwargs):
    """Bad input becomes a short, clear failure instead of a deep traceback; a hypothesis that
    does not apply to this model (a causal-LM task on an encoder) is skipped, saying why."""
    __tracebackhide__ = True
    from stance_harness.runs.tasks import NotApplicable  # why: imports torch; not at plugin load

    try:
        return fn(*args, **kwargs)
    except NotApplicable as exc:
        pytest.skip(f"does not apply to this model: {exc}")
    except HarnessError as exc:
        pytest.fail(f"stance-harness: {exc}", pytrace=False)


def mark_seeds(mark) -> int:
    """The n of a test's `seeds(n)` mark, an integer >= 1."""
    __tracebackhide__ = True
    (count,) = mark.args or (mark.kwargs.get("n"),)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        pytest.fail(f"stance-harness: @pytest.mark.{SEEDS_MARK}(n) needs an integer n >= 1, got {count!r}",
                    pytrace=False)
    return count


class PlannedRun:
    """What `train` returns under --plan: the request was built and checked; reading anything of
    the run (it was not trained) skips the test, naming it."""

    def __init__(self, request):
        self.request = request
        self.run_id = request.run_id

    def __getattr__(self, name):
        pytest.skip(f"--plan: {self.run_id} checked, not trained")


def train_function(harness_session, stance_report, stance_repeat: int, default_seeds: int | None, handed: list):
    """The `train` fixture's function for one test; each run it hands over is appended to `handed`
    (the fixture releases them after the test). `default_seeds`: --seeds, else the seeds(N) mark."""

    def _one(method, offset, kwargs):
        stance_report.seeds = stance_report.seeds or 1
        if harness_session.options.plan_only or harness_session.planning:  # checked now; the test skips when it first reads the run
            return PlannedRun(or_usage_error(harness_session.check_request, method, repeat=offset, **kwargs))
        run = or_usage_error(harness_session.train, method, repeat=offset, **kwargs)
        handed.append(stance_report.use_run(run))
        return run

    def _train(method: str = "full", seeds: int | None = None, **kwargs):  # the checks know it by this name
        __tracebackhide__ = True
        if seeds is None and default_seeds is None:
            return _one(method, stance_repeat, kwargs)
        count = default_seeds if seeds is None else seeds
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            pytest.fail(f"stance-harness: train(seeds=...) must be an integer >= 1, got {seeds!r}", pytrace=False)
        # under --repeat R each repetition gets its own block of seeds
        stance_report.seeds = max(stance_report.seeds or 0, count)
        return RunSet(_one(method, stance_repeat * count + i, kwargs) for i in range(count))

    return _train
