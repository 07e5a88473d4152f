"""Hybrid LoRA + norm-layer schedules (seed 004): warm-up freezing and alternation.

Real setting (seed 004): ViT-Small on CIFAR-100, LoRA + the norm layers (+ head), 128 images
per batch. Baseline Acc@1 0.9004 and ECE 0.0637; warming up with LoRA frozen for 200 batches
gave 0.9021 / 0.0600; alternating every K = 50 batches, LoRA-first (norm trains first), gave
0.8993 / 0.0592 with about 19% more throughput and 13% less peak memory. Norm-first hurt.

Here the same schedules train the stance-classification task (a head on mean-pooled hidden
states: stance reply vs neutral) on `--model` (default tiny-qwen2). On the embedded tiny
models the run is shorter than the seed's, so the schedule lengths are scaled by SCALE: the
suite's parameters name the real setting (200 warm-up batches, K in 25/50/100), and the
report states the scaled values used.

Hypotheses checked:
- Every schedule trains (finite gradients, loss falls) and reports Acc@1, ECE (15 bins),
  step time, throughput, peak memory and the LoRA-norm gradient-interference cosine.
- Alternation trains one group at a time, so its steps are cheaper than the baseline's.
- Warm-up LoRA improves ECE over the baseline (seed 004's accuracy-track claim).
"""

import pytest

from harness import assert_ece_not_worse, assert_gradients_stable

TASK = "stance-classification"
STANCE = "curious-uncertainty"
REAL_WARMUP = 200  # batches with LoRA frozen (seed 004)
REAL_K = [25, 50, 100]  # alternation periods (seed 004)
LORA = {"r": 8, "alpha": 16, "target_modules": ["qv"]}
RECIPE = {"learning_rate": 2e-3, "num_train_epochs": 6, "per_device_train_batch_size": 16, "seed": 0,
          "max_seq_length": 96}
INSTRUMENTS = {"interference": ("lora", "norm")}


@pytest.fixture(scope="module")
def scale(base_model) -> float:
    """Schedule lengths relative to the seed's: 0.1 on the tiny models' 42-step runs."""
    return 0.1 if base_model.spec.source == "embedded" else 1.0


def schedules(scale: float) -> dict[str, dict]:
    k = [max(1, round(v * scale)) for v in REAL_K]
    return {
        "baseline": {},
        f"warm-up LoRA ({REAL_WARMUP})": {"freeze_lora_steps": round(REAL_WARMUP * scale)},
        **{f"alternate K={real} lora-first": {"alternate_every": scaled, "order": "lora-first"}
           for real, scaled in zip(REAL_K, k)},
        f"alternate K={REAL_K[1]} norm-first": {"alternate_every": k[1], "order": "norm-first"},
    }


@pytest.fixture
def runs(train, scale):
    return {name: train("hybrid", task=TASK, stance=STANCE, recipe=RECIPE, instruments=INSTRUMENTS,
                        **LORA, **options)
            for name, options in schedules(scale).items()}


def _row(name, run):
    summary = run.trace.summary()
    calibration = run.calibration()["adapted"]
    cosines = [e["mean_cosine"] for e in summary["interference_by_epoch"] if e["mean_cosine"] is not None]
    return {"schedule": name, "freeze_lora_steps": run.config.freeze_lora_steps,
            "alternate_every": run.config.alternate_every, "Acc@1": calibration["acc1"], "ECE": calibration["ece"],
            "step time (s)": summary["mean_step_time_s"], "throughput (ex/s)": summary["examples_per_s"],
            "peak memory (B)": summary["peak_memory_bytes"], "memory kind": summary["peak_memory_kind"],
            "interference cos": sum(cosines) / len(cosines) if cosines else None,
            "loss first": run.trace.loss[0], "loss last": run.trace.loss[-1]}


def test_schedules_are_measured_side_by_side(runs, scale, stance_report):
    rows = [_row(name, run) for name, run in runs.items()]
    stance_report.table(f"hybrid schedules ({TASK}, schedule lengths x{scale:g} of seed 004's)", rows)
    for row in rows:
        key = row["schedule"].split(" (")[0].replace(" ", "_")
        stance_report.metric(f"{key}.ece", row["ECE"])
        stance_report.metric(f"{key}.acc1", row["Acc@1"])
    base = rows[0]
    for row in rows[1:]:
        stance_report.note(f"{row['schedule']}: Acc@1 {row['Acc@1'] - base['Acc@1']:+.3f}, "
                           f"ECE {row['ECE'] - base['ECE']:+.4f}, step time "
                           f"{row['step time (s)'] / base['step time (s)'] - 1:+.1%} vs baseline")


@pytest.mark.parametrize("name", list(schedules(1.0)))  # the names hold the real setting's lengths
def test_every_schedule_trains(runs, name):
    run = runs[name]
    assert_gradients_stable(run)
    assert run.trace.loss[-1] < run.trace.loss[0], f"{name}: loss {run.trace.loss[0]:.4f} -> {run.trace.loss[-1]:.4f}"
    if not run.config.alternate_every:  # alternation never trains both groups at once: no cosine to take
        assert any(e["mean_cosine"] is not None for e in run.trace.summary()["interference_by_epoch"]), (
            f"{name}: the LoRA-norm interference cosine was never defined")


def test_alternation_steps_are_cheaper_than_the_baseline(runs):
    """Each alternating step backpropagates into one group only. Machines are noisy, so the
    claim is the median step, with a 5% margin, not the seed's 19%."""
    def median_step(run):
        times = sorted(run.trace.step_time)
        return times[len(times) // 2]

    base = median_step(runs["baseline"])
    alternating = median_step(runs[f"alternate K={REAL_K[1]} lora-first"])
    assert alternating < 0.95 * base, f"alternating median step {alternating:.4f}s vs baseline {base:.4f}s"


@pytest.mark.expected_outcome("refuted", on="embedded", reason=(
    "measured on tiny-qwen2: warm-up LoRA's ECE is not below the baseline's on this short classification run"))
def test_warmup_lora_improves_ece(runs):
    warm = runs[f"warm-up LoRA ({REAL_WARMUP})"]
    assert_ece_not_worse(warm, than=runs["baseline"], tol=0.0)
