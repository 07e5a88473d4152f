"""Analysis stages under a time limit, so a stuck analysis fails with its name, never hangs.

A stage runs in a daemon thread; the caller waits at most `timeout` seconds. A thread cannot
be killed, so an overrunning stage is abandoned: it goes on in the background, its result is
discarded, and it cannot keep the process from exiting.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

from ..registry import HarnessError

T = TypeVar("T")
DEFAULT_TIMEOUT = 600.0


class StageTimeout(HarnessError):
    def __init__(self, stage: str, seconds: float):
        self.stage, self.seconds = stage, seconds
        super().__init__(
            f"analysis stage {stage!r} did not finish within {seconds:g}s and was abandoned "
            f"(raise --analysis-timeout for large models; 0 turns the limit off)"
        )


def run_stage(stage: str, fn: Callable[[], T], timeout: float | None) -> T:
    if not timeout:
        return fn()
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
