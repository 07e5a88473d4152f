"""Judges: each probe's reply scored for the stance in [0, 1], the way people judge replies.

A judge has a name, an identity (what enters the cache key of what it judged: kind, model,
weights, version, and for a model judge its rubric's digest) and `score(stance, replies,
prompts)`. Two are built in:

- `embedding`: the embedded sentence encoder `minilm-l6` (mean pooling, L2 normalisation, as
  sentence-transformers does). A reply's feature is its mean cosine to the stance's example
  replies minus its mean cosine to their neutral answers; a logistic fit on the examples' own
  replies (each example left out of the references its replies are compared with) turns it into
  a probability. Its held-out agreement (leave one example out) is reported with it.
- `model`: a local instruct model (`model=`, or --judge-model; default smollm2-135m) reads the
  stance's description, the prompt and the reply under a rubric (the stance file's
  `judge_rubric`, or RUBRIC); the score is P(Yes) / (P(Yes) + P(No)) from its next-token
  distribution after the rubric: one forward pass, no sampling. The prompts and those
  probabilities are kept with every score.

Judges from outside register like methods: `register_judge` on a Judge subclass in a conftest.py,
or an entry point in the group `stance_harness.judges`. `agreement` measures any judge against a
stance file's labelled replies (accuracy and Cohen's kappa at 0.5, and the AUC).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import numbers
from functools import lru_cache
from typing import TYPE_CHECKING, ClassVar

# _torch: torch at first use (the plugin imports this module at load, for --judge-model)
from stance_harness.core.devices import _torch
from stance_harness.core.metrics import HIGHER, declare_metric
from stance_harness.core.registry import HarnessError, Registry, load_entry_points
from stance_harness.models import load_model

if TYPE_CHECKING:
    from stance_harness.stances import Stance

RUBRIC = ("Here is how an assistant is meant to reply: {description}\n\n"
          "A user asked: {prompt}\nThe assistant replied: {reply}\n\n"
          "Does the reply follow that description? Answer Yes or No.")
ENTRY_POINT_GROUP = "stance_harness.judges"
EMBEDDING_VERSION = "1"  # bump when the embedding judge's features or fit change
MODEL_VERSION = "1"
THRESHOLD = 0.5  # a score at or above it counts as "in the stance" for agreement
_JUDGE_MODEL = ["smollm2-135m"]  # the model judge's model where none is named; --judge-model sets it


def set_default_judge_model(name: str) -> None:
    """The model the `model` judge uses where `run.judged("model")` names none (--judge-model)."""
    if not isinstance(name, str) or not name.strip():
        raise JudgeError(f"the judge model must be a model name, got {name!r}")
    _JUDGE_MODEL[0] = name


def default_judge_model() -> str:
    return _JUDGE_MODEL[0]


class JudgeError(HarnessError):
    """A judge that cannot score, or scored out of range."""


class Judge:
    """A judge: subclass, set `name`, implement `score` (or `details`), decorate with `@register_judge`.
    Options given to `run.judged(name, **options)` go to the constructor."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "plugin"

    def identity(self, stance: "Stance | None" = None) -> dict:
        """What enters the key of what this judge scored on `stance`; a flat dict of strings. A
        judge from outside the harness adds its module and a hash of its source."""
        return {"kind": self.kind, "version": "1", **dict(_code_identity(type(self)))}

    def score(self, stance: "Stance", replies: list[str], prompts: list[str] | None = None) -> list[float]:
        return [d["score"] for d in self.details(stance, replies, prompts)]

    def details(self, stance: "Stance", replies: list[str], prompts: list[str] | None = None) -> list[dict]:
        """Per reply, {"score": ...} and whatever the judge read to give it."""
        if type(self).score is Judge.score:
            raise NotImplementedError(f"judge {self.name!r} implements neither score nor details")
        return [{"score": s} for s in self.score(stance, replies, prompts)]

    def calibration(self, stance: "Stance") -> dict | None:
        """How the judge was fitted to the stance, where it was (None: it was not)."""
        return None


def load_plugin_judges(group: str = ENTRY_POINT_GROUP) -> None:
    """Each entry point of `group`: a module whose import registers its judges, or a Judge subclass."""
    load_entry_points(group, "judge", Judge, register_judge, lambda cls: cls.name in JUDGES)


JUDGES: Registry[type[Judge]] = Registry("judge", load_plugins=load_plugin_judges)


