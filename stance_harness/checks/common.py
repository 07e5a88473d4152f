"""What every check shares: the exceptions a refuted or undecided claim raises, the run-taking
decorator that checks a helper's arguments before anything is measured, assert_X made from
check_X, recording a result into the report of each test holding the run, assert_all, the
names of the arms a check compares, and the declarations of the metrics the helpers publish.

`check_X(run, ...)` evaluates the claim and returns a CheckResult, whether it holds or not.
`assert_X(run, ...)` is the same check that raises HypothesisFailed (an AssertionError
carrying the result) when the claim does not hold. Either way the result is recorded in the
report section of every test that holds the run: the `train` fixture hands a run to a test
together with that test's record (`run.sinks`), so nothing is recorded through a hidden
channel, and a check outside a test records nothing and still returns its result.
Helper frames are hidden from tracebacks.
"""

from __future__ import annotations

import functools
import inspect

from stance_harness.core.metrics import HIGHER, LOWER, declare_metrics
from stance_harness.core.registry import HarnessError, suggest
from stance_harness.core.results import CheckResult
from stance_harness.analysis import replication
from stance_harness.judges import JUDGES
from stance_harness.measurements import paired_metrics
from stance_harness.report.sections import differing_options, short_value
from stance_harness.runs.request import TrainingRequest
from stance_harness.runs.run import Run
from stance_harness.runs.runset import runset


# The metrics the helpers publish beyond those of the measurements (each measurement declares its
# own with its spec, stance_harness.measurements).
declare_metrics([
    ("max_grad_norm", LOWER, "largest gradient norm during training"),
    ("grad_spike", LOWER, "largest grad norm over the median of the steps before it"),
    ("nonfinite_events", LOWER, "non-finite losses, gradients or weights during training"),
    ("concentration_share", HIGHER, "share of the weight change inside the targeted layers"),
    ("profile_rho", HIGHER, "Spearman rank correlation of two runs' per-layer change profiles"),
])


class HypothesisFailed(AssertionError):
    """The data refuted the claim."""

    def __init__(self, result: CheckResult):
        self.result = result
        super().__init__(result.render())


class HypothesisInconclusive(Exception):
    """The data neither support nor refute the claim (its interval straddles the margin); what
    pytest makes of it is --inconclusive's choice. Not an AssertionError: it is no refutation."""

    def __init__(self, result: CheckResult):
        self.result = result
        super().__init__(result.render())


def conclude(runs, result: CheckResult, published: dict | None = None) -> CheckResult:
    """Record `result` in the report of each test holding one of `runs`, and return it: a check_X
    ends with `return conclude([run], CheckResult(...), published)`.

    `published` maps metric names to values (a number, or a core.metrics.Estimate with its
    interval), named by run label as `f"{run.label}.my_metric"`: the test's metrics, which
    baselines and --fail-on gate, each declared with its direction by the measurement's spec.
    A run made outside a test records nothing; the result is returned all the same."""
    sinks = []
    for sink in (sink for run in runs for sink in getattr(run, "sinks", ())):
        if sink not in sinks:  # bound methods of one record compare equal, though not identical
            sinks.append(sink)
    for sink in sinks:
        sink(result, published)
    return result


# -- the arguments, checked before anything is measured ------------------------------------------
def _what(value) -> str:
    if callable(value) and getattr(value, "__name__", "") == "_train":  # the plugin's `train` fixture
        return "the `train` fixture itself (a function); call it: run = train('lora', ...)"
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} (type {type(value).__name__})"


def _is_run(value) -> bool:
    # under --plan, `train` returns a PlannedRun: its request is checked, and reading the run skips the
    # test; a stand-in (tests) has what every helper uses of a run, its label and its sinks
    return (isinstance(value, Run) or isinstance(getattr(value, "request", None), TrainingRequest)
            or (hasattr(value, "label") and hasattr(value, "sinks")))


def _same(a, b) -> bool:
    key = getattr(a, "run_id", None)
    return a is b or (key is not None and key == getattr(b, "run_id", None))


