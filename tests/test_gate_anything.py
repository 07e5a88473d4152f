"""Gate whatever was trained: any peft tuner, a fully fine-tuned checkpoint, `--adapter NAME=PATH`,
the stance from --stance or the adapter's metadata (refused when neither says), the training
script outside pytest, and --fail-on rules that read the effect's interval (@ci)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import IA3Config, LoHaConfig, get_peft_model
from scipy import stats

from conftest import QUICK
from stance_harness.runs.adapters import FULL, PEFT, PROVENANCE_FILE, load_adapter_run, parse_adapter_spec, read_adapter, save_adapter
from stance_harness.analysis.behavior import effect_of
from stance_harness.analysis.calibration import ece_interval, ece_of_items
from stance_harness.checks.behavior import _forgetting_estimate
from stance_harness.core.errors import HarnessError
from stance_harness.report import gate
from stance_harness.core.metrics import Estimate, Spread, interval_of
from stance_harness.core.metrics import test_metrics as metrics_of_test
from stance_harness.report.records import TestRecord
from stance_harness.report.store import baseline_from_payload

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "examples" / "train_adapter.py"
P = ("-p", "no:cacheprovider")


def _total_sq(run) -> dict:
    return {d.raw_name: d.moments.total_sq for d in run.effective_deltas}


# -- what --adapter accepts ------------------------------------------------------------------------
def test_name_equals_path_names_the_metrics(tmp_path):
    named = parse_adapter_spec("curious-v2=adapters/mine")
    assert (named.name, named.path) == ("curious-v2", Path("adapters/mine"))
    plain = parse_adapter_spec("adapters/curious")
    assert (plain.name, plain.path) == ("curious", Path("adapters/curious"))
    odd = tmp_path / "a=b"  # a directory whose own name holds '=' is taken whole
    odd.mkdir()
    assert parse_adapter_spec(str(odd)).name == "a=b"
    with pytest.raises(HarnessError, match=r"--adapter =adapters/x: '' is not a NAME for NAME=PATH"):
        parse_adapter_spec("=adapters/x")
    with pytest.raises(HarnessError, match=r"--adapter v2=: no PATH after '='; write NAME=PATH"):
        parse_adapter_spec("v2=")


def test_an_ia3_adapter_gates_like_the_run_that_made_it(harness, tmp_path):
    config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    run = harness.train("peft", examples=10, recipe={**QUICK, "learning_rate": 1e-2}, config=config)
    path = save_adapter(run, tmp_path / "ia3-v1")
    saved = read_adapter(path)
    assert saved.kind == PEFT and saved.config["peft_type"] == "IA3"
    assert saved.provenance["stance"]["name"] == "curious-uncertainty" and saved.stance_name() == "curious-uncertainty"
    gated = load_adapter_run(harness.model(), path, harness.stance)
    assert (gated.label, gated.method.name, gated.origin, gated.examples) == ("ia3-v1", "peft", "adapter", 0)
    assert gated.run_id.startswith("adapter-ia3-v1-")
    ours, theirs = _total_sq(run), _total_sq(gated)
    assert ours.keys() == theirs.keys() and any(v > 0 for v in ours.values())
    assert theirs == pytest.approx(ours, rel=1e-6)
    assert gated.behavior()["adapted"] == pytest.approx(run.behavior()["adapted"], abs=1e-6)
    assert gated.changed_frozen() == []
    assert gated.loaded is harness.model()  # measured against the session's own base, not a copy


def test_an_adapter_from_plain_peft_is_measured_only_on_a_named_stance(harness, tiny_qwen2, tmp_path):
    model = get_peft_model(tiny_qwen2.fresh(), LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # LoHa starts at ΔW = 0 (its w2_b is zero): move one layer's q_proj
        model.base_model.model.model.layers[1].self_attn.q_proj.hada_w2_b["default"].add_(0.05)
    model.save_pretrained(tmp_path / "outside", safe_serialization=True)
    saved = read_adapter(tmp_path / "outside")
    assert saved.kind == PEFT and saved.provenance == {}
    with pytest.raises(HarnessError, match=r"--adapter .*outside: no stance to measure it on: it has no "
                                           r"stance_harness.json .*--stance NAME, or save the adapter with save_adapter"):
        load_adapter_run(harness.model(), tmp_path / "outside", harness.stance)
    (tmp_path / "outside" / PROVENANCE_FILE).write_text(json.dumps({"run_id": "elsewhere"}))
    with pytest.raises(HarnessError, match=r"its stance_harness.json names none\. Name it on the command line"):
        load_adapter_run(harness.model(), tmp_path / "outside", harness.stance)
    run = load_adapter_run(harness.model(), f"loha={tmp_path / 'outside'}", harness.stance, stance="curious-uncertainty")
    assert (run.label, run.method.name, run.stance.name) == ("loha", "peft", "curious-uncertainty")
    changed = {(d.layer, d.kind) for d in run.effective_deltas if d.moments.total_sq > 0}
    assert changed == {(1, "q_proj")}
    assert run.behavior()["effect"]["n"] == len(run.stance.probes)


def test_a_full_checkpoint_gates_against_its_base_like_the_full_run(harness, tmp_path):
    run = harness.train("full", examples=10, recipe=QUICK)
    path = save_adapter(run, tmp_path / "full-v1")
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    saved = read_adapter(f"mine={path}")
    assert saved.kind == FULL and saved.spec.name == "mine"
    gated = load_adapter_run(harness.model(), f"mine={path}", harness.stance)
    assert (gated.label, gated.method.name, gated.origin) == ("mine", "full", "adapter")
    assert gated.run_id.startswith("adapter-mine-")
    ours, theirs = _total_sq(run), _total_sq(gated)
    assert ours.keys() == theirs.keys() and any(v > 0 for v in ours.values())
    assert theirs == pytest.approx(ours, rel=1e-6)
    assert gated.behavior()["adapted"] == pytest.approx(run.behavior()["adapted"], abs=1e-6)
    assert gated.forgetting()["relative_increase"] == pytest.approx(run.forgetting()["relative_increase"], abs=1e-9)
    # another base: its provenance says so; without provenance, the first parameter that differs
    with pytest.raises(HarnessError, match=r"--adapter .*full-v1 was trained for base tiny-qwen2 .*not for --model tiny-phi"):
        load_adapter_run(harness.model("tiny-phi"), path, harness.stance)
    (path / PROVENANCE_FILE).unlink()
    with pytest.raises(HarnessError, match=r"--adapter .*full-v1 is not a fine-tune of tiny-phi .*its parameter "):
        load_adapter_run(harness.model("tiny-phi"), path, harness.stance, stance="curious-uncertainty")


# -- intervals -------------------------------------------------------------------------------------
def test_ece_interval_is_scipys_bca_bootstrap_over_predictions():
    rng = np.random.default_rng(3)
    confidence = rng.uniform(0.2, 1.0, 300)
    correct = (rng.uniform(0, 1, 300) < confidence * 0.8).astype(float)
    items = np.column_stack([confidence, correct])
    expected = stats.bootstrap((np.arange(300),), lambda i: ece_of_items(items[i]), vectorized=False,
                               n_resamples=500, method="BCa", rng=np.random.default_rng(7),
                               batch=(1 << 22) // 300).confidence_interval
    low, high = ece_interval(confidence, correct, resamples=500, seed=7)
    assert (low, high) == pytest.approx((expected.low, expected.high), rel=1e-12)
    assert low < ece_of_items(items) < high
    assert ece_interval([0.9], [1.0]) == pytest.approx((0.1, 0.1))  # one prediction: no spread to resample
    with pytest.raises(ValueError, match="at least one prediction"):
        ece_interval([], [])


def test_forgetting_interval_is_the_window_interval_through_expm1():
    per_unit = [0.02, -0.01, 0.05, 0.03, 0.0, 0.04, 0.01, 0.02]
    found = {"kind": "perplexity", "relative_increase": math.expm1(np.mean(per_unit)), "per_unit": per_unit}
    estimate = _forgetting_estimate(found)
    effect = effect_of(per_unit)
    assert float(estimate) == found["relative_increase"]
    assert (estimate.low, estimate.high) == pytest.approx((math.expm1(effect.low), math.expm1(effect.high)))
    assert not isinstance(_forgetting_estimate({**found, "relative_increase": math.inf}), Estimate)  # a collapse


def test_a_recorded_interval_travels_into_the_baseline_and_back():
    record = TestRecord("t.py::test")
    record.metric("lora.ece", Estimate(0.05, 0.04, 0.062))
    record.metric("lora.kl", 0.3, interval=(0.2, 0.4))
    record.metric("lora.acc1", 0.7)
    assert record.metrics == {"lora.ece": 0.05, "lora.kl": 0.3, "lora.acc1": 0.7}
    assert record.intervals == {"lora.ece": [0.04, 0.062], "lora.kl": [0.2, 0.4]}
    with pytest.raises(ValueError, match=r"metric 'lora.ece': interval \(0.1, 0.0\) has its low end above"):
        record.metric("lora.ece", 0.05, interval=(0.1, 0.0))
    baseline = baseline_from_payload("main", {"report_id": "r", "tests": [record.as_dict()]})
    saved = baseline["tests"]["t.py::test"]
    assert saved["intervals"] == {"lora.ece": [0.04, 0.062], "lora.kl": [0.2, 0.4]}
    back = metrics_of_test(json.loads(json.dumps(saved)))
    assert isinstance(back["lora.ece"], Estimate) and (back["lora.ece"].low, back["lora.ece"].high) == (0.04, 0.062)
    assert not isinstance(back["lora.acc1"], Estimate)


class _Seed:
    """A stand-in run: one seed's per-probe shifts (what the pooled shift check reads), recorded."""

    def __init__(self, seed, shifts):
        self.label, self.sinks, self.run_id = "lora", [], f"lora-{seed}"
        self.recipe = type("Recipe", (), {"seed": seed})()
        self.shifts = list(shifts)

    def unit_values(self, metric):
        return "probe", self.shifts

    def unit_ids(self, metric):
        return [f"p{i}" for i in range(len(self.shifts))]


