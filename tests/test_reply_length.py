"""The reply length shift (stance_harness.measurements.reply_length) and its check, against token
counts made by hand: on a trained run's own replies, and on replies set by hand."""

import dataclasses

import pytest

from stance_harness import (HypothesisFailed, HypothesisInconclusive, assert_reply_length_shift,
                            check_reply_length_shift)
from stance_harness.analysis.behavior import effect_of
from stance_harness.core.errors import HarnessError
from stance_harness.core.metrics import direction_of
from stance_harness.measurements import measurement_checks, producer_of
from stance_harness.report.sections import measurement_tables


@pytest.fixture(scope="module")
def lora(quick_run):
    return quick_run("lora")


def tokens(run, text: str) -> int:
    return len(run.loaded.tokenizer(text, add_special_tokens=False)["input_ids"])


def with_replies(run, base: list[str], adapted: list[str], name: str):
    """A copy of `run`, kept out of the run store, whose greedy replies are `base` and `adapted`."""
    copy = dataclasses.replace(run, run_id=name, services=None)
    rows = [{"probe": p.prompt, "base_reply": b, "adapted_reply": a} for p, b, a in zip(run.stance.probes, base, adapted)]
    copy.measurements["replies"] = {"rows": rows, "max_new_tokens": 32, "framing": run.framing.identity()}
    return copy


def test_the_shift_is_the_adapted_replys_tokens_minus_the_bases_per_probe(lora):
    rows = lora.replies()["rows"]
    found = lora.measure("reply_length")
    hand = [tokens(lora, r["adapted_reply"]) - tokens(lora, r["base_reply"]) for r in rows]
    assert [r["delta"] for r in found["per_probe"]] == hand
    assert found["base"] == pytest.approx(sum(tokens(lora, r["base_reply"]) for r in rows) / len(rows))
    assert found["effect"] == effect_of([float(d) for d in hand]).as_dict()
    assert lora.unit_values("reply_length_shift") == ("probe", hand)
    assert lora.unit_ids("reply_length_shift") == lora.unit_ids("loglik_margin")  # paired by probe
    assert producer_of("reply_length_shift").name == "reply_length" and direction_of("reply_length_shift") == "lower"
    assert measurement_checks()["check_reply_length_shift"] == "reply_length"
    view = lora.report_measurements()["reply_length"]
    assert "per_probe" not in view and view["effect"]["mean"] == found["effect"]["mean"]
    titles = [title for title, _ in measurement_tables(lora.report_measurements())]
    assert "reply length (tokens of the greedy reply, adapted minus base, per probe)" in titles


def test_the_check_passes_when_the_replies_keep_their_length(lora):
    texts = [f"I am not sure about {p.prompt[:10]}." for p in lora.stance.probes]
    run = with_replies(lora, texts, texts, "same-length")
    result = assert_reply_length_shift(run, max_shift=2)
    assert result.verdict == "supported" and result.metrics["mean"] == 0.0
    assert result.summary.startswith("lora: replies ") and result.summary.endswith(
        "shift +0 tokens per probe (95% interval +0 to +0); allowed ±2")


def test_the_check_fails_when_every_reply_grows_past_the_bound(lora):
    base = ["Yes." for _ in lora.stance.probes]
    adapted = ["Yes. I do not know that, and I would ask you what you mean by it first." for _ in base]
    grown = tokens(lora, adapted[0]) - tokens(lora, base[0])
    assert grown > 4
    run = with_replies(lora, base, adapted, "longer")
    with pytest.raises(HypothesisFailed) as err:
        assert_reply_length_shift(run, max_shift=4)
    assert err.value.result.verdict == "refuted"
    assert (f"lora: replies {tokens(lora, 'Yes.'):.3g} -> {tokens(lora, adapted[0]):.3g} tokens, shift "
            f"+{grown} tokens per probe (95% interval +{grown} to +{grown}); allowed ±4") in str(err.value)
    assert check_reply_length_shift(run, max_shift=grown).verdict == "supported"


def test_the_check_is_inconclusive_when_the_interval_straddles_the_bound(lora):
    base = ["Yes." for _ in lora.stance.probes]
    adapted = ["Yes." if i % 2 else "Yes. I do not know that, and I would ask you first." for i in range(len(base))]
    run = with_replies(lora, base, adapted, "mixed")
    mean = run.measure("reply_length")["effect"]
    bound = (mean["low"] + mean["high"]) / 2
    with pytest.raises(HypothesisInconclusive, match=r"lora: replies .* allowed ±"):
        assert_reply_length_shift(run, max_shift=bound)


def test_the_check_refuses_a_bound_that_is_no_number_of_tokens(lora):
    with pytest.raises(HarnessError, match=r"check_reply_length_shift: max_shift must be a number of tokens >= 0, "
                                           r"got -1"):
        check_reply_length_shift(lora, max_shift=-1)
