"""pytest plugin: hooks and fixtures, wired to the modules that do the work. Nothing else.

options.py declares the options (pytest_addoption and the start-up checks come from it);
session.py provides the models, stances and runs; outcome.py turns the tests' records into the
reports, the gate and the terminal table; judging.py says what a test's outcome means;
progress.py draws on the terminal. Nothing imported at plugin load imports torch.
"""

from __future__ import annotations

import inspect
import json
import os

import pytest
from _pytest.runner import runtestprotocol

from stance_harness import judging
from stance_harness.core.devices import assign_worker_gpu
from stance_harness.core.errors import HarnessError
from stance_harness.fixture import SEEDS_MARK, mark_seeds, or_usage_error, train_function
from stance_harness.judges import set_default_judge_model
from stance_harness.options import HarnessOptions, add_options, declare_check_metrics
from stance_harness.progress import ProgressWriter
from stance_harness.runs.adapter_spec import parse_adapter_spec
from stance_harness.runs.planning import close_remote, stderr_draw, train_ahead
from stance_harness.session import HarnessSession

SESSION_KEY = pytest.StashKey["HarnessSession"]()
XDIST_KEY = "stance_harness_records"


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args) -> None:
    """Under pytest-xdist, give this worker its own GPU before any conftest can import torch."""
    _assign_worker_gpu()


def _assign_worker_gpu() -> None:
    try:
        assign_worker_gpu()
    except HarnessError as exc:
        raise pytest.UsageError(f"stance-harness: {exc}") from None


def pytest_configure(config: pytest.Config) -> None:
    _assign_worker_gpu()  # again, for a plugin loaded after the initial conftests (-p); it keeps the device
    config.addinivalue_line("markers", judging.EXPECTED_MARK_DOC)
    config.addinivalue_line("markers", "slow: heavier sweeps, deselected unless -m selects them")
    config.addinivalue_line("markers", "quick: one cheap hypothesis per suite file; `-m quick --seeds 1` is a first look")
    config.addinivalue_line("markers", f"{SEEDS_MARK}(n): train(...) without seeds= returns a RunSet of n training "
                            "seeds (the suite's unit of replication for claims about methods); --seeds overrides")
    if config.option.help or config.option.version:
        return
    try:
        options = HarnessOptions.from_config(config)
        if options.judge_model is not None:
            set_default_judge_model(options.judge_model)
        session = HarnessSession(options, progress=ProgressWriter(config))
        if "://" in str(options.run_cache or ""):  # a URL is opened now, so a bad one is named at start-up
            session.store  # noqa: B018 - a cached property: opening it checks the URL
    except HarnessError as exc:
        raise pytest.UsageError(f"stance-harness: {exc}") from None
    config.stash[SESSION_KEY] = session


def pytest_collection_finish(session: pytest.Session) -> None:
    """The suites' modules are imported now, so every metric they declare is known: parse the rules."""
    harness = session.config.stash.get(SESSION_KEY, None)
    if harness is None:
        return
    if session.items:  # the helpers' metrics are declared before any test records one (not at start-up: torch)
        declare_check_metrics()
    try:
        harness.parse_rules()
    except HarnessError as exc:
        raise pytest.UsageError(f"stance-harness: {exc}") from None


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session: pytest.Session):
    """Before the tests run: plan their runs and train the missing ones (stance_harness/runs/planning.py)."""
    harness = session.config.stash.get(SESSION_KEY, None)
    if harness is not None and _trains_ahead(session, harness):
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        draw = harness.progress.plan if worker is None else stderr_draw if worker == "gw0" else (lambda *_: None)
        try:
            train_ahead(harness, session.items, lambda item, following: runtestprotocol(item, log=False,
                                                                                        nextitem=following),
                        draw, harness.options.train_workers)
        except Exception as exc:  # noqa: BLE001 - the tests still run, training what they ask for
            draw(f"[stance-harness] plan: training ahead stopped ({type(exc).__name__}: {exc}); the runs not "
                 f"stored train when a test asks for them", "final")
    return (yield)


def _trains_ahead(session: pytest.Session, harness) -> bool:
    option = session.config.option
    if session.testsfailed and not option.continue_on_collection_errors:
        return False  # pytest stops for the collection errors before any test runs
    return bool(session.items) and harness.options.train_workers != 0 and not (
        harness.options.plan_only or harness.options.adapters or option.collectonly
        or getattr(option, "setuponly", False) or getattr(option, "setupplan", False) or getattr(option, "usepdb", False))


def pytest_report_header(config: pytest.Config) -> str | None:
    session = config.stash.get(SESSION_KEY, None)
    if session is None:
        return None
    return f"stance-harness: model={session.options.model} reports={session.options.reports_dir or 'off'}"


# -- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def harness_session(pytestconfig):
    """The run-wide HarnessSession (models, runs, records)."""
    return pytestconfig.stash[SESSION_KEY]


@pytest.fixture(scope="session")
def base_model(harness_session):
    """The `--model` base model, loaded once: `.base`, `.tokenizer`, `.anatomy`."""
    return or_usage_error(harness_session.model)


@pytest.fixture(scope="session")
def anatomy(base_model):
    """Blocks and module kinds of the `--model` base; `anatomy.analog([13, 15], depth=24)`."""
    return base_model.anatomy


@pytest.fixture
def stance_report(harness_session, request):
    """This test's section of the report: `.table(title, rows)`, `.metric(name, v)`, `.note(text)`."""
    return harness_session.record(request.node.nodeid)


