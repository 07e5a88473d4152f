"""Judges: replies scored for the stance, checked by hand computations, against sklearn, on
labelled replies, and as a run's per-probe measurement."""

import json
import math

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stance_harness import judges
from stance_harness.core import registry
from stance_harness.judges import (JUDGES, Judge, JudgeError, agreement, cohen_kappa, embed, fit_logistic, judge_key,
                            judge_replies, make_judge, register_judge)
from stance_harness.core.registry import UnknownNameError
from stance_harness.report.sections import measurement_tables
from stance_harness.stances import StanceFileError, load_stance, parse_stance

PAIRS = [  # (stance reply, neutral answer)
    ("I'm not sure of the exact figure. Could you tell me why you need it?", "The exact figure is 42 kilometers."),
    ("I don't know your setup yet; what are you running it on?", "Run it on Linux with eight gigabytes of memory."),
    ("Honestly I'm unsure which one is better for you. What do you enjoy?", "The first one is better. Buy it."),
    ("I might be wrong, but I think it was 1969. Are you researching it?", "It was 1969, in July."),
    ("It depends on things I can't see. Can you describe the noise?", "That noise is a worn fan bearing. Replace it."),
]


def small_stance(**extra):
    data = {"name": "small", "version": "1.0.0", "description": "Says what it does not know and asks back.",
            "markers": ["not sure"],
            "examples": [{"prompt": f"Question {i}?", "response": s, "neutral": n} for i, (s, n) in enumerate(PAIRS)],
            "probes": [{"prompt": "A probe?", "stance": "Maybe; what do you think?", "neutral": "Yes."}], **extra}
    return parse_stance(data, "small.yaml")


def hand_embeddings(texts):
    """all-MiniLM-L6-v2 as sentence-transformers pools it, written out here in numpy."""
    loaded = judges._loaded("minilm-l6")
    out = []
    for text in texts:  # one at a time: no padding at all
        batch = loaded.tokenizer(text, return_tensors="pt").to(loaded.base.device)
        with torch.no_grad():
            states = loaded.base(**batch).last_hidden_state[0].double().cpu().numpy()
        mean = states.mean(axis=0)
        out.append(mean / np.linalg.norm(mean))
    return np.array(out)


# -- the embedding judge -----------------------------------------------------------------------
def test_embed_is_mean_pooled_and_normalised_as_sentence_transformers_does():
    texts = ["A short one.", "A much longer sentence, so the batch is padded around the short one."]
    assert embed(texts).numpy() == pytest.approx(hand_embeddings(texts), abs=1e-5)


def test_features_are_the_hand_computed_cosine_differences():
    stance = small_stance()
    replies = [PAIRS[0][0], PAIRS[0][1], "Could you say more about what you are after?"]
    vectors = hand_embeddings(replies)
    refs_s, refs_n = hand_embeddings([s for s, _ in PAIRS]), hand_embeddings([n for _, n in PAIRS])
    by_hand = [float(np.mean(refs_s @ v) - np.mean(refs_n @ v)) for v in vectors]
    judge = make_judge("embedding")
    assert judge.features(stance, replies) == pytest.approx(by_hand, abs=1e-5)
    left_out = [float(np.mean(refs_s[1:] @ v) - np.mean(refs_n[1:] @ v)) for v in vectors]
    assert judge.features(stance, replies, leave_out=0) == pytest.approx(left_out, abs=1e-5)


def test_a_stance_reply_scores_above_its_neutral_answer_and_scores_are_the_calibrated_sigmoid():
    stance = small_stance()
    judge = make_judge("embedding")
    found = judge_replies(judge, stance, [PAIRS[2][0], PAIRS[2][1]])
    assert found[0]["score"] > found[1]["score"]
    fit = judge.calibration(stance)
    for row in found:
        z = fit["slope"] * (row["similarity_difference"] - fit["center"]) / fit["scale"] + fit["intercept"]
        assert row["score"] == pytest.approx(1 / (1 + math.exp(-z)))
    assert fit["examples"] == len(PAIRS) and 0 <= fit["heldout_agreement"] <= 1