def _check_run_arguments(helper: str, arguments: dict, runs: tuple, lists: bool) -> None:
    """Each of `runs` a Run (or with `lists`, a list of Runs, one per seed), no run held against
    itself, and no run twice on one side."""
    sides = {}
    for name in runs:
        value = arguments[name]
        many = lists and isinstance(value, (list, tuple))
        for i, run in enumerate(value if many else [value]):
            if not _is_run(run):
                where = f"{name}[{i}]" if many else name
                wanted = "a Run (what train(...) returns)" + (
                    ", or a RunSet (train(..., seeds=N)) or list of Runs, one per seed" if lists else "")
                raise HarnessError(f"{helper}: `{where}` must be {wanted}, got {_what(run)}")
        sides[name] = side = list(value) if many else [value]
        twice = next((x for i, x in enumerate(side) if any(_same(x, y) for y in side[i + 1:])), None)
        if twice is not None:
            raise HarnessError(f"{helper}: `{name}` holds run {_name_of(twice)} twice; one per seed, each a "
                               f"different run")
    if len(runs) == 2:
        (first, a), (second, b) = sides.items()
        same = next((x for x, y in zip(a, b) if _same(x, y)), None)
        if same is not None:
            raise HarnessError(f"{helper}: `{first}` and `{second}` are the same run ({_name_of(same)}); a run "
                               f"compared with itself differs by exactly 0, which is no evidence either way. "
                               f"Compare two different runs (another method, recipe or seed)")


def _name_of(run) -> str:
    return getattr(run, "run_id", None) or run.label


def _check_metric(helper: str, metric) -> None:
    """`metric` is one a registered measurement gives per-unit values for, or judge:NAME."""
    if isinstance(metric, str) and metric.startswith("judge:"):  # a registered judge's scores, per probe
        JUDGES.get(metric.partition(":")[2])
        return
    known = paired_metrics(prefixes=False)  # judge:NAME is said below, with the registered judges
    if metric not in known:
        raise HarnessError(f"{helper}: no metric {metric!r} to compare.{suggest(str(metric), list(known))} "
                           f"Paired comparisons take {', '.join(known)}, and judge:NAME for a judge "
                           f"({', '.join(f'judge:{n}' for n in JUDGES.names())})")


def takes_runs(*runs: str, lists: bool = False, paired: bool = False, pooled: bool = False):
    """Decorate a check_X: its arguments are checked before anything is measured, so a wrong one
    fails with a message naming the helper as called (check_X or assert_X), the argument and what
    it got (`train` itself instead of a run, a run compared with itself, an unknown metric).

    `runs` name its Run parameters: `@takes_runs("run")` for a check of one run, `@takes_runs("a",
    "b")` for a comparison (with `lists`, a list of runs per seed is allowed too). A single-run
    check given a RunSet checks each seed, and holds when every seed holds, unless `pooled` (it
    then takes the seeds as one arm itself). With `paired`, its `metric` argument must be a paired
    metric (stance_harness.measurements.paired_metrics(), read at the call: a measurement added
    later counts). Pair it with `asserting` for the assert_X form."""
    def decorate(check):
        signature = inspect.signature(check)
        per_seed = runs == ("run",) and not pooled  # a single-run check takes a RunSet too, and checks each seed
        lists_ok = lists or runs == ("run",)

        def validate(helper: str, args, kwargs) -> None:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                return  # the call itself raises the TypeError, saying which argument
            bound.apply_defaults()
            if paired:
                _check_metric(helper, bound.arguments["metric"])
            _check_run_arguments(helper, bound.arguments, runs, lists_ok)

        body = _each_seed(check) if per_seed else check

        @functools.wraps(check)
        def checked(*args, **kwargs):
            __tracebackhide__ = True
            validate(check.__name__, args, kwargs)
            return body(*args, **kwargs)

        checked.validate, checked.unchecked = validate, body
        return checked
    return decorate


def _each_seed(check):
    """A single-run check that takes a RunSet (or list of runs) too: it checks each run, and the
    claim holds when it holds for every seed; the result names the seeds where it does not."""
    @functools.wraps(check)
    def per_seed(run, *args, **kwargs):
        if not isinstance(run, (list, tuple)):
            return check(run, *args, **kwargs)
        if not run:
            raise HarnessError(f"{check.__name__}: the RunSet holds no run")
        results = [check(r, *args, **kwargs) for r in run]  # each is recorded in the test's report
        seeds = _seeds(run)
        verdicts = [x.verdict for x in results]
        verdict = next((v for v in ("refuted", "inconclusive") if v in verdicts), "supported")
        failing = [f"seed {s}: {x.summary}" for s, x in zip(seeds, results) if not x.passed]
        summary = (f"{check.__name__.replace('check_', 'assert_', 1)} holds for all {len(run)} seeds" if not failing
                   else f"fails for {len(failing)} of {len(run)} seeds: " + "; ".join(failing))
        return CheckResult(results[0].check, all(x.passed for x in results), summary, ["seed", "verdict", "summary"],
                           [[s, x.verdict, x.summary] for s, x in zip(seeds, results)],
                           {"seeds": len(run), "failing_seeds": [s for s, x in zip(seeds, results) if not x.passed]},
                           verdict=verdict)
    return per_seed


