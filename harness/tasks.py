"""Tasks: what the one training loop optimises, and how a stance becomes training data.

`stance-lm` (the default) teaches a causal LM to answer in the stance: prompt + response,
with the loss on the response tokens only.

`stance-classification` puts a fresh linear head on the mean-pooled hidden states of the
model's own body (an encoder such as minilm-l6, or a decoder's transformer stack) and
trains it to tell stance-marked replies (class 1) from neutral ones (class 0). The stance's
examples give the training texts; its held-out probes give the evaluation texts, which is
where Acc@1 and ECE are measured.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .registry import HarnessError, Registry

CLASS_NAMES = ("neutral", "stance")


class Task:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def check(self, loaded) -> None:
        """Refuse models this task cannot train."""

    def wrap(self, model, loaded):
        """The module the loop trains (the model itself, or the model with a task head)."""
        return model

    def anatomy(self, loaded):
        """The anatomy of what `wrap` returns (its parameter paths)."""
        return loaded.anatomy

    def encode(self, tokenizer, examples, max_len: int) -> list:
        raise NotImplementedError

    def collate(self, items, pad_id: int, device) -> dict:
        raise NotImplementedError

    def head_parameters(self, model) -> list:
        """Parameters the task adds, which train under every method (a fresh head must learn)."""
        return []


TASKS: Registry[Task] = Registry("task")


def register_task(cls: type[Task]) -> type[Task]:
    TASKS.register(cls.name, cls())
    return cls


@register_task
class StanceLM(Task):
    name = "stance-lm"
    summary = "causal LM on prompt + stance response; loss on the response tokens"

    def check(self, loaded) -> None:
        if not loaded.is_causal_lm:
            raise HarnessError(
                f"{loaded.name} is a {loaded.anatomy.model_type} encoder ({type(loaded.base).__name__}); the "
                f"stance-lm task needs a causal LM. Use task='stance-classification' for encoders.")

    def encode(self, tokenizer, examples, max_len: int) -> list:
        from .training import encode_examples

        return encode_examples(tokenizer, examples, max_len)

    def collate(self, items, pad_id: int, device) -> dict:
        from .training import collate

        return collate(items, pad_id, device)


@register_task
class StanceClassification(Task):
    name = "stance-classification"
    summary = "linear head on mean-pooled hidden states: stance reply (1) vs neutral reply (0)"

    def wrap(self, model, loaded):
        return SequenceClassifier.around(model, len(CLASS_NAMES))

    def anatomy(self, loaded):
        from .models.anatomy import Anatomy

        prefix = _backbone_prefix(loaded.base)
        source = loaded.anatomy
        block_path = source.block_path if prefix is None else f"{prefix}.{source.block_path}"
        return Anatomy(source.model_type, source.num_layers, block_path, source.layout)

    def encode(self, tokenizer, examples, max_len: int) -> list:
        return classification_items(tokenizer, [(e.response, 1) for e in examples] +
                                    [(e.neutral, 0) for e in examples], max_len)

    def collate(self, items, pad_id: int, device) -> dict:
        from .training import pad_batch

        batch = pad_batch([ids for ids, _ in items], pad_id)
        batch["labels"] = torch.tensor([label for _, label in items], dtype=torch.long)
        return {k: v.to(device) for k, v in batch.items()}

    def head_parameters(self, model) -> list:
        return [p for n, p in model.named_parameters() if _is_head(n)]


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
    from .models.anatomy import unwrap

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
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.classifier(mean_pooled(self.body, input_ids, attention_mask))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def mean_pooled(body, input_ids, attention_mask):
    """Mean of the last hidden states over real tokens, in float32 (sentence-transformers' pooling)."""
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()  # sum in fp32
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
