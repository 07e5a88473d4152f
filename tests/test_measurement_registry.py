"""Measurements as registered specs (stance_harness.measurements), a Run's services as one object
(stance_harness.runs.services), and the report's renderers found by measurement key."""

import dataclasses

import pytest

from stance_harness import check_less
from stance_harness.core.errors import HarnessError
from stance_harness.core.metrics import LOWER, METRICS, direction_of
import stance_harness
from stance_harness.measurements import (MEASUREMENTS, MeasureContext, MeasurementSpec, Metric, measure,
                                         measurement_checks, paired_metrics, producer_of, register_measurement)
from stance_harness.report import sections
from stance_harness.runs import run as run_module
from stance_harness.runs.services import RunServices

PAIRED_BEFORE = ["behavior_shift", "loglik_margin", "kl", "marker_rate", "forgetting", "brier", "acc1", "ece",
                 "step_time", "intruders", "general_ability"]  # what run.py's PAIRED_METRICS tuple held


@pytest.fixture
def registered():
    """Register specs for one test; unregister them and the metrics they declared after it."""
    names, metrics = [], []

    def add(spec):
        new = [m.name for m in spec.metrics if m.name not in METRICS]
        register_measurement(spec)
        names.append(spec.name)
        metrics.extend(new)
        return spec

    yield add
    for name in names:
        MEASUREMENTS.unregister(name)
    for name in metrics:
        METRICS.unregister(name)


class Cache:
    """A stand-in for a run's cache: counts what was computed, by key."""

    def __init__(self):
        self.values, self.calls = {}, []

    def __call__(self, key, compute, stage=None, keep=True):
        if key not in self.values:
            self.calls.append((key, stage, keep))
            self.values[key] = compute()
        return self.values[key]


def context(cache) -> MeasureContext:
    return MeasureContext(run_id="r", loaded=None, stance=None, task=None, method=None, anatomy=None, before={},
                          frozen_digests={}, framing=None, recipe=None, trace=None, examples=0,
                          model_of=lambda: None, cached=cache, base_cache={})


# -- the registry ------------------------------------------------------------------------------
def test_the_paired_metrics_are_those_the_registered_measurements_give_units_for():
    assert paired_metrics()[:12] == PAIRED_BEFORE + ["judge:<judge name>"]  # a measurement added later: after
    assert paired_metrics(prefixes=False)[:11] == PAIRED_BEFORE and "judge:" not in paired_metrics(prefixes=False)
    assert {m: producer_of(m).name for m in ("behavior_shift", "kl", "ece", "forgetting", "intruders",
                                             "judge:embedding", "step_time")} == {
        "behavior_shift": "behavior", "kl": "behavior", "ece": "calibration", "forgetting": "forgetting",
        "intruders": "geometry", "judge:embedding": "judged", "step_time": "step_time"}


def test_an_unknown_paired_metric_is_refused_with_the_valid_names():
    with pytest.raises(HarnessError) as err:
        producer_of("perplexity")
    assert str(err.value) == ("no per-unit values for metric 'perplexity'; paired comparisons take "
                              + ", ".join(paired_metrics()))
    assert str(err.value).startswith("no per-unit values for metric 'perplexity'; paired comparisons take "
                                     + ", ".join(PAIRED_BEFORE) + ", judge:<judge name>")
    with pytest.raises(HarnessError, match="'judge:'; paired comparisons take"):
        producer_of("judge:")  # a prefix alone names no judge


def test_a_registered_measurement_declares_its_metrics_and_becomes_paired(registered):
    spec = registered(MeasurementSpec(
        "probe_count", lambda ctx: {"n": 3}, "three units", metrics=(Metric("probe_count", LOWER, "probes"),),
        paired={"probe_count": lambda ctx, metric: ("probe", [1.0, 2.0, 3.0])}))
    assert direction_of("lora.probe_count") == LOWER
    assert paired_metrics()[-1] == "probe_count" and producer_of("probe_count") is spec
    with pytest.raises(HarnessError, match="check_less: no metric 'probe_cont' to compare. Did you mean: probe_count?"):
        check_less(object(), object(), metric="probe_cont")  # the checks read the registry when called


