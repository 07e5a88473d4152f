"""Instruments: NaN injected at a chosen step is caught there, in the right parameter, under
each policy; per-layer grad norms; throughput and memory; stuck analyses time out."""

import math
import threading
import time
from dataclasses import dataclass

import pytest

from conftest import detached
import torch

from stance_harness import HypothesisFailed, assert_gradients_stable
from stance_harness.core.stages import StageTimeout, run_stage
from stance_harness.runs.instruments import InstrumentConfig
from stance_harness.runs.services import RunServices
from stance_harness.runs.methods import METHODS
from stance_harness.runs.methods.base import MethodConfig, register_method
from stance_harness.runs.methods.full import FullFineTuning
from stance_harness.core.errors import HarnessError
from stance_harness.runs.recipe import Recipe

from direct_training import train_direct

RECIPE = Recipe.of(learning_rate=1e-3, num_train_epochs=1, per_device_train_batch_size=2, seed=0)
TARGET = "model.layers.20.self_attn.v_proj.weight"  # canonical L20.v_proj.weight


@dataclass(frozen=True)
class PoisonConfig(MethodConfig):
    step: int = 2
    what: str = "gradient"  # gradient, loss, weight


class Poison(FullFineTuning):
    """Full fine-tuning that turns one value non-finite at a chosen step (via the extension points)."""

    name = "test-poison"
    config_cls = PoisonConfig

    def setup(self, ctx):
        param = dict(ctx.model.named_parameters())[TARGET]
        param.register_hook(lambda g: g * math.nan if ctx.state.get("step") == ctx.config.step else g)

    def schedule(self, ctx, step):
        ctx.state["step"] = step if ctx.config.what == "gradient" else None
        if ctx.config.what == "weight" and step == ctx.config.step:
            with torch.no_grad():
                dict(ctx.model.named_parameters())[TARGET][0, 0] = math.inf
        return None

    def extra_loss(self, ctx, step):
        return torch.tensor(math.nan) if ctx.config.what == "loss" and step == ctx.config.step else None


@pytest.fixture(scope="module")
def poisoned(harness):
    register_method(Poison)

    def make(policy, what="gradient", step=2):
        return harness.train("test-poison", examples=10, recipe=RECIPE, instruments={"nonfinite": policy},
                             step=step, what=what)

    yield make
    METHODS.unregister("test-poison")


def test_halt_stops_at_the_step_with_the_parameter_and_keeps_the_trace(poisoned):
    run = poisoned("halt")
    assert run.trace.nonfinite[0] == {"step": 2, "what": "gradient", "parameter": "L20.v_proj.weight"}
    assert run.trace.halted_at == 2 and run.trace.halt_reason == "non-finite gradient in L20.v_proj.weight"
    assert len(run.trace.loss) == 3 and math.isnan(run.trace.grad_norm[2])
    assert math.isnan(run.trace.layer_grad_norm["L20"][2]) and math.isfinite(run.trace.layer_grad_norm["L19"][2])
    # the poisoned step was not applied: the weights stay finite and the analyses are clean
    assert all(r.moments.nonfinite == 0 for r in run.adapter_deltas)


def test_skip_step_skips_only_the_bad_step(poisoned):
    run = poisoned("skip_step")
    assert run.trace.skipped_steps == [2] and run.trace.halted_at is None
    assert len(run.trace.loss) == 5 and len(run.trace.nonfinite) == 1
    assert all(r.moments.nonfinite == 0 for r in run.adapter_deltas)


def test_record_goes_on_and_analyses_of_nan_weights_complete_and_say_so(poisoned):
    run = poisoned("record")
    assert run.trace.halted_at is None and len(run.trace.loss) == 5
    events = run.trace.nonfinite
    assert events[0] == {"step": 2, "what": "gradient", "parameter": "L20.v_proj.weight"}
    assert {"step": 2, "what": "weight", "parameter": "L20.v_proj.weight"} in events  # made by step 2's update
    rows = {r["layer"]: r for r in run.layer_table()}
    assert rows["L20"]["nonfinite"] > 0
    assert run.summary()["layers"]["effective"]  # the report's analysis completes


