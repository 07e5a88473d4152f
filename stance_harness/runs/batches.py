"""Token batches: stance examples as token ids, and right-padded batches for the training loop
and the measurements. The framing is defined here once, and training, probes, generation and
calibration all use it:

- plain: each user or system turn is its text and a newline; each assistant turn is its text
  and the end-of-text token (a prompt/response example: prompt, newline, reply, eos);
- chat: the tokenizer's own chat template (`apply_chat_template`), where the tokenizer has one
  and `--chat-template auto` (the default) asks for it.

Either way the loss counts only the tokens of the assistant turns being learnt. Under a chat
template those are found from the template's rendering: the text that rendering the conversation
up to turn k adds to rendering it up to the turn before with the generation prompt (so the reply
and the template's end-of-turn marker, never the assistant header). The whole conversation is
tokenized once and a token is the assistant's when its character span lies inside that text.
This works for any template, with or without `{% generation %}` markers, and does not assume
that the tokens of a prefix are a prefix of the tokens of the whole."""

from __future__ import annotations

import hashlib
import json

import torch

from stance_harness.core.errors import HarnessError
from stance_harness.stances import Message

IGNORE_INDEX = -100  # the label value transformers uses for "no loss here"
CHAT_TEMPLATE_CHOICES = ("auto", "none")  # --chat-template


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A user turn in plain framing: the prompt, then a newline; the reply follows."""
    return tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]


def reply_ids(tokenizer, reply: str) -> list[int]:
    """An assistant turn in plain framing: the reply, then end of text."""
    return tokenizer(reply + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]


class Framing:
    """How a conversation becomes token ids and loss labels: plain, or the tokenizer's chat template."""

    def __init__(self, tokenizer, chat: bool):
        if chat and not getattr(tokenizer, "chat_template", None):
            raise HarnessError("chat framing needs a tokenizer with a chat template; this one has none")
        if chat and not getattr(tokenizer, "is_fast", False):
            raise HarnessError("chat framing finds the assistant's tokens from character offsets, which only a fast "
                               "tokenizer gives; this one is slow. Use --chat-template none")
        self.tokenizer, self.chat = tokenizer, chat

    @property
    def kind(self) -> str:
        return "chat" if self.chat else "plain"

    def identity(self) -> dict:
        """What enters a run's key: the kind, and for chat a digest of the template's text."""
        if not self.chat:
            return {"kind": "plain"}
        template = self.tokenizer.chat_template  # a string, or a dict of named templates
        text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
        return {"kind": "chat", "template": hashlib.sha256(text.encode()).hexdigest()[:16]}

    @property
    def key(self) -> str:
        """A short name for caches of base-model measurements."""
        return ":".join(self.identity().values())

    def turns(self, messages) -> tuple[list[int], list[int]]:
        """(ids, labels) of a conversation; labels are IGNORE_INDEX except on the tokens of the turns
        whose `loss` is set."""
        if not self.chat:
            ids, labels = [], []
            for message in messages:
                part = (reply_ids if message.role == "assistant" else prompt_ids)(self.tokenizer, message.content)
                ids += part
                labels += part if message.loss else [IGNORE_INDEX] * len(part)
            return ids, labels
        whole = self._render(messages)
        spans = []
        for k, message in enumerate(messages):
            if not message.loss:
                continue
            before = self._render(messages[:k], add_generation_prompt=True)
            through = self._render(messages[: k + 1])
            if not (through.startswith(before) and whole.startswith(through)):
                raise HarnessError(
                    f"the chat template renders turn {k} ({message.role}) differently once later turns follow, "
                    f"so its tokens cannot be found for the loss; use --chat-template none, or a template whose "
                    f"rendering of a conversation starts with its rendering of each earlier part")
            spans.append((len(before), len(through)))
        encoded = self.tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        labels = [token if any(start <= a and b <= end and a < b for start, end in spans) else IGNORE_INDEX
                  for token, (a, b) in zip(ids, encoded["offset_mapping"])]
        for start, end in spans:
            if not any(start <= a and b <= end and a < b for a, b in encoded["offset_mapping"]):
                raise HarnessError(f"the chat template's assistant turn {whole[start:end][:40]!r} has no token of "
                                   f"its own (it merges with the text around it); use --chat-template none")
        return ids, labels

    def prompt_ids(self, prompt: str) -> list[int]:
        """What generation continues: the prompt as a user turn, then (chat) the assistant's header."""
        if not self.chat:
            return prompt_ids(self.tokenizer, prompt)
        text = self._render((Message("user", prompt),), add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def continuation(self, prompt: str, reply: str) -> tuple[list[int], int, int]:
        """A prompt answered by `reply`, as training frames it: (ids, start, length) of the reply's
        tokens (in plain framing, the reply and eos; in chat, the reply and the end-of-turn marker)."""
        ids, labels = self.turns((Message("user", prompt), Message("assistant", reply, loss=True)))
        marked = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        start, end = marked[0], marked[-1] + 1
        if len(marked) != end - start:
            raise HarnessError("the chat template splits an assistant reply into pieces; use --chat-template none")
        return ids[:end], start, end - start

    def _render(self, messages, add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages], tokenize=False,
                add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # a template's own error (jinja2's TemplateError, raise_exception)
            raise HarnessError(f"the tokenizer's chat template failed on a conversation of roles "
                               f"{[m.role for m in messages]} ({type(exc).__name__}: {exc}); use --chat-template none "
                               f"or fix the data") from None


def framing_for(tokenizer, chat_template: str = "auto") -> Framing:
    """--chat-template auto: the template where the tokenizer has one; none: plain framing."""
    if chat_template not in CHAT_TEMPLATE_CHOICES:
        raise HarnessError(f"--chat-template {chat_template!r}: use one of {', '.join(CHAT_TEMPLATE_CHOICES)}")
    return Framing(tokenizer, chat=chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None)))


def framing_of(tokenizer, identity: dict) -> Framing:
    """The framing a request recorded (Framing.identity()), checked against the tokenizer."""
    framing = Framing(tokenizer, chat=identity.get("kind") == "chat")
    if framing.identity() != identity:
        raise HarnessError(f"this request was framed {identity}, but the tokenizer gives {framing.identity()}; "
                           f"its chat template changed")
    return framing


def encode_examples(framing: Framing, examples, max_len: int):
    """Each example's conversation as (ids, labels); the loss counts only the turns to learn."""
    encoded = []
    for example in examples:
        ids, labels = framing.turns(example.conversation())
        ids, labels = ids[:max_len], labels[:max_len]
        if all(label == IGNORE_INDEX for label in labels):
            raise HarnessError(
                f"max_seq_length={max_len} cuts off the whole response of the example "
                f"starting {example.prompt[:40]!r}; raise recipe.max_seq_length"
            )
        encoded.append((ids, labels))
    return encoded


def pad_batch(id_lists, pad_id: int) -> dict:
    """Right-padded input_ids and attention_mask (on the CPU) for token id lists."""
    width = max(len(ids) for ids in id_lists)
    input_ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(id_lists), width), dtype=torch.long)
    for row, ids in enumerate(id_lists):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def collate(items, pad_id: int, device):
    """(ids, labels) items as a causal-LM batch; label -100 marks tokens the loss skips."""
    batch = pad_batch([ids for ids, _ in items], pad_id)
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    for row, (_, labs) in enumerate(items):
        labels[row, : len(labs)] = torch.tensor(labs)
    batch["labels"] = labels
    return to_device(batch, device)
