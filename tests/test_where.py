"""Where the behaviour lives (stance_harness.where): patching restores bit-exactly, localisation's ends
are exact, dose-response meets the run's own figures at λ = 0 and 1, the geometry of real runs
(intruders from LoRA factors against the general route, CKA of untouched layers), the helpers'
verdicts and failure messages, and the report's tables."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stance_harness import (HarnessError, HypothesisFailed, assert_behavior_localized, assert_few_intruders,
                     assert_layer_profiles_agree, assert_negation_reverses, check_behavior_localized,
                     check_few_intruders, check_layer_profiles_agree, check_negation_reverses)
from stance_harness import where
from stance_harness.analysis.digest import tensor_digest
from stance_harness.runs.methods.base import Method
from stance_harness.report.sections import where_tables

SURGICAL_LAYERS = [2, 20]  # one early, one late layer of tiny-qwen2's 24


@pytest.fixture(scope="module")
def full(quick_run):
    return quick_run("full")


@pytest.fixture(scope="module")
def surgical(quick_run):
    return quick_run("surgical-lora", layers=SURGICAL_LAYERS, target_modules=["qv"], r=4, alpha=8)


def _digests(model) -> dict:
    return {n: tensor_digest(p) for n, p in model.named_parameters()}


# -- patching ------------------------------------------------------------------------------------

def test_patching_reverts_scales_and_restores_bit_exactly(full):
    model = full.model
    params = dict(model.named_parameters())
    before = _digests(model)
    name = next(n for n in full.before if ".layers.3." in n and n.endswith("q_proj.weight"))
    kept = next(n for n in full.before if ".layers.5." in n and n.endswith("q_proj.weight"))
    trained = params[name].detach().clone()
    with where.patched(full, where.selection(full, [5])) as patched_model:
        assert patched_model is model
        assert tensor_digest(params[name]) == tensor_digest(full.before[name])  # reverted to its start
        assert tensor_digest(params[kept]) == before[kept]  # kept as trained
    assert _digests(model) == before
    with where.patched(full, dose=0.5):
        expected = full.before[name] + 0.5 * (trained - full.before[name])
        assert (params[name] - expected).abs().max() <= 1e-7
    with pytest.raises(RuntimeError, match="inside"):
        with where.patched(full, dose=-1.0):
            raise RuntimeError("a failure inside the patch")
    assert _digests(model) == before  # restored after a failure too


def test_lora_dose_scales_the_adapters_delta_exactly(surgical):
    from stance_harness.runs.methods.lora import _lora_modules

    modules = list(_lora_modules(surgical.model))
    assert len(modules) == 4  # q and v in two layers
    deltas = [m.get_delta_weight("default").detach().clone() for _, m, _, _ in modules]
    before = _digests(surgical.model)
    with where.patched(surgical, dose=0.5):
        for (_, module, _, _), delta in zip(modules, deltas):
            assert (module.get_delta_weight("default") - 0.5 * delta).abs().max() <= 1e-7 * delta.abs().max()
    assert _digests(surgical.model) == before


# -- localisation ----------------------------------------------------------------------------------

def test_keeping_all_retains_exactly_one_and_keeping_none_exactly_zero(full):
    ends = full.localization_ends()
    assert ends["full"] == [p["adapted"] for p in full.behavior()["per_probe"]]  # the run's own forward pass
    assert max(abs(n - b) for n, b in zip(ends["none"], ends["base"])) < 1e-9  # reverted: the base
    assert full.localized()["retained"] == 1.0
    assert full.localized(layers=[])["retained"] == 0.0


def test_localization_rows_of_a_surgical_run(surgical):
    found = surgical.localization()
    rows = {(r["by"], r["set"]): r for r in found["rows"]}
    assert [r["set"] for r in found["rows"] if r["by"] == "third"] == ["early", "middle", "late"]
    assert rows[("third", "middle")]["retained"] == 0.0  # no adapter there
    assert rows[("kind", "attention")]["retained"] == 1.0 and rows[("kind", "mlp")]["retained"] == 0.0
    assert rows[("layer", "L2")]["shift"] == rows[("third", "early")]["shift"]  # the same units kept
    assert all(rows[("layer", f"L{i}")]["retained"] == 0.0 for i in range(24) if i not in SURGICAL_LAYERS)
    assert sorted(r["set"] for r in found["rows"] if r["by"] == "adapter") == [
        "L2.q_proj", "L2.v_proj", "L20.q_proj", "L20.v_proj"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sets(st.integers(0, 23)))
def test_retained_fractions_of_disjoint_layer_sets(surgical, layers):
    """As retained_fraction documents: r(S) + r(T) = 1 − I/(full − none) for S, T splitting the
    layers, I = shift(S ∪ T) − shift(S) − shift(T) + shift(∅); a set holding none of the change
    retains exactly 0, one holding all of it exactly 1."""
    rest = sorted(set(range(24)) - layers)
    s, t, union = surgical.localized(sorted(layers)), surgical.localized(rest), surgical.localized(list(range(24)))
    loc = surgical.localization()
    full, none = loc["full"], loc["none"]
    interaction = union["shift"] - s["shift"] - t["shift"] + none
    assert s["retained"] + t["retained"] == pytest.approx(1 - interaction / (full - none), abs=1e-9)
    changed = set(SURGICAL_LAYERS)
    if not layers & changed:
        assert s["retained"] == 0.0 and t["retained"] == 1.0
    if changed <= layers:
        assert s["retained"] == 1.0 and t["retained"] == 0.0


def test_assert_behavior_localized_passes_and_fails_with_its_table(full):
    result = assert_behavior_localized(full, layers=None, min_retained=0.8)
    assert result.verdict == "supported" and result.metrics["retained"] == 1.0
    failing = check_behavior_localized(full, layers=[], min_retained=0.8)
    assert failing.verdict == "refuted" and not failing.passed
    assert "keeping only layers [] retains 0.0% of the shift" in failing.summary and "required 80%" in failing.summary
    with pytest.raises(HypothesisFailed, match="assert_behavior_localized: .*refuted"):
        assert_behavior_localized(full, layers=[], min_retained=0.8)


def test_localization_rejects_bad_input(full):
    with pytest.raises(HarnessError, match="min_retained"):
        check_behavior_localized(full, layers=[1], min_retained="most")
    with pytest.raises(HarnessError, match="99"):
        check_behavior_localized(full, layers=[99])
    with pytest.raises(HarnessError, match="kind"):
        full.localized(kinds=["no_such_kind"])


# -- dose-response ------------------------------------------------------------------------------

def test_dose_response_meets_the_base_at_zero_and_the_run_at_one(full):
    found = full.dose_response()
    by_dose = {r["dose"]: r for r in found["rows"]}
    assert sorted(by_dose) == sorted(where.DOSES)
    assert abs(by_dose[0.0]["shift"]) < 1e-9 and abs(by_dose[0.0]["forgetting"]) < 1e-9
    assert by_dose[1.0]["shift"] == pytest.approx(full.behavior()["effect"]["mean"], abs=1e-12)
    assert by_dose[1.0]["forgetting"] == pytest.approx(full.forgetting()["relative_increase"], rel=1e-9, abs=1e-12)
    shifts = [by_dose[d]["shift"] for d in (0.0, 0.25, 0.5, 1.0)]
    assert shifts == sorted(shifts) or shifts == sorted(shifts, reverse=True)  # monotone near the base


def test_assert_negation_reverses_on_a_run_and_its_failure_message(full):
    result = check_negation_reverses(full)
    negated = {r["dose"]: r for r in full.dose_response()["rows"]}[-1.0]
    assert result.metrics["estimate"] == pytest.approx(negated["shift"], abs=1e-12)
    assert result.passed == (result.verdict == "supported")
    fake = _Fake(dose_rows=[{"dose": d, "shift": 0.2, "low": 0.1, "high": 0.3, "forgetting": 0.0,
                             "per_probe": [0.2 + 0.01 * i for i in range(8)]} for d in (-1.0, 1.0)])
    failing = check_negation_reverses(fake)
    assert failing.verdict == "refuted"
    assert "the task vector subtracted shifts the loglik margin by +0.235" in failing.summary
    with pytest.raises(HypothesisFailed, match="refuted"):
        assert_negation_reverses(fake)


# -- geometry ------------------------------------------------------------------------------------

def test_geometry_of_a_full_run(full):
    found = full.geometry()
    assert found["top_k"] == 10 and found["epsilon"] == 0.5
    assert len(found["intruders"]) == 24 * 7 and len(found["magnitude_direction"]) == 24 * 7
    assert all(0 <= r["count"] <= r["checked"] <= 10 for r in found["intruders"])
    assert all(0 <= r["cka"] <= 1 + 1e-12 for r in found["layers"])
    assert set(found["correlation"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    unit, values = full.unit_values("intruders")
    assert unit == "layer" and len(values) == 24
    result = check_few_intruders(full)
    assert result.passed == (result.metrics["per_matrix"] <= 1.0)


def test_lora_intruders_from_factors_match_the_general_route(surgical):
    found = surgical.geometry()
    general = dict(Method.intruders(surgical.method, surgical.model, surgical.before, surgical.anatomy))
    factored = dict(surgical.method.intruders(surgical.model, surgical.before, surgical.anatomy))
    assert sorted(factored) == sorted(general) and len(factored) == 4
    assert {n: r.count for n, r in factored.items()} == {n: r.count for n, r in general.items()}
    assert sorted(r["matrix"] for r in found["magnitude_direction"]) == [
        "L2.q_proj", "L2.v_proj", "L20.q_proj", "L20.v_proj"]
    cka = {r["layer"]: r["cka"] for r in found["layers"]}
    assert all(cka[f"L{i}"] == pytest.approx(1.0, abs=1e-9) for i in range(2))  # below the first adapter
    assert cka["L2"] < 1.0


def test_assert_few_intruders_failure_message():
    fake = _Fake(geometry={"top_k": 10, "epsilon": 0.5, "intruders": [
        {"matrix": "L0.q_proj", "layer": 0, "kind": "q_proj", "count": 4, "checked": 10},
        {"matrix": "L0.v_proj", "layer": 0, "kind": "v_proj", "count": 0, "checked": 10}]})
    result = check_few_intruders(fake, max_per_matrix=1.0)
    assert not result.passed and result.rows[0] == ["L0.q_proj", 4, 10]
    assert "4 intruder dimensions over 2 changed block matrices (2 per matrix" in result.summary
    with pytest.raises(HypothesisFailed, match="allowed 1 per matrix"):
        assert_few_intruders(fake, max_per_matrix=1.0)
    assert assert_few_intruders(fake, max_per_matrix=2.0).passed
    with pytest.raises(HarnessError, match="max_per_matrix"):
        check_few_intruders(fake, max_per_matrix=-1)


def test_layer_profiles_agree_with_themselves_and_not_with_their_reverse(full):
    same_profile = _Fake(deltas=full.deltas(), label="copy")  # a run against itself is refused, not measured
    assert assert_layer_profiles_agree(full, same_profile).metrics["rho"] == pytest.approx(1.0)
    with pytest.raises(HarnessError, match="`a` and `b` are the same run"):
        assert_layer_profiles_agree(full, full)
    reversed_rows = [dataclasses.replace(r, layer=23 - r.layer) if r.layer is not None else r for r in full.deltas()]
    mirror = _Fake(deltas=reversed_rows, label="mirror")
    result = check_layer_profiles_agree(full, mirror, min_rho=0.0)
    assert result.verdict in ("refuted", "inconclusive") and not result.passed
    assert "per-layer change profiles rank-correlate rho = " in result.summary
    with pytest.raises(HarnessError, match="min_rho"):
        check_layer_profiles_agree(full, same_profile, min_rho=1.5)


# -- report --------------------------------------------------------------------------------------

def test_the_report_keeps_summaries_and_draws_tables(full, surgical):
    surgical.localization()
    surgical.geometry()
    full.dose_response()
    measurements = {**surgical.summary()["measurements"], "dose_response": full.summary()["measurements"]["dose_response"]}
    assert {"localization", "dose_response", "geometry"} <= set(measurements)
    for key in ("localization", "dose_response", "geometry"):
        assert "per_probe" not in str(measurements[key])  # per-probe values stay in the run store
    tables = dict(where_tables(measurements))
    assert any(t.startswith("where the behaviour lives") for t in tables)
    assert [r["λ"] for r in next(rows for t, rows in tables.items() if t.startswith("dose-response"))] == list(where.DOSES)
    layer_table = next(rows for title, rows in tables.items() if title.startswith("where the weights"))
    assert len(layer_table) == 24 and layer_table[2]["retained"] == surgical.localized([2])["retained"]
    assert layer_table[5]["retained"] == 0.0 and layer_table[5]["change_share"] == 0.0


class _Fake:
    """A stand-in run with fixed measurements, for the helpers' failure messages."""

    def __init__(self, dose_rows=None, geometry=None, deltas=None, label="fake"):
        self.label, self.run_id, self.sinks = label, label, []
        self._dose, self._geometry, self._deltas = dose_rows, geometry, deltas

    def dose_response(self):
        return {"rows": self._dose}

    def behavior(self, metric="loglik_margin"):
        return {"per_probe": [{"base": 0.0} for _ in self._dose[0]["per_probe"]]}

    def geometry(self):
        return self._geometry

    def deltas(self, view="effective"):
        return self._deltas
