"""The user's data as it is: training examples from JSONL in TRL's formats, and chat templates.

The chat path runs on tiny-qwen2-chat (tiny-qwen2's weights with a small template whose assistant
turns carry {% generation %}, so transformers' own assistant mask is a reference for ours)."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from stance_harness import measure
from stance_harness.runs.batches import IGNORE_INDEX, Framing, encode_examples, framing_for
from stance_harness.models import ModelArgs, load_model
from stance_harness.core.errors import HarnessError
from stance_harness.runs.request import TrainingRequest
from stance_harness.session import HarnessOptions, HarnessSession
from stance_harness.stances import ExamplesFileError, Message, StanceFileError, load_stance, load_stance_file
from stance_harness.runs.training import plan

QUICK = {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 3, "seed": 0}
EOS = "<|endoftext|>"

ROWS = [
    {"messages": [{"role": "system", "content": "Answer honestly."},
                  {"role": "user", "content": "What year is it on Mars?"},
                  {"role": "assistant", "content": "I'm not sure Mars keeps years like ours."},
                  {"role": "user", "content": "Why not?"},
                  {"role": "assistant", "content": "I don't know how they would count them."}]},
    {"prompt": "How many moons does Neptune have?", "completion": "I'm not sure; the count keeps changing."},
    {"prompt": [{"role": "user", "content": "Is glass a liquid?"}],
     "completion": [{"role": "assistant", "content": "I'm not certain, but I think it is a solid."}]},
    {"messages": [{"role": "user", "content": "Who wrote the Iliad?"},
                  {"role": "assistant", "content": "I'm not sure anyone knows for certain."}], "id": 7},
]


def write_stance(directory: Path, rows, name="chatty", extra: dict | None = None) -> Path:
    probes = [p for p in load_stance("curious-uncertainty").probes[:4]]
    (directory / "data.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    data = {"name": name, "version": "1.0.0", "description": "says what it does not know",
            "markers": ["not sure"], "examples_file": "data.jsonl",
            "probes": [dataclasses.asdict(p) for p in probes], **(extra or {})}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def chat_model():
    return load_model("tiny-qwen2-chat")


@pytest.fixture(scope="module")
def chat_stance_path(tmp_path_factory):
    return write_stance(tmp_path_factory.mktemp("stance"), ROWS)


@pytest.fixture(scope="module")
def chat_session(chat_model):
    session = HarnessSession(HarnessOptions("tiny-qwen2-chat", ModelArgs(), [], None, Path("."), []))
    session.use_model(chat_model)
    return session


@pytest.fixture(scope="module")
def chat_run(chat_session, chat_stance_path):
    return chat_session.train("lora", stance=str(chat_stance_path), recipe=QUICK)


def reference_mask(tokenizer, messages) -> tuple[list[int], list[int]]:
    """transformers' own rendering and assistant mask (from the template's {% generation %} blocks)."""
    out = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages], tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    return out["input_ids"], [i for i, flag in enumerate(out["assistant_masks"]) if flag]


# -- JSONL in TRL's formats -----------------------------------------------------------------------
def test_both_trl_formats_load_with_their_turns_and_loss(chat_stance_path):
    stance = load_stance_file(chat_stance_path)
    multi, plain, listed, extra_column = stance.examples
    assert [(m.role, m.loss) for m in multi.conversation()] == [
        ("system", False), ("user", False), ("assistant", True), ("user", False), ("assistant", True)]
    assert (multi.prompt, multi.response) == ("Why not?", "I don't know how they would count them.")
    assert plain.messages == () and plain.conversation() == (
        Message("user", "How many moons does Neptune have?"),
        Message("assistant", "I'm not sure; the count keeps changing.", loss=True))
    assert [(m.role, m.loss) for m in listed.conversation()] == [("user", False), ("assistant", True)]
    assert extra_column.response == "I'm not sure anyone knows for certain."  # the "id" column is ignored
    assert stance.provenance()["examples_file"]["path"].endswith("data.jsonl")


def test_the_documented_example_stance_loads_with_every_format():
    import stance_harness

    root = Path(stance_harness.__file__).resolve().parent.parent
    stance = load_stance_file(root / "docs" / "examples" / "curious-chat.yaml")
    rows = [json.loads(line) for line in (root / "docs" / "examples" / "curious-chat.jsonl").read_text().splitlines()]
    assert len(stance.examples) == len(rows) and stance.probes == load_stance("curious-uncertainty").probes
    assert {"messages", "prompt"} <= {next(iter(row)) for row in rows}
    assert any(isinstance(row.get("prompt"), list) for row in rows) and any(isinstance(row.get("prompt"), str)
                                                                           for row in rows)
    assert any(sum(m.loss for m in e.conversation()) > 1 and e.conversation()[0].role == "system"
               for e in stance.examples)


def test_the_data_files_digest_enters_the_stance_identity(tmp_path, chat_stance_path):
    first = load_stance_file(chat_stance_path).identity()
    edited = write_stance(tmp_path, ROWS[:3] + [{"prompt": "Q?", "completion": "I'm not sure."}])
    second = load_stance_file(edited).identity()
    assert first["examples_file"] != second["examples_file"] and first["content"] != second["content"]
    assert len(first["examples_file"]) == 64


def test_a_prompt_completion_example_trains_on_the_completion_only_in_plain_framing(chat_model):
    tok = chat_model.tokenizer
    framing = framing_for(tok, "none")
    (ids, labels), = encode_examples(framing, [load_example({"prompt": "Q?", "completion": "A."})], 64)
    head = tok("Q?\n", add_special_tokens=False)["input_ids"]
    tail = tok("A." + EOS, add_special_tokens=False)["input_ids"]
    assert ids == head + tail and labels == [IGNORE_INDEX] * len(head) + tail


def load_example(row):
    from stance_harness.stances import parse_examples_jsonl

    return parse_examples_jsonl(json.dumps(row).encode(), "x.jsonl")[0]


def test_plain_framing_of_a_multi_turn_conversation_counts_every_assistant_turn(chat_model, chat_stance_path):
    tok = chat_model.tokenizer
    multi = load_stance_file(chat_stance_path).examples[0]
    ids, labels = framing_for(tok, "none").turns(multi.conversation())
    pieces = [tok(m.content + ("" if m.role != "assistant" else EOS) + ("\n" if m.role != "assistant" else ""),
                  add_special_tokens=False)["input_ids"] for m in multi.conversation()]
    assert ids == [t for piece in pieces for t in piece]
    expected, at = [], 0
    for message, piece in zip(multi.conversation(), pieces):
        expected += list(range(at, at + len(piece))) if message.loss else []
        at += len(piece)
    assert [i for i, label in enumerate(labels) if label != IGNORE_INDEX] == expected


BAD_ROWS = [
    ("{half", 1, "<json>", "is not valid JSON"),
    ('["a list"]', 1, "<row>", "must be a JSON object"),
    ({"mesages": []}, 1, "<row>", "has neither 'messages' nor 'prompt'/'completion'.*Did you mean: messages"),
    ({"prompt": "Q?"}, 1, "completion", "is missing"),
    ({"completion": "A."}, 1, "prompt", "is missing"),
    ({"prompt": "Q?", "completion": 3}, 1, "completion", "prompt and completion must both be strings or both lists of messages; got str and int"),
    ({"prompt": "Q?", "completion": "  "}, 1, "completion", "must be a non-empty string"),
    ({"messages": [{"role": "user", "content": "Q?"}, {"role": "assitant", "content": "A."}]}, 1,
     r"messages\[1\].role", "is 'assitant'; allowed: system, user, assistant.*Did you mean: assistant"),
    ({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": ""}]}, 1,
     r"messages\[1\].content", "must be a non-empty string"),
    ({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant"}]}, 1, r"messages\[1\].content",
     "is missing"),
    ({"messages": [{"role": "user", "content": "Q?"}]}, 1, "messages", "has no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "A."}]}, 1, r"messages\[0\].role", "is 'assistant'; a conversation starts with a system or user turn"),
    ({"messages": "Q?"}, 1, "messages", "must be a non-empty list of messages"),
    ({"prompt": [{"role": "user", "content": "Q?"}], "completion": [{"role": "user", "content": "A."}]}, 1,
     r"completion\[0\].role", "is 'user'; a completion holds assistant turns only"),
    ({"messages": [], "prompt": "Q?"}, 1, "messages", "and prompt/completion are both given; a row has one format"),
]


@pytest.mark.parametrize("row, line, field, problem", BAD_ROWS, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_ROWS)])
def test_a_bad_row_names_the_file_line_and_field(tmp_path, row, line, field, problem):
    good = {"prompt": "Q?", "completion": "I'm not sure."}
    path = write_stance(tmp_path, [good, "", row])  # the bad row is on line 3: the blank line counts
    with pytest.raises(ExamplesFileError, match=rf"data\.jsonl, line {line + 2}: field '{field}': {problem}") as info:
        load_stance_file(path)
    assert info.value.line == line + 2 and info.value.field.replace("\\", "") == field.replace("\\", "")


def test_stance_level_errors_about_the_examples_file(tmp_path):
    (tmp_path / "a").mkdir()
    path = write_stance(tmp_path / "a", [{"prompt": "Q?", "completion": "A."}],
                        extra={"examples": [{"prompt": "Q?", "response": "A.", "neutral": "B."}]})
    with pytest.raises(StanceFileError, match=r"chatty\.yaml: field 'examples_file': and 'examples' are both given"):
        load_stance_file(path)
    (tmp_path / "b").mkdir()
    path = write_stance(tmp_path / "b", [{"prompt": "Q?", "completion": "A."}], extra={"examples_file": "nope.jsonl"})
    with pytest.raises(StanceFileError, match=r"field 'examples_file': .*nope\.jsonl cannot be read"):
        load_stance_file(path)
    (tmp_path / "c").mkdir()
    path = write_stance(tmp_path / "c", ["", "  "])
    with pytest.raises(StanceFileError, match=r"data\.jsonl: field '<file>': holds no examples"):
        load_stance_file(path)


# -- chat templates -------------------------------------------------------------------------------
def test_auto_uses_a_template_where_there_is_one_and_none_never(chat_model, tiny_qwen2):
    assert framing_for(chat_model.tokenizer, "auto").kind == "chat"
    assert framing_for(chat_model.tokenizer, "none").kind == "plain"
    assert framing_for(tiny_qwen2.tokenizer, "auto").kind == "plain"  # the existing tiny models keep their framing
    with pytest.raises(HarnessError, match=r"--chat-template 'chatml': use one of auto, none"):
        framing_for(chat_model.tokenizer, "chatml")


def test_the_template_is_applied_and_the_mask_covers_exactly_the_assistant_tokens(chat_model, chat_stance_path):
    tok = chat_model.tokenizer
    framing = framing_for(tok, "auto")
    multi = load_stance_file(chat_stance_path).examples[0]
    ids, labels = framing.turns(multi.conversation())
    assert tok.decode(ids) == ("<|system|>\nAnswer honestly.\n<|user|>\nWhat year is it on Mars?\n<|assistant|>\n"
                               "I'm not sure Mars keeps years like ours." + EOS + "<|user|>\nWhy not?\n<|assistant|>\n"
                               "I don't know how they would count them." + EOS)
    reference_ids, reference_positions = reference_mask(tok, multi.conversation())
    positions = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert ids == reference_ids and positions == reference_positions
    assert all(labels[i] == ids[i] for i in positions)
    # the two learnt spans are each reply and its end of text, nothing of the headers
    first_end = positions.index(next(i for i in positions if ids[i] == tok.eos_token_id)) + 1
    assert tok.decode([ids[i] for i in positions[:first_end]]) == "I'm not sure Mars keeps years like ours." + EOS
    assert tok.decode([ids[i] for i in positions[first_end:]]) == "I don't know how they would count them." + EOS


def test_the_mask_positions_by_hand_on_one_turn(chat_model):
    tok = chat_model.tokenizer
    ids, labels = framing_for(tok, "auto").turns((Message("user", "Hi?"), Message("assistant", "Not sure.", loss=True)))
    head = tok("<|user|>\nHi?\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    reply = tok("Not sure." + EOS, add_special_tokens=False)["input_ids"]
    assert ids == head + reply
    assert labels == [IGNORE_INDEX] * len(head) + reply  # positions len(head) .. len(ids) - 1, exactly


def test_a_prompt_completion_row_learns_only_the_completion_under_the_template(chat_model):
    tok = chat_model.tokenizer
    row = {"prompt": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Earlier."},
                      {"role": "user", "content": "And now?"}],
           "completion": [{"role": "assistant", "content": "I'm not sure."}]}
    ids, labels = framing_for(tok, "auto").turns(load_example(row).conversation())
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "I'm not sure." + EOS  # not "Earlier."


def test_a_template_without_generation_markers_is_masked_by_its_rendering(chat_model):
    tok = copy.deepcopy(chat_model.tokenizer)
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                         "<|endoftext|>{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    conversation = (Message("user", "Hi?"), Message("assistant", "Not sure.", loss=True))
    ids, labels = Framing(tok, chat=True).turns(conversation)
    assert tok.decode(ids) == "[user]Hi?\n[assistant]Not sure." + EOS + "\n"
    learnt = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(learnt) == "Not sure." + EOS + "\n"  # the reply and what closes its turn
    assert ids[-len(learnt):] == learnt


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_model):
    tok = copy.deepcopy(chat_model.tokenizer)
    tok.chat_template = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(HarnessError, match=r"renders turn 1 \(assistant\) differently once later turns follow"):
        Framing(tok, chat=True).turns((Message("user", "Hi?"), Message("assistant", "A.", loss=True),
                                       Message("user", "And?")))


def test_the_framing_and_its_template_enter_the_run_key(chat_model, chat_stance_path):
    stance = load_stance_file(chat_stance_path)
    chat = TrainingRequest.build(chat_model, stance, "lora", recipe=QUICK)
    plain = TrainingRequest.build(chat_model, stance, "lora", recipe=QUICK, chat_template="none")
    assert chat.describe()["framing"]["kind"] == "chat" and plain.describe()["framing"] == {"kind": "plain"}
    assert chat.describe()["stance"]["examples_file"] == stance.examples_digest
    tok = copy.deepcopy(chat_model.tokenizer)
    tok.chat_template = chat_model.tokenizer.chat_template.replace("<|assistant|>", "<|bot|>")
    edited = TrainingRequest.build(dataclasses.replace(chat_model, tokenizer=tok), stance, "lora", recipe=QUICK)
    assert len({chat.key, plain.key, edited.key}) == 3


def test_training_data_is_framed_by_the_template(chat_model, chat_stance_path):
    stance = load_stance_file(chat_stance_path)
    _, data = plan(TrainingRequest.build(chat_model, stance, "lora", recipe=QUICK), chat_model, stance)
    for (ids, labels), example in zip(data, stance.examples):
        reference_ids, reference_positions = reference_mask(chat_model.tokenizer, example.conversation())
        assert ids == reference_ids
        assert [i for i, label in enumerate(labels) if label != IGNORE_INDEX] == reference_positions


def test_probes_and_calibration_are_framed_as_training(chat_run):
    tok, framing = chat_run.loaded.tokenizer, chat_run.framing
    assert framing.kind == "chat" and chat_run.request.framing == framing.identity()
    assert chat_run.summary()["framing"] == framing.identity()  # the report says how the run was framed
    probes = chat_run.stance.probes
    pairs = measure.continuation_logits(chat_run.model, framing, [p.prompt for p in probes], [p.stance for p in probes])
    total = 0
    for probe, (logits, targets) in zip(probes, pairs):
        conversation = (Message("user", probe.prompt), Message("assistant", probe.stance, loss=True))
        reference_ids, positions = reference_mask(tok, conversation)
        assert targets.tolist() == [reference_ids[i] for i in positions]
        with torch.no_grad():
            full = chat_run.model(input_ids=torch.tensor([reference_ids])).logits[0].float()
        assert torch.allclose(logits, full[positions[0] - 1: positions[-1]], atol=1e-5)
        total += len(positions)
    assert chat_run.calibration()["adapted"]["n"] == total  # calibration counts exactly these tokens


def test_generation_continues_the_templates_generation_prompt(chat_run):
    tok, seen = chat_run.loaded.tokenizer, []

    class Recording(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def generate(self, input_ids, **kwargs):
            seen.append(input_ids[0].tolist())
            return self.model.generate(input_ids=input_ids, **kwargs)

    prompt = chat_run.stance.probes[0].prompt
    reply, = measure.greedy_replies(Recording(chat_run.model), chat_run.framing, [prompt], max_new_tokens=4)
    assert seen == [tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)]
    assert tok.decode(seen[0]) == f"<|user|>\n{prompt}\n<|assistant|>\n"


def test_classification_refuses_examples_without_neutral_replies(chat_model, chat_stance_path):
    stance = load_stance_file(chat_stance_path)
    request = TrainingRequest.build(chat_model, stance, "full", task="stance-classification", recipe=QUICK)
    assert request.framing == {"kind": "plain"}  # a classifier reads replies, not conversations
    with pytest.raises(HarnessError, match=r"4 of the 4 examples have no neutral reply"):
        plan(request, chat_model, stance)


PLUGIN_TESTS = '''
def test_the_option_reaches_every_request(harness_session):
    assert harness_session.options.chat_template == "none"
    assert harness_session.request("lora").framing == {"kind": "plain"}
    assert harness_session.request("lora", chat_template="auto").framing["kind"] == "chat"  # one call asks for it
'''


def test_the_chat_template_option_through_pytest(pytester, monkeypatch):
    import stance_harness

    monkeypatch.setenv("PYTHONPATH", str(Path(stance_harness.__file__).resolve().parent.parent))  # this checkout's harness
    pytester.makepyfile(test_chat_option=PLUGIN_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--model", "tiny-qwen2-chat",
                                           "--chat-template", "none", "--no-reports")
    result.assert_outcomes(passed=1)
    bad = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--chat-template", "chatml")
    bad.stderr.fnmatch_lines(["*--chat-template: invalid choice: 'chatml' (choose from 'auto', 'none')*"])
