"""pytest plugin: options, the session in config.stash, fixtures, report hooks. Nothing else.

Heavy libraries (torch, transformers, peft) are imported only inside fixtures and hooks that
need them, so `pytest --help` and runs without harness fixtures stay fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest

GROUP = "stance-harness"
OPT_MODEL = "--model"
OPT_MODEL_ARGS = "--model-args"
OPT_STANCE_DIR = "--stance-dir"
OPT_REPORTS_DIR = "--reports-dir"
OPT_NO_REPORTS = "--no-reports"
OPT_ANALYSIS_TIMEOUT = "--analysis-timeout"

SESSION_KEY = pytest.StashKey["HarnessSession"]()
XDIST_KEY = "stance_harness_records"


def pytest_addoption(parser: pytest.Parser) -> None:
    from .models.loading import DEFAULT_MODEL

    group = parser.getgroup(GROUP, "stance-harness: hypotheses about fine-tuning")
    group.addoption(OPT_MODEL, metavar="NAME", default=DEFAULT_MODEL,
                    help=f"model alias, hub id (from the local HF cache) or local directory. Default: {DEFAULT_MODEL}")
    group.addoption(OPT_MODEL_ARGS, metavar="K=V,...", default="",
                    help="dtype=float32|bfloat16|float16|auto, revision=REV, device=cpu|cuda[:N], trust_remote_code=false")
    group.addoption(OPT_STANCE_DIR, metavar="DIR", action="append", default=[],
                    help="extra directory of stance YAML files (repeatable); ./stances is always searched")
    group.addoption(OPT_REPORTS_DIR, metavar="DIR", default="reports",
                    help="where reports/<run-id>/ is written, relative to the rootdir. Default: reports")
    group.addoption(OPT_NO_REPORTS, action="store_true", default=False, help="write no report files")
    group.addoption(OPT_ANALYSIS_TIMEOUT, metavar="SECONDS", type=float, default=600.0,
                    help="time limit per post-training analysis stage; an overrun fails naming the stage. 0: no limit. Default: 600")


def pytest_configure(config: pytest.Config) -> None:
    from .models.loading import ModelArgs, check_model_available
    from .registry import HarnessError
    from .session import HarnessOptions, HarnessSession

    if config.getoption(OPT_ANALYSIS_TIMEOUT) < 0:
        raise pytest.UsageError(f"stance-harness: {OPT_ANALYSIS_TIMEOUT} must be >= 0 (0 turns the limit off)")
    try:
        model_args = ModelArgs.parse(config.getoption(OPT_MODEL_ARGS))
        # Unknown names and missing weights stop the run now, not once per test.
        check_model_available(config.getoption(OPT_MODEL), model_args)
    except HarnessError as exc:
        raise pytest.UsageError(f"stance-harness: {exc}") from None
    reports = None if config.getoption(OPT_NO_REPORTS) else Path(config.rootpath) / config.getoption(OPT_REPORTS_DIR)
    options = HarnessOptions(
        model=config.getoption(OPT_MODEL), model_args=model_args,
        stance_dirs=config.getoption(OPT_STANCE_DIR), reports_dir=reports,
        rootdir=Path(config.rootpath), args=list(config.invocation_params.args),
        analysis_timeout=config.getoption(OPT_ANALYSIS_TIMEOUT),
    )
    config.stash[SESSION_KEY] = HarnessSession(options, progress=_progress_writer(config))


def _progress_writer(config: pytest.Config):
    """Progress lines on the terminal, through capture, silent under -q."""

    def write(message: str) -> None:
        if config.get_verbosity() < 0:
            return
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capture = config.pluginmanager.get_plugin("capturemanager")
        if reporter is None:
            return
        if capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"[stance-harness] {message}")
        else:
            reporter.write_line(f"[stance-harness] {message}")

    return write


def pytest_report_header(config: pytest.Config) -> str:
    session = config.stash[SESSION_KEY]
    return f"stance-harness: model={session.options.model} reports={session.options.reports_dir or 'off'}"


# -- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def harness_session(pytestconfig):
    """The run-wide HarnessSession (models, runs, records)."""
    return pytestconfig.stash[SESSION_KEY]


@pytest.fixture(scope="session")
def base_model(harness_session):
    """The `--model` base model, loaded once: `.base`, `.tokenizer`, `.anatomy`."""
    return _or_usage_error(harness_session.model)


@pytest.fixture(scope="session")
def anatomy(base_model):
    """Blocks and module kinds of the `--model` base; `anatomy.analog([13, 15], depth=24)`."""
    return base_model.anatomy


@pytest.fixture
def stance_report(harness_session, request):
    """This test's section of the report: `.table(title, rows)`, `.metric(name, v)`, `.note(text)`."""
    return harness_session.record(request.node.nodeid)


