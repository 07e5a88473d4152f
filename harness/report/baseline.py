"""Saved baselines and the regression gate: which way is better for each metric, how much
worse is allowed, and a table that says what moved.

Habits taken from pytest-benchmark (`--benchmark-save`, `--benchmark-compare`,
`--benchmark-compare-fail=mean:5%`), with three changes:
- every metric has a direction (ECE is better lower, behaviour shift is better higher), so a
  rule knows which change is a regression, and a sign that contradicts it is an error;
- a relative tolerance on a zero baseline allows no worsening at all, instead of failing
  every comparison (pytest-benchmark treats the change as infinite);
- each row says what the value may not cross ("≤ 0.0612"), not only that it failed.

Rule grammar (one `--fail-on` argument):

    RULE      := METRIC ":" [SIGN] NUMBER ["%"]
    METRIC    := NAME ("." NAME)*        e.g. ece, lora.ece, full.behavior_shift
    SIGN      := "+" | "-"               the change that counts as a regression
    NUMBER    := 0.01 | 5 | 1e-3 ...     the tolerance: absolute, or with "%" a share of |baseline|

The direction comes from the metric's last dotted component. Without a sign the rule takes
the registered bad side. A bare METRIC (`ece`) covers that metric in every namespace
(`ece`, `lora.ece`, `full.ece`); a namespaced one (`lora.ece`) covers only itself, and wins
over a bare rule for the same metric.

Nothing here imports pytest.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..registry import HarnessError, Registry, UnknownNameError, suggest
from .records import json_safe
from .writer import atomic_write

LOWER, HIGHER = "lower", "higher"

BASELINE_FORMAT = 1
BASELINE_DIR = "baselines"
_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


# -- metric directions ----------------------------------------------------------------------
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


def register_metric(name: str, direction: str, description: str) -> MetricInfo:
    """Register a metric's direction (a bare name: no dots; namespaces share it)."""
    if "." in name:
        raise ValueError(f"register the bare metric name, not {name!r}: namespaces share its direction")
    return METRICS.register(name, MetricInfo(direction, description))


for _name, _direction, _description in [
    # calibration and accuracy
    ("ece", LOWER, "expected calibration error"),
    ("mce", LOWER, "maximum calibration error"),
    ("brier", LOWER, "Brier score"),
    ("acc1", HIGHER, "top-1 accuracy"),
    # did the stance take? an adapter that shifts less than before has regressed
    ("behavior_shift", HIGHER, "how far behaviour moved toward the stance"),
    ("loglik_margin", HIGHER, "log-likelihood margin of stance answers over plain ones"),
    ("kl", HIGHER, "KL divergence of the tuned model's predictions from the base model's on probes"),
    ("marker_rate", HIGHER, "share of generations that carry the stance's markers"),
    # what it cost elsewhere
    ("forgetting", LOWER, "loss increase on held-out general text"),
    ("perplexity_increase", LOWER, "perplexity increase on held-out general text"),
    ("embedding_drift", LOWER, "drift of sentence embeddings of held-out text"),
    # training health
    ("max_grad_norm", LOWER, "largest gradient norm during training"),
    ("grad_spike", LOWER, "largest step-to-step gradient-norm jump"),
    ("nonfinite_events", LOWER, "non-finite losses or gradients during training"),
    # where the change went
    ("effective_rank", LOWER, "effective rank of the weight change (lower: more concentrated)"),
    ("concentration_share", HIGHER, "share of the weight change inside the targeted layers"),
    # cost
    ("trainable_params", LOWER, "trainable parameter count"),
    ("params_per_example", LOWER, "trainable parameters per training example"),
    ("stance_bytes", LOWER, "bytes needed to store the stance"),
    ("step_time", LOWER, "seconds per optimizer step"),
    ("peak_memory", LOWER, "peak memory in bytes"),
]:
    register_metric(_name, _direction, _description)


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


# -- rules ----------------------------------------------------------------------------------
RULE_FORMAT = ("METRIC:[+|-]TOLERANCE[%], e.g. ece:+0.01 (absolute), behavior_shift:-10% (relative to the "
               "baseline) or acc1:0.02 (no sign: the metric's bad side)")
_RULE_RE = re.compile(r"^(?P<name>[^:\s]+):(?P<sign>[+-])?(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
                      r"(?P<percent>%)?$")
