"""Text that ships with CPython, so the tiny models have a real base offline.

`pydoc_data.topics` holds the English reference documentation of the language. Topics are
split deterministically: the tiny models pretrain on `pretrain`, and forgetting is measured
on `heldout`, which no model here has seen.
"""

from __future__ import annotations

from functools import lru_cache

HELDOUT_EVERY = 10  # every 10th topic (sorted by key) is held out


@lru_cache(maxsize=None)
def general_text(split: str = "pretrain") -> tuple[str, ...]:
    if split not in ("pretrain", "heldout"):
        raise ValueError(f"split must be 'pretrain' or 'heldout', not {split!r}")
    from pydoc_data.topics import topics

    keys = sorted(topics)
    chosen = [k for i, k in enumerate(keys) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == (split == "heldout")]
    return tuple(topics[k] for k in chosen)
