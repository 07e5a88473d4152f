"""pytest plugin: options, fixtures and hooks, wired to the HarnessSession. Nothing else.

Options are parsed once, in `pytest_configure`, into HarnessOptions; the session does the
work (training, records, reports, the gate) and this module only hands pytest's events to it.
The session module imports torch, so it is imported inside the hooks, never at plugin load, and
not at all under `pytest --help`.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

GROUP = "stance-harness"
OPT_MODEL = "--model"
OPT_MODEL_ARGS = "--model-args"
OPT_STANCE_DIR = "--stance-dir"
OPT_REPORTS_DIR = "--reports-dir"
OPT_NO_REPORTS = "--no-reports"
OPT_ANALYSIS_TIMEOUT = "--analysis-timeout"
OPT_REPEAT = "--repeat"
OPT_SEEDS = "--seeds"
SEEDS_MARK = "seeds"
OPT_ADAPTER = "--adapter"
OPT_STANCE = "--stance"
OPT_SAVE_BASELINE = "--save-baseline"
OPT_COMPARE_BASELINE = "--compare-baseline"
OPT_FAIL_ON = "--fail-on"
OPT_RUN_CACHE = "--run-cache"
OPT_RUN_MEMORY = "--run-memory"
OPT_RETRAIN = "--retrain"
OPT_INCONCLUSIVE = "--inconclusive"
OPT_RECORD_VERDICTS = "--record-verdicts"
OPT_PLAN = "--plan"
OPT_VERDICT_JSON = "--verdict-json"
OPT_CHAT_TEMPLATE = "--chat-template"
CHAT_TEMPLATE_CHOICES = ("auto", "none")  # batches.CHAT_TEMPLATE_CHOICES; not imported here: it imports torch
OPT_LAUNCHER = "--launcher"
OPT_NUM_PROCESSES = "--num-processes"
OPT_JUDGE_MODEL = "--judge-model"
OPT_TRAIN_WORKERS = "--train-workers"
OPT_EXECUTOR = "--executor"
OPT_RAY_ADDRESS = "--ray-address"
INCONCLUSIVE_CHOICES = ("fail", "skip", "pass")
VERDICT_KEY = pytest.StashKey[str]()
HARNESS_FIXTURES = {"train", "adapter_run", "stance_report"}  # a test using one of these is judged as a hypothesis  # what the test's call found: supported, refuted or inconclusive
EXPECTED_MARK = "expected_outcome"

SESSION_KEY = pytest.StashKey["HarnessSession"]()
XDIST_KEY = "stance_harness_records"


def pytest_addoption(parser: pytest.Parser) -> None:
    from stance_harness.models.loading import DEFAULT_MODEL

    group = parser.getgroup(GROUP, "stance-harness: hypotheses about fine-tuning")
    group.addoption(OPT_MODEL, metavar="NAME", default=DEFAULT_MODEL,
                    help=f"model alias, hub id (from the local HF cache), local directory or GGUF file (converted "
                         f"once). Default: {DEFAULT_MODEL}")
    group.addoption(OPT_MODEL_ARGS, metavar="K=V,...", default="",
                    help="dtype=float32|bfloat16|float16|auto, revision=REV, device=auto|cpu|cuda[:N] (auto: the first "
                         "CUDA device, else cpu), device_map=auto (shard the base over the GPUs), trust_remote_code=false, "
                         "gguf_file=NAME (a GGUF file in the --model directory)")
    group.addoption(OPT_CHAT_TEMPLATE, choices=CHAT_TEMPLATE_CHOICES, default="auto",
                    help="auto (default): where the tokenizer has a chat template, training, probes, generation and "
                         "calibration use it, and the loss counts only the assistant's tokens; none: plain "
                         "prompt, newline, reply, end of text")
    group.addoption(OPT_STANCE_DIR, metavar="DIR", action="append", default=[],
                    help="extra directory of stance YAML files (repeatable); ./stances is always searched")
    group.addoption(OPT_REPORTS_DIR, metavar="DIR", default="reports",
                    help="where reports/<report-id>/ is written, relative to the rootdir. Default: reports")
    group.addoption(OPT_NO_REPORTS, action="store_true", default=False, help="write no report files")
    group.addoption(OPT_ANALYSIS_TIMEOUT, metavar="SECONDS", type=float, default=600.0,
                    help="time limit per post-training analysis stage; an overrun fails naming the stage. 0: no limit. Default: 600")
    group.addoption(OPT_REPEAT, metavar="N", type=int, default=1,
                    help="run each test that trains N times, with seeds seed, seed+1, ...; the report gives mean and spread")
    group.addoption(OPT_SEEDS, metavar="N", type=_positive_int, default=None,
                    help="train(...) without seeds= trains N runs with seeds seed, seed+1, ... and returns them as "
                         "one RunSet: comparative claims are then about the methods. Overrides a test's "
                         f"{SEEDS_MARK}(N) mark. Default: the mark's N, else one run")
    group.addoption(OPT_ADAPTER, metavar="[NAME=]PATH", action="append", default=[],
                    help="gate a saved peft adapter (any tuner) or a fully fine-tuned checkpoint (safetensors) on "
                         "--model's base without training (repeatable); NAME (default: the directory's name) names "
                         "its metrics. Tests that train are skipped, tests using `adapter_run` measure each one")
    group.addoption(OPT_STANCE, metavar="NAME", default=None,
                    help=f"the stance each {OPT_ADAPTER} is measured on. Default: the one its stance_harness.json "
                         f"names (save_adapter writes it); an adapter without either is refused")
    group.addoption(OPT_SAVE_BASELINE, metavar="NAME", default=None,
                    help="store this session's metrics as baseline NAME (reports/baselines/NAME.json)")
    group.addoption(OPT_COMPARE_BASELINE, metavar="NAME", default=None,
                    help="compare this session's metrics with baseline NAME; regressions past --fail-on fail the session")
    group.addoption(OPT_FAIL_ON, metavar="RULE", nargs="+", action="extend", default=[],
                    help="regression rules METRIC:[+|-]TOL[%%][@ci], e.g. 'ece:+0.01' 'behavior_shift:-10%%'; with "
                         "@ci only a change whose 95%% interval lies wholly past the tolerance fails")
    group.addoption(OPT_RUN_CACHE, metavar="DIR|URL", default=None,
                    help="the run store: finished runs, loaded instead of trained again; a directory or a URL "
                         "(file://, s3://BUCKET/PATH, gs://BUCKET/PATH) that sessions share. Default: "
                         "$STANCE_HARNESS_RUN_CACHE, else runs/ in the harness cache (~/.cache/stance-harness)")
    group.addoption(OPT_RUN_MEMORY, metavar="SIZE", default=None,
                    help="memory for adapted models (e.g. 8GiB); past it the least recently used is released and "
                         "rebuilt when needed. Default: half of the memory free at start (GPU memory on CUDA)")
    group.addoption(OPT_RETRAIN, action="store_true", default=False,
                    help="train every run, even one the run store holds (and store it anew)")
    group.addoption(OPT_INCONCLUSIVE, choices=INCONCLUSIVE_CHOICES, default="fail",
                    help="what an inconclusive claim (its interval straddles the margin) makes of its test, where no "
                         "verdict is recorded: fail (default), skip or pass")
    group.addoption(OPT_PLAN, action="store_true", default=False,
                    help="check every run the tests ask for (task, method, layers, schedule lengths) without "
                         "building a model or training; each test that trains is skipped once its first run is checked. "
                         "Prints how many runs the store holds and an estimate of the time to train the rest")
    group.addoption(OPT_VERDICT_JSON, metavar="PATH", default=None,
                    help="at the end, write the session's verdict (passed, test counts, the gate's comparison) as "
                         "one line of JSON to PATH, or with '-' print it as the last line of the stance-harness summary")
    group.addoption(OPT_LAUNCHER, choices=("accelerate",), default=None,
                    help="train each run data-parallel through accelerate (DDP) in --num-processes processes; "
                         "the workers store the run, the test loads it")
    group.addoption(OPT_NUM_PROCESSES, metavar="N", type=int, default=1,
                    help=f"processes per run under {OPT_LAUNCHER}; each trains per_device_train_batch_size "
                         f"examples per micro-batch. Default: 1")
    group.addoption(OPT_TRAIN_WORKERS, metavar="N", type=int, default=None,
                    help="after collection, every run the tests ask for is planned and the ones the run store lacks "
                         "are trained first, in N worker processes. Default: $STANCE_HARNESS_TRAIN_WORKERS, else one "
                         "per GPU, or one per core on the CPU; 1: in this process; 0: no training ahead (each run "
                         "trains when a test asks for it)")
    group.addoption(OPT_EXECUTOR, metavar="NAME", default="local",
                    help="what trains the planned runs: local (worker processes on this machine) or ray (a task "
                         "per run on a Ray cluster; needs the ray extra). Default: local")
    group.addoption(OPT_RAY_ADDRESS, metavar="ADDRESS", default=None,
                    help=f"the Ray cluster of {OPT_EXECUTOR} ray (e.g. ray://head:10001 or auto). Default: "
                         f"$RAY_ADDRESS, else a local Ray started for the session with this machine's cores")
    group.addoption(OPT_JUDGE_MODEL, metavar="NAME", default=None,
                    help="the model of the model judge (run.judged('model')) where a test names none: an alias, "
                         "a directory or a hub id in the local cache. Default: smollm2-135m")
    group.addoption(OPT_RECORD_VERDICTS, action="store_true", default=False,
                    help="write what each hypothesis found on --model into verdicts/<model>.json beside its test "
                         "file; later sessions on that model compare with it, and a changed verdict fails")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args) -> None:
    """Under pytest-xdist, give this worker its own GPU before any conftest can import torch."""
    _assign_worker_gpu()


def _assign_worker_gpu() -> None:
    from stance_harness.core.devices import assign_worker_gpu
    from stance_harness.core.errors import HarnessError

    try:
        assign_worker_gpu()
    except HarnessError as exc:
        raise pytest.UsageError(f"stance-harness: {exc}") from None


def pytest_configure(config: pytest.Config) -> None:
    _assign_worker_gpu()  # again, for a plugin loaded after the initial conftests (-p); it keeps the device
    config.addinivalue_line("markers", f"{EXPECTED_MARK}(outcome, reason, on='embedded'): the hypothesis is expected "
                            "to be 'refuted' (or 'supported') on the embedded tiny models ('embedded') or on any model ('any')")
    config.addinivalue_line("markers", "slow: heavier sweeps, deselected unless -m selects them")
    config.addinivalue_line("markers", "quick: one cheap hypothesis per suite file; `-m quick --seeds 1` is a first look")
    config.addinivalue_line("markers", f"{SEEDS_MARK}(n): train(...) without seeds= returns a RunSet of n training "
                            f"seeds (the suite's unit of replication for claims about methods); {OPT_SEEDS} overrides")
    if config.option.help or config.option.version:
        return
    from stance_harness.core.errors import HarnessError
    from stance_harness.session import HarnessSession

    if config.getoption(OPT_JUDGE_MODEL, None) is not None:
        from stance_harness.judges import set_default_judge_model

        set_default_judge_model(config.getoption(OPT_JUDGE_MODEL))

    try:
        options = _options(config)
        session = HarnessSession(options, progress=ProgressWriter(config))
        if "://" in str(options.run_cache or ""):  # a URL is opened now, so a bad one is named at start-up
            session.store  # noqa: B018 - a cached property: opening it checks the URL
    except HarnessError as exc:
        raise pytest.UsageError(f"stance-harness: {exc}") from None
    config.stash[SESSION_KEY] = session


def _options(config: pytest.Config):
    """Every option parsed and checked once; what can be checked before any model loads is."""
    from stance_harness.models.loading import ModelArgs, check_model_available
    from stance_harness.core.errors import HarnessError
    from stance_harness.report import gate, store
    from stance_harness.core.files import check_writable_directory
    from stance_harness.core.metrics import is_declared
    from stance_harness.runs.residency import parse_bytes
    from stance_harness.session import HarnessOptions
    from stance_harness.stances import load_stance

    if config.getoption(OPT_ANALYSIS_TIMEOUT) < 0:
        raise HarnessError(f"{OPT_ANALYSIS_TIMEOUT} must be >= 0 (0 turns the limit off)")
    if config.getoption(OPT_REPEAT) < 1:
        raise HarnessError(f"{OPT_REPEAT} must be >= 1")
    if config.getoption(OPT_NUM_PROCESSES) < 1:
        raise HarnessError(f"{OPT_NUM_PROCESSES} must be >= 1")
    train_workers = _train_workers(config)
    from stance_harness.runs import executors_ray  # noqa: F401 - registers "ray" (Ray itself is imported only when it trains)
    from stance_harness.runs.planning import EXECUTORS

    entry = EXECUTORS.get(config.getoption(OPT_EXECUTOR))  # an unknown name is refused now, listing the known
    if hasattr(entry, "check"):
        entry.check()  # e.g. Ray not installed: said before collection
    if config.getoption(OPT_RAY_ADDRESS) and config.getoption(OPT_EXECUTOR) != "ray":
        raise HarnessError(f"{OPT_RAY_ADDRESS} is for {OPT_EXECUTOR} ray, not {config.getoption(OPT_EXECUTOR)}")
    if config.getoption(OPT_NUM_PROCESSES) > 1 and config.getoption(OPT_LAUNCHER) is None:
        raise HarnessError(f"{OPT_NUM_PROCESSES} {config.getoption(OPT_NUM_PROCESSES)} needs {OPT_LAUNCHER} accelerate")
    model_args = ModelArgs.parse(config.getoption(OPT_MODEL_ARGS))
    # Unknown names and missing weights stop the run now, not once per test.
    check_model_available(config.getoption(OPT_MODEL), model_args)
    reports_dir = Path(config.rootpath) / config.getoption(OPT_REPORTS_DIR)
    if config.getoption(OPT_ADAPTER):  # (adapters import torch: only when there is one to read)
        from stance_harness.runs.adapters import parse_adapter_spec, read_adapter

        names = {}
        for adapter in config.getoption(OPT_ADAPTER):
            spec = parse_adapter_spec(adapter)
            if spec.name in names:
                raise HarnessError(f"{OPT_ADAPTER} {names[spec.name]} and {adapter} would both name their metrics "
                                   f"{spec.name!r}; give each its own with NAME=PATH")
            names[spec.name] = adapter
        for adapter in names.values():  # a bad path or no stance stops the session before the model loads
            read_adapter(adapter).stance_name(config.getoption(OPT_STANCE))
    for directory in config.getoption(OPT_STANCE_DIR):
        if not Path(directory).is_dir():
            raise HarnessError(f"{OPT_STANCE_DIR} {directory}: no such directory")
    if config.getoption(OPT_STANCE) is not None:
        load_stance(config.getoption(OPT_STANCE), config.getoption(OPT_STANCE_DIR))
    if not config.getoption(OPT_NO_REPORTS):
        check_writable_directory(reports_dir, OPT_REPORTS_DIR)
    verdict_json = config.getoption(OPT_VERDICT_JSON)
    if verdict_json not in (None, "-"):
        if Path(verdict_json).is_dir():
            raise HarnessError(f"{OPT_VERDICT_JSON} {verdict_json}: it is a directory; name the file to write")
        check_writable_directory(Path(verdict_json).parent, OPT_VERDICT_JSON)
    compare_to, save = config.getoption(OPT_COMPARE_BASELINE), config.getoption(OPT_SAVE_BASELINE)
    rules = config.getoption(OPT_FAIL_ON)
    if rules:  # the helpers declare their metrics, so rules on them are checked now (it imports torch: only then)
        from stance_harness import checks  # noqa: F401
    if rules and not compare_to:
        raise HarnessError(f"{OPT_FAIL_ON} needs {OPT_COMPARE_BASELINE} NAME to compare against")
    for rule in rules:
        # a rule on a declared metric is checked whole now; one naming a suite's own metric, once
        # collection has imported the suite that declares it
        match = gate.check_rule_syntax(rule)
        if is_declared(match["name"]):
            gate.parse_rule(rule)
    if compare_to:
        store.load_baseline(reports_dir, compare_to)
    if save:
        store.check_baseline_name(save)
    return HarnessOptions(
        model=config.getoption(OPT_MODEL), model_args=model_args,
        stance_dirs=config.getoption(OPT_STANCE_DIR),
        reports_dir=None if config.getoption(OPT_NO_REPORTS) else reports_dir,
        rootdir=Path(config.rootpath), args=list(config.invocation_params.args),
        analysis_timeout=config.getoption(OPT_ANALYSIS_TIMEOUT),
        repeat=config.getoption(OPT_REPEAT), seeds=config.getoption(OPT_SEEDS), adapters=config.getoption(OPT_ADAPTER),
        stance=config.getoption(OPT_STANCE),
        save_baseline=save, compare_baseline=compare_to, fail_on_specs=list(rules), baselines_dir=reports_dir,
        run_cache=config.getoption(OPT_RUN_CACHE) or None,  # a path or a URL: the run store reads it
        run_memory=parse_bytes(config.getoption(OPT_RUN_MEMORY)) if config.getoption(OPT_RUN_MEMORY) else None,
        retrain=config.getoption(OPT_RETRAIN), inconclusive=config.getoption(OPT_INCONCLUSIVE),
        record_verdicts=config.getoption(OPT_RECORD_VERDICTS), plan_only=config.getoption(OPT_PLAN),
        verdict_json=config.getoption(OPT_VERDICT_JSON),
        chat_template=config.getoption(OPT_CHAT_TEMPLATE),
        launcher=config.getoption(OPT_LAUNCHER), num_processes=config.getoption(OPT_NUM_PROCESSES),
        train_workers=train_workers, executor=config.getoption(OPT_EXECUTOR),
        ray_address=config.getoption(OPT_RAY_ADDRESS),
    )


def _train_workers(config: pytest.Config) -> int | None:
    """--train-workers, else $STANCE_HARNESS_TRAIN_WORKERS; None: as many as the machine allows."""
    import os

    from stance_harness.core.errors import HarnessError

    value, where = config.getoption(OPT_TRAIN_WORKERS), OPT_TRAIN_WORKERS
    if value is None and os.environ.get("STANCE_HARNESS_TRAIN_WORKERS", "").strip():
        value, where = os.environ["STANCE_HARNESS_TRAIN_WORKERS"].strip(), "$STANCE_HARNESS_TRAIN_WORKERS"
        try:
            value = int(value)
        except ValueError:
            raise HarnessError(f"{where}={value!r} is not a whole number (0: no training ahead)") from None
    if value is not None and value < 0:
        raise HarnessError(f"{where} must be >= 0 (0: no training ahead), got {value}")
    return value


def pytest_collection_finish(session: pytest.Session) -> None:
    """The suites' modules are imported now, so every metric they declare is known: parse the rules."""
    harness = session.config.stash.get(SESSION_KEY, None)
    if harness is None:
        return
    from stance_harness.core.errors import HarnessError

    if session.items:  # the helpers' metrics are declared before any test records one (not at start-up: torch)
        from stance_harness import checks  # noqa: F401
    try:
        harness.parse_rules()
    except HarnessError as exc:
        raise pytest.UsageError(f"stance-harness: {exc}") from None


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session: pytest.Session):
    """Before the tests run: plan their runs and train the missing ones (stance_harness/runs/planning.py)."""
    harness = session.config.stash.get(SESSION_KEY, None)
    if harness is not None and _trains_ahead(session, harness):
        import os

        from _pytest.runner import runtestprotocol

        from stance_harness.runs.planning import stderr_draw, train_ahead

        worker = os.environ.get("PYTEST_XDIST_WORKER")
        draw = harness.progress.plan if worker is None else stderr_draw if worker == "gw0" else (lambda *_: None)
        try:
            train_ahead(harness, session.items, lambda item, following: runtestprotocol(item, log=False,
                                                                                        nextitem=following),
                        draw, harness.options.train_workers, harness.options.executor)
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
        self._emit(lambda reporter: reporter.write_line(f"[stance-harness] {message}"))

    def step(self, label: str, step: int, total: int, loss: float) -> None:
        filled = self.BAR * step // max(1, total)
        text = f"[stance-harness]   {label} [{'#' * filled}{'.' * (self.BAR - filled)}] {step}/{total} loss {loss:.4f}"

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
def stance_repeat(request) -> int:
    """Which repetition this is under `--repeat N` (0 without it); offsets the training seed."""
    return getattr(request, "param", 0)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


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
    default_seeds = harness_session.options.seeds or (_mark_seeds(mark) if mark else None)
    if harness_session.options.adapters:
        pytest.skip(f"{OPT_ADAPTER} given: gating saved adapters, so tests that train are skipped")
    handed = []

    def _one(method, offset, kwargs):
        stance_report.seeds = stance_report.seeds or 1
        if harness_session.options.plan_only or harness_session.planning:  # checked now; the test skips when it first reads the run
            return PlannedRun(_or_usage_error(harness_session.check_request, method, repeat=offset, **kwargs))
        run = _or_usage_error(harness_session.train, method, repeat=offset, **kwargs)
        handed.append(stance_report.use_run(run))
        return run

    def _train(method: str = "full", seeds: int | None = None, **kwargs):
        __tracebackhide__ = True
        from stance_harness.runs.run import RunSet

        if seeds is None and default_seeds is None:
            return _one(method, stance_repeat, kwargs)
        count = default_seeds if seeds is None else seeds
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            pytest.fail(f"stance-harness: train(seeds=...) must be an integer >= 1, got {seeds!r}", pytrace=False)
        # under --repeat R each repetition gets its own block of seeds
        stance_report.seeds = max(stance_report.seeds or 0, count)
        return RunSet(_one(method, stance_repeat * count + i, kwargs) for i in range(count))

    yield _train
    for run in handed:
        stance_report.release_run(run)


