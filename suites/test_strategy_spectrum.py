"""The fine-tuning spectrum: adaptation against forgetting, and what freezing saves (seeds 002, 003).

Hypotheses:

- Seed 002 puts the strategies on one line, from feature extraction (frozen network, only the
  head trains) through gradual unfreezing and discriminative learning rates to full fine-tuning:
  along it, adaptation and the risk of forgetting rise together. Its summary rates forgetting
  "none" for feature extraction, "medium" for gradual and discriminative, "high" for full FT,
  and "low" for full FT held near the pretrained weights (L2-SP, EWC); replay of pretraining
  data is a third mitigation.
- Seed 003: freezing layers saves compute and memory (no gradients or optimizer state for the
  frozen weights, no backward pass below the lowest trainable layer; "75% frozen: 3.2x faster").

How it is measured, on the `--model` base (default tiny-qwen2), curious-uncertainty stance, the
stance-lm task, 20 examples, one recipe (the locus suite's, so full FT is shared with it):

- adaptation: the behaviour shift on held-out probes (loglik_margin, 95% bootstrap interval)
  and the mean training loss of the last epoch;
- forgetting: `run.forgetting()`, the relative increase of perplexity on held-out general text;
- gradual unfreezing releases the blocks top-down in thirds, one third per epoch; the
  discriminative rate decays 0.95 per block going down;
- L2-SP (alpha 0.01), EWC (lambda 1000) and replay (ratio 0.1) use the seed's strengths; a slow
  sweep tries stronger ones;
- compute: per-step wall time (`trace.step_time`, median and mean) with 0, 1/4, 1/2 and 3/4 of the
  blocks frozen from the bottom (`selective` on the top blocks, every module kind), all of them
  frozen (feature extraction), and full FT. Peak memory on CPU is the process's peak RSS, which
  only ever grows across a session, so it is reported, never asserted; the gradient + AdamW
  state bytes are computed from the trainable count instead.

Every strategy trains SEEDS times, differing only in the training seed (`--seeds 1`: a quick,
run-level look). Comparisons between strategies are claims about the strategies, with seeds
crossed with paired units: behaviour shift over the 16 held-out probes, forgetting over the 32
held-out windows of general text (the NLL increase per window); step time compares each seed's
median step (Welch's t over seeds: one seed's steps are not crossed with another's). Each is decided by one
test (supported, refuted or inconclusive) and Holm's correction over the file; tables show means
over the seeds. What each model showed is recorded in `suites/verdicts/<model>.json`.
"""

import math
import statistics

import pytest
import torch

from stance_harness import (assert_all, assert_less, assert_no_forgetting, behavior_effect, check_greater, check_less,
                     declare_metric, runset)

declare_metric("step_time_vs_full", "lower", "median step time over full fine-tuning's")

SEEDS = 5  # training seeds per strategy: the unit of replication of every claim about a strategy
pytestmark = pytest.mark.seeds(SEEDS)

STANCE = "curious-uncertainty"
EXAMPLES = 20
RECIPE = {"learning_rate": 1e-3, "num_train_epochs": 3, "per_device_train_batch_size": 4, "seed": 0}
SPECTRUM = ["feature-extraction", "gradual", "discriminative", "full"]  # least to most adaptation (seed 002)
DISCRIMINATIVE = {"decay": 0.95}
MITIGATIONS = {"l2sp": {"alpha": 0.01}, "ewc": {"lambda_ewc": 1000.0}, "replay": {"ratio": 0.1}}  # seed 002's values
STRONGER = {"l2sp": [{"alpha": 1.0}, {"alpha": 100.0}], "ewc": [{"lambda_ewc": 1e5}], "replay": [{"ratio": 1.0}]}
NO_FORGETTING = 0.01  # "no forgetting": held-out perplexity rises by at most 1%
FROZEN_FRACTIONS = [0.0, 0.25, 0.5, 0.75]  # of the blocks, frozen from the bottom
BLOCK_KINDS = ["attention", "mlp", "norm"]  # every module kind of a block


