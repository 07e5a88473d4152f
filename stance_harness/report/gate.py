"""The regression gate: rules that say how much worse a metric may get, and the comparison of
two sets of metrics under them, with a table that says what moved.

Habits taken from pytest-benchmark (`--benchmark-compare-fail=mean:5%`), with three changes:
- every metric has a direction (ECE is better lower, behaviour shift is better higher), so a
  rule knows which change is a regression, and a sign that contradicts it is an error;
- a relative tolerance on a zero baseline allows no worsening at all, instead of failing
  every comparison (pytest-benchmark treats the change as infinite);
- each row says what the value may not cross ("≤ 0.0612"), not only that it failed.

Rule grammar (one `--fail-on` argument):

    RULE      := METRIC ":" [SIGN] NUMBER ["%"] ["@ci"]
    METRIC    := NAME ("." NAME)*        e.g. ece, lora.ece, full.behavior_shift, judge:embedding
    SIGN      := "+" | "-"               the change that counts as a regression
    NUMBER    := 0.01 | 5 | 1e-3 ...     the tolerance: absolute, or with "%" a share of |baseline|
    "@ci"                                 a regression only when the whole 95% interval of the change
                                          is worse than the tolerance (see below)

Intervals: a metric measured with one (behaviour shifts and forgetting: bootstrap over probes and
windows; ECE: BCa bootstrap over predictions; a --repeat mean: the t interval over its runs) keeps
it (`Estimate`), and the table shows it. The change's interval combines both sides' intervals by
MOVER (Zou & Donner 2008; the two measurements taken as independent): for d = now − baseline,
[d − √((now − now_low)² + (base_high − base)²), d + √((now_high − now)² + (base − base_low)²)].
Under `@ci` a change past the tolerance whose interval still reaches inside it is `within noise`
and passes; where neither side has an interval the rule compares the values, and says so.

The direction comes from the metric's last dotted component. Without a sign the rule takes
the declared bad side. A bare METRIC (`ece`) covers that metric in every namespace
(`ece`, `lora.ece`, `full.ece`); a namespaced one (`lora.ece`) covers only itself, and wins
over a bare rule for the same metric.

Nothing here imports pytest.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from tabulate import tabulate

from stance_harness.core.metrics import (
    LOWER,
    Estimate,
    Spread,
    as_number,
    base_name,
    direction_of,
    interval_of,
    metric_info,
)
from stance_harness.core.registry import HarnessError, UnknownNameError
from stance_harness.core.results import json_safe

RULE_FORMAT = ("METRIC:[+|-]TOLERANCE[%][@ci], e.g. ece:+0.01 (absolute), behavior_shift:-10% (relative to the "
               "baseline), acc1:0.02 (no sign: the metric's bad side) or ece:+0.01@ci (only a change whose 95% "
               "interval lies wholly past the tolerance)")
_RULE_RE = re.compile(r"^(?P<name>\S+):(?P<sign>[+-])?(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
                      r"(?P<percent>%)?(?P<ci>@ci)?$")
# a judge's metric holds a colon (judge:embedding); the rule's own colon is the last one
_METRIC_NAME_RE = re.compile(r"^[A-Za-z0-9_:-]+(?:\.[A-Za-z0-9_:-]+)*$")


@dataclass(frozen=True)
class Rule:
    """How much worse `metric` may get: `tolerance` (absolute, or a fraction of |baseline|)."""

    metric: str
    tolerance: float
    relative: bool
    direction: str
    spec: str
    ci: bool = False  # @ci: the change's whole interval must lie past the tolerance

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
        beyond = ", beyond the 95% interval of the change" if self.ci else ""
        return f"{self.metric}: fail on {change} of more than {amount}{beyond}"

    def __str__(self) -> str:
        return self.spec

    def as_dict(self) -> dict:
        """The rule as written and as parsed, for a report's gate entry."""
        return {"spec": self.spec, "metric": self.metric, "tolerance": self.tolerance, "relative": self.relative,
                "direction": self.direction, "ci": self.ci, "description": self.describe()}


def check_rule_syntax(spec: str):
    """The rule's parts, or an error showing the format; the metric's name is not looked up."""
    match = _RULE_RE.match(str(spec).strip())
    if not match or not _METRIC_NAME_RE.match(match["name"]):
        raise HarnessError(f"bad rule {spec!r}: expected {RULE_FORMAT}")
    return match


def parse_rule(spec: str) -> Rule:
    """`ece:+0.01`, `behavior_shift:-10%`, `acc1:0.02`, `lora.ece:0.005`; see the module doc."""
    text = str(spec).strip()
    match = check_rule_syntax(text)
    name, sign, number = match["name"], match["sign"], match["number"]
    try:
        info = metric_info(name)
    except UnknownNameError as err:
        raise HarnessError(f"rule {spec!r}: {err}") from None
    if sign is not None and sign != info.bad_sign:
        fixed = f"{name}:{info.bad_sign}{number}{match['percent'] or ''}{match['ci'] or ''}"
        raise HarnessError(f"rule {spec!r}: {base_name(name)} is better when {info.direction}; "
                           f"a regression is {info.bad_change}: write {fixed}")
    tolerance = float(number) / (100.0 if match["percent"] else 1.0)
    if not math.isfinite(tolerance):
        raise HarnessError(f"bad rule {spec!r}: the tolerance must be a finite number")
    return Rule(metric=name, tolerance=tolerance, relative=bool(match["percent"]), direction=info.direction,
                spec=text, ci=bool(match["ci"]))


