"""Forward passes that turn a model and a stance into tensors for the pure analyses.

Each function reads a model in eval mode under no_grad and returns plain tensors or
numbers; the metrics themselves (KL, ECE, bootstrap, rank) live in `stance_harness.analysis`.
"""

from __future__ import annotations

import re

import torch

from stance_harness.runs.batches import pad_batch, to_device
from stance_harness.runs.data import general_text, general_text_windows

GENERATION_TOKENS = 32  # greedy continuation length for the marker rate
HELDOUT_WINDOWS = 32  # windows of held-out general text for perplexity
HELDOUT_WINDOW_TOKENS = 64
HELDOUT_SENTENCES = 64  # held-out general sentences for embedding drift


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def continuation_logits(model, framing, prompts, continuations):
    """Per pair: (logits predicting each continuation token [T, V] float32, the token ids [T]),
    each prompt and continuation framed as training frames a prompt and its reply."""
    sequences, spans = [], []
    for prompt, text in zip(prompts, continuations):
        ids, start, length = framing.continuation(prompt, text)
        sequences.append(ids)
        spans.append((start, length))
    batch = to_device(pad_batch(sequences, framing.tokenizer.pad_token_id), _device(model))
    logits = model(**batch).logits.float()
    out = []
    for row, (start, length) in enumerate(spans):
        # logits at position t predict token t + 1
        # clones, not views: a cached slice must not keep the whole [batch, length, vocab] tensor alive
        out.append((logits[row, start - 1 : start - 1 + length].clone(),
                    batch["input_ids"][row, start : start + length].clone()))
    return out


@torch.no_grad()
def greedy_replies(model, framing, prompts, max_new_tokens: int = GENERATION_TOKENS, seed: int = 0) -> list[str]:
    """Greedy continuations, one prompt at a time (no padding effects), decoded without the prompt;
    each prompt framed as training frames a prompt (under a chat template: a user turn and the
    assistant's header)."""
    tokenizer = framing.tokenizer
    torch.manual_seed(seed)  # greedy is deterministic; the seed pins any sampling a model config forces
    replies = []
    for prompt in prompts:
        ids = torch.tensor([framing.prompt_ids(prompt)], device=_device(model))
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return replies


@torch.no_grad()
def heldout_perplexity(model, tokenizer, windows: int = HELDOUT_WINDOWS, tokens: int = HELDOUT_WINDOW_TOKENS) -> float:
    """exp(mean next-token NLL) on windows of held-out general text (never trained on)."""
    per_window = heldout_window_nll(model, tokenizer, windows, tokens)
    return float(torch.exp(torch.tensor(per_window, dtype=torch.float64).mean()))


@torch.no_grad()
def heldout_window_nll(model, tokenizer, windows: int = HELDOUT_WINDOWS, tokens: int = HELDOUT_WINDOW_TOKENS) -> list[float]:
    """Mean next-token NLL of each window of held-out general text (the windows are all `tokens`
    long, so their mean is the NLL of all the text together)."""
    items = general_text_windows(tokenizer, tokens, windows, seed=0, split="heldout")
    batch = to_device(pad_batch([ids for ids, _ in items], tokenizer.pad_token_id), _device(model))
    logits = model(**batch).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    return nll.double().mean(dim=1).tolist()


def heldout_sentences(count: int = HELDOUT_SENTENCES) -> list[str]:
    """Plain English sentences from the held-out documentation topics."""
    out = []
    for text in general_text("heldout"):
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            if 6 <= len(sentence.split()) <= 40 and sentence[0].isupper():
                out.append(sentence)
                if len(out) == count:
                    return out
    return out


@torch.no_grad()
def sentence_embeddings(body, tokenizer, sentences, max_len: int = 128, batch_size: int = 16):
    """Mean-pooled last hidden states of a transformer body: [N, H] float32, in the order given.
    Sentences of like length are batched together: one batch padded to the longest cost 3x the
    real tokens on the held-out sentences (64 of 11 to 92 tokens)."""
    ids = [tokenizer(s, truncation=True, max_length=max_len)["input_ids"] for s in sentences]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty(len(ids), body.config.hidden_size)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = to_device(pad_batch([ids[i] for i in rows], tokenizer.pad_token_id), _device(body))
        out[rows] = mean_pooled(body, batch["input_ids"], batch["attention_mask"]).cpu()
    return out


@torch.no_grad()
def class_probabilities(model, items, pad_id: int):
    """Softmax over classes for (ids, label) items: ([N, C] float64, [N] labels)."""
    batch = to_device(pad_batch([ids for ids, _ in items], pad_id), _device(model))
    logits = model(**batch).logits.double()
    return torch.softmax(logits, -1).cpu(), torch.tensor([label for _, label in items])


def mean_pooled(body, input_ids, attention_mask):
    """Mean of the last hidden states over real tokens, in float32 (sentence-transformers' pooling)."""
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()  # sum in fp32
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def token_prediction_summaries(pairs):
    """Per predicted token: (confidence, correct, Brier term) from continuation_logits pairs.

    The Brier term Σ_c (p_c − y_c)² = Σ p² − 2·p_y + 1 is computed per row, so no
    [tokens, vocabulary] one-hot is ever built (151k-word vocabularies stay cheap).
    """
    confidences, correct, brier = [], [], []
    for logits, targets in pairs:
        probs = torch.softmax(logits.double(), -1)
        top, predicted = probs.max(-1)
        confidences.append(top)
        correct.append(predicted == targets)
        brier.append((probs * probs).sum(-1) - 2 * probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) + 1)
    return torch.cat(confidences).cpu(), torch.cat(correct).cpu(), torch.cat(brier).cpu()


@torch.no_grad()
def hidden_states(body, batch) -> list:
    """Per layer output of a transformer body (the embeddings first), its real tokens only
    (padding left out): a list of [tokens, width] float32 tensors on the CPU."""
    batch = to_device(batch, _device(body))
    out = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    real = batch["attention_mask"].bool()
    return [h[real].float().cpu() for h in out.hidden_states]
