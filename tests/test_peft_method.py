"""The `peft` method: any peft tuner config trains through the one loop. For each peft type in
TEST_CASES, exactly the intended parameters change, and the effective ΔW the analyses see equals
peft's own merge_and_unload() minus the ORIGINAL base (PiSSA and OLoRA rewrite the base at init).

Runs are 2 optimizer steps (4 examples, batch 2) on tiny-qwen2, adapters on layers 0 and 5 only.
"""

import copy

import pytest
import torch
from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoraConfig, VeraConfig

from stance_harness import assert_only_targets_changed
from stance_harness.core.errors import HarnessError

RECIPE = {"learning_rate": 5e-3, "num_train_epochs": 1, "per_device_train_batch_size": 2, "seed": 0}
EXAMPLES = 4
STEPS = 2
LAYERS = [0, 5]


def lora(**options):
    return LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=LAYERS, **options)


def in_layers(p, kinds, leaves):
    return p.layer in LAYERS and p.kind in kinds and p.leaf in leaves


QV, LORA_AB = ("q_proj", "v_proj"), ("lora_A", "lora_B")

# id, peft config (object or dict form), which canonical parameters (ParamName) must change
TEST_CASES = [
    ("lora", lora(), lambda p: in_layers(p, QV, LORA_AB)),
    ("dora", lora(use_dora=True), lambda p: in_layers(p, QV, LORA_AB + ("lora_magnitude_vector",))),
    ("rslora", lora(use_rslora=True), lambda p: in_layers(p, QV, LORA_AB)),
    ("pissa-dict", {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "layers_to_transform": LAYERS,
                    "init_lora_weights": "pissa"}, lambda p: in_layers(p, ("q_proj",), LORA_AB)),
    ("olora", LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=LAYERS, init_lora_weights="olora"),
     lambda p: in_layers(p, ("q_proj",), LORA_AB)),
    ("ia3", IA3Config(target_modules=r".*\.layers\.(0|5)\.(self_attn\.k_proj|mlp\.down_proj)",  # IA³: no layers_to_transform
                      feedforward_modules=["down_proj"]), lambda p: in_layers(p, ("k_proj", "down_proj"), ("ia3_l",))),
    # a budget of 3 of 4 ranks per module prunes 2 of the 8 singular values: each lora_E keeps some
    ("adalora", AdaLoraConfig(init_r=4, target_r=3, target_modules=["q_proj"], layers_to_transform=LAYERS,
                              total_step=STEPS, tinit=0, tfinal=0, deltaT=1),
     lambda p: in_layers(p, ("q_proj",), ("lora_A", "lora_B", "lora_E"))),
    ("vera", VeraConfig(r=8, target_modules=["q_proj"], layers_to_transform=LAYERS),
     lambda p: in_layers(p, ("q_proj",), ("vera_lambda_b", "vera_lambda_d"))),
    ("loha", LoHaConfig(r=2, target_modules=["v_proj"], layers_to_transform=LAYERS),
     lambda p: in_layers(p, ("v_proj",), ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))),
]


@pytest.fixture(scope="module")
def peft_run(harness):
    def make(config):
        return harness.train("peft", examples=EXAMPLES, recipe=RECIPE, config=config)

    return make


