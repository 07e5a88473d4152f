"""Locus of learning: where in the network does adaptation put its change?

Seed 001 asks whether fine-tuning moves early, middle or late layers. On the chosen model
(`--model`, default tiny-qwen2) this suite trains the curious-uncertainty stance with full
fine-tuning, LoRA over every layer, and surgical LoRA on the relative-depth analogs of
Qwen2-0.5B's layers 13 and 15, then states and checks:

- LoRA leaves the base bit-identical: only its adapters change.
- Full fine-tuning moves every tensor of the model.
- Surgical LoRA puts all of its effective change (scale·B·A) in the two chosen layers.
- Full fine-tuning spreads its change: no two layers hold half of it.

The per-layer tables (mean Δ, var Δ, mean |Δ|, var |Δ|, ‖Δ‖/‖W‖, norm change) of every run
go to the report, with each method's centre of change and locus (early, middle, late).

Then seed 001's own experiment: QLoRA (r=16, alpha=32, on q/k/v/o and the MLP projections,
as the seed's aggregation covers both) trained on four small domain datasets (C++, Python,
math, physics; stances/domain-*.yaml) at learning rates 2e-4 and 1e-3. Each run reports mean
Δ, var Δ, mean |Δ| and var |Δ| per layer of the effective update, and the suite states where
the locus lies per domain and rate. The seed found the change in the late layers; the
hypothesis checked here is that the locus does not depend on the domain: every domain at a
rate puts its centre of change in the same third of the network. The seed's own finding, that
the late third holds the most change, is checked per rate; on the tiny models' 6-step runs
the change is spread almost evenly (each third holds 0.32-0.34), and at lr 2e-4 two domains
put slightly more in the early third, so that case is marked as an expected refutation.

Every run trains SEEDS times, differing only in the training seed: a property of a run (only the
targets changed, the change spread) must hold on every seed, and where the change lies (centre,
shares of the thirds) is the mean over the seeds; per-layer tables show the first seed.
"""

import statistics

import pytest

from stance_harness import (assert_change_concentrated, assert_change_spread, assert_only_targets_changed, declare_metric,
                     runset)
from stance_harness.analysis.concentration import block_shares, centre_of_mass
from stance_harness.models import locus_of

declare_metric("centre_layer", "higher", "the change's centre of mass over the layers (seed 001: late layers lead)")

SEEDS = 5  # training seeds per run
pytestmark = pytest.mark.seeds(SEEDS)

DOMAINS = ["domain-cpp", "domain-python", "domain-math", "domain-physics"]
DOMAIN_LRS = [2e-4, 1e-3]  # seed 001
QLORA = {"r": 16, "alpha": 32, "target_modules": ["attention", "mlp"]}
DOMAIN_RECIPE = {"num_train_epochs": 2, "per_device_train_batch_size": 8, "seed": 0}

STANCE = "curious-uncertainty"
EXAMPLES = 20
RECIPE = {"learning_rate": 1e-3, "num_train_epochs": 3, "per_device_train_batch_size": 4, "seed": 0}
QWEN2_CRITICAL = [13, 15]  # of Qwen2-0.5B's 24 layers (seed 000)

METHODS = {
    "full": {},
    # "qv": q_proj + v_proj, or the fused projection holding them (GPT-2's c_attn)
    "lora": {"r": 8, "alpha": 16, "target_modules": ["qv"]},
}


@pytest.fixture(scope="module")
def critical_layers(anatomy):
    return anatomy.analog(QWEN2_CRITICAL, depth=24)


@pytest.mark.parametrize("method", list(METHODS))
def test_per_layer_change_is_recorded(train, anatomy, stance_report, method):
    runs = train(method, stance=STANCE, examples=EXAMPLES, recipe=RECIPE, **METHODS[method])
    stance_report.table(f"{method}: per-layer change (effective ΔW), seed {runs[0].recipe.seed}", runs[0].layer_table())
    middle = centre(runs)
    stance_report.metric(f"{method}.centre_layer", middle)
    stance_report.note(f"{method}: centre of change at layer {middle:.1f} of {anatomy.num_layers} "
                       f"({locus_of(middle, anatomy.num_layers)}; mean over {len(runs)} seeds)")
    # both methods reach every block, so every layer has a row, on every seed
    for run in runs:
        layers = [r["layer"] for r in run.layer_table() if r["layer"].startswith("L")]
        assert layers == [f"L{i}" for i in range(anatomy.num_layers)], f"seed {run.recipe.seed}: {layers}"


@pytest.mark.quick
def test_lora_changes_only_its_adapters(train):
    run = train("lora", stance=STANCE, examples=EXAMPLES, recipe=RECIPE, **METHODS["lora"])
    assert_only_targets_changed(run)


def test_full_finetuning_moves_every_tensor(train):
    run = train("full", stance=STANCE, examples=EXAMPLES, recipe=RECIPE)
    assert_only_targets_changed(run)


def test_surgical_lora_concentrates_change_in_critical_layers(train, critical_layers, stance_report):
    run = train("surgical-lora", stance=STANCE, examples=EXAMPLES, recipe=RECIPE, target_modules=["qv"],
                layers=critical_layers)  # seed 000: rank 32 on two layers
    stance_report.note(f"critical layers on this model: {critical_layers} (Qwen2-0.5B 13, 15 by relative depth)")
    assert_only_targets_changed(run, layers=critical_layers, kinds=["qv"])
    assert_change_concentrated(run, layers=critical_layers, min_share=0.999)


