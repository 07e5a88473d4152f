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

Measured on tiny-qwen2: the spectrum holds (shift and forgetting both rise from feature extraction
to full FT), all three mitigations cut full FT's forgetting, and training only the head is two to
three times as fast per step (3/4 of the blocks frozen: about 2x, against the seed's 3.2x). Feature extraction still forgets (its untied head is retrained), and at
the seed's strengths L2-SP and EWC forget more than gradual or discriminative training; those
two claims carry `expected_outcome("refuted", on="embedded")`.
"""

import math
import statistics

import pytest
import torch

from harness import assert_no_forgetting, declare_metric

declare_metric("step_time_vs_full", "lower", "median step time over full fine-tuning's")

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
    """strategy(method, **options) -> Run on the shared task and recipe; gradual runs in thirds."""
    third = math.ceil(anatomy.num_layers / 3)
    defaults = {"gradual": {"every_epochs": 1, "start_layers": third, "layers_per_stage": third},
                "discriminative": DISCRIMINATIVE, **MITIGATIONS}

    def make(method, **options):
        return train(method, stance=STANCE, examples=EXAMPLES, recipe=RECIPE, **(options or defaults.get(method, {})))

    return make


def interval(effect: dict) -> str:
    return f"{effect['mean']:+.4g} [{effect['low']:+.4g}, {effect['high']:+.4g}]"


def last_epoch_loss(run) -> float:
    per_epoch = max(1, len(run.trace.loss) // run.recipe.num_train_epochs)
    return statistics.fmean(run.trace.loss[-per_epoch:])


def outcome_row(label, run) -> dict:
    effect, found = run.behavior("loglik_margin")["effect"], run.forgetting()
    return {"strategy": label, "trainable": run.counts["trainable"], "trainable %": run.counts["trainable_pct"],
            "behaviour shift": interval(effect), "last-epoch loss": last_epoch_loss(run),
            "perplexity": f"{found['base']:.4g} -> {found['adapted']:.4g}", "forgetting": found["relative_increase"]}


def setting(run) -> str:
    """What a spectrum run trained, in words, from its own config."""
    config = run.config.as_dict()
    if run.method.name == "gradual":
        every = f"{config['every_epochs']} epoch(s)" if config["every_epochs"] else f"{config['every_steps']} step(s)"
        return f"top {config['start_layers']} blocks, {config['layers_per_stage']} more every {every}"
    if run.method.name == "discriminative":
        return f"lr x {config['decay']:g} per block going down"
    return {"feature-extraction": "output head only", "full": "every weight"}.get(run.method.name, "")


def strength(options: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in options.items())


def forgetting(run) -> float:
    return run.forgetting()["relative_increase"]


def shift(run) -> float:
    return run.behavior("loglik_margin")["effect"]["mean"]


# -- adaptation against forgetting -----------------------------------------------------------
def test_adaptation_and_forgetting_rise_together_along_the_spectrum(strategy, stance_report):
    runs = {name: strategy(name) for name in SPECTRUM}
    stance_report.table(f"the spectrum on {STANCE}, {EXAMPLES} examples, lr {RECIPE['learning_rate']:g}",
                        [{"strategy": name, "setting": setting(run), **outcome_row(name, run)} for name, run in runs.items()])
    for name, run in runs.items():
        stance_report.metric(f"{name}.forgetting", forgetting(run))
        stance_report.metric(f"{name}.behavior_shift", shift(run))
    ends, middle = (SPECTRUM[0], SPECTRUM[-1]), SPECTRUM[1:-1]
    problems = []
    for measure, of in (("behaviour shift", shift), ("forgetting", forgetting)):
        low, high = of(runs[ends[0]]), of(runs[ends[1]])
        problems += [f"{measure}: {name} {of(runs[name]):.4g} is outside ({ends[0]} {low:.4g}, {ends[1]} {high:.4g})"
                     for name in middle if not low < of(runs[name]) < high]
        if not low < high:
            problems.append(f"{measure}: {ends[0]} {low:.4g} is not below {ends[1]} {high:.4g}")
    assert not problems, "; ".join(problems)


@pytest.mark.expected_outcome("refuted", on="embedded", reason=(
    "measured on tiny-qwen2: feature extraction raises held-out perplexity by 1.5% (172.5 -> 175.2): "
    "its retrained (untied) head is the language model's output layer"))
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
        if not forgetting(run) < forgetting(full):
            more.append(f"{method} {forgetting(run):.2%} >= full {forgetting(full):.2%}")
    stance_report.table("forgetting of full FT with and without a mitigation (seed 002's strengths)", rows)
    stance_report.note("last-epoch loss: L2-SP's and EWC's include their penalty, replay's its general-text batches")
    assert not more, "; ".join(more)


@pytest.mark.expected_outcome("refuted", on="embedded", reason=(
    "measured on tiny-qwen2: at the seed's strengths L2-SP forgets 17.3% and EWC 20.7%, more than "
    "gradual unfreezing (4.8%) and discriminative rates (9.2%)"))
def test_regularised_full_finetuning_forgets_less_than_partial_freezing(strategy, stance_report):
    regularised = {m: forgetting(strategy(m)) for m in ("l2sp", "ewc")}
    partial = {m: forgetting(strategy(m)) for m in ("gradual", "discriminative")}
    stance_report.table("forgetting: seed 002 rates L2-SP/EWC 'low', gradual/discriminative 'medium'",
                        [{"strategy": m, "seed's rating": rating, "forgetting": v}
                         for group, rating in ((regularised, "low"), (partial, "medium")) for m, v in group.items()])
    assert max(regularised.values()) < min(partial.values()), (
        f"regularised {regularised} does not forget less than partial freezing {partial}")


@pytest.mark.slow
def test_stronger_mitigation_forgets_less(strategy, stance_report):
    rows, problems = [], []
    for method, stronger in STRONGER.items():
        ladder = [MITIGATIONS[method], *stronger]
        runs = [strategy(method, **options) for options in ladder]
        for options, run in zip(ladder, runs):
            rows.append({"strategy": method, "strength": strength(options), **outcome_row(method, run)})
        problems += [f"{method}: {a} forgets {forgetting(ra):.2%}, {b} {forgetting(rb):.2%}"
                     for (a, ra), (b, rb) in zip(zip(ladder, runs), zip(ladder[1:], runs[1:]))
                     if not forgetting(rb) < forgetting(ra)]
    stance_report.table("mitigation strength: forgetting against behaviour shift", rows)
    stance_report.note("last-epoch loss: L2-SP's and EWC's include their penalty, replay's its general-text batches")
    assert not problems, "; ".join(problems)


# -- what freezing saves -------------------------------------------------------------------------
def test_training_only_the_head_is_faster_per_step_than_full_finetuning(strategy, anatomy, stance_report):
    n = anatomy.num_layers
    runs = {}
    for fraction in FROZEN_FRACTIONS:
        frozen = round(fraction * n)
        runs[frozen] = (f"selective, top {n - frozen} blocks", strategy(
            "selective", layers=list(range(frozen, n)), kinds=BLOCK_KINDS, biases=True))
    runs[n] = ("feature-extraction (head only)", strategy("feature-extraction"))
    full = strategy("full")
    reference = statistics.median(runs[0][1].trace.step_time)
    rows = []
    for frozen, (label, run) in [*runs.items(), ("-", ("full", full))]:
        summary, counts = run.trace.summary(), run.counts
        bytes_per_param = counts["full_weights_bytes"] / (counts["trainable"] + counts["frozen"])
        median = statistics.median(run.trace.step_time)
        rows.append({"frozen blocks": frozen, "run": label, "trainable": counts["trainable"],
                     "median step (ms)": 1e3 * median, "mean step (ms)": 1e3 * summary["mean_step_time_s"],
                     "speed-up vs 0 frozen": reference / median,
                     "grad + AdamW state (MiB, computed)": 3 * counts["trainable"] * bytes_per_param / 2**20,
                     f"peak memory (MiB, {summary['peak_memory_kind']})": (summary["peak_memory_bytes"] or 0) / 2**20})
    stance_report.table(f"step time against frozen blocks ({EXAMPLES} examples, batch "
                        f"{RECIPE['per_device_train_batch_size']}, {torch.get_num_threads()} intra-op threads)", rows)
    stance_report.note("per-step times are wall clock on a shared machine: read them as a trend (a run shared with "
                       "another suite keeps the time it trained in). On CPU the peak "
                       "memory is the process's peak RSS, which only grows during a session, so it does not compare "
                       "runs; the gradient + AdamW state (3 x trainable x bytes per parameter) does. Seed 003 quotes "
                       "3.2x faster with 75% of BERT-base frozen.")
    head, everything = statistics.median(runs[n][1].trace.step_time), statistics.median(full.trace.step_time)
    stance_report.metric("feature-extraction.step_time_vs_full", head / everything)
    assert head < everything, f"head-only median step {head * 1e3:.1f} ms is not below full FT's {everything * 1e3:.1f} ms"
