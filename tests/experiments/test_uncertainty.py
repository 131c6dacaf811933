"""Fold-ensemble spread scores: calibrated members cover the truth about as a Gaussian does, and an SD that tracks
the error correlates with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ganbert.experiments.uncertainty import spread_scores


def test_a_calibrated_spread_covers_95_percent_and_tracks_the_error() -> None:
    g = torch.Generator().manual_seed(0)
    shape = (2, 6, 8, 8)
    truth_sd = torch.rand(shape, generator=g) * 4 + 0.5  # heteroscedastic: some voxels far less certain
    centre = torch.randn(shape, generator=g) * 10 + 100
    members = centre + truth_sd * torch.randn((400, *shape), generator=g)
    real = centre + truth_sd * torch.randn(shape, generator=g)
    mask = np.ones(shape[1:], dtype=bool)
    scores = spread_scores(real, members, mask)
    assert scores["coverage_2sd"] == pytest.approx(0.954, abs=0.03)
    assert scores["spearman_sd_abs_error"] > 0.3
    # an overconfident ensemble (spread shrunk 10x) covers far less
    tight = centre + 0.1 * (members - centre)
    assert spread_scores(real, tight, mask)["coverage_2sd"] < 0.3
    with pytest.raises(ValueError, match="outputs"):
        spread_scores(real, members[:1], mask)
