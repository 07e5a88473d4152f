"""stance_harness.report.baseline: metric directions, rules, saved baselines and the regression gate."""

import json
import math
import re

import pytest

import stance_harness.checks  # noqa: F401 - these three declare the harness's own metrics and their directions
import stance_harness.runs.instruments  # noqa: F401
import stance_harness.runs.run  # noqa: F401
from stance_harness.core.errors import HarnessError
from stance_harness.report.gate import (
    IMPROVED,
    MISSING_BASELINE,
    MISSING_NOW,
    NOT_FINITE,
    NOT_FINITE_BASELINE,
    OK,
    REGRESSION,
    compare,
    parse_rule,
)
from stance_harness.core.metrics import HIGHER, LOWER, METRICS, Spread, direction_of
from stance_harness.report.store import list_baselines, load_baseline, load_metrics, load_source, save_baseline

NODE = "suites/test_calibration.py::test_lora_keeps_calibration"
OTHER = "suites/test_stance.py::test_stance_takes"


def payload(run_id="20260101-000000-aaaa", tests=None, started="2026-01-01T00:00:00+00:00"):
    if tests is None:
        tests = [{"nodeid": NODE, "outcome": "passed", "metrics": {"lora.ece": 0.05, "lora.acc1": 0.8}, "checks": []}]
    return {"run_id": run_id, "started": started, "finished": started,
            "provenance": {"model": {"name": "tiny-qwen2"}, "git": {"commit": "abc"}}, "tests": tests, "runs": {}}


def write_reports(root, data):
    """What a session leaves behind that this module reads: report.json and the `latest` pointer."""
    run_dir = root / data["run_id"]
    run_dir.mkdir(parents=True)
    (run_dir / "report.json").write_text(json.dumps(data))
    (root / "latest").write_text(data["run_id"] + "\n")
    return run_dir


def one(base: dict, now: dict, rules, test=NODE):
    """Compare one test's metrics; return the single row."""
    result = compare({test: base}, {test: now}, rules)
    assert len(result.rows) == 1, result.render()
    return result.rows[0]


# -- directions ----------------------------------------------------------------------------
REQUIRED = {
    "ece": LOWER, "mce": LOWER, "brier": LOWER, "acc1": HIGHER,
    "behavior_shift": HIGHER, "loglik_margin": HIGHER, "kl": HIGHER, "marker_rate": HIGHER,
    "forgetting": LOWER, "perplexity_increase": LOWER, "embedding_drift": LOWER,
    "max_grad_norm": LOWER, "grad_spike": LOWER, "effective_rank": LOWER, "concentration_share": HIGHER,
    "trainable_params": LOWER, "step_time": LOWER, "peak_memory": LOWER,
}


def test_required_metrics_have_their_directions():
    assert {name: direction_of(name) for name in REQUIRED} == REQUIRED


def test_namespaced_metric_takes_the_direction_of_its_last_component():
    assert direction_of("lora.ece") == LOWER
    assert direction_of("full.behavior_shift") == HIGHER
    assert direction_of("a.b.acc1") == HIGHER


def test_unknown_metric_suggests_close_names():
    with pytest.raises(HarnessError, match=r"unknown metric 'ecee'.*Did you mean: ece"):
        direction_of("ecee")
    with pytest.raises(HarnessError, match=r"unknown metric 'brierr' \(the last part of 'lora.brierr'.*Did you mean: brier"):
        direction_of("lora.brierr")


@pytest.mark.parametrize("name", sorted(METRICS.names()))
def test_every_registered_metric_regresses_in_its_bad_direction(name):
    direction = METRICS.get(name).direction
    worse, better = (1.5, 0.5) if direction == LOWER else (0.5, 1.5)
    rule = f"{name}:0.1"  # no sign: the registered bad side
    assert one({name: 1.0}, {name: worse}, [rule]).verdict == REGRESSION
    assert one({name: 1.0}, {name: better}, [rule]).verdict == IMPROVED
    assert one({name: 1.0}, {name: 1.05 if direction == LOWER else 0.95}, [rule]).verdict == OK
    # and the same under a namespace
    assert one({f"lora.{name}": 1.0}, {f"lora.{name}": worse}, [rule]).verdict == REGRESSION