_METRIC_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$")


@dataclass(frozen=True)
class Rule:
    """How much worse `metric` may get: `tolerance` (absolute, or a fraction of |baseline|)."""

    metric: str
    tolerance: float
    relative: bool
    direction: str
    spec: str

    def matches(self, name: str) -> bool:
        return name == self.metric or name.endswith("." + self.metric)

    @property
    def specificity(self) -> int:
        return self.metric.count(".") + 1

    def slack(self, baseline: float) -> float:
        """How far `now` may move in the bad direction from `baseline`."""
        return self.tolerance * abs(baseline) if self.relative else self.tolerance

    def limit(self, baseline: float) -> float:
        """The value `now` must not cross."""
        slack = self.slack(baseline)
        return baseline + slack if self.direction == LOWER else baseline - slack

    def describe(self) -> str:
        amount = f"{self.tolerance * 100:g}% of the baseline" if self.relative else f"{self.tolerance:g}"
        change = "an increase" if self.direction == LOWER else "a decrease"
        return f"{self.metric}: fail on {change} of more than {amount}"

    def __str__(self) -> str:
        return self.spec


def parse_rule(spec: str) -> Rule:
    """`ece:+0.01`, `behavior_shift:-10%`, `acc1:0.02`, `lora.ece:0.005`; see the module doc."""
    text = str(spec).strip()
    match = _RULE_RE.match(text)
    if not match or not _METRIC_NAME_RE.match(match["name"]):
        raise HarnessError(f"bad rule {spec!r}: expected {RULE_FORMAT}")
    name, sign, number = match["name"], match["sign"], match["number"]
    try:
        info = metric_info(name)
    except UnknownNameError as err:
        raise HarnessError(f"rule {spec!r}: {err}") from None
    if sign is not None and sign != info.bad_sign:
        fixed = f"{name}:{info.bad_sign}{number}{match['percent'] or ''}"
        raise HarnessError(f"rule {spec!r}: {base_name(name)} is better when {info.direction}; "
                           f"a regression is {info.bad_change}: write {fixed}")
    tolerance = float(number) / (100.0 if match["percent"] else 1.0)
    if not math.isfinite(tolerance):
        raise HarnessError(f"bad rule {spec!r}: the tolerance must be a finite number")
    return Rule(metric=name, tolerance=tolerance, relative=bool(match["percent"]), direction=info.direction,
                spec=text)


def parse_rules(specs) -> list[Rule]:
    return [spec if isinstance(spec, Rule) else parse_rule(spec) for spec in specs or ()]


def rule_for(rules: list[Rule], name: str) -> Rule | None:
    """The most specific rule that covers metric `name` (`lora.ece` beats `ece`); the last one given on a tie."""
    best = None
    for rule in rules:
        if rule.matches(name) and (best is None or rule.specificity >= best.specificity):
            best = rule
    return best


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


def _is_number(value) -> bool:
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


def _metrics_of(entry) -> dict:
    """One test's metrics: its recorded values, with repeated tests' means (as Spread) on top."""
    if not isinstance(entry, dict):
        return {}
    metrics = dict(entry.get("metrics") or {}) if isinstance(entry.get("metrics"), dict) else {}
    repeats = entry.get("repeats")
    if isinstance(repeats, dict) and isinstance(repeats.get("metrics"), dict):
        for name, stats in repeats["metrics"].items():
            spread = _spread_from(stats)
            if spread is not None:
                metrics[name] = spread
    return metrics


def _tests_of(payload: dict) -> dict:
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
    return {nodeid: _metrics_of(entry) for nodeid, entry in _tests_of(payload).items()}


# -- baselines ------------------------------------------------------------------------------
def check_baseline_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise HarnessError(f"bad baseline name {name!r}: use letters, digits, '.', '_' and '-' "
                           "(not starting with '.'), e.g. main or lora-r8")
    return name


def baselines_dir(reports_dir) -> Path:
    return Path(reports_dir) / BASELINE_DIR


def baseline_path(reports_dir, name: str) -> Path:
    return baselines_dir(reports_dir) / f"{check_baseline_name(name)}.json"


def _numbers_only(metrics: dict) -> dict:
    return {str(k): json_safe(float(v)) if isinstance(v, Spread) else json_safe(v)
            for k, v in metrics.items() if _is_number(v)}