def test_a_pooled_shift_over_seeds_publishes_its_crossed_interval():
    from stance_harness import check_behavior_shift

    rng = np.random.default_rng(5)
    runs = [_Seed(seed, 0.5 + rng.normal(0, 1.0, 10)) for seed in range(3)]
    record = TestRecord("t.py::test")
    for run in runs:
        record.use_run(run)
    result = check_behavior_shift(runs, min_effect=0.0)
    for name in ("lora.loglik_margin", "lora.behavior_shift"):
        assert record.metrics[name] == pytest.approx(result.metrics["mean"])
        assert record.intervals[name] == pytest.approx([result.metrics["low"], result.metrics["high"]])


def test_a_repeated_mean_has_the_t_interval_of_its_runs():
    spread = Spread(0.5, std=0.1, n=4)
    expected = stats.t.interval(0.95, 3, loc=0.5, scale=0.1 / 2)
    assert interval_of(spread) == pytest.approx(expected)
    assert interval_of(Spread(0.5, std=0.1, n=1)) is None and interval_of(0.5) is None


# -- interval-aware rules --------------------------------------------------------------------------
def test_the_ci_rule_grammar():
    rule = gate.parse_rule("ece:+0.01@ci")
    assert (rule.metric, rule.tolerance, rule.ci, rule.relative) == ("ece", 0.01, True, False)
    assert rule.describe() == "ece: fail on an increase of more than 0.01, beyond the 95% interval of the change"
    assert gate.parse_rule("behavior_shift:-10%@ci").relative and not gate.parse_rule("ece:+0.01").ci
    assert gate.parse_rule("ece:+0.01@ci").as_dict()["ci"] is True
    with pytest.raises(HarnessError, match=r"a regression is an increase: write ece:\+0.01@ci"):
        gate.parse_rule("ece:-0.01@ci")
    with pytest.raises(HarnessError, match=r"bad rule 'ece:\+0.01@95'.*ece:\+0.01@ci \(only a change"):
        gate.parse_rule("ece:+0.01@95")