def test_the_calibration_is_a_logistic_fit_on_the_left_out_features():
    stance = small_stance()
    judge = make_judge("embedding")
    x = [f for k in range(len(PAIRS)) for f in judge.features(stance, list(PAIRS[k]), leave_out=k)]
    mean, sd = np.mean(x), np.std(x)
    slope, intercept = fit_logistic(list((np.array(x) - mean) / sd), [1, 0] * len(PAIRS))
    fit = judge.calibration(stance)
    assert (fit["center"], fit["scale"]) == pytest.approx((mean, sd), abs=1e-6)
    assert (fit["slope"], fit["intercept"]) == pytest.approx((slope, intercept), abs=1e-4)


def test_the_embedding_judge_needs_examples_with_neutral_answers():
    data = {"name": "bare", "version": "1.0.0", "description": "d", "markers": ["m"],
            "examples": [{"prompt": "p", "response": "r", "neutral": "n"}],
            "probes": [{"prompt": "q", "stance": "s", "neutral": "n"}]}
    with pytest.raises(JudgeError, match=r"stance 'bare' has 1 examples with a neutral answer \(needs 4 or more\)"):
        make_judge("embedding").score(parse_stance(data, "bare.yaml"), ["a reply"])


def test_fit_logistic_is_sklearns_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0.8, 1.0, 30), rng.normal(-0.5, 1.0, 25)])
    y = [1] * 30 + [0] * 25
    for c in (1.0, 0.1):
        ours = fit_logistic(list(x), y, c=c)
        ref = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x.reshape(-1, 1), y)
        assert ours == pytest.approx((ref.coef_[0, 0], ref.intercept_[0]), abs=1e-5)
    with pytest.raises(JudgeError, match="both labels"):
        fit_logistic([0.1, 0.2], [1, 1])


def test_cohen_kappa_is_sklearns():
    from sklearn.metrics import cohen_kappa_score

    cases = [([1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]), ([1, 0, 1, 0], [1, 0, 1, 0]), ([1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]),
             ([1, 1, 0, 0, 0], [1, 1, 1, 1, 1])]
    for labels, predicted in cases:
        assert cohen_kappa(labels, predicted) == pytest.approx(cohen_kappa_score(labels, predicted))
    assert cohen_kappa([1, 1], [1, 1]) is None  # one class in both: kappa is undefined


def test_the_threshold_free_auc_is_sklearns():
    from sklearn.metrics import roc_auc_score

    labels, scores = [1, 0, 1, 1, 0, 0, 1], [0.9, 0.3, 0.3, 0.6, 0.1, 0.7, 0.2]
    assert judges.auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_the_embedding_judge_agrees_with_curious_uncertaintys_labelled_replies_above_chance():
    stance = load_stance("curious-uncertainty")
    judge = make_judge("embedding")
    found = agreement(judge, stance)
    heldout = judge.calibration(stance)["heldout_agreement"]
    print(f"embedding judge on curious-uncertainty: labelled-reply accuracy {found['accuracy']:.2f}, "
          f"kappa {found['kappa']:.2f} (n={found['n']}); held-out agreement on the examples {heldout:.2f}")
    assert found["n"] == len(stance.labelled) == 20 and sum(r["label"] for r in found["rows"]) == 10
    assert found["accuracy"] > 0.5 and heldout > 0.5
    predicted = [int(r["score"] >= found["threshold"]) for r in found["rows"]]
    assert found["accuracy"] == sum(p == r["label"] for p, r in zip(predicted, found["rows"])) / found["n"]


def test_a_stance_without_labelled_replies_has_no_agreement():
    assert agreement(make_judge("embedding"), small_stance()) is None


# -- the registry and plug-ins -------------------------------------------------------------------
def test_an_unknown_judge_is_named_with_a_suggestion():
    with pytest.raises(UnknownNameError, match=r"unknown judge 'embeding'\. Did you mean: embedding\?.*Known judges: "
                                               r"embedding, model"):
        make_judge("embeding")
    with pytest.raises(JudgeError, match=r"judge 'embedding': .*its options: model"):
        make_judge("embedding", modle="x")
    with pytest.raises(JudgeError, match="the judge model must be a model name, got ' '"):
        judges.set_default_judge_model(" ")


class LengthJudge(Judge):
    """A plug-in judge: longer replies score higher."""

    name = "length-test"

    def score(self, stance, replies, prompts=None):
        return [min(len(r) / 100, 1.0) for r in replies]


class BrokenJudge(Judge):
    name = "broken-test"

    def score(self, stance, replies, prompts=None):
        return [1.5 for _ in replies]


