"""The token space fitted to the data: summary ranges from quantiles, calibration on real shards, token health."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ganbert import config
from ganbert.models import tokens
from ganbert.models.sequence import Vocabulary
from ganbert.models.tokens import summary_range
from ganbert.store import loader, stats


def test_summary_range_widens_the_quantiles() -> None:
    assert summary_range({"q0.001": -1.0, "q0.999": 9.0}) == pytest.approx((-2.0, 10.0))
    assert summary_range({"q0.001": 4.0, "q0.999": 4.0}, margin=0.0) == (4.0, 5.0)


def test_token_health_names_each_segment_over_all_its_summaries() -> None:
    cfg = config.apply(config.tiny(), {"sequence.mri_range": (0.0, 1.0), "sequence.pet_range": (0.0, 1.0)})
    summaries = {"mri": [np.array([-0.1, 0.0]), np.array([0.5, 1.0, 1.2])], "pet": [np.array([0.5])]}
    health = tokens.token_health(cfg, summaries)
    assert list(health) == ["token_mri_collide_or_clip", "token_mri_distinct", "token_pet_collide_or_clip",
                            "token_pet_distinct"]
    mri = Vocabulary(cfg.sequence).health(torch.tensor([-0.1, 0.0, 0.5, 1.0, 1.2], dtype=torch.float64), "mri")
    assert (health["token_mri_collide_or_clip"], health["token_mri_distinct"]) == (mri["collide_or_clip"],
                                                                                    mri["distinct"])
    assert health["token_pet_collide_or_clip"] == 0.0 and health["token_pet_distinct"] == 1.0


def test_calibrated_token_space_keeps_real_summaries_healthy(tiny_run) -> None:
    """At the defaults, under 5% of real MRI and PET summary values clip; the paper's s=1000 wraps most PET."""
    base = config.tiny()
    cfg = tokens.calibrate_token_space(base, stats.for_run(tiny_run.out, "AV45", 64))
    assert cfg.token_space_fixed and not base.token_space_fixed
    vocab, paper = Vocabulary(cfg.sequence), Vocabulary(config.apply(base, {"sequence.scheme": "paper"}).sequence)
    rows = list(loader.read_rows(tiny_run.out, "val", "AV45")) + list(loader.read_rows(tiny_run.out, "test", "AV45"))
    for seg, index in (("mri", 0), ("pet", 1)):
        values = torch.from_numpy(np.concatenate([stats.row_summaries(r, 64)[index] for r in rows]))
        assert vocab.health(values, seg)["collide_or_clip"] < 0.05
        assert vocab.health(values, seg)["distinct"] > 0.9 * values.unique().numel()
    pet = torch.from_numpy(np.concatenate([stats.row_summaries(r, 64)[1] for r in rows]))
    assert paper.health(pet, "pet")["collide_or_clip"] > 0.5


def test_calibrate_keeps_ranges_the_user_set(tiny_run) -> None:
    found = stats.for_run(tiny_run.out, "AV45", 64)
    cfg = tokens.calibrate_token_space(config.apply(config.tiny(), {"sequence.pet_range": (0.0, 500.0)}), found)
    assert cfg.sequence.pet_range == (0.0, 500.0) and cfg.sequence.mri_range != (0.0, 0.0)