def test_the_change_interval_is_mover_by_hand():
    base, now = Estimate(0.05, 0.04, 0.062), Estimate(0.061, 0.05, 0.075)
    low, high = gate.change_interval(base, now)
    assert low == pytest.approx(0.011 - math.sqrt(0.011 ** 2 + 0.012 ** 2))
    assert high == pytest.approx(0.011 + math.sqrt(0.014 ** 2 + 0.010 ** 2))
    assert gate.change_interval(0.05, now) == pytest.approx((0.0, 0.025))  # an exact baseline: now's widths
    assert gate.change_interval(0.05, 0.061) is None


def test_an_interval_rule_passes_where_the_point_rule_fails():
    baseline = {"t": {"v2.ece": Estimate(0.05, 0.04, 0.062)}}
    noisy = {"t": {"v2.ece": Estimate(0.061, 0.05, 0.075)}}
    point = gate.compare(baseline, noisy, ["ece:+0.01"])
    assert not point.passed and [r.verdict for r in point.rows] == ["REGRESSION"]
    aware = gate.compare(baseline, noisy, ["ece:+0.01@ci"])
    assert aware.passed and [r.verdict for r in aware.rows] == ["within noise"]
    assert aware.summary() == "passed: 1 comparisons, no regression (1 past the tolerance within noise)"
    table = aware.render()
    assert "0.05 [0.04, 0.062]" in table and "0.061 [0.05, 0.075]" in table and "[-0.00528, +0.0282]" in table
    row = aware.as_dict()["rows"][0]
    assert row["delta_low"] == pytest.approx(0.011 - math.hypot(0.011, 0.012))
    # a change whose whole interval is past the tolerance fails under @ci too
    clear = {"t": {"v2.ece": Estimate(0.09, 0.085, 0.095)}}
    failed = gate.compare(baseline, clear, ["ece:+0.01@ci"])
    assert not failed.passed and failed.rows[0].verdict == "REGRESSION"
    # the other direction: higher is better, so the interval's high end must be below −tolerance
    shift = {"t": {"v2.behavior_shift": Estimate(1.0, 0.9, 1.1)}}
    lower = {"t": {"v2.behavior_shift": Estimate(0.8, 0.7, 0.9)}}
    assert [r.verdict for r in gate.compare(shift, lower, ["behavior_shift:-0.1"]).rows] == ["REGRESSION"]
    assert [r.verdict for r in gate.compare(shift, lower, ["behavior_shift:-0.1@ci"]).rows] == ["within noise"]
    assert [r.verdict for r in gate.compare(shift, lower, ["behavior_shift:-0.05@ci"]).rows] == ["REGRESSION"]


