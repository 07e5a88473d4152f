"""The progress output (stance_harness/progress.py) on a fake terminal reporter: lines, the
training bar (redrawn on a terminal, a line per quarter in a log) and the plan's line; -q silences
all but the plan's final line."""

import contextlib
import types

import pytest

from stance_harness.progress import ProgressWriter


class Reporter:
    def __init__(self, isatty: bool):
        self.isatty, self.out = isatty, []

    def write_line(self, text):
        self.out.append(("line", text))

    def rewrite(self, text, erase=False):
        self.out.append(("rewrite", text))

    def write(self, text):
        self.out.append(("write", text))


class Capture:
    def __init__(self):
        self.disabled = 0

    @contextlib.contextmanager
    def global_and_fixture_disabled(self):
        self.disabled += 1
        yield


def writer(isatty=False, verbosity=0, capture=True):
    reporter, manager = Reporter(isatty), Capture()
    plugins = {"terminalreporter": reporter, "capturemanager": manager if capture else None}
    config = types.SimpleNamespace(get_verbosity=lambda: verbosity,
                                   pluginmanager=types.SimpleNamespace(get_plugin=plugins.get))
    return ProgressWriter(config), reporter, manager


def test_a_line_goes_past_capture():
    progress, reporter, capture = writer()
    progress("loaded model tiny-qwen2 in 0.1s")
    assert reporter.out == [("line", "[stance-harness] loaded model tiny-qwen2 in 0.1s")] and capture.disabled == 1


def test_in_a_log_the_bar_prints_each_quarter():
    progress, reporter, _ = writer(isatty=False)
    for step in range(1, 9):
        progress.step("lora", step, 8, 1.0 / step)
    assert [text for _, text in reporter.out] == [
        "[stance-harness]   lora [######..................] 2/8 loss 0.5000",
        "[stance-harness]   lora [############............] 4/8 loss 0.2500",
        "[stance-harness]   lora [##################......] 6/8 loss 0.1667",
        "[stance-harness]   lora [########################] 8/8 loss 0.1250"]


def test_on_a_terminal_the_bar_redraws_and_ends_its_line():
    progress, reporter, _ = writer(isatty=True)
    progress.step("full", 1, 2, 2.0)
    progress.step("full", 2, 2, 1.0)
    assert [kind for kind, _ in reporter.out] == ["rewrite", "rewrite", "write"] and reporter.out[-1][1] == "\n"


def test_quiet_silences_all_but_the_plans_final_line():
    progress, reporter, _ = writer(verbosity=-1)
    progress("training lora")
    progress.step("lora", 4, 4, 0.1)
    progress.plan("plan: 1 of 2 trained", "event")
    progress.plan("plan: 2 of 2 trained", "final")
    assert reporter.out == [("line", "plan: 2 of 2 trained")]


@pytest.mark.parametrize("when, shown", [("step", False), ("event", True), ("final", True)])
def test_in_a_log_the_plan_prints_events_and_the_end(when, shown):
    progress, reporter, _ = writer()
    progress.plan("plan: 1 of 2 trained", when)
    assert reporter.out == ([("line", "plan: 1 of 2 trained")] if shown else [])


def test_without_a_capture_manager_or_a_reporter():
    progress, reporter, _ = writer(capture=False)
    progress("x")
    assert reporter.out == [("line", "[stance-harness] x")]
    config = types.SimpleNamespace(get_verbosity=lambda: 0, pluginmanager=types.SimpleNamespace(get_plugin=lambda n: None))
    ProgressWriter(config)("nowhere to write: nothing happens")