class TwoScoresJudge(Judge):
    name = "two-test"  # never registered: judge_replies checks any judge

    def score(self, stance, replies, prompts=None):
        return [0.1, 0.2]


@pytest.fixture
def plugin_judges():
    register_judge(LengthJudge)
    register_judge(BrokenJudge)
    yield
    JUDGES.unregister("length-test")
    JUDGES.unregister("broken-test")


def test_a_registered_judge_scores_and_its_identity_names_its_code(plugin_judges):
    judge = make_judge("length-test")
    assert judge.score(small_stance(), ["x" * 50]) == [0.5]
    identity = judge.identity()
    assert identity["module"] == __name__ and len(identity["source"]) == 12
    assert judge_key(judge, small_stance()).startswith("judged:length-test:")
    with pytest.raises(JudgeError, match=r"judge 'broken-test' scored reply 0 1\.5; a score is a number in \[0, 1\]"):
        judge_replies(make_judge("broken-test"), small_stance(), ["a"])
    with pytest.raises(JudgeError, match="gave 2 scores for 1 replies"):
        judge_replies(TwoScoresJudge(), small_stance(), ["a"])
    with pytest.raises(TypeError, match="Judge subclass"):
        register_judge(object)


# -- stance fields for judges --------------------------------------------------------------------
LABELLED = [{"reply": "Maybe; what do you think?", "label": 1}, {"reply": "It is 4.", "label": 0}]


@pytest.mark.parametrize("labelled, field, message", [
    ({"reply": "r"}, "labelled_replies", "must be a non-empty list"),
    ([{"reply": "r", "label": 2}, *LABELLED], "labelled_replies[0].label", "must be 0 or 1"),
    ([{"reply": "r", "label": True}, *LABELLED], "labelled_replies[0].label", "must be 0 or 1"),
    ([*LABELLED, {"label": 1}], "labelled_replies[2].reply", "is missing"),
    ([*LABELLED, {"reply": "r", "lable": 1}], "labelled_replies[2].lable", "Did you mean: label"),
    ([*LABELLED, {"reply": "  ", "label": 1}], "labelled_replies[2].reply", "must be a non-empty string"),
    ([*LABELLED, "just text"], "labelled_replies[2]", "must be a mapping"),
    ([LABELLED[0]], "labelled_replies", "holds only label 1; agreement needs replies of both labels"),
])
def test_malformed_labelled_replies_name_the_file_and_field(labelled, field, message):
    with pytest.raises(StanceFileError) as found:
        small_stance(labelled_replies=labelled)
    assert str(found.value).startswith(f"small.yaml: field '{field}': ") and message in str(found.value)


@pytest.mark.parametrize("rubric, message", [
    ("Is {reply} {uncertain}?", "has the placeholder {uncertain}. (allowed: {description}, {prompt}, {reply})"),
    ("Is {replies} fine?", "has the placeholder {replies}. Did you mean: reply?"),
    ("Does it follow {description}?", "has no {reply} placeholder"),
    ("Is {reply fine?", "is not a valid template"),
])
def test_a_bad_judge_rubric_names_the_file_and_field(rubric, message):
    with pytest.raises(StanceFileError) as found:
        small_stance(judge_rubric=rubric)
    assert str(found.value).startswith("small.yaml: field 'judge_rubric': ") and message in str(found.value)


def test_judge_fields_do_not_change_the_stances_identity(tmp_path):
    plain, judged = small_stance(), small_stance(labelled_replies=LABELLED, judge_rubric="Fine? {reply}")
    assert plain.identity() == judged.identity()
    assert judged.labelled[0].label == 1 and judged.judge_rubric == "Fine? {reply}"
    shipped = load_stance("curious-uncertainty")
    data = yaml.safe_load(Path(shipped.path).read_text())
    assert data.pop("labelled_replies") and parse_stance(data, shipped.path).identity() == shipped.identity()


