"""What a Run asks of whoever holds it (a session): one object, imported without torch.
(`run` below is a stance_harness.runs.run.Run; not imported, since run.py imports this module.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from stance_harness.models import LoadedModel


@dataclass
class RunServices:
    """What a Run asks of whoever holds it, as one object. Left at its defaults (a Run alone) it
    measures in memory, cannot rebuild a released model, and records checks nowhere.

    store: keeps the run's measurements (`save_measurements(run)`) and rebuilds its model
        (`rebuild(run)` gives a function that makes it); None: neither.
    residency: the memory budget, told each time the model is used (`touch(run)`); None: none.
    progress: a line of progress for the terminal.
    analysis_timeout: seconds per analysis stage; None: DEFAULT_TIMEOUT; 0: no limit.
    sinks: where a check on the run is recorded, `sink(result, published)` (a test's record adds
        itself while the test runs).
    """

    store: Any = None
    residency: Any = None
    progress: Callable[[str], None] = lambda _message: None
    analysis_timeout: float | None = None
    sinks: list = field(default_factory=list)

    def rebuilder(self, run: Any) -> Callable[[], Any] | None:
        """A function that makes the run's model again, or None where nothing can."""
        return self.store.rebuild(run) if self.store is not None and run.request is not None else None

    def measured(self, run: Any) -> None:
        """A new measurement was kept on `run`."""
        if self.store is not None and run.request is not None:
            self.store.save_measurements(run)

    def model_used(self, run: Any) -> None:
        if self.residency is not None:
            self.residency.touch(run)

    def base_cache(self, loaded: "LoadedModel") -> dict:
        """What was measured on the shared base, by key: one cache per base, shared by its runs."""
        return loaded.measurement_cache
