"""Bootstrap confidence intervals over a test set's examples (percentile method, ``scipy.stats.bootstrap``).

Every resample draws ``n`` example indices with replacement from ``numpy.random.default_rng(seed)``; the interval is
the 2.5th and 97.5th percentile (for 95 %) of the metric over the resamples. Two forms, drawing the same resamples
for the same ``(n, n_resamples, seed)``:

* :func:`bootstrap_ci`: for a metric that is the mean of per-example values (exact match, ROUGE, multiple-choice
  accuracy): the resampled means, computed at once (fast);
* :func:`bootstrap_ci_of`: for any metric, recomputed on each resample from the resampled example indices (corpus
  BLEU and chrF pool n-gram statistics over the corpus, so they must be recomputed: BLEU cheaply from
  :func:`gkd.metrics.bleu_statistics`, anything else from the text, slow for large ``n_resamples``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

CONFIDENCE = 0.95
"""The confidence level of the intervals."""


def _bootstrap(data: np.ndarray, statistic: Callable, vectorized: bool, n_resamples: int, seed: int) -> tuple:
    from scipy.stats import bootstrap

    if data.shape[-1] < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 examples, got {data.shape[-1]}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    res = bootstrap(
        (data,),
        statistic,
        n_resamples=n_resamples,
        confidence_level=CONFIDENCE,
        method="percentile",
        vectorized=vectorized,
        axis=-1,
        rng=np.random.default_rng(seed),
    )
    return res.confidence_interval.low, res.confidence_interval.high


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_resamples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """95 % percentile interval of the mean of per-example ``values`` (shape ``[n]`` or ``[metrics, n]``).

    Returns ``(low, high)``, each a float array of shape ``values.shape[:-1]`` (a 0-d array for one metric).
    """
    data = np.asarray(values, dtype=np.float64)
    low, high = _bootstrap(data, np.mean, True, n_resamples, seed)
    return np.asarray(low), np.asarray(high)


def bootstrap_ci_of(
    statistic: Callable[[np.ndarray], Sequence[float]], n: int, n_resamples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """95 % percentile interval of ``statistic(indices)`` (one value per metric) over resamples of ``n`` examples.

    ``statistic`` gets an int array of ``n`` example indices drawn with replacement and recomputes every metric on
    those examples. Returns ``(low, high)`` arrays with one entry per metric.
    """

    def stat(indices: np.ndarray) -> np.ndarray:
        return np.asarray(statistic(indices.astype(np.int64)), dtype=np.float64)

    low, high = _bootstrap(np.arange(n), stat, False, n_resamples, seed)
    return np.atleast_1d(low), np.atleast_1d(high)
