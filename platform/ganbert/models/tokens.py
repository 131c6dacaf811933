"""The token space fitted to the data: summary ranges from the training quantiles, and the health of real tokens."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ganbert.config import Config, apply
from ganbert.models.sequence import Vocabulary


def summary_range(quantiles: dict[str, float], margin: float = 0.1) -> tuple[float, float]:
    """Summary-value range mapped onto the ids: the 0.1..99.9 % quantiles widened by `margin` of their span.

    `quantiles` has keys "q0.001" and "q0.999" (as `store/stats.py` records them in the manifest).
    """
    lo, hi = float(quantiles["q0.001"]), float(quantiles["q0.999"])
    if not hi > lo:
        hi = lo + 1.0
    pad = margin * (hi - lo)
    return lo - pad, hi + pad


def calibrate_token_space(cfg: Config, tracer_stats_: dict[str, Any]) -> Config:
    """Fill `sequence.mri_range` / `pet_range` left at (0, 0) from the statistics (user-set ranges are kept)."""
    s, updates = cfg.sequence, {}
    for seg in ("mri", "pet"):
        if tuple(getattr(s, f"{seg}_range")) == (0.0, 0.0):
            updates[f"sequence.{seg}_range"] = summary_range(tracer_stats_[seg])
    return apply(cfg, updates) if updates else cfg


def token_health(cfg: Config, summaries: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """Token health of real summaries (`store.stats.split_summaries`) under the run's token space, as MLflow metrics.

    `token_{mri,pet}_collide_or_clip`: share of summary values whose ids collide (paper scheme) or clip
    (monotonic); `token_{mri,pet}_distinct`: distinct value ids used.
    """
    vocab = Vocabulary(cfg.sequence)
    out = {}
    for seg, values in summaries.items():
        for key, value in vocab.health(torch.from_numpy(np.concatenate(values)), seg).items():
            out[f"token_{seg}_{key}"] = value
    return out
