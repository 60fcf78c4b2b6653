"""Ready-made ``metric_fn(model, batches)`` callables for :func:`~acr_optim.probe.probe` on dict batches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .indicator import MetricFn, default_loss

__all__ = ["accuracy", "bleu", "perplexity", "token_accuracy"]


def perplexity(model: nn.Module, batches: Sequence[Any]) -> dict[str, float]:
    """``exp`` of the mean per-batch loss ``model(**batch).loss``."""
    mean = sum(float(default_loss(model, b)) for b in batches) / len(batches)
    return {"perplexity": math.exp(mean) if mean < 700 else math.inf}


def accuracy(model: nn.Module, batches: Sequence[Any]) -> dict[str, float]:
    """Fraction of examples with ``argmax(logits) == labels`` (sequence classification)."""
    hits = total = 0
    for batch in batches:
        pred = model(**batch).logits.argmax(-1)
        hits += int((pred == batch["labels"]).sum())
        total += batch["labels"].numel()
    return {"accuracy": hits / total}


def token_accuracy(shift: bool) -> MetricFn:
    """Teacher-forced next-token accuracy over positions whose label is not -100.

    ``shift=True`` for causal LMs (position t predicts label t+1), ``False`` for seq2seq models
    (logits already aligned with ``labels``).
    """

    def metric(model: nn.Module, batches: Sequence[Any]) -> dict[str, float]:
        hits = total = 0
        for batch in batches:
            logits, labels = model(**batch).logits, batch["labels"]
            if shift:
                logits, labels = logits[:, :-1], labels[:, 1:]
            mask = labels != -100
            hits += int(((logits.argmax(-1) == labels) & mask).sum())
            total += int(mask.sum())
        return {"token_accuracy": hits / max(total, 1)}

    return metric


def bleu(tokenizer: Any, max_new_tokens: int = 64, num_beams: int | None = None) -> MetricFn:
    """Corpus BLEU of ``model.generate`` on ``input_ids`` against the decoded ``labels``
    (:func:`~acr_optim.integrations.evaluate.corpus_bleu`: ``evaluate``'s sacrebleu, or sacrebleu itself offline).

    ``num_beams`` beams (1: greedy); None decodes as ``model.generate()`` does by default, with the
    model's ``generation_config.num_beams``.  At most ``max_new_tokens`` tokens per translation.
    """
    from ..integrations.evaluate import corpus_bleu

    for name, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    beams = {} if num_beams is None else {"num_beams": num_beams}

    def metric(model: nn.Module, batches: Sequence[Any]) -> dict[str, float]:
        hyps: list[str] = []
        refs: list[str] = []
        for batch in batches:
            out = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch.get("attention_mask"),
                max_new_tokens=max_new_tokens,
                **beams,
            )
            hyps += tokenizer.batch_decode(out, skip_special_tokens=True)
            labels = torch.where(batch["labels"] == -100, tokenizer.pad_token_id, batch["labels"])
            refs += tokenizer.batch_decode(labels, skip_special_tokens=True)
        return {"bleu": corpus_bleu(hyps, refs)}

    return metric
