"""Metrics: which way is better for each one, and reading their values out of reports.

Each metric's direction is declared where the metric is produced (`declare_metric`): the
assertion helpers declare theirs, a suite declares its own at module level. A report records
the direction of every metric it holds, so a comparison outside pytest knows them too.
Values: a test's metrics, with repeated tests' means kept as a `Spread`.
"""

from __future__ import annotations

from dataclasses import dataclass

from stance_harness.core.registry import HarnessError, Registry, UnknownNameError, suggest

LOWER, HIGHER = "lower", "higher"


@dataclass(frozen=True)
class MetricInfo:
    direction: str  # "lower" or "higher": which way is better
    description: str

    def __post_init__(self):
        if self.direction not in (LOWER, HIGHER):
            raise ValueError(f"direction must be {LOWER!r} or {HIGHER!r}, not {self.direction!r}")

    @property
    def bad_change(self) -> str:
        return "an increase" if self.direction == LOWER else "a decrease"

    @property
    def bad_sign(self) -> str:
        return "+" if self.direction == LOWER else "-"


METRICS: Registry[MetricInfo] = Registry("metric")
WALL_CLOCK: set[str] = set()  # metrics timed by the clock: their values depend on the machine and its load


def declare_metric(name: str, direction: str, description: str, wall_clock: bool = False) -> MetricInfo:
    """Declare a metric's direction where it is produced (a bare name: namespaces share it).
    Declaring it again with the same direction is a no-op; with the other direction, an error.
    wall_clock: its values are times the clock measured (a step's seconds), not a function of
    the runs alone."""
    if "." in name:
        raise ValueError(f"declare the bare metric name, not {name!r}: namespaces share its direction")
    if wall_clock:
        WALL_CLOCK.add(name)
    info = MetricInfo(direction, description)
    if name in METRICS:
        known = METRICS.get(name)
        if known.direction != direction:
            raise ValueError(f"metric {name!r} is already declared better when {known.direction}, not {direction}")
        return known
    return METRICS.register(name, info)


def declare_metrics(entries) -> None:
    """`declare_metric` for each (name, direction, description)."""
    for name, direction, description in entries:
        declare_metric(name, direction, description)


def is_declared(name: str) -> bool:
    return base_name(name) in METRICS


def is_wall_clock(name: str) -> bool:
    """Whether the metric's values are clock times (declared wall_clock)."""
    return base_name(name) in WALL_CLOCK


def declared_directions(names) -> dict[str, dict]:
    """{bare name: {direction, description}} for the declared metrics among `names`: what a report records."""
    out = {}
    for name in names:
        if is_declared(name):
            info = METRICS.get(base_name(name))
            out[base_name(name)] = {"direction": info.direction, "description": info.description}
    return out


def declare_from_report(payload: dict) -> None:
    """Declare the metric directions a report or baseline recorded (for comparisons outside pytest)."""
    recorded = payload.get("metric_directions") if isinstance(payload, dict) else None
    for name, info in (recorded or {}).items():
        if isinstance(info, dict) and info.get("direction") in (LOWER, HIGHER) and name not in METRICS:
            declare_metric(str(name), info["direction"], str(info.get("description", "")))


def base_name(name: str) -> str:
    """`lora.ece` -> `ece`: the component that names the metric."""
    return name.rsplit(".", 1)[-1]


def metric_info(name: str) -> MetricInfo:
    base = base_name(name)
    if base in METRICS:
        return METRICS.get(base)
    err = UnknownNameError("metric", base, METRICS.names())
    if base != name:
        message = (f"unknown metric {base!r} (the last part of {name!r} names the metric)."
                   f"{suggest(base, METRICS.names())} Known metrics: {', '.join(sorted(METRICS.names()))}")
        err.args = (message,)
    raise err


def direction_of(name: str) -> str:
    """"lower" or "higher" for a bare or namespaced metric name; unknown names are an error."""
    return metric_info(name).direction


