"""Corpus BLEU through Hugging Face ``evaluate`` when its ``sacrebleu`` metric loads, else through ``sacrebleu``.

Both paths compute the same score: ``evaluate``'s ``sacrebleu`` metric is a thin wrapper around
``sacrebleu.corpus_bleu`` with sacreBLEU's defaults (13a tokenisation, exponential smoothing,
case-sensitive, ``force=False``, ``use_effective_order=False``), and the fallback calls
``sacrebleu.corpus_bleu`` with those same defaults.  The metric script comes from the Hub or the
local ``evaluate`` cache (the ``evaluate`` package ships no metric scripts); offline and never
cached, the fallback is used and says so in one log line per process.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import sacrebleu

__all__ = ["corpus_bleu", "sacrebleu_metric"]

logger = logging.getLogger(__name__)


@functools.cache
def sacrebleu_metric() -> Any | None:
    """``evaluate.load("sacrebleu")``, loaded once per process; ``None`` (logged once) when it cannot be loaded."""
    try:
        import evaluate

        return evaluate.load("sacrebleu")
    except (ImportError, OSError) as err:  # no evaluate, or offline with nothing cached (OSError covers HTTP errors)
        logger.warning(
            "BLEU: evaluate.load('sacrebleu') is not available (%s: %s); computing it with sacrebleu.corpus_bleu "
            "directly, with the same settings",
            type(err).__name__,
            str(err).splitlines()[0] if str(err) else "",
        )
        return None


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