# -- rules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, metric, tolerance, relative, direction", [
    ("ece:+0.01", "ece", 0.01, False, LOWER),
    ("behavior_shift:-10%", "behavior_shift", 0.10, True, HIGHER),
    ("acc1:0.02", "acc1", 0.02, False, HIGHER),  # no sign: acc1's bad side, a decrease
    ("step_time:25%", "step_time", 0.25, True, LOWER),
    ("lora.ece:1e-3", "lora.ece", 0.001, False, LOWER),
    ("full.kl:-.5", "full.kl", 0.5, False, HIGHER),
])
def test_parse_rule(spec, metric, tolerance, relative, direction):
    rule = parse_rule(spec)
    assert (rule.metric, rule.relative, rule.direction, rule.spec) == (metric, relative, direction, spec)
    assert rule.tolerance == pytest.approx(tolerance)


def test_rule_limits_absolute_and_relative():
    assert parse_rule("ece:+0.01").limit(0.05) == pytest.approx(0.06)
    assert parse_rule("behavior_shift:-10%").limit(0.5) == pytest.approx(0.45)
    assert parse_rule("acc1:0.02").limit(0.8) == pytest.approx(0.78)


def test_wrong_sign_says_which_change_is_a_regression():
    with pytest.raises(HarnessError, match=re.escape("ece is better when lower; a regression is an increase: "
                                                     "write ece:+0.01")):
        parse_rule("ece:-0.01")
    with pytest.raises(HarnessError, match=re.escape("behavior_shift is better when higher; a regression is a "
                                                     "decrease: write behavior_shift:-10%")):
        parse_rule("behavior_shift:+10%")
    with pytest.raises(HarnessError, match=re.escape("write lora.acc1:-0.02")):
        parse_rule("lora.acc1:+0.02")


@pytest.mark.parametrize("spec", ["ece", "ece:", ":0.1", "ece:abc", "ece:+-0.1", "ece:0.1%%", "ece:0.1 extra",
                                  "lora..ece:0.1", ".ece:0.1", "ece:-", "ece=0.1", ""])
def test_malformed_rule_shows_the_format(spec):
    with pytest.raises(HarnessError, match=re.escape("expected METRIC:[+|-]TOLERANCE[%]")):
        parse_rule(spec)


def test_rule_for_unknown_metric_suggests():
    with pytest.raises(HarnessError, match=r"rule 'behaviour_shift:-10%'.*Did you mean: behavior_shift"):
        parse_rule("behaviour_shift:-10%")


def test_bare_rule_covers_every_namespace_and_a_namespaced_rule_wins():
    base = {"ece": 0.1, "lora.ece": 0.1, "full.ece": 0.1, "lora.mce": 0.1, "lora.xece": 0.1}
    now = {"ece": 0.2, "lora.ece": 0.2, "full.ece": 0.2, "lora.mce": 0.9, "lora.xece": 0.9}
    for rules in (["ece:+0.5", "lora.ece:+0.01"], ["lora.ece:+0.01", "ece:+0.5"]):  # order does not matter
        result = compare({NODE: base}, {NODE: now}, rules)
        verdicts = {row.metric: row.verdict for row in result.rows}
        assert verdicts == {"ece": OK, "full.ece": OK, "lora.ece": REGRESSION}  # mce, xece: no rule covers them
        assert {row.metric: row.rule for row in result.rows}["lora.ece"] == "lora.ece:+0.01"


def test_namespaced_rule_leaves_other_namespaces_alone():
    result = compare({NODE: {"lora.ece": 0.1, "full.ece": 0.1}}, {NODE: {"lora.ece": 0.1, "full.ece": 0.9}},
                     ["lora.ece:+0.01"])
    assert [(r.metric, r.verdict) for r in result.rows] == [("lora.ece", OK)]
    assert result.passed


# -- the comparison ------------------------------------------------------------------------
def test_regression_row_says_what_moved_and_the_limit():
    result = compare({NODE: {"lora.ece": 0.0512}}, {NODE: {"lora.ece": 0.0734}}, ["ece:+0.01"])
    (row,) = result.rows
    assert row.verdict == REGRESSION and not result.passed and result.regressions == [row]
    assert row.allowed == "≤ 0.0612"
    assert row.change.startswith("+0.0222")
    text = result.render()
    assert "REGRESSION" in text and "≤ 0.0612" in text and "FAILED: 1 of 1 comparisons (1 REGRESSION)" in text
    json.dumps(result.as_dict())  # JSON-ready