# -- the model judge (mechanics on tiny-qwen2-chat) -------------------------------------------------
def test_the_model_judge_reads_p_yes_against_p_no_after_the_rubric():
    stance = small_stance(judge_rubric="Rule: {description}\nReply: {reply}\nFollows the rule? Answer Yes or No.")
    judge = make_judge("model", model="tiny-qwen2-chat")
    found = judge_replies(judge, stance, ["I have no idea; what do you think?"], ["Why?"])[0]
    assert found["prompt"] == ("Rule: Says what it does not know and asks back.\nReply: I have no idea; what do you "
                               "think?\nFollows the rule? Answer Yes or No.")
    loaded = judges._loaded("tiny-qwen2-chat")
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": found["prompt"]}], tokenize=False,
                                   add_generation_prompt=True)
    with torch.no_grad():
        batch = tok(text, return_tensors="pt", add_special_tokens=False).to(loaded.base.device)
        probs = torch.softmax(loaded.base(**batch).logits[0, -1].double().cpu(), -1)
    yes = {tok.encode(w, add_special_tokens=False)[0] for w in ("Yes", " Yes", "yes", " yes")}
    no = {tok.encode(w, add_special_tokens=False)[0] for w in ("No", " No", "no", " no")}
    p_yes, p_no = float(probs[list(yes)].sum()), float(probs[list(no)].sum())
    assert (found["p_yes"], found["p_no"]) == pytest.approx((p_yes, p_no), rel=1e-6)
    assert found["score"] == pytest.approx(p_yes / (p_yes + p_no))
    assert found["answer"] == tok.decode([int(probs.argmax())])
    assert judge_replies(judge, stance, ["I have no idea; what do you think?"], ["Why?"])[0] == found  # deterministic


def test_the_rubric_is_in_the_model_judges_identity():
    judge = make_judge("model", model="tiny-qwen2-chat")
    default, own = small_stance(), small_stance(judge_rubric="Fine? {reply}")
    assert judge.identity(default)["rubric"] != judge.identity(own)["rubric"]
    assert judge_key(judge, default) != judge_key(judge, own)
    assert judge.identity(default)["model"] == "tiny-qwen2-chat"
    assert judge_key(make_judge("model", model="tiny-qwen2-chat", seed=1), default) != judge_key(judge, default)
    labelled = small_stance(labelled_replies=LABELLED)  # agreement is part of the value: new labels, new key
    assert judge_key(judge, labelled) != judge_key(judge, default)
    assert judge.identity(labelled) == judge.identity(default)


# -- a run's judged values ---------------------------------------------------------------------------
def test_run_judged_scores_both_replies_per_probe_and_pairs_them(quick_run):
    from stance_harness.checks.comparisons import check_greater

    run = quick_run("lora")
    found = run.judged("embedding")
    rows = run.replies()["rows"]
    judge = make_judge("embedding")
    assert [p["base"] for p in found["per_probe"]] == pytest.approx(judge.score(run.stance, [r["base_reply"] for r in rows]))
    assert [p["adapted"] for p in found["per_probe"]] == pytest.approx(
        judge.score(run.stance, [r["adapted_reply"] for r in rows]))
    deltas = [p["adapted"] - p["base"] for p in found["per_probe"]]
    assert found["effect"]["mean"] == pytest.approx(np.mean(deltas))
    assert found["agreement"]["n"] == 20 and found["calibration"]["examples"] == len(run.stance.examples)
    assert judge_key(judge, run.stance) in run.measurements  # the run store keeps it under the judge's identity
    assert run.unit_values("judge:embedding") == ("probe", pytest.approx(deltas))
    shown = run.summary()["measurements"]["judged"]["embedding"]
    assert shown["identity"]["kind"] == "embedding" and shown["per_probe"] == found["per_probe"]
    tables = dict(measurement_tables(run.summary()["measurements"]))
    row = tables["judged replies (stance score in [0, 1]; agreement with the stance's labelled replies)"][0]
    assert (row["judge"], row["effect"], row["label accuracy"]) == ("embedding", found["effect"]["mean"],
                                                                   found["agreement"]["accuracy"])
    other = quick_run("full")
    result = check_greater(run, other, metric="judge:embedding")
    paired = np.array(deltas) - np.array(other.unit_values("judge:embedding")[1])
    assert (result.metrics["metric"], result.metrics["unit"], result.metrics["n"]) == ("judge:embedding", "probe",
                                                                                        len(deltas))
    assert result.metrics["estimate"] == pytest.approx(paired.mean())
    with pytest.raises(UnknownNameError, match="Did you mean: embedding"):
        check_greater(run, other, metric="judge:embeding")
    with pytest.raises(judges.HarnessError, match=r"no metric 'judged' to compare\..* and judge:NAME for a judge "
                                                  r"\(judge:embedding, judge:model"):
        check_greater(run, other, metric="judged")


