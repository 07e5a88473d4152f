"""`stance-harness new NAME`: a commented hypothesis file to start from.

The template is kept here as a string (not a data file) so that packaging needs nothing extra.
The file it writes passes as written on the default model (tiny-qwen2) in a few seconds; its
bounds were measured there with margin (see docs/writing-hypotheses.md).
"""

from __future__ import annotations

import keyword
import re
import string
import unicodedata
from pathlib import Path

from stance_harness.core.errors import HarnessError

TEMPLATE = string.Template('''\
"""${title}.

Hypothesis: LoRA on q_proj + v_proj (rank 8) moves the model toward the curious-uncertainty
stance on held-out probes, leaves every base weight bit-identical, and forgets less general
text than full fine-tuning on the same examples and recipe.

Refuted if: a frozen weight changes, LoRA's change leaves q/v, two layers hold half of full
fine-tuning's change, either stance shift's 95% interval reaches 0, or LoRA forgets more than
5% (full: 25%) or as much as full fine-tuning does.

Rewrite the two paragraphs above as your own claim, one sentence per assert below, then
change the constants and the asserts to match. Run it with:

    python -m pytest ${path}            # default model: tiny-qwen2 (embedded, CPU, seconds)
    python -m pytest ${path} --model tiny-phi
"""

from stance_harness import (
    assert_behavior_shift,
    assert_change_concentrated,
    assert_change_spread,
    assert_no_forgetting,
    assert_only_targets_changed,
)

# Which stance to teach: a stances/*.yaml name (curious-uncertainty, engaged-difficulty, domain-*).
STANCE = "curious-uncertainty"
# How many of the stance's training examples to use (None: all of them).
EXAMPLES = 10
# The training recipe, Hugging Face names: 10 examples / batch 5 x 1 epoch = 2 optimizer steps
# (LoRA needs at least 2: its A matrices move only once B is non-zero). Raise it for real claims.
RECIPE = {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5, "seed": 0}
# The two methods compared: train()'s first argument and its options (see README "Methods").
LORA = {"r": 8, "alpha": 16, "target_modules": ["qv"]}  # "qv": q_proj + v_proj in every layer
# Bounds: LoRA may raise held-out perplexity by at most 5%, full fine-tuning by at most 25%.
# Measured with this recipe on tiny-qwen2: LoRA -0.02%, full +2.9% (tiny-phi: +0.01%, +6.3%).
MAX_FORGETTING_LORA = 0.05
MAX_FORGETTING_FULL = 0.25


def test_${name}(train, stance_report):
    # train() fine-tunes a fresh copy of the --model base; identical requests in a session train once.
    lora = train("lora", stance=STANCE, examples=EXAMPLES, recipe=RECIPE, **LORA)
    full = train("full", stance=STANCE, examples=EXAMPLES, recipe=RECIPE)

    # What the report shows besides the checks: a table, metrics (baseline-comparable) and a note.
    rows = []
    for run in (lora, full):
        shift, forgetting = run.behavior("loglik_margin")["effect"], run.forgetting()
        rows.append({"method": run.label, "trainable": run.counts["trainable"],
                     "stance bytes": run.counts["stance_bytes"], "loss first": run.trace.loss[0],
                     "loss last": run.trace.loss[-1], "stance shift": shift["mean"],
                     "perplexity increase": forgetting["relative_increase"]})
        stance_report.metric(f"{run.label}.stance_bytes", run.counts["stance_bytes"])  # gate-able in CI
    stance_report.table("LoRA vs full fine-tuning", rows)
    stance_report.note(f"{EXAMPLES} examples of {STANCE}; recipe {RECIPE}")

    # Where the change went: LoRA touches only its adapters, all of them on q/v; full FT spreads out.
    assert_only_targets_changed(lora)
    assert_change_concentrated(lora, layers=None, kinds=["qv"], min_share=0.999)  # layers=None: every layer
    assert_change_spread(full, top_k=2, max_share=0.5)

    # What it learned: the stance reply gains log-likelihood over the neutral one (95% CI above 0).
    assert_behavior_shift(lora, "loglik_margin", min_effect=0.0)
    assert_behavior_shift(full, "loglik_margin", min_effect=0.0)

    # What it cost: held-out general text, as a relative perplexity increase.
    assert_no_forgetting(lora, max_increase=MAX_FORGETTING_LORA)
    assert_no_forgetting(full, max_increase=MAX_FORGETTING_FULL)
    # A plain assert works too: it fails the test like a helper, but records no table.
    assert lora.forgetting()["relative_increase"] < full.forgetting()["relative_increase"]
''')


def normalise_name(raw: str) -> str:
    """`My Claim!`, `my-claim.py`, `test_my_claim` -> `my_claim`: a valid, lower-case identifier part."""
    text = unicodedata.normalize("NFKD", str(raw)).encode("ascii", "ignore").decode("ascii")
    text = Path(text).name
    if text.lower().endswith(".py"):
        text = text[:-3]
    name = re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_")
    if name.startswith("test_"):
        name = name[len("test_"):]
    if not name or name == "test":
        raise HarnessError(f"{raw!r} gives no usable name: use letters, digits and '_' (e.g. lora_forgets_less)")
    if not f"test_{name}".isidentifier() or keyword.iskeyword(f"test_{name}"):  # cannot happen after the re.sub
        raise HarnessError(f"{raw!r} does not make a valid test name")
    return name


def render(name: str, path: str | Path) -> str:
    title = name.replace("_", " ").capitalize()
    return TEMPLATE.substitute(name=name, title=title, path=Path(path).as_posix())


def write_hypothesis(raw_name: str, directory: str | Path = "suites", force: bool = False) -> Path:
    """Write `<directory>/test_<name>.py`; refuse to overwrite an existing file unless `force`."""
    name = normalise_name(raw_name)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise HarnessError(f"{directory} is not a directory")
    path = directory / f"test_{name}.py"
    if path.exists() and not force:
        raise HarnessError(f"{path} already exists; pass --force to overwrite it")
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(render(name, path), encoding="utf-8")
    return path