def test_value_exactly_at_the_limit_passes():
    assert one({"ece": 0.05}, {"ece": 0.06}, ["ece:+0.01"]).verdict == OK
    assert one({"acc1": 0.8}, {"acc1": 0.78}, ["acc1:0.02"]).verdict == OK
    assert one({"behavior_shift": 0.5}, {"behavior_shift": 0.45}, ["behavior_shift:-10%"]).verdict == OK
    assert one({"behavior_shift": 0.5}, {"behavior_shift": 0.449}, ["behavior_shift:-10%"]).verdict == REGRESSION


def test_relative_tolerance_on_a_zero_baseline_allows_no_worsening():
    # A share of 0 is 0: the value may not get worse at all (pytest-benchmark would divide by zero and
    # fail every comparison). A zero baseline that stays zero, or improves, passes; a note says why.
    assert one({"forgetting": 0.0}, {"forgetting": 0.0}, ["forgetting:+10%"]).verdict == OK
    result = compare({NODE: {"forgetting": 0.0}}, {NODE: {"forgetting": 0.001}}, ["forgetting:+10%"])
    assert result.rows[0].verdict == REGRESSION
    assert result.rows[0].allowed == "≤ 0"
    assert any("baseline is 0" in note and "forgetting:+0.01" in note for note in result.notes)
    assert "allows no worsening" in result.render()
    assert one({"kl": 0.0}, {"kl": -0.01}, ["kl:-10%"]).verdict == REGRESSION
    assert one({"kl": 0.0}, {"kl": 0.5}, ["kl:-10%"]).verdict == IMPROVED


def test_relative_tolerance_uses_the_baseline_magnitude_when_negative():
    rule = ["loglik_margin:-10%"]  # baseline -2.0: a drop of up to 0.2 is allowed
    assert one({"loglik_margin": -2.0}, {"loglik_margin": -2.1}, rule).verdict == OK
    assert one({"loglik_margin": -2.0}, {"loglik_margin": -2.3}, rule).verdict == REGRESSION
    assert one({"loglik_margin": -2.0}, {"loglik_margin": -1.5}, rule).verdict == IMPROVED


def test_metric_missing_on_one_side():
    missing_now = one({"lora.ece": 0.05}, {}, ["ece:+0.01"])
    assert missing_now.verdict == MISSING_NOW and missing_now.failed  # a gated metric that vanished fails
    missing_before = compare({NODE: {}}, {NODE: {"lora.ece": 0.05}}, ["ece:+0.01"])
    assert missing_before.rows[0].verdict == MISSING_BASELINE and missing_before.passed  # new metric: no reference


@pytest.mark.parametrize("now, shown", [("nan", "now nan"), ("inf", "now inf"), (float("nan"), "now nan"),
                                        ("oops", "not a number: 'oops'"), (None, "not a number: None"),
                                        ({"x": 1}, "not a number"), (True, "not a number: True")])
def test_non_finite_or_non_numeric_now_fails(now, shown):
    row = one({"ece": 0.05}, {"ece": now}, ["ece:+0.01"])
    assert row.verdict == NOT_FINITE and row.failed
    assert shown in row.change


def test_non_finite_baseline_cannot_be_compared_and_does_not_fail():
    result = compare({NODE: {"ece": "nan"}}, {NODE: {"ece": 0.05}}, ["ece:+0.01"])
    assert result.rows[0].verdict == NOT_FINITE_BASELINE
    assert result.passed


def test_bad_data_never_raises():
    result = compare(None, {NODE: [1, 2]}, ["ece:+0.01"])
    assert result.only_now == [NODE]
    assert not result.passed and "nothing was compared" in result.summary()  # a gate that saw nothing fails
    assert any("not a mapping" in note for note in result.notes)
    result = compare({NODE: None}, {NODE: "junk"}, ["ece:+0.01"])
    assert result.rows == [] and any("the now metrics are a str, not a mapping" in note for note in result.notes)
    result.render()


def test_a_new_test_is_a_note_and_a_vanished_gated_test_fails():
    base = {NODE: {"ece": 0.05}, OTHER: {"ece": 0.05, "centre_layer": 3}}
    now = {NODE: {"ece": 0.05}, "suites/test_new.py::test_new": {"ece": 0.9}}
    result = compare(base, now, ["ece:+0.01"])
    assert [(row.test, row.metric, row.verdict) for row in result.rows] == [
        (NODE, "ece", "ok"), (OTHER, "ece", "missing now")]  # centre_layer has no rule: not gated
    assert result.only_baseline == [OTHER] and result.only_now == ["suites/test_new.py::test_new"]
    assert not result.passed
    assert compare({NODE: {"ece": 0.05}, OTHER: {"centre_layer": 3}}, now, ["ece:+0.01"]).passed
    text = result.render()
    assert f"only in baseline (missing now): {OTHER}" in text
    assert "only now (no baseline): suites/test_new.py::test_new" in text


