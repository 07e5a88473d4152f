"""Token batches: stance examples as token ids, and right-padded batches for the training loop
and the measurements. The framing (prompt, newline, reply, end of text) is defined here once."""

from __future__ import annotations

import torch

from .registry import HarnessError

IGNORE_INDEX = -100  # the label value transformers uses for "no loss here"


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as training and probing frame it: prompt, newline, then the reply."""
    return tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]


def reply_ids(tokenizer, reply: str) -> list[int]:
    return tokenizer(reply + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]


def encode_examples(tokenizer, examples, max_len: int):
    """prompt + response + eos; the loss counts only the response tokens."""
    encoded = []
    for example in examples:
        head, tail = prompt_ids(tokenizer, example.prompt), reply_ids(tokenizer, example.response)
        ids = (head + tail)[:max_len]
        labels = ([IGNORE_INDEX] * len(head) + tail)[:max_len]
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
