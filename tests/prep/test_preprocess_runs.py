"""Preprocessing runs: one writer per output folder, T1 fallback, and pairs.csv that always matches the shards."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ganbert import config
from ganbert.config import TRACERS
from ganbert.ingest import adni, phantom
from ganbert.prep import preprocess
from ganbert.store import shards

FOLLOW_UP_SUBJECT = "011_S_6003"  # phantom subject 3: a baseline T1 and a follow-up T1 a year later


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    phantom.write_cohort(raw, 4, TRACERS, "tiny", 0)
    return raw


def _pairs(out: Path) -> list[dict[str, str]]:
    with (out / "pairs.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_holds_it(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    out.mkdir()
    (out / ".tmp-999-train-AV45-00000.parquet").write_bytes(b"the other run's shard in progress")
    with preprocess.out_lock(out):
        with pytest.raises(ValueError, match=r"another `ganbert preprocess` is writing there"):
            preprocess.run(cohort, out, config.tiny())
    assert (out / ".tmp-999-train-AV45-00000.parquet").exists()  # nothing of the other run was deleted


@pytest.mark.slow
def test_rejected_t1_falls_back_to_the_next_nearest_and_pairs_match_shards(
        cohort: Path, tmp_path: Path, local_ray: None, capsys: pytest.CaptureFixture[str]) -> None:
    scans = adni.ingest(cohort).scans
    t1s = sorted((s for s in scans if s.subject == FOLLOW_UP_SUBJECT and s.kind == "T1"), key=lambda s: s.acq_date)
    baseline, follow_up = t1s
    path = cohort / follow_up.files[0]
    img = nib.load(str(path))
    bad = nib.Nifti1Image(np.full(img.shape, 7, dtype=np.int16), img.affine, img.header)
    nib.save(bad, str(path))  # headers fine, voxels constant: rejected when processed
    out = tmp_path / "shards"
    summary = preprocess.run(cohort, out, config.tiny())
    assert summary["rejected"] == 1
    done = summary["written"] + 1  # the rejected job is one more step of the progress count
    printed = capsys.readouterr().out
    assert re.search(rf"^\[preprocess\] {done}/{done} done, [0-9.]+/s, ETA 0 s$", printed, re.MULTILINE), printed
    manifest = shards.read_manifest(out)
    pairs = _pairs(out)
    # pairs.csv is exactly what the shards hold
    assert sorted((p["pet_image_id"], p["mri_image_id"]) for p in pairs) == \
        sorted((r["pet_image_id"], r["mri_image_id"]) for r in manifest["rows"])
    # the PET nearest the rejected follow-up T1 was paired with the baseline T1 instead of being dropped
    pets = [s for s in scans if s.subject == FOLLOW_UP_SUBJECT and s.kind == "PET"]
    assert len([r for r in manifest["rows"] if r["subject"] == FOLLOW_UP_SUBJECT]) == len(pets)
    used = {p["mri_image_id"] for p in pairs if p["subject"] == FOLLOW_UP_SUBJECT}
    assert used == {baseline.image_id}
    assert follow_up.image_id not in {r["mri_image_id"] for r in manifest["rows"]}