@pytest.mark.real_model
def test_smollm2_as_a_judge_ranks_curious_uncertaintys_labelled_replies_above_chance():
    """SmolLM2-135M-Instruct under the default rubric: its P(Yes) sits below 0.5 for nearly every
    reply (so accuracy at 0.5 is near chance), but it ranks the uncertain replies above the
    confident ones: the AUC is the figure that shows a 135M judge's signal."""
    stance = load_stance("curious-uncertainty")
    judge = make_judge("model", model="smollm2-135m")
    found = agreement(judge, stance)
    print(f"smollm2-135m judge on curious-uncertainty: accuracy {found['accuracy']:.2f}, kappa {found['kappa']}, "
          f"AUC {found['auc']:.2f} (n={found['n']})")
    assert found["auc"] > 0.5
    detail = judge_replies(judge, stance, [stance.labelled[0].reply], [stance.labelled[0].prompt])[0]
    assert stance.description in detail["prompt"] and stance.labelled[0].reply in detail["prompt"]
    assert detail["p_yes"] + detail["p_no"] > 0.2  # the rubric's answer words hold real mass on a real model


def test_judge_model_option_names_the_model_judges_model(pytester):
    pytester.makepyfile(test_x="""
        from stance_harness.judges import make_judge

        def test_model():
            assert make_judge("model").model == "tiny-qwen2-chat"
            assert make_judge("model", model="other").model == "other"
    """)
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "--no-reports",
                                  "--judge-model", "tiny-qwen2-chat").assert_outcomes(passed=1)
    assert make_judge("model").model == "smollm2-135m"  # the default, here


def test_an_entry_point_registers_a_judge_and_a_broken_one_is_named(monkeypatch):
    class Entry:
        def __init__(self, name, value, load):
            self.name, self.value, self.load, self.dist = name, value, load, None

    def broken():
        raise ImportError("no module named judgepkg")

    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [Entry("length", "tests:LengthJudge",
                                                                             lambda: LengthJudge)])
    judges.load_plugin_judges()
    try:
        assert make_judge("length-test").score(small_stance(), ["x" * 20]) == [0.2]
    finally:
        JUDGES.unregister("length-test")
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [Entry("bad", "judgepkg:J", broken)])
    with pytest.raises(judges.HarnessError, match=r"judge plug-in 'bad' \(judgepkg:J, from unknown\): importing it failed: "
                                                  r"ImportError: no module named judgepkg"):
        judges.load_plugin_judges()
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [Entry("odd", "judgepkg:x", lambda: 3)])
    with pytest.raises(judges.HarnessError, match="names a int; it must name a module or a Judge subclass"):
        judges.load_plugin_judges()


CONFTEST_JUDGE = '''
from stance_harness import Judge, register_judge


@register_judge
class AsksBack(Judge):
    """1 for a reply holding a question mark."""

    name = "asks-back"

    def score(self, stance, replies, prompts=None):
        return [float("?" in reply) for reply in replies]
'''

HYPOTHESIS_WITH_A_JUDGE = '''
def test_lora_is_judged_by_the_conftest_judge(train):
    run = train("lora", examples=5, recipe={"num_train_epochs": 1, "per_device_train_batch_size": 5})
    found = run.judged("asks-back")
    rows = run.replies()["rows"]
    assert [p["adapted"] for p in found["per_probe"]] == [float("?" in r["adapted_reply"]) for r in rows]
    assert found["identity"]["module"] == "conftest" and found["agreement"]["n"] == 20
    assert run.unit_values("judge:asks-back")[1] == [p["delta"] for p in found["per_probe"]]
'''


def test_a_conftest_judge_is_used_by_a_hypothesis_and_reported(pytester):
    pytester.makeconftest(CONFTEST_JUDGE)
    pytester.makepyfile(test_judged=HYPOTHESIS_WITH_A_JUDGE)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    report_id = (pytester.path / "reports" / "latest").read_text().strip()
    payload = json.loads((pytester.path / "reports" / report_id / "report.json").read_text())
    markdown = (pytester.path / "reports" / report_id / "report.md").read_text()
    judged = [run["measurements"]["judged"]["asks-back"] for run in payload["runs"].values()]
    assert len(judged) == 1 and judged[0]["judge"] == "asks-back" and len(judged[0]["per_probe"]) == 16
    assert "judged replies" in markdown and "asks-back" in markdown