def register_judge(cls: type[Judge]) -> type[Judge]:
    """Register a Judge subclass under its `name` (a class decorator), and declare its paired
    metric `judge:<name>` (higher is better: more of the stance)."""
    if not (isinstance(cls, type) and issubclass(cls, Judge)):
        raise TypeError(f"register_judge takes a Judge subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name`")
    JUDGES.register(cls.name, cls)
    declare_metric(f"judge:{cls.name}", HIGHER, f"judge {cls.name!r}: stance score of each probe's reply, "
                                                 f"adapted minus base")
    return cls


def make_judge(name: str, **options) -> Judge:
    """The registered judge `name`, built with `options` (e.g. model="smollm2-135m")."""
    cls = JUDGES.get(name)
    try:
        return cls(**options)
    except TypeError as err:
        allowed = [p for p in inspect.signature(cls).parameters if p != "self"]
        raise JudgeError(f"judge {name!r}: {err}; its options: {', '.join(allowed) or 'none'}") from None


def judge_key(judge: Judge, stance: "Stance") -> str:
    """The measurement key of what `judge` scored on `stance`: its name and a digest of its identity
    and of the labelled replies its agreement is measured on (outside the stance's identity)."""
    labels = [[item.reply, item.label, item.prompt] for item in stance.labelled]
    content = json.dumps({"judge": judge.identity(stance), "labelled": labels}, sort_keys=True)
    digest = hashlib.sha256(content.encode()).hexdigest()[:12]
    return f"judged:{judge.name}:{digest}"


def judge_replies(judge: Judge, stance: "Stance", replies: list[str], prompts: list[str] | None = None) -> list[dict]:
    """`judge.details(...)`, checked: one finite score in [0, 1] per reply."""
    found = judge.details(stance, list(replies), prompts)
    if len(found) != len(replies):
        raise JudgeError(f"judge {judge.name!r} gave {len(found)} scores for {len(replies)} replies")
    for i, row in enumerate(found):
        score = row.get("score") if isinstance(row, dict) else None
        if not isinstance(score, numbers.Real) or isinstance(score, bool) or not 0.0 <= float(score) <= 1.0:
            raise JudgeError(f"judge {judge.name!r} scored reply {i} {score!r}; a score is a number in [0, 1]")
    return [{**row, "score": float(row["score"])} for row in found]


# -- agreement with labelled replies ----------------------------------------------------------
def cohen_kappa(labels: list[int], predicted: list[int]) -> float | None:
    """Cohen's kappa of two binary labellings; None where chance agreement is total (one class)."""
    n = len(labels)
    observed = sum(a == b for a, b in zip(labels, predicted)) / n
    p_label, p_pred = sum(labels) / n, sum(predicted) / n
    expected = p_label * p_pred + (1 - p_label) * (1 - p_pred)
    return None if expected == 1 else (observed - expected) / (1 - expected)


def auc(labels: list[int], scores: list[float]) -> float:
    """The chance that a reply labelled 1 scores above one labelled 0 (ties count half): a
    threshold-free agreement, for a judge whose scores rank well but sit on one side of 0.5."""
    positive = [s for s, y in zip(scores, labels) if y == 1]
    negative = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def agreement(judge: Judge, stance: "Stance", threshold: float = THRESHOLD) -> dict | None:
    """The judge against the stance file's labelled replies: accuracy and Cohen's kappa of
    score >= threshold, and the threshold-free AUC; None where the stance has none."""
    if not stance.labelled:
        return None
    replies = [item.reply for item in stance.labelled]
    scores = [row["score"] for row in judge_replies(judge, stance, replies, [item.prompt for item in stance.labelled])]
    labels = [item.label for item in stance.labelled]
    predicted = [int(s >= threshold) for s in scores]
    return {"n": len(labels), "threshold": threshold,
            "accuracy": sum(a == b for a, b in zip(labels, predicted)) / len(labels),
            "kappa": cohen_kappa(labels, predicted), "auc": auc(labels, scores),
            "rows": [{"reply": r, "label": y, "score": s} for r, y, s in zip(replies, labels, scores)]}


