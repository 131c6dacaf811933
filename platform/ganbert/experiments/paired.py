"""Paired per-subject comparisons: subject-bootstrap confidence intervals, Wilcoxon signed-rank p, Holm adjustment.

Everything here is a pure function of per-subject values, so anyone can recompute a study's numbers from its
`study.json` alone:
- `bootstrap_ci(values)`: `rng = numpy.random.default_rng(seed)`, `idx = rng.integers(0, n, size=(resamples, n))`,
  the means of `values[idx]` over axis 1, and their `numpy.quantile` at (1 - level) / 2 and 1 - (1 - level) / 2
  (percentile interval). Values are ordered by subject id before resampling.
- `wilcoxon_p(diffs)`: `scipy.stats.wilcoxon(diffs)` with scipy's defaults (two-sided, zero_method "wilcox").
- `holm(ps)`: Holm's step-down adjustment over the p-values of one family (the rows of one metric).
- `verdict`: "better" / "worse" only when the interval excludes 0 and at least MIN_SUBJECTS subjects are paired.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95
BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no difference at this n"
# The smallest n at which the two-sided exact Wilcoxon signed-rank test can reach p < 0.05 (2 / 2^6 = 0.031);
# below it a percentile bootstrap of a handful of differences is far too narrow to be read as evidence.
MIN_SUBJECTS = 6


def bootstrap_ci(values: Sequence[float] | np.ndarray, resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (n,), resampling subjects with replacement.

    Raises ValueError naming `values` when it is empty or not finite, `resamples` when < 1, `level` outside (0, 1).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"values must be a non-empty 1-D array of finite numbers, got shape {x.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def wilcoxon_p(diffs: Sequence[float] | np.ndarray) -> float | None:
    """Two-sided Wilcoxon signed-rank p of paired differences (scipy defaults); None when it is undefined (no
    difference is non-zero)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0 or not np.any(d != 0):
        return None
    return float(stats.wilcoxon(d).pvalue)


def holm(ps: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values in the input order (None stays None and is not counted in the family)."""
    valid = sorted((p, i) for i, p in enumerate(ps) if p is not None and math.isfinite(p))
    m = len(valid)
    out: list[float | None] = [None] * len(ps)
    running = 0.0
    for rank, (p, i) in enumerate(valid):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def verdict(low: float, high: float, higher_is_better: bool, n: int) -> str:
    """"better" / "worse" only when the interval of (row - reference) excludes 0 over n >= MIN_SUBJECTS paired
    subjects, else "no difference at this n"."""
    if n >= MIN_SUBJECTS and (low > 0 or high < 0):
        return BETTER if (low > 0) == higher_is_better else WORSE
    return NO_DIFFERENCE


@dataclass(frozen=True)
class Comparison:
    """A row against a reference on one metric over the subjects both have."""

    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_wilcoxon: float | None


def compare(row: dict[str, float], reference: dict[str, float], resamples: int = RESAMPLES,
            seed: int = SEED) -> Comparison | None:
    """Paired differences row - reference over the subjects with finite values in both (ordered by subject id):
    their mean, bootstrap interval and Wilcoxon p; None when no subject is shared."""
    subjects = sorted(s for s in row.keys() & reference.keys()
                      if math.isfinite(row[s]) and math.isfinite(reference[s]))
    if not subjects:
        return None
    d = np.array([row[s] - reference[s] for s in subjects], dtype=np.float64)
    lo, hi = bootstrap_ci(d, resamples, seed)
    return Comparison(len(subjects), float(d.mean()), lo, hi, wilcoxon_p(d))