def _mark_seeds(mark) -> int:
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
        pytest.skip(f"{OPT_PLAN}: {self.run_id} checked, not trained")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    repeat = metafunc.config.getoption(OPT_REPEAT)
    if repeat > 1 and "stance_repeat" in metafunc.fixturenames:
        metafunc.parametrize("stance_repeat", range(repeat), indirect=True, ids=[f"repeat{i}" for i in range(repeat)])
    if "adapter_run" in metafunc.fixturenames:
        from stance_harness.runs.adapters import parse_adapter_spec

        adapters = metafunc.config.getoption(OPT_ADAPTER)
        metafunc.parametrize("adapter_run", adapters or [None], indirect=True,
                             ids=[parse_adapter_spec(a).name for a in adapters] if adapters else ["no-adapter"])


@pytest.fixture
def adapter_run(request, harness_session, stance_report):
    """The `--adapter [NAME=]PATH` being gated, as a Run named NAME on the `--model` base (one test per adapter)."""
    if request.param is None:
        pytest.skip(f"no {OPT_ADAPTER} given: this test gates saved adapters")
    run = _or_usage_error(harness_session.adapter_run, request.param)
    yield stance_report.use_run(run)
    stance_report.release_run(run)


def _or_usage_error(fn, *args, **kwargs):
    """Bad input becomes a short, clear failure instead of a deep traceback; a hypothesis that
    does not apply to this model (a causal-LM task on an encoder) is skipped, saying why."""
    __tracebackhide__ = True
    from stance_harness.core.errors import HarnessError
    from stance_harness.runs.tasks import NotApplicable

    try:
        return fn(*args, **kwargs)
    except NotApplicable as exc:
        pytest.skip(f"does not apply to this model: {exc}")
    except HarnessError as exc:
        pytest.fail(f"stance-harness: {exc}", pytrace=False)


