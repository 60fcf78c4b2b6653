"""Corpus BLEU and accuracy through Hugging Face ``evaluate`` when its metric loads, else computed directly.

BLEU: both paths compute the same score: ``evaluate``'s ``sacrebleu`` metric is a thin wrapper around
``sacrebleu.corpus_bleu`` with sacreBLEU's defaults (13a tokenisation, exponential smoothing,
case-sensitive, ``force=False``, ``use_effective_order=False``), and the fallback calls
``sacrebleu.corpus_bleu`` with those same defaults.  The metric script comes from the Hub or the
local ``evaluate`` cache (the ``evaluate`` package ships no metric scripts); offline and never
cached, the fallback is used, noted once per process at the INFO log level (the score is the same,
so nothing is wrong).  Accuracy: ``evaluate``'s ``accuracy`` metric, or the same share computed with
numpy.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import sacrebleu

__all__ = ["accuracy", "accuracy_metric", "corpus_bleu", "sacrebleu_metric"]

logger = logging.getLogger(__name__)


def _load_metric(name: str, label: str, fallback: str) -> Any | None:
    """``evaluate.load(name)``; ``None``, logged at INFO as ``"{label}: ... computing it {fallback}"``, when it cannot
    be loaded."""
    try:
        import evaluate

        return evaluate.load(name)
    except (ImportError, OSError) as err:  # no evaluate, or offline with nothing cached (OSError covers HTTP errors)
        logger.info(
            "%s: evaluate.load(%r) is not available (%s: %s); computing it %s",
            label,
            name,
            type(err).__name__,
            str(err).splitlines()[0] if str(err) else "",
            fallback,
        )
        return None


@functools.cache
def sacrebleu_metric() -> Any | None:
    """``evaluate.load("sacrebleu")``, loaded once per process; ``None`` (logged once, at INFO) when it cannot be
    loaded."""
    return _load_metric("sacrebleu", "BLEU", "with sacrebleu.corpus_bleu directly, with the same settings")


@functools.cache
def accuracy_metric() -> Any | None:
    """``evaluate.load("accuracy")``, loaded once per process; ``None`` (logged once, at INFO) when it cannot be
    loaded."""
    return _load_metric("accuracy", "accuracy", "with numpy: the share of predictions equal to their reference")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU in ``[0, 100]`` of ``hypotheses`` against one reference each (sacreBLEU's defaults).

    ``BLEU = BP * exp(sum_{k=1..4} log(p_k) / 4)`` with ``p_k`` the clipped ``k``-gram precisions
    over the corpus (13a tokenisation, exponential smoothing of zero counts) and the brevity
    penalty ``BP = min(1, exp(1 - r / c))`` for total reference length ``r`` and hypothesis
    length ``c``.  Computed by :func:`sacrebleu_metric` when it loads, else by
    ``sacrebleu.corpus_bleu`` directly; the two give the same score.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    metric = sacrebleu_metric()
    if metric is None:
        return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score
    # evaluate's metric takes the references of each hypothesis as a list; sacrebleu takes reference streams.
    return metric.compute(predictions=list(hypotheses), references=[[r] for r in references])["score"]


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    """The share in ``[0, 1]`` of ``predictions`` equal to their reference (class ids), computed by
    :func:`accuracy_metric` when it loads, else with numpy; the two give the same value."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    metric = accuracy_metric()
    if metric is None:
        return float(np.mean(np.asarray(predictions) == np.asarray(references)))
    return float(metric.compute(predictions=list(predictions), references=list(references))["accuracy"])