@pytest.mark.parametrize("what,step,expected", [
    ("loss", 1, {"step": 1, "what": "loss", "parameter": None}),
    ("weight", 3, {"step": 2, "what": "weight", "parameter": "L20.v_proj.weight"}),  # seen as step 3 starts
])
def test_loss_and_weight_are_caught_too(poisoned, what, step, expected):
    run = poisoned("halt", what, step)
    assert run.trace.nonfinite[0] == expected


def test_assert_gradients_stable_fails_naming_step_parameter_and_norms(poisoned):
    with pytest.raises(HypothesisFailed) as err:
        assert_gradients_stable(poisoned("halt"))
    message = str(err.value)
    assert message.startswith("assert_gradients_stable: non-finite gradient at step 2 in L20.v_proj.weight")
    assert "the run halted at step 2" in message and "policy halt" in message
    lines = message.splitlines()
    assert lines[1].split()[:4] == ["step", "loss", "grad", "norm"]
    assert [line.split()[0] for line in lines[3:]] == ["0", "1", "2"]
    assert lines[5].rstrip().endswith("<- first non-finite")


def test_assert_gradients_stable_passes_on_a_clean_run(quick_run):
    result = assert_gradients_stable(quick_run("full"), max_grad_norm=1e6, max_spike=1e6)
    assert result.passed and result.summary.startswith("2 steps, all finite; max grad norm")


def test_assert_gradients_stable_bounds_and_spikes(quick_run):
    run = quick_run("full")
    peak = max(run.trace.grad_norm)
    with pytest.raises(HypothesisFailed, match=rf"exceeds max_grad_norm {peak / 2:g}"):
        assert_gradients_stable(run, max_grad_norm=peak / 2)
    ratio = run.trace.grad_norm[1] / run.trace.grad_norm[0]
    if ratio > 1:
        with pytest.raises(HypothesisFailed, match="grad norm spike at step 1"):
            assert_gradients_stable(run, max_spike=ratio * 0.99)
    else:
        assert assert_gradients_stable(run, max_spike=1.0).passed


def test_per_layer_grad_norms_compose_the_global_norm(quick_run):
    trace = quick_run("full").trace
    for step, total in enumerate(trace.grad_norm):
        layers = [norms[step] for norms in trace.layer_grad_norm.values()]
        assert math.sqrt(sum(n * n for n in layers)) == pytest.approx(total, rel=1e-4)
    assert set(trace.layer_grad_norm) == {"embed", "final_norm"} | {f"L{i}" for i in range(24)}


def test_clipping_matches_torch(tiny_qwen2, stance):
    from stance_harness.runs.instruments import StepProbe

    model = tiny_qwen2.fresh()
    params = [(n, p) for n, p in model.named_parameters()]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    reference = [p.grad.clone() for _, p in params]
    expected_total = torch.nn.utils.clip_grad_norm_([p for _, p in params], 0.5)
    clipped = [p.grad.clone() for _, p in params]
    for (_, p), g in zip(params, reference):
        p.grad = g.clone()
    probe = StepProbe(params, ["x"] * len(params))
    total = probe.clip_(probe.grad_norms(), 0.5)
    assert total.item() == pytest.approx(expected_total.item(), rel=1e-5)
    for (_, p), g in zip(params, clipped):
        torch.testing.assert_close(p.grad, g)


def test_throughput_and_peak_memory_are_traced(quick_run):
    run = quick_run("full")
    summary = run.trace.summary()
    assert summary["steps"] == 2 and summary["examples_per_s"] > 0 and summary["tokens_per_s"] > summary["examples_per_s"]
    assert run.trace.examples == [5, 5] and all(t > 0 for t in run.trace.tokens)
    assert summary["peak_memory_kind"] == "process_peak_rss" and summary["peak_memory_bytes"] > 50 * 2**20


