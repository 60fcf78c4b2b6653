"""The statistics every summary uses, written once: mean ± std over seeds, the paired t interval, Welch's
unpaired interval, the one-sample t-test and Holm's correction.

Each function returns numbers; how a table prints them is the summary's business (:func:`lab.docs.mean_std`
and :func:`lab.docs.interval` print the common forms).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterable, Sequence

LEVEL = 0.95  # the confidence of every interval


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value, ``nan`` when a value is not finite)."""
    values = list(values)
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    if not all(math.isfinite(v) for v in values):
        return mean, math.nan
    return mean, statistics.stdev(values)


def t_interval(diffs: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """Mean of paired differences and the half-width of its two-sided t interval at ``level`` (``inf`` for a
    single difference: one seed resolves nothing)."""
    from scipy.stats import t

    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.inf
    return mean, t.ppf((1 + level) / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))


def welch(runs: Sequence[float], base: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """Unpaired: the difference of the two means, the half-width of its Welch interval at ``level`` and Welch's
    two-sided p-value."""
    from scipy.stats import ttest_ind

    test = ttest_ind(runs, base, equal_var=False)
    ci = test.confidence_interval(level)
    return statistics.fmean(runs) - statistics.fmean(base), (ci.high - ci.low) / 2, float(test.pvalue)


def t_test(diffs: Sequence[float]) -> float:
    """The two-sided p-value of the one-sample t-test of ``diffs`` against 0."""
    from scipy.stats import ttest_1samp

    return float(ttest_1samp(diffs, 0.0).pvalue)


def holm(pvalues: Sequence[float], level: float = 1 - LEVEL) -> int:
    """How many of the smallest p-values Holm's step-down correction for their number keeps at family-wise
    ``level``: the k-th smallest (from 0) is kept while it and every smaller one are at most
    ``level / (m - k)``."""
    ordered = sorted(pvalues)
    for k, p in enumerate(ordered):
        if p > level / (len(ordered) - k):
            return k
    return len(ordered)


def bootstrap_share(
    hits: Sequence[bool], level: float = LEVEL, draws: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """The percentile bootstrap interval of the share of ``hits`` that are true, resampling the runs with replacement
    (``draws`` resamples from a fixed ``seed``, so a table regenerates to the same interval)."""
    rng = random.Random(seed)
    n = len(hits)
    shares = sorted(sum(rng.choices(hits, k=n)) / n for _ in range(draws))
    tail = (1 - level) / 2
    return shares[int(tail * draws)], shares[min(draws - 1, int((1 - tail) * draws))]


def clopper_pearson(hits: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a share ``hits / n``: unlike the bootstrap, not empty at 0 or n hits."""
    from scipy.stats import beta

    tail = (1 - level) / 2
    low = 0.0 if hits == 0 else float(beta.ppf(tail, hits, n - hits + 1))
    high = 1.0 if hits == n else float(beta.ppf(1 - tail, hits + 1, n - hits))
    return low, high
