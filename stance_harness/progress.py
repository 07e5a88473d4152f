"""Progress on the terminal while tests run: the harness's lines, the training bar and the plan's
line, written through pytest's terminal reporter past output capture."""

from __future__ import annotations

import pytest

PREFIX = "[stance-harness]"


class ProgressWriter:
    """Progress on the terminal through capture: lines, and a training bar (steps, loss).

    Silent under -q. On a terminal the bar redraws in place; in a log (CI) it prints a line
    at each quarter of the run instead of hundreds of redraws.
    """

    BAR = 24

    def __init__(self, config: pytest.Config):
        self.config = config

    def _emit(self, draw, quiet_too: bool = False) -> None:
        if self.config.get_verbosity() < 0 and not quiet_too:
            return
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        if capture is not None:
            with capture.global_and_fixture_disabled():
                draw(reporter)
        else:
            draw(reporter)

    def __call__(self, message: str) -> None:
        self._emit(lambda reporter: reporter.write_line(f"{PREFIX} {message}"))

    def step(self, label: str, step: int, total: int, loss: float) -> None:
        filled = self.BAR * step // max(1, total)
        text = f"{PREFIX}   {label} [{'#' * filled}{'.' * (self.BAR - filled)}] {step}/{total} loss {loss:.4f}"

        def draw(reporter):
            if reporter.isatty:
                reporter.rewrite(text, erase=True)
                if step == total:
                    reporter.write("\n")
            elif step == total or step % max(1, total // 4) == 0:
                reporter.write_line(text)

        self._emit(draw)

    def plan(self, text: str, when: str) -> None:
        """The plan's one progress line (`when`: step, event or final): redrawn in place on a
        terminal; in a log a line per finished run, and under -q only the last."""
        quiet = self.config.get_verbosity() < 0

        def draw(reporter):
            if reporter.isatty:
                reporter.rewrite(text, erase=True)
                if when == "final":
                    reporter.write("\n")
            elif when == "final" or (when == "event" and not quiet):
                reporter.write_line(text)

        self._emit(draw, quiet_too=True)
