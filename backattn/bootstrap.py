"""95% bootstrap intervals for per-problem scores: plain, paired, and resampling templates first.

Every quality number of the comparison is a statistic of per-problem values ``x_i`` (a 0/1 correctness, a
summed loss) over held-out problems, either the mean ``sum_i x_i / n`` or, with ``denominators`` ``d_i``
(tokens per problem), the ratio ``sum_i x_i / sum_i d_i`` (a token-weighted cross-entropy). Its interval is the
percentile bootstrap: the statistic on ``n_resamples`` resampled data sets, cut at ``(1 - level) / 2`` and
``(1 + level) / 2``.

* ``groups`` (a template id per problem) resamples in two stages: templates with replacement, then problems
  within each drawn template with replacement. Problems generated from one template are correlated, so
  resampling problems alone would give intervals that are too narrow.
* ``baseline`` (the other model's values on the same problems) gives the interval of the paired difference
  ``stat(x) - stat(baseline)``: both statistics are taken on the same resample.

A statistic that is neither a mean nor one ratio (a macro-F1: a mean of per-class ratios) goes through
:func:`bootstrap_statistic`, which hands the statistic the resamples' weights (the same resamples, for the same
``n``, ``groups`` and ``seed``, as :func:`bootstrap_interval` draws).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Interval(NamedTuple):
    estimate: float
    low: float
    high: float

    def format(self, spec: str = ".3f") -> str:
        return f"{self.estimate:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def _resample_weights(n: int, groups: np.ndarray | None, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """How often each problem is drawn in each resample: ``(n_resamples, n)`` counts."""
    rows = np.arange(n_resamples)[:, None]

    def counts(resample: np.ndarray, problem: np.ndarray) -> np.ndarray:
        flat = np.bincount((resample * n + problem).ravel(), minlength=n_resamples * n)
        return flat.reshape(n_resamples, n).astype(float)

    if groups is None:
        return counts(rows, rng.integers(0, n, (n_resamples, n)))
    # Two stages: m templates with replacement, then within each drawn template as many problems as it has.
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    sizes = np.array([len(m) for m in members])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    order = np.concatenate(members)  # problems sorted by template; template j holds order[starts[j]: + sizes[j]]
    drawn = rng.integers(0, len(members), (n_resamples, len(members)))  # (B, m) template indices
    offsets = np.floor(rng.random((n_resamples, len(members), sizes.max())) * sizes[drawn][..., None]).astype(int)
    picks = order[starts[drawn][..., None] + np.minimum(offsets, sizes[drawn][..., None] - 1)]  # (B, m, max size)
    valid = np.arange(sizes.max()) < sizes[drawn][..., None]
    return counts(np.broadcast_to(rows[..., None], picks.shape)[valid], picks[valid])


def bootstrap_interval(
    values,
    denominators=None,
    *,
    groups=None,
    baseline=None,
    baseline_denominators=None,
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """The statistic of ``values`` (minus that of ``baseline`` when given) with its percentile interval.

    Args:
        values: one number per problem (NaN not allowed: a missing score is a bug upstream).
        denominators: per-problem weights for a ratio statistic; default the mean.
        groups: a template id per problem: resample templates, then problems within them.
        baseline, baseline_denominators: the compared model's values on the same problems (paired).
        level, n_resamples, seed: the interval's coverage, the number of resamples, the generator's seed.
    """
    x = np.asarray(values, dtype=float)
    d = np.ones_like(x) if denominators is None else np.asarray(denominators, dtype=float)
    if x.ndim != 1 or not len(x) or d.shape != x.shape:
        raise ValueError(f"values must be a non-empty 1-D array with denominators of the same shape; got {x.shape}.")
    if not np.isfinite(x).all() or not np.isfinite(d).all():
        raise ValueError("values and denominators must be finite (a NaN score means a problem went unscored).")
    y = yd = None
    if baseline is not None:
        y = np.asarray(baseline, dtype=float)
        yd = np.ones_like(y) if baseline_denominators is None else np.asarray(baseline_denominators, dtype=float)
        if y.shape != x.shape or yd.shape != x.shape:
            raise ValueError(f"baseline must score the same {len(x)} problems; got shape {y.shape}.")
    group_ids = None if groups is None else np.asarray(groups)
    if group_ids is not None and group_ids.shape != x.shape:
        raise ValueError(f"groups must name one template per problem; got shape {group_ids.shape}.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")

    def statistic(w: np.ndarray) -> np.ndarray:
        value = (w @ x) / (w @ d)
        return value - (w @ y) / (w @ yd) if y is not None else value

    weights = _resample_weights(len(x), group_ids, n_resamples, np.random.default_rng(seed))
    estimate = float(statistic(np.ones((1, len(x))))[0])
    low, high = np.quantile(statistic(weights), [(1 - level) / 2, (1 + level) / 2])
    return Interval(estimate, float(low), float(high))


def bootstrap_statistic(
    statistic, n: int, *, groups=None, level: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> Interval:
    """Any statistic of ``n`` problems with its percentile interval.

    ``statistic(weights)`` takes a ``(resamples, n)`` array of how often each problem is drawn (one row of ones is
    the data set itself) and returns one value per row; ``groups`` as in :func:`bootstrap_interval`.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive number of problems, got {n!r}.")
    group_ids = None if groups is None else np.asarray(groups)
    if group_ids is not None and group_ids.shape != (n,):
        raise ValueError(f"groups must name one template per problem; got shape {group_ids.shape}.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    estimate = float(np.asarray(statistic(np.ones((1, n))))[0])
    values = np.asarray(statistic(_resample_weights(n, group_ids, n_resamples, np.random.default_rng(seed))))
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return Interval(estimate, float(low), float(high))


__all__ = ["Interval", "bootstrap_interval", "bootstrap_statistic"]