# -- values ---------------------------------------------------------------------------------
class Spread(float):
    """A mean over repeated runs that keeps its spread. It computes and compares as the mean."""

    std: float | None
    min: float | None
    max: float | None
    n: int | None

    def __new__(cls, mean, std=None, min=None, max=None, n=None):  # the stats' own names
        self = super().__new__(cls, mean)
        self.std, self.min, self.max, self.n = std, min, max, n
        return self

    def __repr__(self) -> str:
        return f"Spread({float(self)!r}, std={self.std!r}, n={self.n!r})"

    def __reduce__(self):
        return (Spread, (float(self), self.std, self.min, self.max, self.n))


class Estimate(float):
    """A measured value with its interval (95% unless said otherwise): `low`, `high`. It
    computes and compares as the value; a gate rule with @ci reads the interval."""

    low: float
    high: float

    def __new__(cls, value, low, high):
        self = super().__new__(cls, value)
        self.low, self.high = float(low), float(high)
        return self

    def __repr__(self) -> str:
        return f"Estimate({float(self)!r}, low={self.low!r}, high={self.high!r})"

    def __reduce__(self):
        return (Estimate, (float(self), self.low, self.high))


def interval_of(value) -> tuple[float, float] | None:
    """The value's interval: an Estimate's own; for a Spread of n >= 2 repeated runs, the t
    interval of their mean (95%); otherwise None."""
    if isinstance(value, Estimate):
        return value.low, value.high
    if isinstance(value, Spread) and value.n and value.n >= 2 and value.std is not None:
        from scipy import stats  # why: pytest's start-up imports this module; only a gate needs scipy

        half = float(stats.t.ppf(0.975, value.n - 1)) * value.std / value.n ** 0.5
        return float(value) - half, float(value) + half
    return None


def as_number(value) -> float | None:
    """The float a metric value stands for (JSON's "nan"/"inf" strings included), or None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if not isinstance(value, Spread) else value
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def is_number(value) -> bool:
    return as_number(value) is not None


def _spread_from(stats) -> Spread | None:
    if not isinstance(stats, dict):
        return None
    mean = as_number(stats.get("mean"))
    if mean is None:
        return None
    n = stats.get("n")
    return Spread(mean, as_number(stats.get("std")), as_number(stats.get("min")), as_number(stats.get("max")),
                  n if isinstance(n, int) and not isinstance(n, bool) else None)


def test_metrics(entry) -> dict:
    """One test's metrics: its recorded values (as Estimate where the entry holds their interval,
    `intervals`: {name: [low, high]}), with repeated tests' means (as Spread) on top."""
    if not isinstance(entry, dict):
        return {}
    metrics = dict(entry.get("metrics") or {}) if isinstance(entry.get("metrics"), dict) else {}
    intervals = entry.get("intervals") if isinstance(entry.get("intervals"), dict) else {}
    for name, bounds in intervals.items():
        if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
            continue
        value, low, high = as_number(metrics.get(name)), as_number(bounds[0]), as_number(bounds[1])
        if value is not None and low is not None and high is not None:
            metrics[name] = Estimate(value, low, high)
    repeats = entry.get("repeats")
    if isinstance(repeats, dict) and isinstance(repeats.get("metrics"), dict):
        for name, stats in repeats["metrics"].items():
            spread = _spread_from(stats)
            if spread is not None:
                metrics[name] = spread
    return metrics


def tests_by_id(payload: dict) -> dict:
    """{nodeid: entry} from a report (tests is a list) or a baseline (tests is a dict)."""
    tests = payload.get("tests") if isinstance(payload, dict) else None
    if isinstance(tests, dict):
        return {str(k): v for k, v in tests.items()}
    if isinstance(tests, list):
        # --repeat's repetitions share one entry, under the test's id without the repeat part
        return {str(_repeat_group(t) or t["nodeid"]): t for t in tests if isinstance(t, dict) and "nodeid" in t}
    raise HarnessError("not a stance-harness report or baseline: it has no 'tests' list or mapping")


def _repeat_group(test: dict) -> str | None:
    repeats = test.get("repeats")
    return repeats.get("base_nodeid") if isinstance(repeats, dict) else None


def metrics_from_payload(payload: dict) -> dict[str, dict]:
    """{nodeid: {metric: value}} from a report.json or baseline payload; repeated tests give their means."""
    return {nodeid: test_metrics(entry) for nodeid, entry in tests_by_id(payload).items()}


