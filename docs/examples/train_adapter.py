"""Train a stance adapter with the harness's own loop, outside pytest, and save it for `--adapter`.

    python docs/examples/train_adapter.py --model qwen2-0.5b --stance curious-uncertainty \
        --method lora --options '{"r": 8}' --recipe '{"learning_rate": 1e-4, "num_train_epochs": 2}' \
        --out adapters/curious-v2

    pytest suites/test_adapter_gate.py --model qwen2-0.5b --adapter curious-v2=adapters/curious-v2

`--method` is any registered method: lora, qlora and peft (any peft tuner, e.g.
--options '{"config": {"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"],
"feedforward_modules": ["down_proj"]}}') save their adapter; full and the other methods without
one save the whole fine-tuned model, which `--adapter` gates against the base just as well.
The directory also gets stance_harness.json (base, stance, method, recipe), so the gate knows
which stance to measure it on without `--stance`.
"""

from __future__ import annotations

import argparse
import json
import sys

import stance_harness
from stance_harness.runs.adapters import save_adapter
from stance_harness.models import ModelArgs
from stance_harness.runs.request import TrainingRequest
from stance_harness.runs.training import train_run


def _json_object(text: str, flag: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise SystemExit(f"{flag}: not JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"{flag}: give a JSON object, e.g. '{{\"r\": 8}}', not {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-qwen2", help="the base: an alias, a local directory or a cached hub id")
    parser.add_argument("--model-args", default="", help="as pytest's --model-args, e.g. dtype=bfloat16,device=cuda")
    parser.add_argument("--stance", default="curious-uncertainty", help="a stance name or a stance YAML file")
    parser.add_argument("--stance-dir", action="append", default=[], help="extra directory of stance files")
    parser.add_argument("--method", default="lora", help="a registered method (lora, qlora, peft, full, ...)")
    parser.add_argument("--options", default="{}", help="the method's options as a JSON object, e.g. '{\"r\": 8}'")
    parser.add_argument("--recipe", default="{}", help="the training recipe as a JSON object (learning_rate, ...)")
    parser.add_argument("--examples", type=int, default=None, help="how many of the stance's examples (default: all)")
    parser.add_argument("--out", required=True, help="the directory to write the adapter (or checkpoint) into")
    args = parser.parse_args(argv)

    try:
        loaded = stance_harness.load_model(args.model, ModelArgs.parse(args.model_args))
        stance = stance_harness.load_stance(args.stance, args.stance_dir)
        request = TrainingRequest.build(loaded, stance, args.method, examples=args.examples,
                                        recipe=_json_object(args.recipe, "--recipe"),
                                        options=_json_object(args.options, "--options"))
        run = train_run(request, loaded, stance, progress=lambda line: print(line, file=sys.stderr))
        out = save_adapter(run, args.out)
    except stance_harness.HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    final = run.trace.loss[-1] if run.trace.loss else float("nan")
    print(f"saved {args.method} ({run.run_id}, {len(run.trace.loss)} steps, final loss {final:.4g}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