def test_instrument_options_are_validated():
    with pytest.raises(HarnessError, match="nonfinite must be one of halt, skip_step, record"):
        InstrumentConfig.of({"nonfinite": "ignore"})
    with pytest.raises(HarnessError, match="unknown option 'policy'"):
        InstrumentConfig.of({"policy": "halt"})


# -- no hang -------------------------------------------------------------------------------
def test_a_stuck_stage_times_out_naming_the_stage():
    stuck = threading.Event()
    started = time.perf_counter()
    with pytest.raises(StageTimeout, match="analysis stage 'effective_deltas' did not finish within 0.3s"):
        run_stage("effective_deltas", stuck.wait, timeout=0.3)
    assert time.perf_counter() - started < 3
    stuck.set()


def test_stage_errors_and_values_pass_through():
    assert run_stage("ok", lambda: 42, timeout=5) == 42
    with pytest.raises(ZeroDivisionError):
        run_stage("boom", lambda: 1 / 0, timeout=5)
    assert run_stage("no limit", lambda: "x", timeout=0) == "x"


def test_a_run_whose_analysis_hangs_fails_fast_and_its_summary_says_why(quick_run):
    import copy

    run = quick_run("lora")
    release = threading.Event()

    class Stuck(type(run.method)):
        def effective_deltas(self, model, before, anatomy):
            release.wait()
            return []

    stuck = detached(run, method=Stuck(), model=copy.deepcopy(run.model), services=RunServices(analysis_timeout=0.5))
    started = time.perf_counter()
    with pytest.raises(StageTimeout, match="'effective_deltas'"):
        stuck.layer_table()
    summary = stuck.summary()
    assert "analysis stage 'effective_deltas' did not finish" in summary["analysis_error"]
    assert time.perf_counter() - started < 5
    release.set()


# -- gradient interference -----------------------------------------------------------------
def toy(sign_b: float):
    """y = (A + B) x with equal-size groups; B's gradient is `sign_b` times A's."""
    from stance_harness.runs.instruments import output_change_cosine

    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(3, 4))
    x = torch.randn(5, 4)
    grad = torch.randn(3, 4)
    a.grad, b.grad = grad.clone(), sign_b * grad.clone()
    before = (a.detach().clone(), b.detach().clone())
    cosine, reason = output_change_cosine(lambda: x @ (a + b).T, [a], [b])
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])  # restored bit-exactly
    return cosine, reason


def test_interference_by_hand():
    assert toy(1.0)[0] == pytest.approx(1.0, abs=1e-4)   # same push on the outputs
    assert toy(-1.0)[0] == pytest.approx(-1.0, abs=1e-4)  # opposite pushes


def test_interference_gives_a_reason_not_nan_without_a_gradient():
    from stance_harness.runs.instruments import output_change_cosine

    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    a.grad = torch.ones(2)
    assert output_change_cosine(lambda: a + b, [a], [b]) == (None, "the second group has no gradient at this step")


@pytest.fixture(scope="module")
def hybrid_with_interference(harness):
    def make(**options):
        return harness.train("hybrid", examples=10, recipe=RECIPE, instruments={"interference": ["lora", "norm"]},
                             **options)
    return make


def test_hybrid_interference_is_defined_and_averaged_per_epoch(hybrid_with_interference):
    run = hybrid_with_interference(freeze_lora_steps=0)
    entries = run.trace.interference
    assert [e["step"] for e in entries] == list(range(5))
    # defined at every step, step 0 included: A's gradient is zero there, but B's is not
    values = [e["cosine"] for e in entries]
    assert all(v is not None and -1 <= v <= 1 for v in values)
    (epoch,) = run.trace.summary()["interference_by_epoch"]
    assert epoch["mean_cosine"] == pytest.approx(sum(values) / len(values))
    assert (epoch["steps"], epoch["undefined_steps"]) == (5, 0)