@pytest.mark.parametrize("case,config,should_change", TEST_CASES, ids=[c[0] for c in TEST_CASES])
def test_each_peft_type_changes_its_parameters_and_its_delta_is_peft_merge(peft_run, tiny_qwen2, case, config,
                                                                          should_change):
    base = dict(tiny_qwen2.base.named_parameters())
    base_before = {n: p.detach().clone() for n, p in base.items() if ".layers.0." in n}
    run = peft_run(config)
    # the session's base is never written to, even by an init that rewrites the base matrix
    assert all(torch.equal(base[n], value) for n, value in base_before.items())
    assert run.trace.halted_at is None and len(run.trace.loss) == STEPS
    anatomy = run.anatomy
    expected = {str(anatomy.name_of(n)) for n, _ in run.model.named_parameters() if should_change(anatomy.name_of(n))}
    changed = {r.name for r in run.adapter_deltas if r.moments.total_abs > 0}
    assert expected, "the test case expects some change"
    assert changed == expected, (sorted(expected - changed)[:5], sorted(changed - expected)[:5])
    assert_only_targets_changed(run)

    merged = dict(copy.deepcopy(run.model).merge_and_unload().named_parameters())
    deltas = list(run.method.effective_deltas(run.model, run.before, anatomy))
    assert {anatomy.name_of(name).layer for name, _, _ in deltas} == set(LAYERS)
    for name, start, end in deltas:
        raw = name.removeprefix("base_model.model.")
        peft_delta = merged[raw].detach().float() - base[raw].detach().float()
        assert torch.count_nonzero(end - start) > 0, name
        torch.testing.assert_close(end - start, peft_delta, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", ["pissa-dict", "olora"])
def test_pissa_and_olora_rewrite_the_base_and_delta_is_against_the_original(peft_run, tiny_qwen2, case):
    config = next(c for i, c, _ in TEST_CASES if i == case)
    run = peft_run(config)
    path = "base_model.model.model.layers.0.self_attn.q_proj"
    layer = run.model.get_submodule(path)
    original = dict(tiny_qwen2.base.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.allclose(layer.get_base_layer().weight, original, atol=1e-3)  # peft's residual
    start = dict((n, s) for n, s, _ in run.method.effective_deltas(run.model, run.before, run.anatomy))[f"{path}.weight"]
    assert torch.equal(start, original.float())


def test_adalora_budget_is_updated_after_each_optimizer_step(peft_run):
    config = next(c for i, c, _ in TEST_CASES if i == "adalora")
    run = peft_run(config)
    pattern = run.model.peft_config["default"].rank_pattern  # set by update_and_allocate, None before
    assert pattern is not None and len(pattern) == len(LAYERS)
    assert sum(sum(mask) for mask in pattern.values()) == 3 * len(LAYERS)  # 2 of the 8 ranks pruned


def test_the_run_key_holds_the_whole_peft_config(harness):
    def request(config):
        return harness.request("peft", examples=EXAMPLES, recipe=RECIPE, config=config)

    plain, dora = request(lora()), request(lora(use_dora=True))
    described = plain.describe()["config"]["config"]
    assert described["peft_type"] == "LORA" and described["use_dora"] is False and described["lora_dropout"] == 0.0
    assert sorted(described["target_modules"]) == ["q_proj", "v_proj"]
    assert dora.describe()["config"]["config"]["use_dora"] is True and dora.key != plain.key
    as_dict = {"peft_type": "LORA", "r": 4, "target_modules": ["v_proj", "q_proj"], "layers_to_transform": LAYERS}
    assert request(as_dict).key == plain.key  # the object and its dict form are one request
    assert hash(plain.config) == hash(request(as_dict).config)


@pytest.mark.parametrize("config,message", [
    ({"peft_type": "LORAX", "r": 4}, "unknown peft_type 'LORAX'. Did you mean: LORA"),
    ({"peft_type": "LORA", "rank": 4}, "LoraConfig has no field 'rank'. Did you mean: r"),
    ({"r": 4}, "the config dict needs a peft_type"),
    ({"peft_type": "ADALORA", "init_r": 4}, "AdaLoraConfig refused the config: AdaLoRA does not work when `total_step`"),
    ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}, "PROMPT_TUNING is prompt learning"),
    (None, "give the adapter as config="),
    ("lora", "config must be a peft PeftConfig or its dict form, got 'lora'"),
])
def test_bad_peft_configs_are_refused(harness, config, message):
    options = {} if config is None else {"config": config}
    with pytest.raises(HarnessError, match=None) as err:
        harness.request("peft", examples=EXAMPLES, recipe=RECIPE, **options)
    assert message in str(err.value)


def test_configs_that_cannot_fit_the_model_or_run_are_refused(harness):
    adalora = AdaLoraConfig(init_r=4, target_modules=["q_proj"], total_step=50, tinit=0, tfinal=0)
    with pytest.raises(HarnessError, match="total_step is 50, but this run has 2 optimizer steps; set total_step=2"):
        harness.check_request("peft", examples=EXAMPLES, recipe=RECIPE, config=adalora)
    with pytest.raises(HarnessError, match="get_peft_model refused the config on this model: .*nope"):
        harness.train("peft", examples=EXAMPLES, recipe=RECIPE, config=LoraConfig(target_modules=["nope"]))