def test_an_interval_rule_without_intervals_compares_values_and_says_so():
    result = gate.compare({"t": {"v2.acc1": 0.8}}, {"t": {"v2.acc1": 0.7}}, ["acc1:0.05@ci"])
    assert not result.passed and result.rows[0].verdict == "REGRESSION"
    assert result.notes == ["v2.acc1: neither side has an interval, so rule acc1:0.05@ci compared the values alone"]


# -- end to end: the script, the plugin, the stance, the CLI ------------------------------------------
GATE_FILE = '''
from stance_harness import assert_behavior_shift, assert_ece, assert_no_forgetting

def test_gate(adapter_run):
    assert_behavior_shift(adapter_run, "loglik_margin", min_effect=-1e9)
    assert_no_forgetting(adapter_run, max_increase=10.0)
    assert_ece(adapter_run, max=1.0)
'''


def _report(pytester) -> dict:
    report_id = (pytester.path / "reports" / "latest").read_text().strip()
    return json.loads((pytester.path / "reports" / report_id / "report.json").read_text())


def test_a_scripted_adapter_and_an_outside_checkpoint_are_gated_with_interval_rules(pytester, tiny_qwen2, capsys):
    adapters = pytester.path / "adapters"
    trained = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "tiny-qwen2", "--examples", "10", "--options", '{"r": 4}',
         "--recipe", json.dumps({**QUICK, "learning_rate": 1e-3}), "--out", str(adapters / "curious")],
        capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr
    assert trained.stdout.startswith("saved lora (lora-") and (adapters / "curious" / PROVENANCE_FILE).is_file()
    model = tiny_qwen2.fresh()  # a full fine-tune saved by someone else: no stance_harness.json
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.05)
    model.save_pretrained(adapters / "outside-ft", safe_serialization=True)
    pytester.makepyfile(test_adapter=GATE_FILE)

    # the outside checkpoint names no stance: refused before any model loads, naming both ways
    refused = pytester.runpytest_subprocess(*P, "--adapter", f"ft={adapters / 'outside-ft'}")
    assert refused.ret == pytest.ExitCode.USAGE_ERROR
    refused.stderr.fnmatch_lines(["*--adapter ft=*outside-ft: no stance to measure it on: it has no "
                                  "stance_harness.json*--stance NAME*save_adapter*"])

    # the scripted adapter, named by NAME=PATH, on the stance its metadata records
    saved = pytester.runpytest_subprocess(*P, "--adapter", f"curious-v2={adapters / 'curious'}",
                                          "--save-baseline", "main")
    saved.assert_outcomes(passed=1)
    test = _report(pytester)["tests"][0]
    assert test["nodeid"] == "test_adapter.py::test_gate[curious-v2]"
    assert {"curious-v2.ece", "curious-v2.behavior_shift", "curious-v2.forgetting"} <= set(test["metrics"])
    for name in ("curious-v2.ece", "curious-v2.behavior_shift", "curious-v2.forgetting"):
        low, high = test["intervals"][name]
        assert low <= test["metrics"][name] <= high and low < high
    baseline_file = pytester.path / "reports" / "baselines" / "main.json"
    baseline = json.loads(baseline_file.read_text())
    entry = baseline["tests"]["test_adapter.py::test_gate[curious-v2]"]
    assert entry["intervals"] == {k: v for k, v in test["intervals"].items()}

    # a baseline ECE lower by a quarter of the interval's width: past a tolerance of an eighth, within noise
    ece, (low, high) = entry["metrics"]["curious-v2.ece"], entry["intervals"]["curious-v2.ece"]
    shift = (high - low) / 4
    entry["metrics"]["curious-v2.ece"] = ece - shift
    entry["intervals"]["curious-v2.ece"] = [low - shift, high - shift]
    baseline_file.write_text(json.dumps(baseline))
    tolerance = f"{shift / 2:.6g}"
    # the outside checkpoint too, with --stance (also the stance of the scripted adapter)
    gated = pytester.runpytest_subprocess(*P, "--adapter", f"curious-v2={adapters / 'curious'}",
                                          "--adapter", f"ft={adapters / 'outside-ft'}", "--stance", "curious-uncertainty",
                                          "--compare-baseline", "main", "--fail-on", f"ece:+{tolerance}@ci")
    gated.assert_outcomes(passed=2)
    assert gated.ret == pytest.ExitCode.OK
    gated.stdout.fnmatch_lines(["*test_gate[[]curious-v2[]]*curious-v2.ece*[[]*,*[]]*[[]*,*[]]*within noise*",
                                "passed: 1 comparisons, no regression (1 past the tolerance within noise)"])
    payload = _report(pytester)
    runs = {run["name"]: run for run in payload["runs"].values()}
    assert runs["ft"]["method"] == "full" and runs["ft"]["stance"]["name"] == "curious-uncertainty"
    ft = next(t for t in payload["tests"] if t["nodeid"].endswith("[ft]"))
    assert ft["outcome"] == "passed" and "ft.ece" in ft["metrics"]
    (row,) = payload["gate"]["rows"]
    assert row["verdict"] == "within noise" and row["delta_low"] < float(tolerance) < row["delta"]

    # the same comparison outside pytest: the point rule fails, the interval rule passes
    from stance_harness.cli import main

    args = ["compare", "main", "latest", "--reports-dir", str(pytester.path / "reports")]
    assert main(args + ["--fail-on", f"ece:+{tolerance}"]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert main(args + ["--fail-on", f"ece:+{tolerance}@ci"]) == 0
    assert "within noise" in capsys.readouterr().out