def baseline_from_payload(name: str, payload: dict) -> dict:
    """The baseline document for a report (or another baseline) payload."""
    if not isinstance(payload, dict):
        raise HarnessError("a baseline is saved from a report payload (a dict with run_id and tests)")
    tests = {}
    for nodeid, entry in _tests_of(payload).items():
        metrics = _metrics_of(entry)
        saved: dict = {"metrics": _numbers_only(metrics)}
        if isinstance(entry, dict) and entry.get("outcome") is not None:
            saved["outcome"] = entry["outcome"]
        repeats = entry.get("repeats") if isinstance(entry, dict) else None
        if isinstance(repeats, dict):
            stats = {}
            for metric, values in (repeats.get("metrics") or {}).items():
                if isinstance(values, dict) and _is_number(values.get("mean")):
                    stats[str(metric)] = {k: json_safe(v) for k, v in values.items() if _is_number(v)}
            saved["repeats"] = {"n": repeats.get("n"), "metrics": stats}
        tests[nodeid] = saved
    return {
        "format": BASELINE_FORMAT,
        "name": name,
        "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_id": payload.get("run_id"),
        "provenance": json_safe(payload.get("provenance") or {}),
        "tests": tests,
    }


def save_baseline(reports_dir, name: str, payload: dict) -> Path:
    """Write `reports_dir/baselines/<name>.json` from a report payload; an existing one is replaced."""
    path = baseline_path(reports_dir, name)
    document = baseline_from_payload(name, payload)
    atomic_write(path, json.dumps(document, indent=2, default=str) + "\n")
    return path


def list_baselines(reports_dir) -> list[str]:
    folder = baselines_dir(reports_dir)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if p.is_file() and _NAME_RE.fullmatch(p.stem))


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise HarnessError(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    except OSError as err:
        raise HarnessError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise HarnessError(f"{what} {path} holds a JSON {type(data).__name__}, not an object")
    return data


def load_baseline(reports_dir, name: str) -> dict:
    path = baseline_path(reports_dir, name)
    if not path.is_file():
        known = list_baselines(reports_dir)
        listing = f"existing baselines: {', '.join(known)}" if known else "there are no baselines yet"
        raise HarnessError(f"no baseline {name!r} in {baselines_dir(reports_dir)}.{suggest(name, known)} "
                           f"{listing} (save one with `stance-harness save NAME RUN`)")
    data = _read_json(path, "baseline")
    if not isinstance(data.get("tests"), dict):
        raise HarnessError(f"baseline {path} has no 'tests' mapping")
    return data


# -- sources: a baseline name, a run id, `latest`, or a path ---------------------------------
def list_runs(reports_dir) -> list[str]:
    """Run ids with a report.json, newest first (run ids start with their UTC time)."""
    root = Path(reports_dir)
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.name != BASELINE_DIR and (p / "report.json").is_file()),
                  reverse=True)


def latest_run(reports_dir) -> str:
    pointer = Path(reports_dir) / "latest"
    try:
        run_id = pointer.read_text(encoding="utf-8").strip()
    except OSError:
        raise HarnessError(f"no {pointer}: no session has written a report there yet") from None
    if not run_id:
        raise HarnessError(f"{pointer} is empty")
    return run_id


@dataclass
class Source:
    """One side of a comparison, loaded."""

    spec: str
    kind: str  # "run" or "baseline"
    path: Path
    data: dict

    @property
    def label(self) -> str:
        if self.kind == "baseline":
            return f"baseline {self.data.get('name', self.spec)} (run {self.data.get('run_id')}, saved {self.data.get('saved')})"
        return f"run {self.data.get('run_id', self.spec)}"

    @property
    def metrics(self) -> dict[str, dict]:
        return metrics_from_payload(self.data)


def _load_file(spec: str, path: Path) -> Source:
    if path.is_dir():
        path = path / "report.json"
    data = _read_json(path, "file")
    tests = data.get("tests")
    if isinstance(tests, dict):
        return Source(spec, "baseline", path, data)
    if isinstance(tests, list):
        return Source(spec, "run", path, data)
    raise HarnessError(f"{path} is neither a report.json nor a baseline: it has no 'tests'")


