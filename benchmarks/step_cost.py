"""What one training step costs on this machine: an AdamW full fine-tuning step and a LoRA step
(r=8 on q/v, AdamW over the adapters), each on a batch of `--batch` x `--tokens` tokens, on a
model loaded through the harness (smollm2-135m by default: converted from its GGUF first if it
is not in the cache yet).

    .venv/bin/python benchmarks/step_cost.py [--model smollm2-135m] [--batch 4] [--tokens 96] [--steps 5]

Prints the median seconds of `--steps` steps after one warm-up step, with the torch thread count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def time_steps(model, parameters, batch, steps: int) -> list[float]:
    import torch

    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    times = []
    for step in range(steps + 1):  # the first is a warm-up (allocations, AdamW state)
        started = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--steps", type=int, default=5)
    options = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from stance_harness.models import ModelArgs, load_model, share_frozen_weights

    started = time.perf_counter()
    loaded = load_model(options.model, ModelArgs(device="cpu"), progress=print)
    print(f"{options.model}: loaded in {time.perf_counter() - started:.1f}s, "
          f"{sum(p.numel() for p in loaded.base.parameters()) / 1e6:.1f}M parameters, torch threads "
          f"{torch.get_num_threads()}")
    batch = torch.randint(0, loaded.base.config.vocab_size, (options.batch, options.tokens),
                          generator=torch.Generator().manual_seed(0))

    full = share_frozen_weights(loaded.base).train()
    for parameter in full.parameters():
        parameter.data = parameter.data.clone()  # its own storage: the base stays untouched
        parameter.requires_grad_(True)
    times = time_steps(full, [p for p in full.parameters() if p.requires_grad], batch, options.steps)
    print(f"full fine-tuning, AdamW, batch {options.batch} x {options.tokens} tokens: "
          f"{statistics.median(times):.2f} s/step (median of {len(times)}; min {min(times):.2f}, max {max(times):.2f})")
    del full

    lora = get_peft_model(share_frozen_weights(loaded.base),
                          LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])).train()
    parameters = [p for p in lora.parameters() if p.requires_grad]
    times = time_steps(lora, parameters, batch, options.steps)
    print(f"LoRA r=8 on q/v ({sum(p.numel() for p in parameters) / 1e6:.2f}M trained), batch {options.batch} x "
          f"{options.tokens} tokens: {statistics.median(times):.2f} s/step (median of {len(times)}; "
          f"min {min(times):.2f}, max {max(times):.2f})")


if __name__ == "__main__":
    main()