# -- a penalised logistic fit, one feature ----------------------------------------------------
def fit_logistic(x: list[float], y: list[int], c: float = 1.0) -> tuple[float, float]:
    """(slope, intercept) minimising 0.5·slope² + c·Σ log-loss, the intercept unpenalised: the
    objective of sklearn's LogisticRegression(C=c) (checked against it in the tests). Newton steps."""
    if len(set(y)) != 2:
        raise JudgeError("a logistic calibration needs replies of both labels")
    a, b = 0.0, math.log(sum(y) / (len(y) - sum(y)))
    for _ in range(100):
        p = [_sigmoid(a * xi + b) for xi in x]
        ga = a + c * math.fsum((pi - yi) * xi for pi, yi, xi in zip(p, y, x))
        gb = c * math.fsum(pi - yi for pi, yi in zip(p, y))
        w = [pi * (1 - pi) for pi in p]
        haa = 1 + c * math.fsum(wi * xi * xi for wi, xi in zip(w, x))
        hab = c * math.fsum(wi * xi for wi, xi in zip(w, x))
        hbb = c * math.fsum(w)
        det = haa * hbb - hab * hab
        if det <= 0:
            break
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        a, b = a - da, b - db
        if abs(da) < 1e-12 and abs(db) < 1e-12:
            break
    return a, b


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


# -- the embedding judge ------------------------------------------------------------------------
@lru_cache(maxsize=2)
def _loaded(name: str):
    return load_model(name)


def embed(texts: list[str], model: str = "minilm-l6"):
    """Sentence embeddings as sentence-transformers makes them for all-MiniLM-L6-v2: the token
    states mean-pooled over the attention mask, L2-normalised; float64, one row a text."""
    torch = _torch()
    loaded = _loaded(model)
    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), 32):
            batch = loaded.tokenizer(texts[start:start + 32], padding=True, truncation=True, max_length=256,
                                     return_tensors="pt").to(loaded.args.device)
            states = loaded.base(**batch).last_hidden_state.double()
            mask = batch["attention_mask"].unsqueeze(-1).double()
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(pooled, dim=1).cpu())
    return torch.cat(rows)


@lru_cache(maxsize=16)
def _references(model: str, pairs: tuple[tuple[str, str], ...]):
    return embed([s for s, _ in pairs], model), embed([n for _, n in pairs], model)