def load_source(source: str, reports_dir) -> Source:
    """Resolve `latest`, a run id, a baseline name, or a path (in that order)."""
    root = Path(reports_dir)
    spec = str(source)
    if spec == "latest":
        run_id = latest_run(root)
        path = root / run_id / "report.json"
        if not path.is_file():
            raise HarnessError(f"{root / 'latest'} names run {run_id!r}, but {path} does not exist")
        return _load_file(spec, path)
    run_path = root / spec / "report.json"
    is_name = bool(_NAME_RE.fullmatch(spec))
    is_run = is_name and run_path.is_file()
    is_baseline = is_name and (baselines_dir(root) / f"{spec}.json").is_file()
    if is_run and is_baseline:
        raise HarnessError(f"{spec!r} is both a run and a baseline in {root}: pass a path instead "
                           f"({run_path} or {baselines_dir(root) / (spec + '.json')})")
    if is_run:
        return _load_file(spec, run_path)
    if is_baseline:
        return Source(spec, "baseline", baseline_path(root, spec), load_baseline(root, spec))
    path = Path(spec)
    if path.is_file() or (path.is_dir() and (path / "report.json").is_file()):
        return _load_file(spec, path)
    if not root.is_dir():
        raise HarnessError(f"no run, baseline or file {spec!r}: the reports directory {root} does not exist "
                           "(pass --reports-dir)")
    runs, baselines = list_runs(root), list_baselines(root)
    known = ["latest"] + runs + baselines
    shown = ", ".join(runs[:3]) + (f" (+{len(runs) - 3} more)" if len(runs) > 3 else "")
    raise HarnessError(f"no run, baseline or file {spec!r} in {root}.{suggest(spec, known)} "
                       f"Runs: {shown or 'none'}; baselines: {', '.join(baselines) or 'none'}")


def load_metrics(source: str, reports_dir) -> dict[str, dict]:
    """{nodeid: {metric: value}} of a baseline name, a run id, `latest`, or a report/baseline path."""
    return load_source(source, reports_dir).metrics


# -- comparison -----------------------------------------------------------------------------
OK, IMPROVED, REGRESSION = "ok", "improved", "REGRESSION"
MISSING_BASELINE, MISSING_NOW = "missing in baseline", "missing now"
NOT_FINITE, NOT_FINITE_BASELINE = "not finite", "not finite in baseline"
SAME, CHANGED = "same", "changed"
FAILING = {REGRESSION, MISSING_NOW, NOT_FINITE}
_MISSING = object()


@dataclass
class Row:
    test: str
    metric: str
    baseline: object  # the value as loaded (a number, a Spread, "nan", ... or None when missing)
    now: object
    change: str
    allowed: str
    verdict: str
    rule: str | None = None
    delta: float | None = None
    limit: float | None = None

    @property
    def failed(self) -> bool:
        return self.verdict in FAILING

    def as_dict(self) -> dict:
        def raw(value):
            if isinstance(value, Spread):
                return {"mean": float(value), "std": value.std, "min": value.min, "max": value.max, "n": value.n}
            return value

        return json_safe({"test": self.test, "metric": self.metric, "baseline": raw(self.baseline),
                          "now": raw(self.now), "change": self.change, "allowed": self.allowed,
                          "verdict": self.verdict, "failed": self.failed, "rule": self.rule,
                          "delta": self.delta, "limit": self.limit})


