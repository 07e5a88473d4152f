"""Gradient stability of concentrated training (seed 000).

Hypothesis (seed 000, Phi-2): unfreezing only the relative-depth analogs of Qwen2-0.5B's
layers 13 and 15 (q_proj + v_proj + biases) with 5 examples goes non-finite or unstable,
while full fine-tuning of the same model on the same data stays stable.

The runs use the seed's first iteration: lr 5e-5, no gradient clipping, batch 1, gradient
accumulation 2, 3 epochs. "Unstable" means a non-finite value, or a grad norm spike above
SPIKE times the running median. Each run's data-to-parameter ratio is reported, as the seed
reports 5.2M trainable parameters per example.

What each model showed (on the embedded tiny models this hypothesis was refuted: selective
unfreezing stays stable at every rate tried; it is full fine-tuning that diverges at lr 1.0) is
recorded in `suites/verdicts/<model>.json`; a session on that model compares with it. Each
approach trains SEEDS times, differing only in the training seed: "stable" and "unstable" are
claims about every seed's trajectory (a method that diverges on some seeds only is neither).
"""

import math

import pytest

from stance_harness import assert_gradients_stable, check_gradients_stable

SEEDS = 5  # training seeds per approach
pytestmark = pytest.mark.seeds(SEEDS)

STANCE = "curious-uncertainty"
EXAMPLES = 5
QWEN2_CRITICAL = [13, 15]
SPIKE = 10.0
SEED_RECIPE = {"learning_rate": 5e-5, "max_grad_norm": None, "per_device_train_batch_size": 1,
               "gradient_accumulation_steps": 2, "num_train_epochs": 3, "warmup_steps": 0, "seed": 0}
SWEEP_LRS = [5e-5, 1e-1, 1.0]
INSTRUMENTS = {"nonfinite": "record"}  # keep going, so the whole trajectory is measured


def stable(run) -> tuple[bool, str]:
    result = check_gradients_stable(run, max_spike=SPIKE)
    return result.passed, result.summary


def stable_seeds(runs) -> list[bool]:
    """Whether each seed's run trained stably (each check is recorded in the report)."""
    return [stable(run)[0] for run in runs]


def stability_row(run, lr, verdict):
    ok, summary = verdict
    trace = run.trace
    finite = [g for g in trace.grad_norm if math.isfinite(g)]
    return {"lr": lr, "approach": run.method.name, "seed": run.recipe.seed, "trainable": run.counts["trainable"],
            "params/example": run.counts["params_per_example"], "steps": len(trace.loss),
            "loss first": trace.loss[0], "loss last": trace.loss[-1],
            "max grad norm": max(finite) if finite else float("nan"), "stable": "yes" if ok else "no",
            "verdict": summary}


@pytest.fixture(scope="module")
def critical_layers(anatomy):
    return anatomy.analog(QWEN2_CRITICAL, depth=24)


@pytest.fixture
def runs(train, critical_layers):
    def make(lr):
        recipe = {**SEED_RECIPE, "learning_rate": lr}
        selective = train("selective", stance=STANCE, examples=EXAMPLES, recipe=recipe, instruments=INSTRUMENTS,
                          layers=critical_layers, kinds=["qv"], biases=True)
        full = train("full", stance=STANCE, examples=EXAMPLES, recipe=recipe, instruments=INSTRUMENTS)
        return selective, full

    return make


def test_concentrated_training_is_unstable_where_full_finetuning_is_not(runs, stance_report):
    selective, full = runs(SEED_RECIPE["learning_rate"])
    stance_report.table("seed 000, iteration 1 recipe, one row per training seed", [
        stability_row(run, SEED_RECIPE["learning_rate"], stable(run)) for arm in (selective, full) for run in arm])
    stance_report.metric("selective.params_per_example", selective[0].counts["params_per_example"])
    stance_report.metric("full.params_per_example", full[0].counts["params_per_example"])
    selective_stable, full_stable = stable_seeds(selective), stable_seeds(full)
    assert not any(selective_stable) and all(full_stable), (
        f"selective stable on {sum(selective_stable)} of {len(selective)} seeds, full on {sum(full_stable)} of "
        f"{len(full)}: the hypothesis needs selective unstable and full stable on every seed")


@pytest.mark.quick
def test_full_finetuning_with_the_seed_recipe_is_stable(runs):
    _, full = runs(SEED_RECIPE["learning_rate"])
    assert_gradients_stable(full, max_spike=SPIKE)


@pytest.mark.slow  # deselected by default; `pytest suites/ -m slow` runs it
def test_learning_rate_sweep_is_recorded(runs, stance_report):
    rows = []
    for lr in SWEEP_LRS:
        rows += [stability_row(r, lr, stable(r)) for arm in runs(lr) for r in arm]
    stance_report.table("stability across learning rates (no clipping, 5 examples), one row per seed", rows)
    assert len(rows) == 2 * len(SWEEP_LRS) * len(runs(SWEEP_LRS[0])[0]), rows  # every seed of both approaches