# -- recording outcomes ------------------------------------------------------------------
@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """What the test's claims found (supported, refuted or inconclusive), held against the verdict
    recorded for this model, or, with none, against --inconclusive."""
    from stance_harness.report.records import repeat_base

    session = item.config.stash[SESSION_KEY]
    if session.planning:  # the run before the run (planning.py): nothing is judged or recorded
        return (yield)
    try:
        try:
            result = yield
            error = None
        except BaseException as exc:  # noqa: BLE001 - judged below, re-raised or replaced
            result, error = None, exc
        if not HARNESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            if error is not None:  # a test that does not use the harness is not judged
                raise error
            return result
        verdict = _verdict_of(item, error)
        if verdict is None:  # not a claim's outcome: an error stays an error
            _fail_cleanly(item, error)
            raise _not_a_refutation(error) if isinstance(error, AssertionError) else error
        if item.nodeid in session.records or "train" in getattr(item, "fixturenames", ()):
            item.stash[VERDICT_KEY] = verdict
        # --record-verdicts records what the test finds now, so the old record does not judge it
        judged_by_record = not (item.get_closest_marker(EXPECTED_MARK) or session.options.record_verdicts)
        recorded = session.verdicts.recorded(item.path, repeat_base(item.nodeid)) if judged_by_record else None
        if recorded is not None:
            _hold_against_record(item, session, recorded, verdict)
            return None
        if verdict == "inconclusive":
            if session.options.inconclusive == "skip":
                pytest.skip(f"inconclusive: {error.result.summary}")
            if session.options.inconclusive == "pass":
                return None
        if error is not None:
            raise error
        return result
    finally:
        record = session.records.get(item.nodeid)
        for name, value in (record.metrics.items() if record else ()):
            item.user_properties.append((name, value))  # JUnit XML <property>, as record_property does


