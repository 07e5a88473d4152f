"""Analysis stages under a time limit, so a stuck analysis fails with its name, never hangs.

On the main thread (where pytest runs tests), a stage runs in place under a real-time alarm
(SIGALRM): when it overruns, StageTimeout is raised in the stage's own code at the next Python
instruction, a cooperative stop between tensor operations. The work really stops, and nothing
is left running that could crash the interpreter at exit (an abandoned thread inside torch
aborts the process at shutdown). Stages may nest; the earliest deadline wins, and the timer a
caller had set before (pytest-timeout's, say) is restored after.

Off the main thread no alarm can be delivered, so there a stage runs in a daemon thread that
is abandoned when it overruns.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Callable, TypeVar

from stance_harness.core.errors import HarnessError

T = TypeVar("T")
DEFAULT_TIMEOUT = 600.0
_deadlines: list[tuple[float, str, float]] = []  # (monotonic deadline, stage, seconds), innermost last


class StageTimeout(HarnessError):
    def __init__(self, stage: str, seconds: float):
        self.stage, self.seconds = stage, seconds
        super().__init__(
            f"analysis stage {stage!r} did not finish within {seconds:g}s and was stopped "
            f"(raise --analysis-timeout for large models; 0 turns the limit off)"
        )


def run_stage(stage: str, fn: Callable[[], T], timeout: float | None) -> T:
    if not timeout:
        return fn()
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return _in_a_thread(stage, fn, timeout)
    now = time.monotonic()
    earliest = min([(now + timeout, stage, timeout)] + _deadlines[-1:], key=lambda d: d[0])
    outermost = not _deadlines
    if outermost:
        previous_handler = signal.signal(signal.SIGALRM, _on_alarm)
        previous_timer = signal.getitimer(signal.ITIMER_REAL)
    _deadlines.append(earliest)
    signal.setitimer(signal.ITIMER_REAL, max(earliest[0] - now, 1e-4))
    try:
        return fn()
    finally:
        _deadlines.pop()
        if _deadlines:  # back to the enclosing stage's deadline
            signal.setitimer(signal.ITIMER_REAL, max(_deadlines[-1][0] - time.monotonic(), 1e-4))
        else:
            signal.setitimer(signal.ITIMER_REAL, 0)
            if outermost:
                signal.signal(signal.SIGALRM, previous_handler)
                if previous_timer[0] > 0:
                    signal.setitimer(signal.ITIMER_REAL, *previous_timer)


def _on_alarm(signum, frame):
    if _deadlines:
        _, stage, seconds = _deadlines[-1]
        raise StageTimeout(stage, seconds)


def _in_a_thread(stage: str, fn: Callable[[], T], timeout: float) -> T:
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, name=f"stance-harness:{stage}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise StageTimeout(stage, timeout)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
