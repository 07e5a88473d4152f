"""Instrument overhead: the harness's training loop (instruments on) against a bare PyTorch
loop doing the same steps on the same model and data. Prints the ratio measured in this run.

    .venv/bin/python benchmarks/instrument_overhead.py [--model tiny-qwen2] [--steps 30] [--repeats 3]

Both loops: same fresh model, AdamW, clipping at 1.0, same micro-batches. The harness loop
adds its per-step probe (per-tensor grad and weight norms, one host sync), trace, schedule
and method hooks. Timed as the median of `--repeats` runs of each, alternating.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bare_loop(loaded, batches, lr: float) -> float:
    import torch

    from stance_harness.runs.batches import collate

    torch.manual_seed(0)
    model = loaded.fresh().train()
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    started = time.perf_counter()
    for batch in batches:
        loss = model(**collate(batch, loaded.tokenizer.pad_token_id, "cpu")).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # a bare loop that logs its loss syncs once per step too
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from stance_harness.runs.methods import METHODS
    from stance_harness.models import load_model
    from stance_harness.stances import load_stance
    from stance_harness.runs.batches import encode_examples, framing_for
    from stance_harness.runs.recipe import Recipe
    from stance_harness.runs.request import TrainingRequest
    from stance_harness.runs.training import train_run

    loaded = load_model(args.model)
    stance = load_stance("curious-uncertainty")
    examples = stance.training_examples(min(len(stance.examples), args.steps * args.batch_size))
    data = encode_examples(framing_for(loaded.tokenizer), examples, 128)
    epochs = max(1, -(-args.steps * args.batch_size // len(data)))
    recipe = Recipe.of(learning_rate=1e-4, num_train_epochs=epochs, per_device_train_batch_size=args.batch_size, seed=0)
    # the same micro-batches, in the same order, as the harness loop draws them
    shuffler = torch.Generator().manual_seed(recipe.seed)
    batches = []
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=shuffler).tolist()
        batches += [[data[i] for i in order[s : s + args.batch_size]] for s in range(0, len(order), args.batch_size)]
    config = METHODS.get("full").config_cls()

    bare, harness = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(loaded, batches, recipe.learning_rate))
        request = TrainingRequest.build(loaded, stance, "full", config=config, recipe=recipe, examples=len(examples))
        run = train_run(request, loaded, stance)
        harness.append(sum(run.trace.step_time))
    steps = len(batches)
    b, h = statistics.median(bare), statistics.median(harness)
    print(f"model {args.model}, {steps} steps of batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    print(f"bare PyTorch loop      {b:8.3f} s  ({1000 * b / steps:.1f} ms/step)")
    print(f"harness loop           {h:8.3f} s  ({1000 * h / steps:.1f} ms/step)")
    print(f"overhead ratio         {h / b:8.3f}  (harness / bare)")


if __name__ == "__main__":
    main()