def _verdict_of(item: pytest.Item, error: BaseException | None) -> str | None:
    """supported: the test passed; refuted: a helper's HypothesisFailed, or an AssertionError of the
    test's own code; inconclusive: a helper's HypothesisInconclusive; None: anything else."""
    from stance_harness.checks.common import HypothesisFailed, HypothesisInconclusive

    if error is None:
        return "supported"
    if isinstance(error, HypothesisInconclusive):
        return "inconclusive"
    if isinstance(error, HypothesisFailed):
        return "refuted"
    if isinstance(error, AssertionError):
        frames = list(_frames(error.__traceback__))
        raised_in = Path(frames[-1].tb_frame.f_code.co_filename).resolve() if frames else None
        ours = raised_in is not None and (raised_in == Path(item.path).resolve()  # the test's own assert
                                          or "_pytest" in raised_in.parts)  # pytest.raises, approx: its own checks
        return "refuted" if ours else None
    return None


def _fail_cleanly(item: pytest.Item, error: BaseException) -> None:
    """A harness error (bad input, an analysis stage over --analysis-timeout) fails its test with
    one `stance-harness:` line naming the test's line, not a traceback through harness frames."""
    from stance_harness.core.errors import HarnessError

    if not isinstance(error, HarnessError):
        return
    test = getattr(getattr(item, "obj", None), "__code__", None)  # the line in the test itself
    lines = [tb.tb_lineno for tb in _frames(error.__traceback__) if tb.tb_frame.f_code is test]
    where = f" ({Path(item.path).name}:{lines[-1]})" if lines else ""
    pytest.fail(f"stance-harness: {error}{where}", pytrace=False)


