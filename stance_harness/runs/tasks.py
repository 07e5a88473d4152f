"""Tasks: what the one training loop optimises, how a stance becomes training data, and how a
run on that task is measured (behaviour, forgetting, calibration).

`stance-lm` (the default) teaches a causal LM to answer in the stance: prompt + response
(or a whole conversation), framed plainly or by the tokenizer's chat template (stance_harness.runs.batches),
with the loss on the assistant's tokens only. It is measured on the probes' continuations and
on greedy replies, framed the same way, and on the perplexity of held-out general text (plain
text, never a chat).

`stance-classification` puts a fresh linear head on the mean-pooled hidden states of the
model's own body (an encoder such as minilm-l6, or a decoder's transformer stack) and
trains it to tell stance-marked replies (class 1) from neutral ones (class 0). The stance's
examples give the training texts; its held-out probes give the evaluation texts, which is
where Acc@1 and ECE are measured. Forgetting is the drift of held-out sentence embeddings.
"""

from __future__ import annotations

import inspect
import math
from functools import lru_cache
from typing import ClassVar

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from stance_harness import measure
from stance_harness.analysis.ability import summarize as summarize_ability
from stance_harness.analysis.behavior import contains_marker, kl_divergence, mean_token_logprob
from stance_harness.analysis.calibration import calibration, calibration_from_predictions
from stance_harness.core.registry import HarnessError, Registry, suggest
from stance_harness.models.anatomy import Anatomy, unwrap
from stance_harness.runs.batches import IGNORE_INDEX, collate, encode_examples, pad_batch, to_device

CLASS_NAMES = ("neutral", "stance")
DEFAULT_TASK = "stance-lm"


class NotApplicable(HarnessError):
    """This task cannot run on this kind of model (a causal-LM task on an encoder): a hypothesis
    that needs it does not apply to the model, and the `train` fixture skips it, saying why."""


class Task:
    """Subclass, set `name`, and decorate with `@register_task`. The docstring's first line describes it."""

    name: ClassVar[str] = ""
    behavior_metrics: ClassVar[tuple[str, ...]] = ()  # what `Run.behavior` can measure on this task
    framed: ClassVar[bool] = False  # frames its data as conversations (a chat template applies)

    def check(self, loaded) -> None:
        """Refuse models this task cannot train."""

    def wrap(self, model, loaded):
        """The module the loop trains (the model itself, or the model with a task head)."""
        return model

    def anatomy(self, loaded):
        """The anatomy of what `wrap` returns (its parameter paths)."""
        return loaded.anatomy

    def encode(self, framing, examples, max_len: int) -> list:
        """Training items from the examples; `framing.tokenizer` is the tokenizer."""
        raise NotImplementedError

    def collate(self, items, pad_id: int, device) -> dict:
        raise NotImplementedError

    def loss(self, forward, batch: dict, loaded):
        """The training loss of one collated micro-batch; `forward` is the model (or its DDP wrapper)."""
        return forward(**batch).loss

    def head_parameters(self, model) -> list:
        """Parameters the task adds, which train under every method (a fresh head must learn)."""
        return []

    def uniform_loss(self, loaded) -> float:
        """The loss of a prediction that knows nothing: ln of the number of outcomes."""
        raise NotImplementedError

    # -- measuring a run on this task: each is given the run's MeasureContext (stance_harness.measurements)
    def check_behavior_metric(self, metric: str) -> None:
        if not self.behavior_metrics:
            raise HarnessError(f"behavioural shift is measured on the stance-lm task (a causal LM's replies); "
                               f"this run trained task {self.name!r}")
        if metric not in self.behavior_metrics:
            raise HarnessError(f"no behaviour metric {metric!r}.{suggest(metric, list(self.behavior_metrics))} "
                               f"Metrics: {', '.join(self.behavior_metrics)}")

    def behavior_values(self, ctx, metric: str) -> tuple[list[float], list[float]]:
        """Per probe: the base's and the adapted model's value of `metric`."""
        raise NotImplementedError

    def forgetting(self, ctx) -> dict:
        raise NotImplementedError

    def calibration(self, ctx, n_bins: int) -> dict:
        raise NotImplementedError

    def replies(self, ctx) -> dict:
        raise HarnessError(f"replies are generated on the stance-lm task (a causal LM); this run trained task "
                           f"{self.name!r}")

    def general_ability(self, ctx, probeset) -> dict:
        raise HarnessError(f"general ability is scored on the stance-lm task's replies (a causal LM); this run "
                           f"trained task {self.name!r}")

    # -- measuring any model of a run (patched or scaled: stance_harness.where), given its context --
    def probe_margins(self, ctx, model) -> list[float]:
        """Per probe: the loglik margin (stance minus neutral continuation) of `model`."""
        raise HarnessError(f"the loglik margin is measured on the stance-lm task; this run trained task {self.name!r}")

    def heldout_nll(self, ctx, model) -> list[float]:
        """Per held-out unit: what forgetting compares (a causal LM's window NLL)."""
        raise HarnessError(f"held-out NLL is measured on the stance-lm task; this run trained task {self.name!r}")

    def hidden_states(self, ctx, model) -> list:
        """Per layer output (embeddings first): the hidden states of held-out text, [tokens, width] float32."""
        tokenizer = ctx.loaded.tokenizer
        ids = [tokenizer(s, truncation=True, max_length=64)["input_ids"] for s in measure.heldout_sentences(16)]
        return measure.hidden_states(body_of(model), pad_batch(ids, tokenizer.pad_token_id))