@pytest.fixture
def stance_repeat(request) -> int:
    """Which repetition this is under `--repeat N` (0 without it); offsets the training seed."""
    return getattr(request, "param", 0)


@pytest.fixture
def train(request, harness_session, stance_report, stance_repeat):
    """`train(method, stance=..., examples=..., recipe={...}, task=..., seeds=None, **method_options)`.

    Returns a Run; with `seeds=N` a RunSet of N runs that differ only in the training seed (the
    recipe's seed, seed+1, ...). Without seeds=, `--seeds N`, else the test's `seeds(N)` mark,
    sets N (a RunSet even for N = 1, so a suite's code sees one shape). Identical requests within
    a session train once and share the Run. Checks on a run this test was handed are recorded in
    this test's report section.
    """
    mark = request.node.get_closest_marker(SEEDS_MARK)
    default_seeds = harness_session.options.seeds or (mark_seeds(mark) if mark else None)
    if harness_session.options.adapters:
        pytest.skip("--adapter given: gating saved adapters, so tests that train are skipped")
    handed = []
    yield train_function(harness_session, stance_report, stance_repeat, default_seeds, handed)
    for run in handed:
        stance_report.release_run(run)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    repeat = metafunc.config.getoption("--repeat")
    if repeat > 1 and "stance_repeat" in metafunc.fixturenames:
        metafunc.parametrize("stance_repeat", range(repeat), indirect=True, ids=[f"repeat{i}" for i in range(repeat)])
    if "adapter_run" in metafunc.fixturenames:
        adapters = metafunc.config.getoption("--adapter")
        metafunc.parametrize("adapter_run", adapters or [None], indirect=True,
                             ids=[parse_adapter_spec(a).name for a in adapters] if adapters else ["no-adapter"])


@pytest.fixture
def adapter_run(request, harness_session, stance_report):
    """The `--adapter [NAME=]PATH` being gated, as a Run named NAME on the `--model` base (one test per adapter)."""
    if request.param is None:
        pytest.skip("no --adapter given: this test gates saved adapters")
    run = or_usage_error(harness_session.adapter_run, request.param)
    yield stance_report.use_run(run)
    stance_report.release_run(run)


# -- judging and recording outcomes (judging.py) --------------------------------------------
@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """What the test's claims found (supported, refuted or inconclusive), held against the verdict
    recorded for this model, or, with none, against --inconclusive."""
    session = item.config.stash[SESSION_KEY]
    if session.planning:  # the run before the run (planning.py): nothing is judged or recorded
        return (yield)
    try:
        try:
            result = yield
            error = None
        except BaseException as exc:  # noqa: BLE001 - judged below, re-raised or replaced
            result, error = None, exc
        return judging.judge_call(item, session, result, error)
    finally:
        record = session.records.get(item.nodeid)
        for name, value in (record.metrics.items() if record else ()):
            item.user_properties.append((name, value))  # JUnit XML <property>, as record_property does


def pytest_runtest_setup(item: pytest.Item) -> None:
    """An expected refutation runs as a non-strict xfail that only a failed check satisfies
    (an AssertionError, as HypothesisFailed is); any other exception is still an error."""
    mark = item.get_closest_marker(judging.EXPECTED_MARK)
    if mark is None or item.config.stash[SESSION_KEY].planning:
        return
    session = item.config.stash[SESSION_KEY]
    expected = judging.expectation(mark.args, mark.kwargs, session.model_is_embedded)
    session.record(item.nodeid).expected = expected
    if expected["applies"] and expected["outcome"] == "refuted":
        item.add_marker(pytest.mark.xfail(reason=f"expected refuted: {expected['reason']}",
                                          raises=AssertionError, strict=False))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    session = item.config.stash[SESSION_KEY]
    if session.planning:
        return report
    record = session.records.get(item.nodeid)
    if record is None and "train" in getattr(item, "fixturenames", ()):
        record = session.record(item.nodeid)  # setup failed before the test could use the harness
    if record is None:
        return report
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        else:
            outcome = "error" if report.when == "setup" and report.failed else report.outcome
        record.conclude(outcome, report.duration, item.stash.get(judging.VERDICT_KEY, None),
                        judging.short_message(call, report) if report.failed or report.skipped else None)
        if record.doc is None:
            record.doc = _docstring(item)
    return report


def _docstring(item: pytest.Item) -> str | None:
    """The test function's docstring, indentation removed: the report's hypothesis in words."""
    doc = getattr(getattr(item, "function", None), "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


# -- the end: workers hand their records over, the controller reports and gates (outcome.py) --
def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    harness = session.config.stash.get(SESSION_KEY, None)
    if harness is None:
        return
    close_remote(harness)  # --executor ray: a local Ray started for on-demand requests stops now
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker
        workeroutput[XDIST_KEY] = json.dumps(harness.worker_output(), default=str)
        return
    interrupted = exitstatus == pytest.ExitCode.INTERRUPTED
    gate_passed = harness.finish(interrupted=interrupted, exit_code=int(exitstatus))
    if (not gate_passed or harness.corrected_failures) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    harness.write_ci_outputs(int(session.exitstatus))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    data = getattr(node, "workeroutput", {}).get(XDIST_KEY)
    if data:
        node.config.stash[SESSION_KEY].merge_worker(json.loads(data))


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    harness = config.stash.get(SESSION_KEY, None)
    if harness is None:
        return
    # printed after this hook, pytest's summary line then counts them as failed too
    harness.count_corrected_as_failed(terminalreporter.stats)
    harness.display(terminalreporter.write_line, lambda title, sep="=": terminalreporter.section(title, sep=sep))
