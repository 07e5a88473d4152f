"""Selective unfreezing of the critical layers, against full fine-tuning and LoRA (seed 000).

Hypothesis (seed 000): full fine-tuning of Qwen2-0.5B put its change in layers 13 and 15 of 24.
If those layers matter by their relative depth, the same depth in another model (Phi-2's 17 and
20 of 32) should carry the stance. Freezing every weight but q_proj + v_proj (+ biases) of those
layers should then force the change there. With 5 examples the seed found instead:

- selective unfreezing went non-finite (two layers, and one layer with a lower lr and clip 0.5);
- full fine-tuning shifted behaviour and trained stably;
- LoRA over every layer (rank 8) and surgical LoRA on the two layers (rank 32) trained stably
  but did not shift behaviour;
- "only full fine-tuning works", and concentrated training needs 20-50+ examples to be stable.

How it is measured, on the `--model` base (default tiny-qwen2, 24 layers):

- the critical layers are Qwen2-0.5B's 13 and 15 mapped by relative depth
  (`anatomy.analog([13, 15], depth=24)`); the suite records which layers that is;
- five approaches train the curious-uncertainty stance on 5 examples with one shared recipe:
  full FT, distributed LoRA (q+v, every layer), surgical LoRA (q+v, the critical layers),
  selective unfreezing of the critical layers (kinds "qv", biases), and of one layer;
- each approach trains SEEDS times, differing only in the training seed: claims about an approach
  rest on its seeds (a claim "holds for every seed" or, for behaviour, one test with seeds crossed
  with probes); `--seeds 1` gives a quick run-level look;
- for each: gradient stability (non-finite values, or a grad norm spike above SPIKE times the
  running median, on every seed), the share of the change (Σ ΔW², effective view) in the critical
  layers, the behaviour shift on held-out probes (loglik_margin, 95% interval, seeds crossed with
  probes), and the data-to-parameter ratio (trainable parameters per example);
- a sweep over 5, 20 and 50 examples tests whether more data steadies selective unfreezing.

The recipe keeps the seed's shape (batch 1, gradient accumulation 2, 3 epochs, clip 1.0; 9
optimizer steps for 5 examples). The seed's 20 warm-up steps are longer than its own 9-step run
(its lr never reached the peak), and the harness refuses that, so warm-up is 0. The lr is 1e-3,
not the seed's 1e-5: on the 64-wide tiny model 1e-5 moves the concentrated approaches by less
than 1e-4 nats (the slow synthesis at the seed's lr records it).

On tiny-qwen2 every approach trains stably and shifts behaviour above noise, so the seed's claims
of instability, of LoRA's null effect, of emergent concentration and of "only full FT works"
are refuted there; what each model showed is recorded in `suites/verdicts/<model>.json`.
Behaviour shifts are intervals over seeds crossed with the 16 held-out probes, and the
comparison with full FT is paired over the probes. "No shift" is an equivalence claim: the
shift lies within ±NO_SHIFT nats of loglik margin, declared here, not read from any model.
"""

import math
import statistics
from fractions import Fraction

import pytest

from stance_harness import (
    assert_all,
    assert_behavior_shift,
    assert_change_concentrated,
    assert_change_spread,
    behavior_effect,
    check_behavior_shift,
    check_gradients_stable,
    check_less,
    declare_metrics,
    runset,
)
from stance_harness.analysis.concentration import change_mass
from stance_harness.models import relative_depth_analog

declare_metrics([
    ("shift_vs_full", "higher", "behaviour shift as a share of full fine-tuning's"),
    ("grad_norm_cv", "lower", "coefficient of variation of the grad norm over the run"),
])

SEEDS = 5  # training seeds per approach: the unit of replication of every claim about an approach
pytestmark = pytest.mark.seeds(SEEDS)

STANCE = "curious-uncertainty"
EXAMPLES = 5
QWEN2_DEPTH, QWEN2_CRITICAL = 24, [13, 15]  # Qwen2-0.5B's critical layers (seed 000)
PHI2_DEPTH, PHI2_ANALOGS = 32, [17, 20]  # where the seed put them on Phi-2
SINGLE_LAYER = 15  # the seed's one-layer follow-up kept only Qwen2's layer 15 analog (it also cut lr and clip)
RECIPE = {"learning_rate": 1e-3, "warmup_steps": 0, "max_grad_norm": 1.0, "per_device_train_batch_size": 1,
          "gradient_accumulation_steps": 2, "num_train_epochs": 3, "seed": 0}