def test_a_paired_metric_has_one_producer_and_metrics_are_typed(registered):
    with pytest.raises(ValueError, match=r"measurement 'other_kl': paired metric\(s\) kl already come from "
                                         r"measurement 'behavior'"):
        registered(MeasurementSpec("other_kl", lambda ctx: 0, "x", paired={"kl": lambda ctx, m: ("probe", [])}))
    assert "other_kl" not in MEASUREMENTS
    with pytest.raises(ValueError, match=r"measurement 'rank' is already registered \(computed by "
                                         r"stance_harness.measurements.rank.rank\)"):
        registered(MeasurementSpec("rank", lambda ctx: 0, "another rank"))
    with pytest.raises(ValueError, match="measurement 'shown': shows must be 'all' or 'last', not 'first'"):
        MeasurementSpec("shown", lambda ctx: 0, "x", shows="first")
    with pytest.raises(TypeError, match=r"measurement 'typed': metrics must be Metric\(name, direction"):
        MeasurementSpec("typed", lambda ctx: 0, "x", metrics=(("typed", LOWER, "a tuple"),))
    with pytest.raises(TypeError, match="register_measurement takes a MeasurementSpec, got dict"):
        register_measurement({"name": "x"})


def test_the_checks_a_measurement_names_are_exported_by_stance_harness():
    found = measurement_checks()
    assert found["check_ece"] == "calibration" and found["check_behavior_shift"] == "behavior"
    for check in found:
        assert callable(getattr(stance_harness, check))
        assert callable(getattr(stance_harness, check.replace("check_", "assert_", 1)))
    with pytest.raises(TypeError, match=r"measurement 'named': checks are the names of its check helpers "
                                        r"\(check_X, in stance_harness.checks\), got 'check_x'"):
        MeasurementSpec("named", lambda ctx: 0, "x", checks="check_x")


def test_measure_computes_once_per_key_under_its_stage_and_checks_params_first(registered):
    computed = []

    def check(ctx, n=1):
        if n < 1:
            raise HarnessError(f"counted: n must be at least 1, got {n}")

    registered(MeasurementSpec("counted", lambda ctx, n=1: computed.append(n) or n * 2, "doubles n",
                               key=lambda ctx, n=1: f"counted:{n}", stage=lambda n=1: "counting", check_params=check))
    cache = Cache()
    ctx = context(cache)
    assert measure(ctx, "counted", n=2) == 4 and ctx.measure("counted", n=2) == 4 and computed == [2]
    assert ctx.measure("counted") == 2 and computed == [2, 1]
    assert cache.calls == [("counted:2", "counting", True), ("counted:1", "counting", True)]
    with pytest.raises(HarnessError, match="counted: n must be at least 1, got 0"):
        ctx.measure("counted", n=0)
    assert computed == [2, 1]
    with pytest.raises(HarnessError, match="unknown measurement 'countd'. Did you mean: counted"):
        ctx.measure("countd")


def test_the_context_is_narrow():
    names = {f.name for f in dataclasses.fields(MeasureContext)}
    assert not names & {"sinks", "services", "measurements", "request", "origin", "name", "train_seconds"}
    assert not any(hasattr(MeasureContext, n) for n in ("summary", "report_measurements", "release_model"))


# -- the run: measure, its accessors and its services ----------------------------------------------
class Store:
    def __init__(self, model):
        self.model, self.saved, self.rebuilt = model, [], []

    def save_measurements(self, run):
        self.saved.append(sorted(run.measurements))

    def rebuild(self, run):
        def make():
            self.rebuilt.append(run.run_id)
            return self.model
        return make


class Residency:
    def __init__(self):
        self.touched = []

    def touch(self, run):
        self.touched.append(run.run_id)


@pytest.fixture(scope="module")
def lora(quick_run):
    return quick_run("lora")