@dataclass
class Comparison:
    rows: list[Row] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    only_baseline: list[str] = field(default_factory=list)  # tests missing now: their gated metrics fail
    only_now: list[str] = field(default_factory=list)  # new tests: noted, not compared
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Row]:
        """Rows that fail the gate: REGRESSION, a gated metric missing now, or a non-finite value now."""
        return [row for row in self.rows if row.failed]

    @property
    def passed(self) -> bool:
        # with rules, a gate that compared nothing must not pass: a renamed or deselected test
        # would otherwise slip through
        return not self.regressions and (not self.rules or bool(self.rows))

    def summary(self) -> str:
        if not self.rules:
            changed = sum(1 for r in self.rows if r.verdict == CHANGED)
            return f"no rules: {changed} of {len(self.rows)} shared metrics changed (information only)"
        failed = self.regressions
        if not self.rows:
            return "FAILED: the rules matched no metric of any test, so nothing was compared"
        if not failed:
            return f"passed: {len(self.rows)} comparisons, no regression"
        counts = {verdict: sum(1 for row in failed if row.verdict == verdict)
                  for verdict in (REGRESSION, NOT_FINITE, MISSING_NOW)}
        kinds = ", ".join(f"{n} {verdict}" for verdict, n in counts.items() if n)
        return f"FAILED: {len(failed)} of {len(self.rows)} comparisons ({kinds})"

    def render(self) -> str:
        from tabulate import tabulate

        lines = []
        if self.rows:
            table, last = [], None
            for row in self.rows:
                b, n = _format_pair(row.baseline, row.now)
                table.append([row.test if row.test != last else "", row.metric, b, n, row.change, row.allowed,
                              row.verdict])
                last = row.test
            lines.append(tabulate(table, headers=["test", "metric", "baseline", "now", "change", "allowed",
                                                  "verdict"], tablefmt="simple", disable_numparse=True))
        else:
            lines.append("no metric to compare" + (" under these rules" if self.rules else ""))
        notes = [f"only in baseline (missing now): {t}" for t in self.only_baseline]
        notes += [f"only now (no baseline): {t}" for t in self.only_now]
        notes += self.notes
        if notes:
            lines += ["", "notes:"] + [f"- {note}" for note in notes]
        if self.rules:
            lines += ["", "rules: " + "; ".join(rule.describe() for rule in self.rules)]
        lines += ["", self.summary()]
        for row in self.regressions:
            lines.append(f"  {row.verdict}: {row.metric} in {row.test}"
                         + (f": {row.change}, allowed {row.allowed}" if row.verdict == REGRESSION else ""))
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return json_safe({"passed": self.passed, "summary": self.summary(),
                          "rules": [rule.spec for rule in self.rules], "rows": [row.as_dict() for row in self.rows],
                          "only_baseline": self.only_baseline, "only_now": self.only_now, "notes": self.notes})


def _format_pair(a, b) -> tuple[str, str]:
    """Format two values with enough digits that unequal numbers never print the same."""
    def one(value, digits):
        if value is _MISSING or value is None:
            return "-"
        number = as_number(value)
        if number is None:
            return repr(value) if not isinstance(value, str) else value
        if isinstance(value, int) and not isinstance(value, bool):
            text = str(value)
        else:
            text = _g(number, digits)
        if isinstance(value, Spread) and value.std is not None:
            text += f" ±{_g(value.std, 2)}" + (f" n={value.n}" if value.n else "")
        return text

    x, y = as_number(a), as_number(b)
    digits = _digits(x, y) if x is not None and y is not None else 4
    return one(a, digits), one(b, digits)


def _g(value: float, digits: int = 4) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    if 10 ** digits <= abs(value) < 1e15:  # 180633.6, not 1.806e+05
        return f"{value:.1f}"
    return f"{value:.{digits}g}"


def _change(b: float, n: float, digits: int, direction: str | None = None) -> str:
    delta = n - b
    text = f"{'+' if delta >= 0 else '-'}{_g(abs(delta), digits)}"
    extra = []
    if b != 0:
        extra.append(f"{delta / abs(b) * 100:+.3g}%")
    if direction is not None and delta != 0:
        worse = delta > 0 if direction == LOWER else delta < 0
        extra.append("worse" if worse else "better")
    return text + (f" ({', '.join(extra)})" if extra else "")


def _digits(b: float, n: float) -> int:
    digits = 4
    while digits < 15 and b != n and _g(b, digits) == _g(n, digits):
        digits += 1
    return digits