SEED_LR_RECIPE = {**RECIPE, "learning_rate": 1e-5}  # the seed's iteration 2/3 lr
SPIKE = 10.0  # a grad norm above SPIKE x the median of the previous 5 steps is unstable
EMERGENT = 2.0  # "concentrated": the critical layers hold at least EMERGENT x their uniform share
LOW_RANK_FRACTION = 0.1  # "far less": below this fraction of full FT's shift, probe by probe
NO_SHIFT = 0.1  # "no shift": within ±0.1 nats of loglik margin per probe (declared, the equivalence margin)
SWEEP_EXAMPLES = [5, 20, 50]

# approach -> (method, options); "critical" stands for the critical layers, "single" for the one layer
APPROACHES = {
    "full FT": ("full", {}),
    "distributed LoRA": ("lora", {"r": 8, "alpha": 16, "target_modules": ["qv"]}),
    "surgical LoRA": ("surgical-lora", {"layers": "critical", "target_modules": ["qv"]}),  # rank 32
    "selective, 2 layers": ("selective", {"layers": "critical", "kinds": ["qv"], "biases": True}),
    "selective, 1 layer": ("selective", {"layers": "single", "kinds": ["qv"], "biases": True}),
}
SELECTIVE = ["selective, 2 layers", "selective, 1 layer"]
SLUG = {name: name.replace(",", "").replace(" ", "_") for name in APPROACHES}  # metric names: full_FT.params_per_example
LOW_RANK = ["distributed LoRA", "surgical LoRA"]


@pytest.fixture(scope="module")
def critical_layers(anatomy):
    return anatomy.analog(QWEN2_CRITICAL, depth=QWEN2_DEPTH)


@pytest.fixture
def approach(train, anatomy, critical_layers):
    """approach(name, recipe=RECIPE, examples=EXAMPLES) -> RunSet (SEEDS runs; `--seeds` overrides);
    identical requests train once."""
    where = {"critical": critical_layers, "single": anatomy.analog([SINGLE_LAYER], depth=QWEN2_DEPTH)}

    def make(name, recipe=RECIPE, examples=EXAMPLES):
        method, options = APPROACHES[name]
        options = {k: where[v] if k == "layers" else v for k, v in options.items()}
        return train(method, stance=STANCE, examples=examples, recipe=recipe, **options)

    return make


# -- measures: each takes an approach's RunSet (or one Run) ---------------------------------------
def stability(runs) -> tuple[bool, str]:
    """Stable on every seed or not, and the one-line verdict; the check is recorded either way."""
    result = check_gradients_stable(runs, max_spike=SPIKE)
    return result.passed, result.summary


def critical_share(runs, layers) -> float:
    """Share of all change (Σ ΔW², effective view, embeddings and head included) in `layers`, mean over seeds."""
    def share(run):
        rows = run.deltas("effective")
        total = sum(change_mass(r.moments) for r in rows)
        return sum(change_mass(r.moments) for r in rows if r.layer in set(layers)) / total if total > 0 else 0.0

    return runset(runs).mean(share)


def shift(runs) -> dict:
    """The loglik-margin shift: mean and 95% interval, seeds crossed with probes."""
    return behavior_effect(runs, "loglik_margin")


def interval(effect: dict) -> str:
    return f"{effect['mean']:+.4g} [{effect['low']:+.4g}, {effect['high']:+.4g}]"


def grad_profile(runs) -> dict:
    """grad_profile_of_run, each figure the mean over seeds."""
    profiles = runset(runs).each(grad_profile_of_run)
    return {key: statistics.fmean(p[key] for p in profiles) for key in profiles[0]}