def _frames(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def _not_a_refutation(error: AssertionError) -> BaseException:
    frames = list(_frames(error.__traceback__))
    where = frames[-1].tb_frame.f_code.co_filename if frames else "?"
    replaced = RuntimeError(f"an AssertionError raised inside {where}, not by the test or a harness helper, "
                            f"is an error, not a refutation of the hypothesis: {error}")
    replaced.__cause__ = error
    return replaced


def _hold_against_record(item: pytest.Item, session, recorded: dict, verdict: str) -> None:
    from stance_harness.report.records import repeat_base
    from stance_harness.report.verdicts import changed_message, interval_of

    model = session.options.model
    if verdict == "supported" and recorded["verdict"] == "inconclusive":
        # supported alone; whether it stays supported is known only when its family (the test
        # file) is Holm-corrected at the end of the session, which then judges it against the record
        session.record(item.nodeid).held_for_family = True
        pytest.xfail(f"recorded inconclusive on {model}; supported alone, so the Holm correction over its test "
                     f"file decides at the end of the session")
    if verdict != recorded["verdict"]:
        record = session.records.get(item.nodeid)
        interval = interval_of(record.checks if record else [])
        raise VerdictChanged(changed_message(repeat_base(item.nodeid), recorded, verdict, interval, model))
    if verdict != "supported":
        pytest.xfail(f"recorded {verdict} on {model}: {recorded.get('reason') or '-'}")


class VerdictChanged(Exception):
    """What a hypothesis found differs from what was recorded for this model."""


def pytest_runtest_setup(item: pytest.Item) -> None:
    """An expected refutation runs as a non-strict xfail that only a failed check satisfies
    (an AssertionError, as HypothesisFailed is); any other exception is still an error."""
    mark = item.get_closest_marker(EXPECTED_MARK)
    if mark is None or item.config.stash[SESSION_KEY].planning:
        return
    session = item.config.stash[SESSION_KEY]
    expected = _expectation(mark, session)
    session.record(item.nodeid).expected = expected
    if expected["applies"] and expected["outcome"] == "refuted":
        item.add_marker(pytest.mark.xfail(reason=f"expected refuted: {expected['reason']}",
                                          raises=AssertionError, strict=False))


def _expectation(mark, session) -> dict:
    outcome = mark.args[0] if mark.args else mark.kwargs.get("outcome")
    reason, on = mark.kwargs.get("reason", ""), mark.kwargs.get("on", "embedded")
    if outcome not in ("refuted", "supported") or on not in ("embedded", "any") or not reason:
        raise pytest.UsageError(f"@pytest.mark.{EXPECTED_MARK}('refuted'|'supported', reason='...', "
                                f"on='embedded'|'any'); got args={mark.args} kwargs={mark.kwargs}")
    applies = on == "any" or session.model_is_embedded()
    return {"outcome": outcome, "reason": reason, "on": on, "applies": applies}


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
        record.conclude(outcome, report.duration, item.stash.get(VERDICT_KEY, None),
                        _short_message(call, report) if report.failed or report.skipped else None)
        if record.doc is None:
            record.doc = _docstring(item)
    return report


def _docstring(item: pytest.Item) -> str | None:
    """The test function's docstring, indentation removed: the report's hypothesis in words."""
    doc = getattr(getattr(item, "function", None), "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


def _short_message(call, report) -> str:
    if call.excinfo is not None:
        from stance_harness.checks.common import HypothesisFailed, HypothesisInconclusive

        if isinstance(call.excinfo.value, (HypothesisFailed, HypothesisInconclusive)):
            return call.excinfo.value.result.summary
        return call.excinfo.exconly().strip()
    return str(report.longrepr)


# -- the end: workers hand their records over, the controller reports and gates ----------
def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    harness = session.config.stash.get(SESSION_KEY, None)
    if harness is None:
        return
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker
        import json

        workeroutput[XDIST_KEY] = json.dumps(harness.worker_output(), default=str)
        return
    interrupted = exitstatus == pytest.ExitCode.INTERRUPTED
    gate_passed = harness.finish(interrupted=interrupted, exit_code=int(exitstatus))
    if (not gate_passed or harness.corrected_failures) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    harness.write_ci_outputs(int(session.exitstatus))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    import json

    data = getattr(node, "workeroutput", {}).get(XDIST_KEY)
    if data:
        node.config.stash[SESSION_KEY].merge_worker(json.loads(data))


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    harness = config.stash.get(SESSION_KEY, None)
    if harness is not None and harness.corrected_failures:
        # tests that passed alone and failed their family's Holm correction count as failed in
        # pytest's own summary line too (it is printed after this hook)
        stats = terminalreporter.stats
        for key in ("passed", "xfailed"):
            for report in list(stats.get(key, [])):
                if report.nodeid in harness.corrected_failures and report.when == "call":
                    stats[key].remove(report)
                    report.outcome = "failed"
                    report.longrepr = harness.records[report.nodeid].message
                    if hasattr(report, "wasxfail"):
                        del report.wasxfail
                    stats.setdefault("failed", []).append(report)
    if harness is not None:
        harness.display(terminalreporter.write_line,
                        lambda title, sep="=": terminalreporter.section(title, sep=sep))
