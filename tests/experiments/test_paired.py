"""Paired statistics: the bootstrap interval as documented, Wilcoxon as scipy, Holm by hand, the verdict rules."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ganbert.experiments import paired


def test_bootstrap_interval_is_the_documented_percentile_recipe() -> None:
    x = np.array([0.5, -0.2, 1.3, 0.9, 0.1, 0.7, 1.1])
    rng = np.random.default_rng(7)
    means = x[rng.integers(0, x.size, size=(2000, x.size))].mean(axis=1)
    assert paired.bootstrap_ci(x, 2000, 7) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])), abs=0)
    assert paired.bootstrap_ci(x, 2000, 7) != paired.bootstrap_ci(x, 2000, 8)  # the seed matters
    lo, hi = paired.bootstrap_ci(x)
    assert lo < x.mean() < hi


@pytest.mark.parametrize("bad, match", [([], "values"), ([1.0, float("nan")], "values")])
def test_bootstrap_refuses_empty_or_non_finite_values(bad: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        paired.bootstrap_ci(bad)


def test_wilcoxon_is_scipys_default_and_undefined_without_a_difference() -> None:
    d = [0.3, -0.1, 0.8, 0.5, 0.2, 0.4]
    assert paired.wilcoxon_p(d) == stats.wilcoxon(d).pvalue
    assert paired.wilcoxon_p([0.0, 0.0, 0.0]) is None


def test_holm_by_hand() -> None:
    # sorted 0.01, 0.02, 0.04 over m = 3: 0.03, max(0.03, 0.04) = 0.04, max(0.04, 0.04) = 0.04
    assert paired.holm([0.04, 0.01, None, 0.02]) == pytest.approx([0.04, 0.03, None, 0.04])
    assert paired.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_verdict_needs_an_interval_off_zero_and_enough_subjects() -> None:
    n = paired.MIN_SUBJECTS
    assert paired.verdict(0.1, 0.5, True, n) == paired.BETTER
    assert paired.verdict(0.1, 0.5, False, n) == paired.WORSE  # e.g. RMSE went up
    assert paired.verdict(-0.5, -0.1, False, n) == paired.BETTER
    assert paired.verdict(-0.1, 0.5, True, n) == paired.NO_DIFFERENCE
    assert paired.verdict(0.1, 0.5, True, n - 1) == paired.NO_DIFFERENCE
    # the threshold is where an exact two-sided Wilcoxon test first can reach p < 0.05
    assert stats.wilcoxon(np.arange(1.0, n)).pvalue > 0.05 > stats.wilcoxon(np.arange(1.0, n + 1)).pvalue


def test_compare_pairs_only_the_shared_finite_subjects_in_id_order() -> None:
    row = {"b": 2.0, "a": 1.0, "c": 5.0, "d": float("nan")}
    ref = {"a": 0.5, "b": 1.0, "d": 1.0, "e": 3.0}
    c = paired.compare(row, ref, resamples=100, seed=1)
    assert c is not None and c.n == 2 and c.mean_diff == pytest.approx(0.75)
    assert (c.ci_low, c.ci_high) == paired.bootstrap_ci([0.5, 1.0], 100, 1)
    assert paired.compare({"x": 1.0}, {"y": 1.0}) is None