def test_full_finetuning_spreads_change(train):
    run = train("full", stance=STANCE, examples=EXAMPLES, recipe=RECIPE)
    assert_change_spread(run, top_k=2, max_share=0.5)


def test_lora_and_full_compared_layer_by_layer(train, anatomy, stance_report):
    full = train("full", stance=STANCE, examples=EXAMPLES, recipe=RECIPE)[0]  # the first seed of each
    lora = train("lora", stance=STANCE, examples=EXAMPLES, recipe=RECIPE, **METHODS["lora"])[0]
    full_layers = {r["layer"]: r for r in full.layer_table()}
    lora_layers = {r["layer"]: r for r in lora.layer_table()}
    rows = []
    for i in range(anatomy.num_layers):
        label = f"L{i}"
        f, lo = full_layers.get(label), lora_layers.get(label)
        rows.append({"layer": label, "locus": locus_of(i, anatomy.num_layers),
                     "full mean|Δ|": f["mean_abs"] if f else 0.0, "full ‖Δ‖/‖W‖": f["rel_change"] if f else 0.0,
                     "lora mean|Δ|": lo["mean_abs"] if lo else 0.0, "lora ‖Δ‖/‖W‖": lo["rel_change"] if lo else 0.0})
    stance_report.table(f"full FT vs LoRA (q, v) per layer, seed {full.recipe.seed}", rows)
    stance_report.metric("full.trainable_params", full.counts["trainable"])
    stance_report.metric("lora.trainable_params", lora.counts["trainable"])
    stance_report.metric("lora.stance_bytes", lora.counts["stance_bytes"])
    stance_report.metric("full.stance_bytes", full.counts["stance_bytes"])
    assert lora.counts["stance_bytes"] < full.counts["stance_bytes"]


def _thirds(runs, num_layers) -> dict[str, float]:
    """The share of the block change in each third of the network, mean over seeds."""
    def of_run(run):
        thirds = {"early": 0.0, "middle": 0.0, "late": 0.0}
        for layer, share in block_shares(run.deltas()).items():
            thirds[locus_of(layer, num_layers)] += share
        return thirds

    each = runset(runs).each(of_run)
    return {third: statistics.fmean(t[third] for t in each) for third in each[0]}


def centre(runs) -> float:
    """The change's centre of mass over the layers, mean over seeds."""
    return runset(runs).mean(lambda run: centre_of_mass(block_shares(run.deltas())))


def _qlora(train, domain, lr):
    return train("qlora", stance=domain, recipe={**DOMAIN_RECIPE, "learning_rate": lr}, **QLORA)


@pytest.mark.parametrize("lr", DOMAIN_LRS, ids=lambda lr: f"lr{lr:g}")
@pytest.mark.parametrize("domain", DOMAINS)
def test_qlora_domain_change_per_layer(train, anatomy, stance_report, domain, lr):
    runs = _qlora(train, domain, lr)
    rows = [{k: r[k] for k in ("layer", "mean", "var", "mean_abs", "var_abs", "rel_change")}
            for r in runs[0].layer_table() if r["layer"].startswith("L")]
    stance_report.table(f"QLoRA {domain}, lr {lr:g}: per-layer effective ΔW, seed {runs[0].recipe.seed}", rows)
    stance_report.metric(f"{domain}.lr{lr:g}.centre_layer", centre(runs))
    assert_only_targets_changed(runs)
    for run in runs:
        changed = [r for r in run.layer_table() if r["layer"].startswith("L")]
        assert len(changed) == anatomy.num_layers, f"seed {run.recipe.seed}: QLoRA on every layer must change every layer"


@pytest.mark.parametrize("lr", DOMAIN_LRS, ids=lambda lr: f"lr{lr:g}")
def test_locus_is_the_same_for_every_domain(train, anatomy, stance_report, lr):
    rows = []
    for domain in DOMAINS:
        runs = _qlora(train, domain, lr)
        middle, thirds = centre(runs), _thirds(runs, anatomy.num_layers)
        rows.append({"domain": domain, "lr": lr, "seeds": len(runs), "centre layer": middle,
                     "locus": locus_of(middle, anatomy.num_layers), "early share": thirds["early"],
                     "middle share": thirds["middle"], "late share": thirds["late"]})
    stance_report.table(f"where QLoRA puts its change, lr {lr:g} (means over seeds)", rows)
    loci = {r["locus"] for r in rows}
    stance_report.note(f"lr {lr:g}: locus " + ", ".join(f"{r['domain']} {r['locus']} ({r['centre layer']:.1f})"
                                                          for r in rows))
    assert len(loci) == 1, f"the locus depends on the domain at lr {lr:g}: {rows}"


@pytest.mark.parametrize("lr", DOMAIN_LRS, ids=lambda lr: f"lr{lr:g}")
def test_late_layers_change_most_in_every_domain(train, anatomy, lr):
    """Seed 001: fine-tuning on a domain moves the late third of the network most."""
    not_late = {}
    for domain in DOMAINS:
        thirds = _thirds(_qlora(train, domain, lr), anatomy.num_layers)
        if max(thirds, key=thirds.get) != "late":
            not_late[domain] = {k: round(v, 4) for k, v in thirds.items()}
    assert not not_late, f"at lr {lr:g} the late third is not where most change lies for: {not_late}"