TASKS: Registry[Task] = Registry("task")


def register_task(cls: type[Task]) -> type[Task]:
    TASKS.register(cls.name, cls())
    return cls


LOSS_CHUNK = 256  # tokens whose logits exist at once in ChunkedHeadLoss (256 × 151,936 floats: 148 MiB)
# Causal LMs whose logits are exactly lm_head(hidden): no soft-capping, scaling or bias after the head.
PLAIN_HEAD_MODELS = frozenset({"Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
                               "GPT2LMHeadModel", "Phi3ForCausalLM", "GPTNeoXForCausalLM"})


def _inner(model):
    """The transformers model inside `model` (peft, DDP or none around it), or None."""
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def _plain_head(model):
    """The output head of a PLAIN_HEAD_MODELS model inside `model`, if it is a bias-free
    torch.nn.Linear (not an adapter-wrapped one); else None."""
    inner = _inner(model)
    if inner is None or type(inner).__name__ not in PLAIN_HEAD_MODELS:
        return None
    head = inner.get_output_embeddings()
    return head if type(head) is torch.nn.Linear and head.bias is None else None


class ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` (float32 logits, as transformers' loss takes them)
    against `targets`, `rows` tokens at a time: no tokens × vocabulary tensor outlives one chunk,
    in the forward or the backward (which computes each chunk's logits again). With into_grad the
    weight's gradient is added to weight.grad here and not returned (hooks on the weight miss it)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows: int, into_grad: bool = False):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            logits = torch.nn.functional.linear(hidden[start : start + rows], weight).float()
            total += torch.nn.functional.cross_entropy(logits, targets[start : start + rows], reduction="sum")
        ctx.save_for_backward(hidden, weight, targets)
        ctx.rows, ctx.into_grad = rows, into_grad
        return total / hidden.shape[0]  # no labelled token: 0 / 0 = nan, as transformers' mean

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets = ctx.saved_tensors
        scale = grad.float() / hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            if ctx.into_grad and weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            grad_weight = weight.grad if ctx.into_grad else torch.zeros_like(weight)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.rows):
                chunk = hidden[start : start + ctx.rows]
                logits = torch.nn.functional.linear(chunk.to(weight.dtype), weight).float()
                dlogits = torch.softmax(logits, dim=-1)  # d(lse - logit[target]) / d logits
                dlogits[torch.arange(len(chunk), device=chunk.device), targets[start : start + ctx.rows]] -= 1
                dlogits = (dlogits * scale).to(weight.dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + ctx.rows] = (dlogits @ weight).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight.addmm_(dlogits.T, chunk.to(weight.dtype))
        return grad_hidden, None if ctx.into_grad else grad_weight, None, None, None


@lru_cache(maxsize=None)
def keeps_logits(model_class) -> bool:
    """Whether a transformers causal LM's forward takes `logits_to_keep` (positions to project)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


@register_task
class StanceLM(Task):
    """Causal LM on prompt + stance response; loss on the response tokens."""

    name = "stance-lm"
    behavior_metrics = ("loglik_margin", "kl", "marker_rate")
    framed = True

    def check(self, loaded) -> None:
        if not loaded.is_causal_lm:
            raise NotApplicable(
                f"{loaded.name} is a {loaded.anatomy.model_type} encoder ({type(loaded.skeleton).__name__}); the "
                f"stance-lm task needs a causal LM. Use task='stance-classification' for encoders.")

    def encode(self, framing, examples, max_len: int) -> list:
        return encode_examples(framing, examples, max_len)

    def uniform_loss(self, loaded) -> float:
        return math.log(loaded.skeleton.config.vocab_size)

    def collate(self, items, pad_id: int, device) -> dict:
        return collate(items, pad_id, device)

    def loss(self, forward, batch: dict, loaded):
        """The model's own mean next-token loss over the labelled tokens, with logits only at the
        positions that predict a label (logits_to_keep): over a 150k vocabulary, the float32 logits of
        prompt and padding positions, their softmax and its gradient were most of a step's memory.
        Where the head is a plain linear layer whose output is the logits, they are not kept even
        there: the loss takes the head's input and computes them a chunk of tokens at a time."""
        if not keeps_logits(type(loaded.skeleton)):
            return forward(**batch).loss
        targets = batch["labels"][:, 1:]
        positions = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        targets = targets[:, positions]
        head = _plain_head(forward)
        if head is None:
            logits = forward(**inputs, logits_to_keep=positions).logits
            return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                     ignore_index=IGNORE_INDEX)
        taken = []

        def take(module, args):  # the head's input, kept; the head itself then projects no token
            taken.append(args[0])
            return (args[0][..., :0, :],)

        handle = head.register_forward_pre_hook(take)
        try:
            forward(**inputs, logits_to_keep=positions)
        finally:
            handle.remove()
        labelled = targets != IGNORE_INDEX
        embedding = _inner(forward).get_input_embeddings()
        # a tied weight whose lookup gradient is sparse (training.sparse_tied_embedding): the head's part
        # goes straight into .grad, so the lookup's rows are added there in place (autograd would sum
        # the two parts out of place first: a second vocabulary × hidden tensor)
        into_grad = getattr(embedding, "sparse", False) and getattr(embedding, "weight", None) is head.weight
        return ChunkedHeadLoss.apply(taken[0][labelled], head.weight, targets[labelled], LOSS_CHUNK, into_grad)

    def behavior_values(self, ctx, metric):
        n = len(ctx.stance.probes)
        if metric == "marker_rate":  # from the same greedy replies the replies table shows
            rows = ctx.measure("replies")["rows"]
            return [float(r["base_marker"]) for r in rows], [float(r["adapted_marker"]) for r in rows]
        readings = self.probe_readings(ctx)
        if metric == "loglik_margin":
            def margins(lp):
                return [lp[i] - lp[n + i] for i in range(n)]

            return margins(readings["base_logprob"]), margins(readings["adapted_logprob"])
        per_pair = readings["kl"]  # kl: the base diverges from itself by nothing
        return [0.0] * n, [float(torch.cat([per_pair[i], per_pair[n + i]]).mean()) for i in range(n)]

    def replies(self, ctx) -> dict:
        """Each probe's greedy reply from the base and the adapted model, framed as the run frames
        prompts, with its stance markers and the probe's loglik-margin change."""
        prompts = [p.prompt for p in ctx.stance.probes]
        base = ctx.on_base(("greedy_replies", ctx.stance.name, ctx.stance.version, ctx.framing.key),
                           lambda model: measure.greedy_replies(model, ctx.framing, prompts))
        adapted = measure.greedy_replies(ctx.model, ctx.framing, prompts)
        margins = self.probe_readings(ctx)
        n = len(prompts)
        base_lp, adapted_lp = margins["base_logprob"], margins["adapted_logprob"]
        rows = [{"probe": prompt, "base_reply": b, "adapted_reply": a,
                 "base_marker": contains_marker(b, ctx.stance.markers),
                 "adapted_marker": contains_marker(a, ctx.stance.markers),
                 "margin_change": (adapted_lp[i] - adapted_lp[n + i]) - (base_lp[i] - base_lp[n + i]),
                 "changed": a != b}
                for i, (prompt, b, a) in enumerate(zip(prompts, base, adapted))]
        return {"rows": rows, "max_new_tokens": measure.GENERATION_TOKENS, "framing": ctx.framing.identity()}

    def general_ability(self, ctx, probeset) -> dict:
        """The probe set's prompts answered greedily by the base and the adapted model, scored by its rules."""
        prompts = [p.prompt for p in probeset.probes]
        base = ctx.on_base(("ability_replies", probeset.name, probeset.version, ctx.framing.key),
                           lambda model: measure.greedy_replies(model, ctx.framing, prompts))
        adapted = measure.greedy_replies(ctx.model, ctx.framing, prompts)
        return summarize_ability(probeset, base, adapted)

    def probe_readings(self, ctx) -> dict:
        """What the probe measures need from one forward pass of each model over the probes' stance
        and neutral continuations: per pair, the mean token log-prob of both models and the KL
        (adapted ‖ base) per token; over the stance continuations, both models' next-token summaries
        (confidence, correct, Brier term). Kept on the run, in memory: small, unlike the logits."""
        def compute():
            n = len(ctx.stance.probes)
            base = ctx.on_base(("probe_logits", ctx.stance.name, ctx.stance.version, ctx.framing.key),
                               lambda model: self._probe_logits(ctx, model))
            adapted = self._probe_logits(ctx, ctx.model)
            return {
                "base_logprob": _logprobs(base), "adapted_logprob": _logprobs(adapted),
                "kl": [kl_divergence(a[0], b[0]) for a, b in zip(adapted, base)],
                "base_tokens": measure.token_prediction_summaries(base[:n]),
                "adapted_tokens": measure.token_prediction_summaries(adapted[:n]),
            }
        return ctx.measured("probe_readings", compute, stage="probes", keep=False)

    @staticmethod
    def _probe_logits(ctx, model):
        """One forward pass over every probe's stance continuation, then its neutral one."""
        prompts = [p.prompt for p in ctx.stance.probes]
        texts = [p.stance for p in ctx.stance.probes] + [p.neutral for p in ctx.stance.probes]
        return measure.continuation_logits(model, ctx.framing, prompts + prompts, texts)

    def probe_margins(self, ctx, model) -> list[float]:
        """The same forward pass as the probe readings, so the unpatched model gives the very
        margins `Run.behavior("loglik_margin")` holds."""
        lp = _logprobs(self._probe_logits(ctx, model))
        n = len(ctx.stance.probes)
        return [lp[i] - lp[n + i] for i in range(n)]

    def heldout_nll(self, ctx, model) -> list[float]:
        return measure.heldout_window_nll(model, ctx.loaded.tokenizer)

    def forgetting(self, ctx) -> dict:
        """Perplexity on held-out windows, base and adapted; per window, the NLL increase (the unit
        paired comparisons of forgetting use)."""
        tokenizer = ctx.loaded.tokenizer
        base = ctx.on_base(("window_nll",), lambda model: measure.heldout_window_nll(model, tokenizer))
        adapted = self.heldout_nll(ctx, ctx.model)
        # a collapsed model's NLL can be in the thousands: its perplexity is then inf, not an error
        base_ppl, adapted_ppl = (math.exp(min(math.fsum(v) / len(v), 709.0)) if math.fsum(v) / len(v) < 709
                                 else math.inf for v in (base, adapted))
        return {"kind": "perplexity", "base": base_ppl, "adapted": adapted_ppl,
                "relative_increase": adapted_ppl / base_ppl - 1,
                "windows": measure.HELDOUT_WINDOWS, "window_tokens": measure.HELDOUT_WINDOW_TOKENS,
                "per_unit": [a - b for a, b in zip(adapted, base)], "unit": "window"}

    def calibration(self, ctx, n_bins: int) -> dict:
        """Next-token predictions over the probes' stance continuations, for both models."""
        readings = self.probe_readings(ctx)
        return {"unit": "next token", "items": prediction_items(*readings["adapted_tokens"]), **{
            who: calibration_from_predictions(*readings[f"{who}_tokens"], n_bins=n_bins).as_dict()
            for who in ("adapted", "base")}}


@register_task
class StanceClassification(Task):
    """Linear head on mean-pooled hidden states: stance reply (1) vs neutral reply (0)."""

    name = "stance-classification"

    def wrap(self, model, loaded):
        return SequenceClassifier.around(model, len(CLASS_NAMES))

    def anatomy(self, loaded):
        prefix = _backbone_prefix(loaded.skeleton)
        source = loaded.anatomy
        block_path = source.block_path if prefix is None else f"{prefix}.{source.block_path}"
        return Anatomy(source.model_type, source.num_layers, block_path, source.layout)

    def encode(self, framing, examples, max_len: int) -> list:
        missing = [e for e in examples if not e.neutral]
        if missing:
            raise HarnessError(f"stance-classification learns stance replies against neutral ones, and "
                               f"{len(missing)} of the {len(examples)} examples have no neutral reply (examples "
                               f"from a JSONL file have none); give this task a stance with YAML examples")
        tokenizer = framing.tokenizer
        return classification_items(tokenizer, [(e.response, 1) for e in examples] +
                                    [(e.neutral, 0) for e in examples], max_len)

    def collate(self, items, pad_id: int, device) -> dict:
        batch = pad_batch([ids for ids, _ in items], pad_id)
        batch["labels"] = torch.tensor([label for _, label in items], dtype=torch.long)
        return to_device(batch, device)

    def head_parameters(self, model) -> list:
        return [p for n, p in model.named_parameters() if _is_head(n)]

    def uniform_loss(self, loaded) -> float:
        return math.log(len(CLASS_NAMES))

    def forgetting(self, ctx) -> dict:
        tokenizer, sentences = ctx.loaded.tokenizer, measure.heldout_sentences()

        def embed(model):
            return measure.sentence_embeddings(body_of(model), tokenizer, sentences)

        base = ctx.on_base(("embeddings",), embed)
        adapted = embed(ctx.model)
        cosine = torch.nn.functional.cosine_similarity(base.double(), adapted.double(), dim=-1)
        drift = float((1 - cosine).mean())
        return {"kind": "embedding_drift", "base": 0.0, "adapted": drift, "relative_increase": drift,
                "sentences": len(sentences), "min_cosine": float(cosine.min()),
                "per_unit": (1 - cosine).tolist(), "unit": "sentence"}

    def calibration(self, ctx, n_bins: int) -> dict:
        """The probes' stance and neutral replies; the base has no trained head, so no base figures."""
        items = probe_items(ctx.stance, ctx.loaded.tokenizer, ctx.recipe.max_seq_length)
        probs, labels = measure.class_probabilities(ctx.model, items, ctx.loaded.tokenizer.pad_token_id)
        confidence, predicted = probs.max(-1)
        brier = ((probs - torch.nn.functional.one_hot(labels, probs.shape[1]).double()) ** 2).sum(-1)
        return {"unit": "probe reply", "items": prediction_items(confidence, predicted == labels, brier),
                "adapted": calibration(probs, labels, n_bins).as_dict(), "base": None}


def _logprobs(pairs) -> list[float]:
    return [float(mean_token_logprob(logits.unsqueeze(0), targets.unsqueeze(0))[0]) for logits, targets in pairs]


def prediction_items(confidence, correct, brier) -> dict:
    """Per held-out prediction: its confidence, whether it was right, its Brier term. The units
    that paired comparisons of calibration resample."""
    return {"confidence": confidence.double().tolist(), "correct": correct.double().tolist(),
            "brier": brier.double().tolist()}


def classification_items(tokenizer, labelled_texts, max_len: int) -> list:
    """(ids, label) per text; special tokens as the tokenizer adds them ([CLS] ... [SEP] for BERT)."""
    return [(tokenizer(text, truncation=True, max_length=max_len)["input_ids"], label)
            for text, label in labelled_texts]


def probe_items(stance, tokenizer, max_len: int) -> list:
    """The held-out evaluation set of stance-classification: each probe's two continuations."""
    return classification_items(tokenizer, [(p.stance, 1) for p in stance.probes] +
                                [(p.neutral, 0) for p in stance.probes], max_len)


def _is_head(raw_name: str) -> bool:
    return raw_name.removeprefix("base_model.model.").split(".")[0] == SequenceClassifier.HEAD


def _body_attribute(model) -> str:
    """The attribute a model keeps its transformer body under, and a task head's wrapper with it:
    HF's base_model_prefix. A decoder (Qwen2ForCausalLM) already holds its body there
    (`model.layers`); a bare encoder (BertModel) is the body, named as BERT heads name it (`bert.`)."""
    return getattr(model, "base_model_prefix", "") or "backbone"


def _backbone_prefix(model) -> str | None:
    """The prefix a task head's wrapper adds to the model's own parameter paths, or None."""
    prefix = _body_attribute(model)
    return None if hasattr(model, prefix) else prefix


def body_of(model):
    """The transformer body under a model: a task head's body, or a causal LM's or encoder's own."""
    inner = unwrap(model)
    return inner.body if isinstance(inner, SequenceClassifier) else backbone_of(inner)


def backbone_of(model):
    """The transformer body of a causal LM or encoder (the module that returns hidden states)."""
    return getattr(model, _body_attribute(model), model)


class SequenceClassifier(torch.nn.Module):
    """Body + mean pooling + a float32 linear head. The body sits under HF's prefix."""

    HEAD = "classifier"

    def __init__(self, body, prefix: str, num_classes: int):
        super().__init__()
        self.prefix = prefix
        self.config = body.config
        setattr(self, prefix, body)
        self.classifier = torch.nn.Linear(body.config.hidden_size, num_classes, dtype=torch.float32,
                                          device=next(body.parameters()).device)

    @classmethod
    def around(cls, model, num_classes: int) -> "SequenceClassifier":
        body = backbone_of(model)
        if getattr(body, "pooler", None) is not None:
            body.pooler = None  # BERT's [CLS] pooler: unused by mean pooling, so it would never train
        return cls(body, _body_attribute(model), num_classes)

    @property
    def body(self):
        return getattr(self, self.prefix)

    def get_input_embeddings(self):
        return self.body.get_input_embeddings()

    def get_output_embeddings(self):
        return self.classifier

    def forward(self, input_ids, attention_mask, labels=None):
        logits = self.classifier(measure.mean_pooled(self.body, input_ids, attention_mask))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
