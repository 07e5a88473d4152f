"""Text that ships with CPython, so the tiny models have a real base offline.

`pydoc_data.topics` holds the English reference documentation of the language. Topics are
split deterministically: the tiny models pretrain on `pretrain`, and forgetting is measured
on `heldout`, which no model here has seen.
"""

from __future__ import annotations

import weakref
from functools import lru_cache
from pydoc_data.topics import topics

import torch

HELDOUT_EVERY = 10  # every 10th topic (sorted by key) is held out


@lru_cache(maxsize=None)
def general_text(split: str = "pretrain") -> tuple[str, ...]:
    if split not in ("pretrain", "heldout"):
        raise ValueError(f"split must be 'pretrain' or 'heldout', not {split!r}")
    keys = sorted(topics)
    chosen = [k for i, k in enumerate(keys) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == (split == "heldout")]
    return tuple(topics[k] for k in chosen)


def general_text_windows(tokenizer, seq_len: int, count: int, seed: int, split: str = "pretrain"):
    """`count` windows of `seq_len` tokens of general text, as (ids, labels) items.

    Replay mixes these into training; EWC estimates its Fisher on them. The windows are
    drawn with their own seeded generator, so the task's shuffling is unaffected.
    """
    ids = _token_ids(tokenizer, split)
    if len(ids) <= seq_len + 1:
        raise ValueError(f"general text ({len(ids)} tokens) is shorter than one window of {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (count,), generator=generator).tolist()
    return [(ids[s : s + seq_len], ids[s : s + seq_len]) for s in starts]


_TOKEN_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _token_ids(tokenizer, split: str) -> list[int]:
    """The split tokenized once per tokenizer (about 160k tokens)."""
    per_split = _TOKEN_CACHE.setdefault(tokenizer, {})
    if split not in per_split:
        per_split[split] = tokenizer("\n\n".join(general_text(split)), add_special_tokens=False)["input_ids"]
    return per_split[split]