def parse_rules(specs) -> list[Rule]:
    return [spec if isinstance(spec, Rule) else parse_rule(spec) for spec in specs or ()]


def rule_for(rules: list[Rule], name: str) -> Rule | None:
    """The most specific rule that covers metric `name` (`lora.ece` beats `ece`); the last one given on a tie."""
    best = None
    for rule in rules:
        if rule.matches(name) and (best is None or rule.specificity >= best.specificity):
            best = rule
    return best


OK, IMPROVED, REGRESSION, NOISE = "ok", "improved", "REGRESSION", "within noise"
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
    delta_low: float | None = None  # the change's 95% interval (MOVER), where a side has an interval
    delta_high: float | None = None

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
                          "delta": self.delta, "delta_low": self.delta_low, "delta_high": self.delta_high,
                          "limit": self.limit})


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
            noise = sum(1 for row in self.rows if row.verdict == NOISE)
            within = f" ({noise} past the tolerance within noise)" if noise else ""
            return f"passed: {len(self.rows)} comparisons, no regression{within}"
        counts = {verdict: sum(1 for row in failed if row.verdict == verdict)
                  for verdict in (REGRESSION, NOT_FINITE, MISSING_NOW)}
        kinds = ", ".join(f"{n} {verdict}" for verdict, n in counts.items() if n)
        return f"FAILED: {len(failed)} of {len(self.rows)} comparisons ({kinds})"

    def render(self) -> str:
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


def report_entry(comparison: Comparison, baseline: dict) -> dict:
    """The gate as a report holds it (report.json's `gate`), which report.md and index.html open with.

    `baseline` describes the side compared against: at least `name`; a session adds `path`,
    `report_id` and `saved` from the baseline file. Each row also keeps its values as the
    terminal printed them (`baseline_text`, `now_text`), so every view shows the same digits."""
    rows = []
    for row in comparison.rows:
        entry = row.as_dict()
        entry["baseline_text"], entry["now_text"] = _format_pair(row.baseline, row.now)
        rows.append(entry)
    regressions = [row for row in rows if row["failed"]]
    return json_safe({"baseline": dict(baseline), "passed": comparison.passed, "failed": not comparison.passed,
                      "summary": comparison.summary(), "rules": [rule.as_dict() for rule in comparison.rules],
                      "rows": rows, "regressions": len(regressions), "only_baseline": comparison.only_baseline,
                      "only_now": comparison.only_now, "notes": comparison.notes})


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
        if isinstance(value, Estimate):
            text += f" [{_g(value.low, 3)}, {_g(value.high, 3)}]"
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
    interval = change_interval(baseline, now)
    if interval is not None:
        row.delta_low, row.delta_high = interval
        row.change += f" [{_signed(interval[0])}, {_signed(interval[1])}]"
    row.allowed = f"{'≤' if rule.direction == LOWER else '≥'} {_g(limit, max(digits, 4))}"
    worse_by = (n - b) if rule.direction == LOWER else (b - n)
    eps = 1e-12 * max(1.0, abs(b), abs(n))  # a value exactly at the limit passes, whatever the rounding
    if worse_by > slack + eps:
        row.verdict = REGRESSION
        if rule.ci and interval is not None:
            # the least worsening the interval allows: its low end when higher is worse, else its high end
            least = interval[0] if rule.direction == LOWER else -interval[1]
            if not least > slack + eps:
                row.verdict = NOISE
    elif worse_by < -(slack + eps):
        row.verdict = IMPROVED
    return row


def change_interval(baseline, now) -> tuple[float, float] | None:
    """The 95% interval of now − baseline from each side's own interval (MOVER, the two taken as
    independent; a side without one counts as exact), or None when neither side has one."""
    b, n = as_number(baseline), as_number(now)
    b_iv, n_iv = interval_of(baseline), interval_of(now)
    if b is None or n is None or (b_iv is None and n_iv is None):
        return None
    b_low, b_high = b_iv or (b, b)
    n_low, n_high = n_iv or (n, n)
    d = n - b
    below = math.hypot(max(0.0, n - n_low), max(0.0, b_high - b))
    above = math.hypot(max(0.0, n_high - n), max(0.0, b - b_low))
    return d - below, d + above


def _signed(value: float) -> str:
    return ("+" if value >= 0 else "-") + _g(abs(value), 3)


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
    pointwise: set[tuple[str, str]] = set()  # (@ci rule, metric) compared without an interval
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
            if rule.ci and row.delta is not None and row.delta_low is None:
                pointwise.add((rule.spec, name))
            if rule.relative and row.delta is not None and as_number(row.baseline) == 0:
                zero_relative.add(name)
    for name in sorted(zero_relative):
        result.notes.append(f"{name}: the baseline is 0, so its relative tolerance allows no worsening at all; "
                            f"use an absolute rule ({base_name(name)}:{metric_info(name).bad_sign}0.01) "
                            "for metrics that can be 0")
    for spec, name in sorted(pointwise):
        result.notes.append(f"{name}: neither side has an interval, so rule {spec} compared the values alone")
    for rule in rules:
        if rule.spec not in used:
            result.notes.append(f"rule {rule.spec} matched no metric of a test on both sides")
    return result