@pytest.fixture
def train(harness_session, stance_report):
    """`train(method, stance=..., examples=..., recipe={...}, **method_options) -> Run`.

    Identical requests within a session train once and share the Run.
    """

    def _train(method: str = "full", **kwargs):
        __tracebackhide__ = True
        run = _or_usage_error(harness_session.train, method, **kwargs)
        stance_report.use_run(run)
        return run

    return _train


def _or_usage_error(fn, *args, **kwargs):
    """Bad input becomes a short, clear failure instead of a deep traceback."""
    __tracebackhide__ = True
    from .registry import HarnessError

    try:
        return fn(*args, **kwargs)
    except HarnessError as exc:
        pytest.fail(f"stance-harness: {exc}", pytrace=False)


# -- recording outcomes ------------------------------------------------------------------
@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    from .report.records import reset_current_record, set_current_record

    session = item.config.stash[SESSION_KEY]
    token = set_current_record(lambda: session.record(item.nodeid))
    try:
        return (yield)
    finally:
        reset_current_record(token)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    session = item.config.stash[SESSION_KEY]
    record = session.records.get(item.nodeid)
    if record is None and "train" in getattr(item, "fixturenames", ()):
        record = session.record(item.nodeid)  # setup failed before the test could use the harness
    if record is None:
        return report
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if hasattr(report, "wasxfail"):
            record.outcome = "xfailed" if report.skipped else "xpassed"
        else:
            record.outcome = "error" if report.when == "setup" and report.failed else report.outcome
        record.duration += report.duration
        if report.failed or report.skipped:
            record.message = _short_message(call, report)
    return report


def _short_message(call, report) -> str:
    if call.excinfo is not None:
        from .assertions import HypothesisFailed

        if isinstance(call.excinfo.value, HypothesisFailed):
            return call.excinfo.value.result.summary
        return call.excinfo.exconly().strip()
    return str(report.longrepr)


# -- xdist: workers hand their records to the controller ---------------------------------
def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    harness = session.config.stash[SESSION_KEY]
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker
        import json

        harness.summarise_runs()
        workeroutput[XDIST_KEY] = json.dumps({
            "tests": [r.as_dict() for r in harness.records.values()], "runs": harness.run_summaries,
            "models": [m.provenance() for m in harness._models.values()],
            "stances": [s.provenance() for s in harness._stances.values()],
        }, default=str)
        return
    _write_reports(session.config, harness)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    import json

    from .report.records import TestRecord

    data = getattr(node, "workeroutput", {}).get(XDIST_KEY)
    if not data:
        return
    harness = node.config.stash[SESSION_KEY]
    merged = json.loads(data)
    for test in merged["tests"]:
        harness.records[test["nodeid"]] = TestRecord(**test)
    harness.run_summaries.update(merged["runs"])
    harness.remote_provenance["models"] += merged["models"]
    harness.remote_provenance["stances"] += merged["stances"]


def _write_reports(config: pytest.Config, harness) -> None:
    if not harness.records or harness.options.reports_dir is None:
        return
    from .report.writer import new_run_id, write_reports

    payload = harness.payload(new_run_id())
    config.stash[REPORT_PATH_KEY] = write_reports(harness.options.reports_dir, payload)
    config.stash[PAYLOAD_KEY] = payload


REPORT_PATH_KEY = pytest.StashKey[Path]()
PAYLOAD_KEY = pytest.StashKey[dict]()


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    harness = config.stash[SESSION_KEY]
    if not harness.records:
        return
    from tabulate import tabulate

    from .report.writer import test_rows

    payload = config.stash.get(PAYLOAD_KEY, None) or {"tests": [r.as_dict() for r in harness.records.values()],
                                                      "runs": harness.run_summaries}
    terminalreporter.section("stance-harness", sep="=")
    rows = test_rows(payload)
    terminalreporter.write_line(tabulate([list(r.values()) for r in rows], headers=list(rows[0]), tablefmt="simple"))
    path = config.stash.get(REPORT_PATH_KEY, None)
    if path is not None:
        terminalreporter.write_line(f"report: {path / 'report.md'}  (json: {path / 'report.json'})")