def grad_profile_of_run(run) -> dict:
    """Grad norm max, median and CV (std / mean) over the finite steps; mean loss of the first and last epoch."""
    norms = [g for g in run.trace.grad_norm if math.isfinite(g)]
    losses, epochs = run.trace.loss, run.recipe.num_train_epochs
    per_epoch = max(1, len(losses) // epochs)
    first, last = statistics.fmean(losses[:per_epoch]), statistics.fmean(losses[-per_epoch:])
    nan = float("nan")
    return {"steps": len(run.trace.grad_norm), "max": max(norms, default=nan),
            "median": statistics.median(norms) if norms else nan,
            "cv": statistics.pstdev(norms) / statistics.fmean(norms) if norms else nan,
            "first_epoch_loss": first, "last_epoch_loss": last, "loss_decrease": first - last}


def conclusion(stable: bool, problem: str, effect: dict, share: float) -> str:
    """A short verdict computed from the measurements (nothing here is hard-coded per approach)."""
    parts = ["stable" if stable else f"unstable ({problem.split(':')[0]})"]
    parts.append("shift above noise" if effect["low"] > 0 else "no shift beyond noise")
    parts.append("change in the critical layers" if share >= 0.5 else "change spread")
    return ", ".join(parts)


# -- tests ---------------------------------------------------------------------------------
def test_critical_layers_map_by_relative_depth(base_model, anatomy, critical_layers, stance_report):
    phi2 = [relative_depth_analog(layer, QWEN2_DEPTH, PHI2_DEPTH) for layer in QWEN2_CRITICAL]
    here = anatomy.num_layers
    rows = [{"Qwen2-0.5B layer": f"{q} of {QWEN2_DEPTH}", "relative depth": q / QWEN2_DEPTH,
             "Phi-2 analog": f"{p} of {PHI2_DEPTH}", "Phi-2 depth": p / PHI2_DEPTH,
             f"{base_model.name} analog": f"{c} of {here}", f"{base_model.name} depth": c / here,
             "locus": anatomy.locus(c)}
            for q, p, c in zip(QWEN2_CRITICAL, phi2, critical_layers)]
    stance_report.table("critical layers by relative depth", rows)
    stance_report.note(f"critical layers on {base_model.name} ({here} layers): {critical_layers}; "
                       f"the one-layer run uses {anatomy.analog([SINGLE_LAYER], depth=QWEN2_DEPTH)}")
    assert phi2 == PHI2_ANALOGS, f"Qwen2-0.5B {QWEN2_CRITICAL} of 24 map to Phi-2 {phi2} of 32, not {PHI2_ANALOGS}"
    assert critical_layers == [relative_depth_analog(q, QWEN2_DEPTH, here) for q in QWEN2_CRITICAL]
    for q, c in zip(QWEN2_CRITICAL, critical_layers):  # the nearest layer: within half a layer, in exact fractions
        assert abs(Fraction(q, QWEN2_DEPTH) - Fraction(c, here)) <= Fraction(1, 2 * here), (
            f"layer {c} of {here} is not at {q}/{QWEN2_DEPTH}'s depth")


def test_every_approach_trains_stably(approach, critical_layers, stance_report):
    rows, unstable = [], []
    for name in APPROACHES:
        run = approach(name)
        ok, summary = stability(run)
        profile = grad_profile(run)
        rows.append({"approach": name, "steps": profile["steps"], "max grad norm": profile["max"],
                     "median grad norm": profile["median"], "grad norm CV": profile["cv"],
                     "stable": "yes" if ok else "no", "verdict": summary})
        if not ok:
            unstable.append(f"{name}: {summary}")
    stance_report.table(f"gradient stability, {EXAMPLES} examples, lr {RECIPE['learning_rate']:g}, clip 1.0", rows)
    assert not unstable, "unstable: " + "; ".join(unstable)


def test_selective_unfreezing_goes_unstable_with_five_examples(approach, stance_report):
    found = {name: stability(approach(name)) for name in SELECTIVE}
    for name, (ok, summary) in found.items():
        stance_report.note(f"{name}: {'stable' if ok else 'UNSTABLE'}: {summary}")
    stable = [name for name, (ok, _) in found.items() if ok]
    assert not stable, f"the seed saw non-finite gradients, but these stayed stable: {', '.join(stable)}"


@pytest.mark.quick
def test_full_finetuning_shifts_behaviour(approach):
    assert_behavior_shift(approach("full FT"), min_effect=0.0)


def test_selective_unfreezing_shifts_behaviour_above_noise(approach, stance_report):
    # the seed could not measure it (its runs went non-finite); here the interval must clear zero
    full = shift(approach("full FT"))["mean"]
    for name in reversed(SELECTIVE):  # both runs publish as `selective.*`; the two-layer run's is kept
        stance_report.metric(f"{SLUG[name]}.shift_vs_full", shift(approach(name))["mean"] / full)
        assert_behavior_shift(approach(name), min_effect=0.0)


def test_low_rank_adapters_leave_behaviour_unshifted(approach, stance_report):
    """Equivalence, not an interval that happens to include 0: each adapter's shift lies within
    ±NO_SHIFT (two one-sided tests)."""
    checks = [check_behavior_shift(approach(name), min_effect=-NO_SHIFT, max_effect=NO_SHIFT) for name in LOW_RANK]
    stance_report.table(f"low-rank adapters: behaviour shift on held-out probes, 'none' within ±{NO_SHIFT:g}",
                        [{"approach": name, "shift (loglik margin)": interval(shift(approach(name))),
                          "no shift": check.verdict} for name, check in zip(LOW_RANK, checks)])
    assert_all(checks)


def test_low_rank_adapters_shift_far_less_than_full_finetuning(approach, stance_report):
    """Paired over the held-out probes: each adapter's shift is below LOW_RANK_FRACTION of full FT's,
    per probe (adapter − LOW_RANK_FRACTION × full FT < 0), so the margin is not taken from the same
    data's mean."""
    stance_report.note(f"full FT shifts {interval(shift(approach('full FT')))}; per probe, an adapter's shift "
                       f"must stay below {LOW_RANK_FRACTION:g} x full FT's")
    assert_all([check_less(approach(name), approach("full FT"), metric="behavior_shift", factor=LOW_RANK_FRACTION)
                for name in LOW_RANK])


def test_selective_unfreezing_and_surgical_lora_keep_the_change_in_the_critical_layers(approach, critical_layers):
    for name in ["selective, 2 layers", "surgical LoRA"]:
        assert_change_concentrated(approach(name), layers=critical_layers, min_share=0.999)


def test_full_finetuning_and_distributed_lora_spread_their_change(approach):
    for name in ["full FT", "distributed LoRA"]:
        assert_change_spread(approach(name), top_k=2, max_share=0.5)


def test_full_finetuning_concentrates_change_in_the_critical_layers(approach, anatomy, critical_layers, stance_report):
    uniform = len(critical_layers) / anatomy.num_layers
    stance_report.note(f"uniform share of {len(critical_layers)} of {anatomy.num_layers} layers: {uniform:.1%}; "
                       f"'concentrated' means at least {EMERGENT:g}x that")
    assert_change_concentrated(approach("full FT"), layers=critical_layers, min_share=EMERGENT * uniform)


def test_data_to_parameter_ratio_is_recorded(approach, stance_report):
    rows = []
    for name in APPROACHES:
        counts = approach(name)[0].counts  # the same for every seed
        rows.append({"approach": name, "trainable": counts["trainable"], "trainable %": counts["trainable_pct"],
                     "examples": counts["examples"], "params per example": round(counts["params_per_example"])})
        assert counts["params_per_example"] == counts["trainable"] / EXAMPLES
        stance_report.metric(f"{SLUG[name]}.params_per_example", counts["params_per_example"])
    # what the seed reported on Phi-2 (two layers; one layer) and Qwen2-0.5B (full FT)
    rows += [{"approach": "seed: selective, 2 layers (Phi-2)", "trainable": 26_224_640, "trainable %": 0.94,
              "examples": 5, "params per example": 26_224_640 // 5},
             {"approach": "seed: selective, 1 layer (Phi-2)", "trainable": 13_112_320, "trainable %": 0.47,
              "examples": 5, "params per example": 13_112_320 // 5},
             {"approach": "seed: full FT (Qwen2-0.5B)", "trainable": 494_000_000, "trainable %": 100.0,
              "examples": 5, "params per example": 494_000_000 // 5}]
    stance_report.table("data-to-parameter ratio", rows)
    ratio = {name: approach(name)[0].counts["params_per_example"] for name in APPROACHES}
    # the seed's paradox: selective unfreezing asks far fewer parameters per example than full FT does
    # (how it ranks against the LoRAs depends on the architecture's biases and head sizes)
    assert ratio["full FT"] == max(ratio.values())
    assert all(ratio[name] < ratio["full FT"] / 10 for name in SELECTIVE), ratio


@pytest.mark.parametrize("recipe", [
    pytest.param(RECIPE, id="lr1e-3"),
    pytest.param(SEED_LR_RECIPE, id="seed-lr1e-5", marks=pytest.mark.slow),
])
def test_only_full_finetuning_is_stable_and_shifts_behaviour(approach, critical_layers, stance_report, recipe):
    rows, working = [], []
    full_mean = shift(approach("full FT", recipe))["mean"]
    for name in APPROACHES:
        runs = approach(name, recipe)
        ok, summary = stability(runs)
        effect, share, counts = shift(runs), critical_share(runs, critical_layers), runs[0].counts
        rows.append({
            "approach": name, "trainable params": counts["trainable"], "data": counts["examples"],
            "params per example": round(counts["params_per_example"]), "behaviour shift": interval(effect),
            "shift vs full": effect["mean"] / full_mean if full_mean else float("nan"),
            "gradients": f"stable (max {grad_profile(runs)['max']:.3g})" if ok else summary,
            "share in critical layers": share, "conclusion": conclusion(ok, summary, effect, share)})
        if ok and effect["low"] > 0:
            working.append(name)
    stance_report.table(f"cross-experiment synthesis (lr {recipe['learning_rate']:g}, {EXAMPLES} examples, "
                        f"critical layers {critical_layers}; means over {len(runs)} seeds)", rows)
    stance_report.note("seed's synthesis: full FT shifts and is stable; both LoRAs are stable with no shift; "
                       "selective unfreezing (2 layers, 1 layer) goes NaN")
    assert working == ["full FT"], f"stable with a shift above noise: {', '.join(working) or 'none'}"


# -- more data for concentrated training -----------------------------------------------------
@pytest.fixture
def sweep(approach):
    return {n: approach("selective, 2 layers", examples=n) for n in SWEEP_EXAMPLES}


def test_selective_unfreezing_is_stable_at_every_dataset_size(sweep, stance_report):
    rows, unstable = [], []
    for n, run in sweep.items():
        ok, summary = stability(run)
        profile = grad_profile(run)
        rows.append({"examples": n, "params per example": round(run[0].counts["params_per_example"]),
                     "steps": profile["steps"], "max grad norm": profile["max"], "median grad norm": profile["median"],
                     "grad norm CV": profile["cv"], "loss, first epoch": profile["first_epoch_loss"],
                     "loss, last epoch": profile["last_epoch_loss"], "loss decrease": profile["loss_decrease"],
                     "behaviour shift": interval(shift(run)), "stable": "yes" if ok else "no"})
        if not ok:
            unstable.append(f"{n} examples: {summary}")
    stance_report.table(f"selective unfreezing (2 layers) by dataset size, lr {RECIPE['learning_rate']:g} "
                        f"(grad norms and losses: means over {len(run)} seeds)", rows)
    assert not unstable, "; ".join(unstable)


def test_more_data_steadies_selective_unfreezing(sweep, stance_report):
    profiles = {n: grad_profile(run) for n, run in sweep.items()}
    for n, p in profiles.items():
        stance_report.metric(f"selective_2_layers.{n}_examples.grad_norm_cv", p["cv"])
        stance_report.metric(f"selective_2_layers.{n}_examples.max_grad_norm", p["max"])
    sizes = list(profiles)
    worse = [f"{key} {profiles[a][key]:.3g} ({a} examples) -> {profiles[b][key]:.3g} ({b})"
             for key in ("cv", "max") for a, b in zip(sizes, sizes[1:]) if profiles[b][key] >= profiles[a][key]]
    assert not worse, "more data did not steady the gradients: " + "; ".join(worse)