@pytest.fixture
def strategy(train, anatomy):
    """strategy(method, **options) -> RunSet (SEEDS runs) on the shared task and recipe; gradual runs in thirds."""
    third = math.ceil(anatomy.num_layers / 3)
    defaults = {"gradual": {"every_epochs": 1, "start_layers": third, "layers_per_stage": third},
                "discriminative": DISCRIMINATIVE, **MITIGATIONS}

    def make(method, **options):
        return train(method, stance=STANCE, examples=EXAMPLES, recipe=RECIPE, **(options or defaults.get(method, {})))

    return make


def interval(effect: dict) -> str:
    return f"{effect['mean']:+.4g} [{effect['low']:+.4g}, {effect['high']:+.4g}]"


def last_epoch_loss(runs) -> float:
    def last(run):
        per_epoch = max(1, len(run.trace.loss) // run.recipe.num_train_epochs)
        return statistics.fmean(run.trace.loss[-per_epoch:])

    return runset(runs).mean(last)


def outcome_row(label, runs) -> dict:
    """One strategy's row: its counts, its behaviour shift (seeds crossed with probes) and the
    means over its seeds."""
    runs = runset(runs)
    counts = runs[0].counts  # the same for every seed
    adapted = runs.mean(lambda r: r.forgetting()["adapted"])
    return {"strategy": label, "seeds": len(runs), "trainable": counts["trainable"],
            "trainable %": counts["trainable_pct"], "behaviour shift": interval(behavior_effect(runs)),
            "last-epoch loss": last_epoch_loss(runs),
            "perplexity": f"{runs[0].forgetting()['base']:.4g} -> {adapted:.4g}", "forgetting": forgetting(runs)}


def setting(runs) -> str:
    """What a spectrum run trained, in words, from its own config."""
    run = runset(runs)[0]
    config = run.config.as_dict()
    if run.method.name == "gradual":
        every = f"{config['every_epochs']} epoch(s)" if config["every_epochs"] else f"{config['every_steps']} step(s)"
        return f"top {config['start_layers']} blocks, {config['layers_per_stage']} more every {every}"
    if run.method.name == "discriminative":
        return f"lr x {config['decay']:g} per block going down"
    return {"feature-extraction": "output head only", "full": "every weight"}.get(run.method.name, "")


def strength(options: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in options.items())


def forgetting(runs) -> float:
    """The relative increase of held-out perplexity, mean over seeds."""
    return runset(runs).mean(lambda r: r.forgetting()["relative_increase"])


def shift(runs) -> float:
    return behavior_effect(runs)["mean"]


# -- adaptation against forgetting -----------------------------------------------------------
def test_adaptation_and_forgetting_rise_together_along_the_spectrum(strategy, stance_report):
    runs = {name: strategy(name) for name in SPECTRUM}
    stance_report.table(f"the spectrum on {STANCE}, {EXAMPLES} examples, lr {RECIPE['learning_rate']:g}",
                        [{"strategy": name, "setting": setting(run), **outcome_row(name, run)} for name, run in runs.items()])
    for name, run in runs.items():
        stance_report.metric(f"{name}.forgetting", forgetting(run))
        stance_report.metric(f"{name}.behavior_shift", shift(run))
    # each step along the line adapts more and forgets more than the one before it
    steps = list(zip(SPECTRUM, SPECTRUM[1:]))
    assert_all([check_greater(runs[after], runs[before], metric="behavior_shift") for before, after in steps]
               + [check_greater(runs[after], runs[before], metric="forgetting") for before, after in steps])


@pytest.mark.quick
def test_feature_extraction_does_not_forget(strategy):
    assert_no_forgetting(strategy("feature-extraction"), max_increase=NO_FORGETTING)


def test_l2sp_ewc_and_replay_forget_less_than_full_finetuning(strategy, stance_report):
    full = strategy("full")
    rows = [{"strategy": "full", "strength": "-", **outcome_row("full", full), "forgetting vs full": 1.0}]
    more = []
    for method, options in MITIGATIONS.items():
        run = strategy(method)
        rows.append({"strategy": method, "strength": strength(options), **outcome_row(method, run),
                     "forgetting vs full": forgetting(run) / forgetting(full)})
        stance_report.metric(f"{method}.forgetting", forgetting(run))
        more.append(check_less(run, full, metric="forgetting"))
    stance_report.table("forgetting of full FT with and without a mitigation (seed 002's strengths)", rows)
    stance_report.note("last-epoch loss: L2-SP's and EWC's include their penalty, replay's its general-text batches")
    assert_all(more)


def test_regularised_full_finetuning_forgets_less_than_partial_freezing(strategy, stance_report):
    regularised = {m: strategy(m) for m in ("l2sp", "ewc")}
    partial = {m: strategy(m) for m in ("gradual", "discriminative")}
    stance_report.table("forgetting: seed 002 rates L2-SP/EWC 'low', gradual/discriminative 'medium'",
                        [{"strategy": m, "seed's rating": rating, "forgetting": forgetting(run)}
                         for group, rating in ((regularised, "low"), (partial, "medium")) for m, run in group.items()])
    assert_all([check_less(low, medium, metric="forgetting") for low in regularised.values() for medium in partial.values()])


@pytest.mark.slow
def test_stronger_mitigation_forgets_less(strategy, stance_report):
    rows, checks = [], []
    for method, stronger in STRONGER.items():
        ladder = [MITIGATIONS[method], *stronger]
        runs = [strategy(method, **options) for options in ladder]
        for options, run in zip(ladder, runs):
            rows.append({"strategy": method, "strength": strength(options), **outcome_row(method, run)})
        checks += [check_less(stronger_run, weaker, metric="forgetting") for weaker, stronger_run in zip(runs, runs[1:])]
    stance_report.table("mitigation strength: forgetting against behaviour shift", rows)
    stance_report.note("last-epoch loss: L2-SP's and EWC's include their penalty, replay's its general-text batches")
    assert_all(checks)


# -- what freezing saves -------------------------------------------------------------------------
def test_training_only_the_head_is_faster_per_step_than_full_finetuning(strategy, anatomy, stance_report):
    n = anatomy.num_layers
    runs = {}  # frozen blocks -> (label, RunSet)
    for fraction in FROZEN_FRACTIONS:
        frozen = round(fraction * n)
        runs[frozen] = (f"selective, top {n - frozen} blocks", strategy(
            "selective", layers=list(range(frozen, n)), kinds=BLOCK_KINDS, biases=True))
    runs[n] = ("feature-extraction (head only)", strategy("feature-extraction"))
    full = strategy("full")
    def median_step(arm) -> float:
        return runset(arm).mean(lambda r: statistics.median(r.trace.step_time))

    reference = median_step(runs[0][1])
    rows = []
    for frozen, (label, arm) in [*runs.items(), ("-", ("full", full))]:
        run = runset(arm)[0]  # counts and memory: the first seed's (counts are the same for every seed)
        summary, counts = run.trace.summary(), run.counts
        bytes_per_param = counts["full_weights_bytes"] / (counts["trainable"] + counts["frozen"])
        median = median_step(arm)
        rows.append({"frozen blocks": frozen, "run": label, "trainable": counts["trainable"],
                     "median step (ms)": 1e3 * median,
                     "mean step (ms)": 1e3 * runset(arm).mean(lambda r: r.trace.summary()["mean_step_time_s"]),
                     "speed-up vs 0 frozen": reference / median,
                     "grad + AdamW state (MiB, computed)": 3 * counts["trainable"] * bytes_per_param / 2**20,
                     f"peak memory (MiB, {summary['peak_memory_kind']})": (summary["peak_memory_bytes"] or 0) / 2**20})
    stance_report.table(f"step time against frozen blocks ({EXAMPLES} examples, batch "
                        f"{RECIPE['per_device_train_batch_size']}, {torch.get_num_threads()} intra-op threads; "
                        f"step times: means over {len(full)} seeds)", rows)
    stance_report.note("per-step times are wall clock on a shared machine: read them as a trend (a run shared with "
                       "another suite keeps the time it trained in). On CPU the peak "
                       "memory is the process's peak RSS, which only grows during a session, so it does not compare "
                       "runs; the gradient + AdamW state (3 x trainable x bytes per parameter) does. Seed 003 quotes "
                       "3.2x faster with 75% of BERT-base frozen.")
    head, everything = median_step(runs[n][1]), median_step(full)
    stance_report.metric("feature-extraction.step_time_vs_full", head / everything)
    assert_less(runs[n][1], full, metric="step_time")