def test_rule_that_matches_nothing_is_noted():
    result = compare({NODE: {"ece": 0.05}}, {NODE: {"ece": 0.05}}, ["ece:+0.01", "kl:-5%"])
    assert result.passed
    assert "rule kl:-5% matched no metric" in result.render()


def test_without_rules_every_shared_metric_is_information():
    result = compare({NODE: {"ece": 0.05, "acc1": 0.8, "centre_layer": 3, "only_before": 1}},
                     {NODE: {"ece": 0.09, "acc1": 0.8, "centre_layer": 5, "only_now": 2}}, [])
    verdicts = {row.metric: row.verdict for row in result.rows}
    assert verdicts == {"acc1": "same", "centre_layer": "changed", "ece": "changed"}
    assert "worse" in {row.metric: row.change for row in result.rows}["ece"]  # direction shown, not judged
    assert result.passed
    assert "information only" in result.render()
    assert compare({NODE: {"ece": 0.05}}, {NODE: {"ece": "nan"}}, []).passed


def test_close_values_print_with_enough_digits_to_differ():
    row = one({"trainable_params": 956480}, {"trainable_params": 956481}, ["trainable_params:0"])
    assert row.verdict == REGRESSION
    text = compare({NODE: {"trainable_params": 956480}}, {NODE: {"trainable_params": 956481}}, []).render()
    assert "956480" in text and "956481" in text
    text = compare({NODE: {"ece": 0.1234561}}, {NODE: {"ece": 0.1234569}}, []).render()
    assert "0.123456 " in text and "0.123457 " in text  # 4 significant digits would print 0.1235 twice


# -- repeats -------------------------------------------------------------------------------
def repeated_payload(run_id, mean, single):
    test = {"nodeid": NODE, "outcome": "passed", "metrics": {"lora.ece": single, "lora.acc1": 0.8},
            "repeats": {"n": 5, "metrics": {"lora.ece": {"mean": mean, "std": 0.004, "min": mean - 0.005,
                                                         "max": mean + 0.005, "n": 5}}}, "checks": []}
    return payload(run_id, [test])


def test_repeated_tests_compare_their_means(tmp_path):
    write_reports(tmp_path, repeated_payload("20260101-000000-aaaa", mean=0.050, single=0.050))
    write_reports(tmp_path, repeated_payload("20260102-000000-bbbb", mean=0.052, single=0.099))
    now = load_metrics("latest", tmp_path)
    assert now[NODE]["lora.ece"] == pytest.approx(0.052)  # the mean, not the last seed's 0.099
    assert isinstance(now[NODE]["lora.ece"], Spread) and now[NODE]["lora.ece"].n == 5
    result = compare(load_metrics("20260101-000000-aaaa", tmp_path), now, ["ece:+0.01"])
    assert [(r.metric, r.verdict) for r in result.rows] == [("lora.ece", OK)]
    assert "±0.004 n=5" in result.render()
    regressed = compare(load_metrics("20260101-000000-aaaa", tmp_path), now, ["ece:+0.001"])
    assert regressed.rows[0].verdict == REGRESSION


def test_baseline_of_a_repeated_run_keeps_means_and_spread(tmp_path):
    path = save_baseline(tmp_path, "seeds", repeated_payload("20260101-000000-aaaa", mean=0.05, single=0.07))
    saved = json.loads(path.read_text())["tests"][NODE]
    assert saved["metrics"]["lora.ece"] == pytest.approx(0.05)
    assert saved["repeats"]["n"] == 5 and saved["repeats"]["metrics"]["lora.ece"]["std"] == pytest.approx(0.004)
    value = load_metrics("seeds", tmp_path)[NODE]["lora.ece"]
    assert isinstance(value, Spread) and value == pytest.approx(0.05) and value.std == pytest.approx(0.004)


