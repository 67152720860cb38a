"""Statistics for comparing runs on the same questions: the exact McNemar test and a bootstrap interval of EM.

McNemar (exact, two-sided): of the n questions exactly one run answers right, b go to the
first run and c to the second; under "equally accurate" b ~ Binomial(n, 1/2), so
p = min(1, 2 * P[X <= min(b, c)]) (McNemar 1947; the exact form of Fagerland et al. 2013).
Bootstrap: resample the questions with replacement, a percentile interval of the EM.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs (1.0 when there are none)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))  # exact integers, any n
    return min(1.0, 2 * tail / 2**n)


def bootstrap_interval(correct: Sequence[bool], *, samples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``correct`` (EM): (low, high); (nan, nan) when empty."""
    values = np.asarray(correct, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, 100):  # 100 resamples at a time: memory stays O(100 n)
        count = min(100, samples - start)
        picks = rng.integers(0, values.size, size=(count, values.size))  # (S', n) question indices
        means[start:start + count] = values[picks].mean(axis=1)  # (S',)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