def asserting(check):
    """assert_X from a check_X decorated with `takes_runs`: the same arguments, checked the same
    way, and the same CheckResult returned when the claim holds; HypothesisFailed (an
    AssertionError carrying the result) when it is refuted, HypothesisInconclusive when the data
    cannot tell. A check module ends with `assert_X = asserting(check_X)`."""
    name = check.__name__.replace("check_", "assert_", 1)

    @functools.wraps(check)
    def assertion(*args, **kwargs):
        __tracebackhide__ = True
        check.validate(name, args, kwargs)
        result = check.unchecked(*args, **kwargs)
        if result.verdict == "inconclusive":
            raise HypothesisInconclusive(result)
        if not result.passed:
            raise HypothesisFailed(result)
        return result

    assertion.__name__ = assertion.__qualname__ = name
    return assertion


def _seeds(runs) -> list:
    return runset(runs).seeds


# -- the arms a check compares: runs paired by unit id, seeds as the unit of replication -------------
def _runs(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _options(run) -> dict:
    """A run's options as its report summary holds them (what report/sections.py compares)."""
    def as_dict(value):
        return value.as_dict() if hasattr(value, "as_dict") else {}
    return {"method": run.label, "config": as_dict(getattr(run, "config", None)),
            "recipe": as_dict(getattr(run, "recipe", None)),
            "stance": {"name": getattr(getattr(run, "stance", None), "name", None)},
            "examples": getattr(run, "examples", None), "task": getattr(getattr(run, "task", None), "name", None)}


def _arm_name(runs: list) -> str:
    """One arm's name on its own: its runs' label, `x5` for five seeds."""
    labels = list(dict.fromkeys(r.label for r in runs))
    return labels[0] if len(labels) == 1 and len(runs) == 1 else f"{'/'.join(labels)} x{len(runs)}"


def _names(runs_a: list, runs_b: list) -> tuple[str, str]:
    """Each arm's name: its runs' label, with the options that tell it from the other arm when
    both share one (`hybrid[freeze_lora_steps=4] vs hybrid[freeze_lora_steps=0]`, not `hybrid vs
    hybrid`); `x3` for three seeds. Two arms alike in every option are named by run id."""
    differing = differing_options({"a": _options(runs_a[0]), "b": _options(runs_b[0])})
    names = []
    for side, runs in (("a", runs_a), ("b", runs_b)):
        labels = list(dict.fromkeys(r.label for r in runs))
        name = "/".join(labels)
        if runs_a[0].label == runs_b[0].label:
            parts = [f"{k}={short_value(v)}" for k, v in differing[side][:3]] or [str(getattr(runs[0], "run_id", side))]
            name += "[" + ", ".join(parts) + "]"
        names.append(name if len(runs) == 1 else f"{name} x{len(runs)}")
    return names[0], names[1]


def _arm(runs: list, metric: str, name: str) -> tuple[str, tuple, list]:
    """(unit, unit ids, one row of per-unit values per seed): the seeds' units paired by id."""
    unit, first, rows = None, None, []
    for run in runs:
        unit, values = run.unit_values(metric)
        ids = tuple(run.unit_ids(metric))
        if first is None:
            first = ids
        else:  # the same units in another order are reordered; other units are refused
            where = replication.match_ids(first, ids, f"{name} (first seed)", f"{name} ({run.label}, a later seed)", unit)
            values = [values[j] for j in where]
        rows.append(list(values))
    return unit, first, rows


def assert_all(results) -> list[CheckResult]:
    """Several checks as one claim (a list of check_ results, so every one is recorded): raise for
    the first refuted one, else for the first inconclusive one; return them all when all hold."""
    __tracebackhide__ = True
    results = list(results)
    if not results:
        raise ValueError("assert_all needs at least one CheckResult")
    for i, result in enumerate(results):
        if not isinstance(result, CheckResult):
            hint = "; use check_X (which returns one), not assert_X" if result is None else ""
            raise HarnessError(f"assert_all: `results[{i}]` must be a CheckResult (what a check_X helper returns), "
                               f"got {_what(result)}{hint}")
    for verdict, error in (("refuted", HypothesisFailed), ("inconclusive", HypothesisInconclusive)):
        for result in results:
            if result.verdict == verdict:
                raise error(result)
    return list(results)
