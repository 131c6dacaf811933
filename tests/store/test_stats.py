"""Training-split statistics recorded once at preprocessing: summary quantiles and the PET level."""

from __future__ import annotations

import numpy as np
import pytest

from ganbert import config
from ganbert.store import loader, shards, stats


def test_preprocess_records_train_stats_per_tracer(tiny_run) -> None:
    manifest = shards.read_manifest(tiny_run.out)
    recorded = manifest[stats.KEY]
    assert set(recorded) == set(config.TRACERS)
    for tracer, found in recorded.items():
        assert found["length"] == config.tiny().sequence.length
        assert found["rows"] == loader.count_rows(tiny_run.out, "train", tracer)
        for seg in ("mri", "pet"):
            values = [found[seg][f"q{q:g}"] for q in stats.QUANTILES]
            assert values == sorted(values)
    # the PET level over every training voxel, as the generator init uses it
    found = recorded["AV45"]
    voxels = np.concatenate([stats.row_summaries(r, 64)[2] for r in loader.read_rows(tiny_run.out, "train", "AV45")])
    assert found["pet_mean"] == pytest.approx(voxels.mean(), rel=1e-9)
    assert found["pet_std"] == pytest.approx(voxels.std(), rel=1e-6)


def test_for_run_reads_the_manifest_or_computes_another_length(tiny_run) -> None:
    recorded = shards.read_manifest(tiny_run.out)[stats.KEY]["FDG"]
    found = stats.for_run(tiny_run.out, "FDG", 64)
    volume = found.pop("pet_mean_volume")
    assert found == recorded
    pets = [stats.row_summaries(r, 64)[2] for r in loader.read_rows(tiny_run.out, "train", "FDG")]
    assert volume.shape == (2, 14, 12, 12)
    assert np.allclose(volume.ravel(), np.mean(pets, axis=0), rtol=1e-5, atol=1e-4)
    other = stats.for_run(tiny_run.out, "FDG", 8)
    assert other["length"] == 8 and other["pet"]["q1"] <= recorded["pet"]["q1"]  # max over bigger blocks