def test_interference_under_alternation_says_why_steps_are_undefined(hybrid_with_interference):
    run = hybrid_with_interference(freeze_lora_steps=2)
    reasons = [e["reason"] for e in run.trace.interference[:2]]
    assert reasons == ["the first group has no gradient at this step"] * 2  # LoRA frozen in warm-up


def test_interference_needs_groups_the_method_has(tiny_qwen2, stance):
    config = METHODS.get("full").config_cls()
    with pytest.raises(HarnessError, match="interference group 'lora' is not one of this method's parameter groups: all"):
        train_direct(tiny_qwen2, stance, "full", config, RECIPE, examples=10, instruments={"interference": ["lora", "norm"]})


def test_a_failed_stage_fails_at_once_afterwards(quick_run):
    import copy

    run = quick_run("lora")
    release = threading.Event()

    class Stuck(type(run.method)):
        def effective_deltas(self, model, before, anatomy):
            release.wait()

    stuck = detached(run, method=Stuck(), model=copy.deepcopy(run.model), services=RunServices(analysis_timeout=0.3))
    with pytest.raises(StageTimeout):
        stuck.layer_table()
    started = time.perf_counter()
    with pytest.raises(StageTimeout):
        stuck.layer_table()  # remembered: no second wait
    assert time.perf_counter() - started < 0.1
    release.set()


def test_record_policy_reports_each_weight_once(poisoned):
    weight_events = [e for e in poisoned("record").trace.nonfinite if e["what"] == "weight"]
    assert len({e["parameter"] for e in weight_events}) == len(weight_events)


def test_gradients_stable_rejects_bad_bounds(quick_run):
    with pytest.raises(ValueError, match="need window >= 1"):
        assert_gradients_stable(quick_run("full"), max_spike=2.0, window=0)


def test_instruments_must_be_a_dict():
    with pytest.raises(HarnessError, match="instruments must be a dict"):
        InstrumentConfig.of("record")
    with pytest.raises(HarnessError, match="Did you mean: nonfinite"):
        InstrumentConfig.of({"nonfinit": "record"})


def test_interference_every_measures_only_every_nth_step(harness):
    run = harness.train("hybrid", examples=10, recipe=RECIPE, freeze_lora_steps=0,
                        instruments={"interference": ["lora", "norm"], "interference_every": 2})
    assert [e["step"] for e in run.trace.interference] == [0, 2, 4]
    (epoch,) = run.trace.summary()["interference_by_epoch"]
    assert epoch["steps"] == 3


def test_interference_every_must_be_a_positive_whole_number():
    from stance_harness.runs.instruments import InstrumentConfig

    for bad in (0, -1):
        with pytest.raises(HarnessError, match="interference_every must be a whole number of steps >= 1, got -?[01]"):
            InstrumentConfig.of({"interference": ["lora", "norm"], "interference_every": bad})
    with pytest.raises(HarnessError, match="interference_every must be an integer, got 1.5"):
        InstrumentConfig.of({"interference": ["lora", "norm"], "interference_every": 1.5})
    assert InstrumentConfig.of({"interference": ["lora", "norm"], "interference_every": 4}).interference_every == 4


def test_interference_time_is_not_the_steps_time(harness, monkeypatch):
    """A step's time leaves out the instrument's forward passes: a slow instrument leaves it unchanged."""
    import time as time_module

    import stance_harness.runs.training as training

    measured = training._trace_interference

    def slow(*args, **kwargs):
        measured(*args, **kwargs)
        time_module.sleep(0.5)

    monkeypatch.setattr(training, "_trace_interference", slow)
    run = harness.train("hybrid", examples=10, recipe=RECIPE, freeze_lora_steps=0,
                        instruments={"interference": ["lora", "norm"], "interference_every": 3})
    assert [e["step"] for e in run.trace.interference] == [0, 3]
    assert max(run.trace.step_time) < 0.5, run.trace.step_time