# -- saved baselines -----------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    tests = [{"nodeid": NODE, "outcome": "passed", "checks": [],
              "metrics": {"lora.ece": 0.05, "lora.trainable_params": 43008, "lora.kl": "nan", "label": "lora",
                          "flag": True}},
             {"nodeid": OTHER, "outcome": "failed", "metrics": {}, "checks": []}]
    source = payload("20260101-000000-aaaa", tests)
    path = save_baseline(tmp_path, "main", source)
    assert path == tmp_path / "baselines" / "main.json"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left
    data = load_baseline(tmp_path, "main")
    assert data["name"] == "main" and data["report_id"] == "20260101-000000-aaaa" and data["format"] == 1
    assert data["provenance"] == source["provenance"] and data["saved"]
    assert data["tests"][NODE] == {"metrics": {"lora.ece": 0.05, "lora.trainable_params": 43008, "lora.kl": "nan"},
                                   "outcome": "passed"}  # numbers only; the JSON spelling of nan kept
    assert data["tests"][OTHER]["metrics"] == {}
    assert list_baselines(tmp_path) == ["main"]
    loaded = load_metrics("main", tmp_path)
    assert loaded[NODE]["lora.ece"] == 0.05 and math.isnan(float(loaded[NODE]["lora.kl"]))
    # a baseline compares cleanly against the report it came from
    write_reports(tmp_path, source)
    assert compare(loaded, load_metrics("latest", tmp_path), ["ece:+0.0", "trainable_params:0"]).passed


def test_save_replaces_an_existing_baseline(tmp_path):
    save_baseline(tmp_path, "main", payload("20260101-000000-aaaa"))
    save_baseline(tmp_path, "main", payload("20260102-000000-bbbb"))
    assert load_baseline(tmp_path, "main")["report_id"] == "20260102-000000-bbbb"


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".hidden", "with space", "é"])
def test_bad_baseline_name(tmp_path, name):
    with pytest.raises(HarnessError, match="bad baseline name"):
        save_baseline(tmp_path, name, payload())


def test_missing_baseline_lists_existing_ones(tmp_path):
    with pytest.raises(HarnessError, match="no baseline 'main'.*there are no baselines yet"):
        load_baseline(tmp_path, "main")
    save_baseline(tmp_path, "main", payload())
    save_baseline(tmp_path, "lora-r8", payload())
    with pytest.raises(HarnessError, match=r"no baseline 'mian'.*Did you mean: main\?.*existing baselines: lora-r8, main"):
        load_baseline(tmp_path, "mian")


# -- sources -------------------------------------------------------------------------------
def test_sources_resolve_run_latest_baseline_and_paths(tmp_path):
    first = write_reports(tmp_path, payload("20260101-000000-aaaa"))
    write_reports(tmp_path, payload("20260102-000000-bbbb", [
        {"nodeid": NODE, "outcome": "passed", "metrics": {"lora.ece": 0.07}, "checks": []}]))
    baseline = save_baseline(tmp_path, "main", payload("20260101-000000-aaaa"))
    assert load_metrics("20260101-000000-aaaa", tmp_path)[NODE]["lora.ece"] == 0.05
    assert load_metrics("latest", tmp_path)[NODE]["lora.ece"] == 0.07
    assert load_metrics("main", tmp_path)[NODE]["lora.ece"] == 0.05
    assert load_metrics(str(first / "report.json"), tmp_path / "elsewhere")[NODE]["lora.ece"] == 0.05
    assert load_metrics(str(first), tmp_path / "elsewhere")[NODE]["lora.ece"] == 0.05
    assert load_source(str(baseline), tmp_path / "elsewhere").kind == "baseline"
    assert "baseline main (report 20260101-000000-aaaa" in load_source("main", tmp_path).label


def test_unknown_source_names_what_exists(tmp_path):
    write_reports(tmp_path, payload("20260101-000000-aaaa"))
    save_baseline(tmp_path, "main", payload())
    with pytest.raises(HarnessError, match=r"no report, baseline or file 'maim'.*Did you mean: main.*"
                                           r"Reports: 20260101-000000-aaaa; baselines: main"):
        load_metrics("maim", tmp_path)
    with pytest.raises(HarnessError, match="reports directory .* does not exist"):
        load_metrics("main", tmp_path / "nowhere")
    with pytest.raises(HarnessError, match="no session has written a report"):
        load_metrics("latest", tmp_path / "nowhere")


def test_ambiguous_and_broken_sources(tmp_path):
    write_reports(tmp_path, payload("main"))
    save_baseline(tmp_path, "main", payload())
    with pytest.raises(HarnessError, match="'main' is both a report and a baseline"):
        load_metrics("main", tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(HarnessError, match="is not valid JSON"):
        load_metrics(str(broken), tmp_path)
    other = tmp_path / "other.json"
    other.write_text('{"benchmarks": []}')
    with pytest.raises(HarnessError, match="neither a report.json nor a baseline"):
        load_metrics(str(other), tmp_path)
