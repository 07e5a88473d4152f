"""Replay (seed 002): full fine-tuning with general-text batches mixed into the task batches."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stance_harness.runs.data import general_text_windows
from stance_harness.core.errors import HarnessError
from stance_harness.runs.methods.base import register_method
from stance_harness.runs.methods.full import FullConfig, FullFineTuning


@dataclass(frozen=True)
class ReplayConfig(FullConfig):
    ratio: float = field(default=0.25, metadata={"help": "replay micro-batches per task micro-batch (0.25: one in four)"})
    seq_len: int = field(default=64, metadata={"help": "tokens per replayed window of general text"})

    def __post_init__(self):
        if not 0 < self.ratio <= 4:
            raise HarnessError(f"replay: ratio must be in (0, 4], got {self.ratio!r}")
        if self.seq_len < 8:
            raise HarnessError(f"replay: seq_len must be >= 8, got {self.seq_len!r}")


def interleave(task: list, replay: list) -> list:
    """Spread `replay` evenly among `task`, in order: t t r t t r ..."""
    if not replay:
        return list(task)
    out, every = [], len(task) / len(replay)
    next_replay = every
    r = 0
    for i, item in enumerate(task, start=1):
        out.append(item)
        while r < len(replay) and i >= next_replay - 1e-9:
            out.append(replay[r])
            r += 1
            next_replay += every
    return out + replay[r:]


@register_method
class Replay(FullFineTuning):
    """Full fine-tuning with general-text (pretraining) batches mixed in at a ratio (seed 002)."""

    name = "replay"
    config_cls = ReplayConfig

    def check(self, ctx):
        ctx.require_lm_task("replay", "it mixes general-text language-modelling batches into training")

    def added_micro_batches(self, config, task_micro_batches):
        return max(1, math.floor(config.ratio * task_micro_batches + 0.5))  # half up, not banker's

    def mix_batches(self, ctx, micro_batches, epoch):
        count = self.added_micro_batches(ctx.config, len(micro_batches))
        size = ctx.recipe.per_device_train_batch_size
        windows = general_text_windows(ctx.loaded.tokenizer, ctx.config.seq_len, count * size,
                                       seed=ctx.recipe.seed * 1000 + epoch)
        replay = [windows[i : i + size] for i in range(0, len(windows), size)]
        return interleave(micro_batches, replay)