def _judge(test: str, name: str, baseline, now, rule: Rule) -> Row:
    row = Row(test, name, None if baseline is _MISSING else baseline, None if now is _MISSING else now,
              change="", allowed="-", verdict=OK, rule=rule.spec)
    b, n = as_number(baseline), as_number(now)
    if now is _MISSING:
        row.verdict = MISSING_NOW
        return row
    if baseline is _MISSING:
        row.verdict = MISSING_BASELINE
        return row
    if n is None or not math.isfinite(n):
        row.verdict = NOT_FINITE
        row.change = "now " + (_g(n) if n is not None else f"not a number: {now!r}")
        return row
    if b is None or not math.isfinite(b):
        row.verdict = NOT_FINITE_BASELINE
        row.change = "baseline " + (_g(b) if b is not None else f"not a number: {baseline!r}")
        return row
    digits = _digits(b, n)
    slack = rule.slack(b)
    limit = rule.limit(b)
    row.limit, row.delta = limit, n - b
    row.change = _change(b, n, digits)
    row.allowed = f"{'≤' if rule.direction == LOWER else '≥'} {_g(limit, max(digits, 4))}"
    worse_by = (n - b) if rule.direction == LOWER else (b - n)
    eps = 1e-12 * max(1.0, abs(b), abs(n))  # a value exactly at the limit passes, whatever the rounding
    if worse_by > slack + eps:
        row.verdict = REGRESSION
    elif worse_by < -(slack + eps):
        row.verdict = IMPROVED
    return row


def _info(test: str, name: str, baseline, now) -> Row:
    row = Row(test, name, baseline, now, change="", allowed="-", verdict=SAME)
    b, n = as_number(baseline), as_number(now)
    try:
        direction = direction_of(name)
    except HarnessError:
        direction = None
    if b is None or n is None or not (math.isfinite(b) and math.isfinite(n)):
        if b is None or n is None:
            row.verdict = SAME if baseline == now else CHANGED
        elif b == n or (math.isnan(b) and math.isnan(n)):
            row.verdict = SAME
        else:  # information only: without rules nothing fails
            row.verdict = CHANGED
            row.change = f"{_g(b)} -> {_g(n)}"
        return row
    row.delta = n - b
    if b != n:
        row.verdict = CHANGED
        row.change = _change(b, n, _digits(b, n), direction)
    return row


def compare(baseline_metrics: dict, current_metrics: dict, rules=()) -> Comparison:
    """One row per (test, metric) a rule covers, for tests on both sides; never raises on bad data.

    `rules` are Rule objects or rule strings (strings are parsed, and a bad one raises HarnessError).
    With no rules, every metric both sides have is listed as information and the comparison passes.
    """
    rules = parse_rules(rules)
    result = Comparison(rules=rules)
    base = baseline_metrics if isinstance(baseline_metrics, dict) else {}
    now = current_metrics if isinstance(current_metrics, dict) else {}
    for side, value in (("baseline", baseline_metrics), ("current", current_metrics)):
        if not isinstance(value, dict):
            result.notes.append(f"the {side} metrics are a {type(value).__name__}, not a mapping of tests")
    used: set[str] = set()
    zero_relative: set[str] = set()
    for test in list(now) + [t for t in base if t not in now]:
        if test not in base:
            result.only_now.append(test)
            continue
        if test not in now:
            result.only_baseline.append(test)
            gated = base[test] if isinstance(base[test], dict) and rules else {}
            for name in sorted(gated):  # a gated test that vanished is a failure, metric by metric
                rule = rule_for(rules, name)
                if rule is not None:
                    used.add(rule.spec)
                    result.rows.append(_judge(test, name, gated[name], _MISSING, rule))
            continue
        b = base[test] if isinstance(base[test], dict) else {}
        n = now[test] if isinstance(now[test], dict) else {}
        for side, value in (("baseline", base[test]), ("now", now[test])):
            if not isinstance(value, dict) and value is not None:
                result.notes.append(f"{test}: the {side} metrics are a {type(value).__name__}, not a mapping")
        if not rules:
            for name in sorted(set(b) & set(n)):
                result.rows.append(_info(test, name, b[name], n[name]))
            continue
        for name in sorted(set(b) | set(n)):
            rule = rule_for(rules, name)
            if rule is None:
                continue
            used.add(rule.spec)
            row = _judge(test, name, b.get(name, _MISSING), n.get(name, _MISSING), rule)
            result.rows.append(row)
            if rule.relative and row.delta is not None and as_number(row.baseline) == 0:
                zero_relative.add(name)
    for name in sorted(zero_relative):
        result.notes.append(f"{name}: the baseline is 0, so its relative tolerance allows no worsening at all; "
                            f"use an absolute rule ({base_name(name)}:{metric_info(name).bad_sign}0.01) "
                            "for metrics that can be 0")
    for rule in rules:
        if rule.spec not in used:
            result.notes.append(f"rule {rule.spec} matched no metric of a test on both sides")
    return result