class EmbeddingJudge(Judge):
    """A reply's mean cosine to the stance's example replies minus that to their neutral answers,
    calibrated to a probability on the examples themselves."""

    name = "embedding"
    kind = "embedding"

    def __init__(self, model: str = "minilm-l6"):
        self.model = model

    def identity(self, stance: "Stance | None" = None) -> dict:
        loaded = _loaded(self.model)
        weights = loaded.identity()["weights"] or loaded.revision or ""
        return {"kind": self.kind, "model": loaded.model_id, "weights": str(weights), "version": EMBEDDING_VERSION}

    @staticmethod
    def pairs(stance: "Stance") -> tuple[tuple[str, str], ...]:
        found = tuple((e.response, e.neutral) for e in stance.examples if e.neutral)
        if len(found) < 4:
            raise JudgeError(f"the embedding judge compares replies with the stance's example replies and their "
                             f"neutral answers; stance {stance.name!r} has {len(found)} examples with a neutral "
                             f"answer (needs 4 or more)")
        return found

    def features(self, stance: "Stance", replies: list[str], leave_out: int | None = None) -> list[float]:
        """Mean cosine to the example replies minus mean cosine to the neutral ones; leave_out:
        an example index left out of both reference sets."""
        stance_refs, neutral_refs = _references(self.model, self.pairs(stance))
        if leave_out is not None:
            keep = [i for i in range(len(stance_refs)) if i != leave_out]
            stance_refs, neutral_refs = stance_refs[keep], neutral_refs[keep]
        vectors = embed(list(replies), self.model)
        return ((vectors @ stance_refs.T).mean(1) - (vectors @ neutral_refs.T).mean(1)).tolist()

    def calibration(self, stance: "Stance") -> dict:
        return dict(self._calibration(stance))

    def _calibration(self, stance: "Stance") -> tuple:
        key = (json.dumps(stance.identity(), sort_keys=True), self.model)
        if key not in _CALIBRATIONS:
            pairs = self.pairs(stance)
            stance_refs, neutral_refs = _references(self.model, pairs)
            x = []  # per example: its reply's feature, then its neutral answer's; the example left out
            for k in range(len(pairs)):
                keep = [i for i in range(len(pairs)) if i != k]
                for v in (stance_refs[[k]], neutral_refs[[k]]):
                    x.append(float((v @ stance_refs[keep].T).mean() - (v @ neutral_refs[keep].T).mean()))
            y = [1, 0] * len(pairs)
            # standardised first: cosine differences are a few hundredths, and the fit's L2 penalty
            # would otherwise shrink the slope to nearly nothing (every score near 0.5)
            center = math.fsum(x) / len(x)
            scale = math.sqrt(math.fsum((v - center) ** 2 for v in x) / len(x)) or 1.0
            z = [(v - center) / scale for v in x]
            slope, intercept = fit_logistic(z, y)
            correct = 0
            for k in range(len(pairs)):  # held out: fitted without example k, then judged on its two replies
                rest = [i for i in range(len(z)) if i // 2 != k]
                a, b = fit_logistic([z[i] for i in rest], [y[i] for i in rest])
                correct += (_sigmoid(a * z[2 * k] + b) >= THRESHOLD) + (_sigmoid(a * z[2 * k + 1] + b) < THRESHOLD)
            _CALIBRATIONS[key] = (("examples", len(pairs)), ("center", center), ("scale", scale), ("slope", slope),
                                  ("intercept", intercept), ("heldout_agreement", correct / len(z)))
        return _CALIBRATIONS[key]

    def details(self, stance, replies, prompts=None) -> list[dict]:
        fit = dict(self._calibration(stance))
        return [{"score": _sigmoid(fit["slope"] * (d - fit["center"]) / fit["scale"] + fit["intercept"]),
                 "similarity_difference": d}
                for d in self.features(stance, replies)]


_CALIBRATIONS: dict = {}


# -- the model judge ----------------------------------------------------------------------------
class ModelJudge(Judge):
    """A local instruct model's P(Yes) after the rubric, against P(No)."""

    name = "model"
    kind = "model"

    def __init__(self, model: str | None = None, seed: int = 0):
        self.model, self.seed = model or default_judge_model(), seed

    def identity(self, stance: "Stance | None" = None) -> dict:
        loaded = _loaded(self.model)
        weights = loaded.identity()["weights"] or loaded.revision or ""
        return {"kind": self.kind, "model": loaded.model_id, "weights": str(weights), "version": MODEL_VERSION,
                "rubric": _digest(stance.judge_rubric or RUBRIC if stance is not None else RUBRIC),
                "seed": str(self.seed)}

    def details(self, stance, replies, prompts=None) -> list[dict]:
        # why: runs.batches imports torch at its top, and the plugin imports this module at load
        from stance_harness.runs.batches import Framing

        torch = _torch()
        loaded = _loaded(self.model)
        tokenizer = loaded.tokenizer
        framing = Framing(tokenizer, chat=bool(getattr(tokenizer, "chat_template", None)))
        yes, no = _answer_ids(tokenizer, "Yes"), _answer_ids(tokenizer, "No")
        rubric = stance.judge_rubric or RUBRIC
        prompts = prompts or [""] * len(replies)
        torch.manual_seed(self.seed)  # one forward pass, no sampling; the seed pins anything a config forces
        out = []
        with torch.no_grad():
            for prompt, reply in zip(prompts, replies):
                text = rubric.format(description=stance.description, prompt=prompt, reply=reply)
                ids = torch.tensor([framing.prompt_ids(text)], device=loaded.args.device)
                probs = torch.softmax(loaded.base(input_ids=ids).logits[0, -1].double(), dim=-1)
                p_yes, p_no = float(probs[yes].sum()), float(probs[no].sum())
                out.append({"score": p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.5, "prompt": text,
                            "p_yes": p_yes, "p_no": p_no, "answer": tokenizer.decode([int(probs.argmax())])})
        return out


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _answer_ids(tokenizer, word: str) -> list[int]:
    """The first token of the word as an answer starts (bare, after a space, lower case)."""
    found = []
    for variant in (word, f" {word}", word.lower(), f" {word.lower()}"):
        ids = tokenizer.encode(variant, add_special_tokens=False)
        if ids and ids[0] not in found:
            found.append(ids[0])
    return found


@lru_cache(maxsize=None)
def _code_identity(cls: type) -> tuple:
    """A judge from outside the harness: its module and a hash of its source."""
    if cls.__module__.split(".")[0] == "stance_harness":
        return ()
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        source = cls.__qualname__
    return (("module", cls.__module__), ("source", _digest(source)[:12]))


register_judge(EmbeddingJudge)
register_judge(ModelJudge)
