"""The general-ability probe set: rules that accept a right answer said in a sentence, and the
forgetting summary (retention, backward transfer, regressions, pattern) computed by hand."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stance_harness.analysis.ability import (
    AbilityProbe, ProbeSet, check_reply, forgetting_pattern, load_probeset, numbers_in, summarize,
)
from stance_harness.core.errors import HarnessError


@pytest.fixture(scope="module")
def general():
    return load_probeset()


def probe(general, probe_id):
    return next(p for p in general.probes if p.id == probe_id)


def test_the_shipped_set_has_three_families_and_unique_ids(general):
    assert general.families == ["factual", "arithmetic", "instruction"]
    assert len({p.id for p in general.probes}) == len(general.probes) >= 30


@pytest.mark.parametrize("reply, correct", [
    ("The capital of Australia is Canberra.", True),
    ("Canberra", True),
    ("canberra, of course.", True),
    ("The capital of Australia is Sydney.", False),
    ("Sydney. No wait, Canberra.", False),  # a wrong answer beside the right one is wrong
    ("I am not sure.", False),
    ("Canberras", False),  # whole words only
])
def test_a_factual_answer_is_accepted_in_a_full_sentence(general, reply, correct):
    ok, why = check_reply(probe(general, "capital-australia"), reply)
    assert ok is correct, why


def test_the_reason_names_what_was_wrong(general):
    assert check_reply(probe(general, "capital-australia"), "It is Sydney.") == (False, "says 'Sydney'")
    assert check_reply(probe(general, "multiply"), "7 times 8 is 54.") == (False, "says 54, not 56")
    assert check_reply(probe(general, "multiply"), "I cannot count.") == (False, "states no number")
    assert check_reply(probe(general, "one-word-sky"), "The sky on a clear day is blue") == \
        (False, "8 words, more than 3")


@pytest.mark.parametrize("probe_id, reply, correct", [
    ("multiply", "7 times 8 is 56.", True),  # the prompt's own numbers are not the answer
    ("multiply", "56", True),
    ("multiply", "The answer is 54.", False),
    ("hours-day", "There are 48 hours in two days.", True),
    ("continents", "There are seven continents.", True),
    ("freezing-point", "Water freezes at 0 degrees Celsius.", True),
    ("freezing-point", "Water freezes at 32 degrees.", False),
    ("yes-no-sun", "Yes.", True),
    ("yes-no-sun", "No", False),
    ("yes-no-fish", "No, it cannot.", True),
    ("count-to-three", "1, 2, 3", True),
    ("count-to-three", "1 2 4", False),
    ("plural-mouse", "Mice.", True),
    ("plural-mouse", "Mouses", False),
])
def test_rules_on_constructed_answers(general, probe_id, reply, correct):
    ok, why = check_reply(probe(general, probe_id), reply)
    assert ok is correct, why


def test_numbers_in_reads_digits_words_and_thousands():
    assert numbers_in("seven, 12, 1,000 and 2.5") == [7.0, 12.0, 1000.0, 2.5]
    assert numbers_in("no numbers here") == []


@given(st.sampled_from(["Canberra", "Paris", "Tokyo"]), st.text(alphabet="abcdefgh ", max_size=20))
def test_padding_a_right_answer_with_neutral_words_keeps_it_right(answer, padding):
    p = AbilityProbe("x", "factual", "?", accept=(answer,))
    assert check_reply(p, f"{padding} {answer}. {padding}")[0]


def test_the_summary_against_a_hand_computation():
    probes = ProbeSet("t", 1, (
        AbilityProbe("a1", "A", "?", accept=("yes",)), AbilityProbe("a2", "A", "?", accept=("yes",)),
        AbilityProbe("b1", "B", "?", accept=("yes",)), AbilityProbe("b2", "B", "?", accept=("yes",)),
    ))
    base = ["yes", "yes", "yes", "no"]
    adapted = ["yes", "no", "yes", "yes"]  # a2 regresses, b2 gains
    s = summarize(probes, base, adapted)
    assert s["families"]["A"]["retention"] == 0.5 and s["families"]["B"]["retention"] == 2.0
    # BWT = mean over families of (adapted - base) accuracy = ((0.5 - 1) + (1 - 0.5)) / 2 = 0
    assert s["backward_transfer"] == 0.0
    assert s["selectivity"] == 0.5  # largest drop 0.5 minus mean drop 0
    assert [r["id"] for r in s["regressions"]] == ["a2"] and [r["id"] for r in s["gains"]] == ["b2"]
    assert s["regressions"][0]["base_reply"] == "yes" and s["regressions"][0]["adapted_reply"] == "no"
    assert s["per_unit"] == [0.0, -1.0, 0.0, 1.0] and s["unit_ids"] == ["a1", "a2", "b1", "b2"]
    assert s["pattern"] == "broad"  # one of two families dropped by more than 0.10


def test_a_family_the_base_never_got_right_has_no_retention():
    probes = ProbeSet("t", 1, (AbilityProbe("a", "A", "?", accept=("yes",)),))
    assert summarize(probes, ["no"], ["no"])["families"]["A"]["retention"] is None


@pytest.mark.parametrize("drops, name", [
    ({"a": 0.0, "b": -0.1, "c": 0.0}, "none"),
    ({"a": 0.05, "b": 0.0, "c": 0.0}, "minimal"),
    ({"a": 0.3, "b": 0.0, "c": 0.0}, "selective"),
    ({"a": 0.3, "b": 0.2, "c": 0.0}, "broad"),
])
def test_pattern_names(drops, name):
    assert forgetting_pattern(drops) == name


def test_replies_must_match_the_probes(general):
    with pytest.raises(HarnessError, match="has 30 probes, got 2 replies"):
        summarize(general, ["a", "b"], ["a", "b"])


def test_a_malformed_probe_set_names_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nfamilies:\n  f:\n    - {id: x, prompt: 'q?', acept: [y]}\n")
    with pytest.raises(HarnessError, match=r"bad.yaml: f\[0\]: unknown field\(s\) acept"):
        load_probeset(bad)
    with pytest.raises(HarnessError, match="unknown probe set 'nope'"):
        load_probeset("nope")