def test_the_named_accessors_are_measure(lora):
    run = dataclasses.replace(lora, services=None)
    assert run.behavior("kl") is run.measure("behavior", metric="kl")
    assert run.counts is run.measure("counts") and run.counts["trainable"] == sum(t.numel() for t in run.before.values())
    assert run.unit_values("loglik_margin") == ("probe", [r["delta"] for r in run.behavior()["per_probe"]])
    with pytest.raises(HarnessError, match="no behaviour metric 'kll'"):
        run.measure("behavior", metric="kll")


def test_the_services_keep_measurements_track_use_rebuild_and_report_progress(lora, monkeypatch):
    store, residency, lines = Store(lora.model), Residency(), []
    run = dataclasses.replace(lora, run_id="served", services=RunServices(store=store, residency=residency,
                                                                          progress=lines.append))
    monkeypatch.setattr(run_module, "SLOW_MEASUREMENT", 0.0)  # every measurement counts as slow
    _ = run.counts
    assert store.saved == [["counts"]] and residency.touched == ["served"]
    assert len(lines) == 1 and lines[0].startswith("measured counts on served in ")
    assert run.release_model() > 0 and not run.model_resident
    assert run.model is lora.model and store.rebuilt == ["served"]
    run.deltas()  # kept measurements are saved; in-memory ones (delta_rows) are not
    assert store.saved[-1] == ["counts", "deltas:effective"]


def test_a_run_alone_measures_in_memory_and_cannot_rebuild(lora):
    run = dataclasses.replace(lora, run_id="alone", services=None)
    assert isinstance(run.services, RunServices) and run.rebuild is None and run.sinks == []
    assert run.release_model() == 0 and run.model_resident
    run.behavior("kl")  # nothing to save it to, nothing raised
    with pytest.raises(TypeError, match="Run.attach takes a RunServices, got dict"):
        run.attach({"store": None})
    sink = []
    assert run.attach(RunServices(sinks=[sink.append])) is run and run.sinks == [sink.append]


def test_the_report_keeps_each_measurements_view_under_its_renderer_key(lora):
    run = dataclasses.replace(lora, services=None)
    run.behavior("loglik_margin"), run.behavior("kl"), run.calibration(), run.calibration(10)
    run.rank(0.5), run.rank(0.9), run.counts
    view = run.report_measurements()
    assert set(view) == {"behavior", "calibration", "rank"}
    assert set(view["behavior"]) == {"loglik_margin", "kl"} and "items" not in view["calibration"]
    assert view["calibration"]["adapted"] == run.calibration()["adapted"]  # 15 bins, not the 10 asked after
    assert view["rank"]["energy"] == 0.9  # the energy last asked for
    run.rank(0.5)
    assert run.report_measurements()["rank"]["energy"] == 0.5


# -- the report's renderers, by measurement key ----------------------------------------------------
def test_every_renderer_draws_a_registered_measurement():
    keys = {spec.renderer for _, spec in MEASUREMENTS.items() if spec.renderer is not None}
    assert set(sections.RENDERERS) | set(sections.OWN_SECTIONS) <= keys  # the rest get one row of their numbers
    assert list(sections.RENDERERS) == ["behavior", "judged", "calibration", "forgetting", "localization",
                                       "dose_response", "geometry", "rank"]


def test_a_measurement_without_a_renderer_gets_one_row_of_its_numbers():
    tables = sections.measurement_tables({"reply_length": {"base": 10.0, "adapted": 12.5, "per_probe": [1],
                                                           "effect": {"mean": 2.5, "low": 1.0, "high": 4.0, "n": 4}},
                                          "replies": {"rows": []}})
    assert tables == [("reply length", [{"base": 10.0, "adapted": 12.5, "effect mean": 2.5, "effect low": 1.0,
                                         "effect high": 4.0, "effect n": 4}])]


def test_a_renderer_key_is_registered_once():
    with pytest.raises(ValueError, match="a renderer for measurement 'rank' is already registered"):
        sections.renders("rank")(lambda value, measurements: [])
