"""Input QC of a T1: a phantom T1 passes; header failures need no registration; inverted, noise, skull-stripped,
cropped, PET and FLAIR inputs fail the check that names them; preprocessing rejects and records alike."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ganbert.ingest import adni, dicom, phantom
from ganbert.prep import brainmask, preprocess, qc
from ganbert.prep.registration import Registration
from ganbert.store import shards


@pytest.fixture(scope="module")
def t1(phantom_t1: dict[str, Path]) -> tuple[np.ndarray, np.ndarray, qc.Report]:
    """The phantom T1 (X, Y, Z), its affine and its QC report (registration made once, by the session fixture)."""
    vol = dicom.read_any(phantom_t1["t1"])
    return vol.data, vol.affine, qc.assess(vol.data, vol.affine)


def test_phantom_t1_passes_with_plausible_scores(t1: tuple[np.ndarray, np.ndarray, qc.Report]) -> None:
    _, _, report = t1
    assert report.passed, report.failures
    s = report.scores
    assert s["brain_coverage"] > 0.99 and s["similarity"] > 0.8
    assert 0.6 < s["gm_wm"] < 0.8 and 0.4 < s["csf_gm"] < 0.8 and s["scalp_wm"] > 0.45
    record = report.record()
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    assert record["passed"] and record["failed_checks"] == [] and len(record["template_registration"]
                                                                      ["fixed_to_moving"]) == 16


@pytest.mark.parametrize(("shape", "voxel", "check"), [
    ((48, 56, 5), 4.4, "field of view"),  # a 5-slice slab
    ((48, 56, 56), 40.0, "voxel size"),
    ((48, 56, 56), 0.01, "voxel size"),
    ((48, 56, 56, 3), 4.4, "dimensions"),
], ids=["slab", "huge-voxels", "tiny-voxels", "4d"])
def test_header_checks_fail_before_any_registration(shape: tuple[int, ...], voxel: float, check: str) -> None:
    data = np.random.default_rng(0).random(shape, dtype=np.float32)
    report = qc.assess(data, np.diag([voxel, voxel, voxel, 1.0]))
    assert not report.passed and report.failed_checks[0] == check and report.registration is None
    assert report.reason().startswith(f"T1 quality control failed: {check}: ")


def _variant(kind: str, data: np.ndarray, affine: np.ndarray, fit: Registration) -> np.ndarray:
    if kind == "inverted":
        return data.max() - data
    if kind == "noise":
        return np.random.default_rng(1).uniform(0, data.max(), data.shape).astype(np.float32)
    if kind == "skull-stripped":
        return data * brainmask.on_grid(fit.matrix, affine, data.shape)
    raise AssertionError(kind)


@pytest.mark.parametrize(("kind", "checks"), [
    ("inverted", {"similarity", "contrast"}),
    ("noise", {"similarity"}),
    ("skull-stripped", {"scalp"}),
], ids=["inverted", "noise", "skull-stripped"])
def test_non_t1_contrasts_fail_the_named_check(t1: tuple[np.ndarray, np.ndarray, qc.Report], kind: str,
                                               checks: set[str]) -> None:
    """Scored under the T1's own registration (the bench registers each input anew; these are the scoring rules)."""
    data, affine, report = t1
    assert report.registration is not None
    bad = qc.assess(_variant(kind, data, affine, report.registration), affine, fit=report.registration)
    assert checks <= set(bad.failed_checks), bad.failures


def test_half_the_head_cropped_away_fails_coverage(t1: tuple[np.ndarray, np.ndarray, qc.Report]) -> None:
    data, affine, report = t1
    half = data[:, :, data.shape[2] // 2:]  # the lower half of the voxels gone (array axis 2 runs inferior->superior)
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, data.shape[2] // 2]) + affine[:3, 3]
    bad = qc.assess(half, shifted, fit=report.registration)
    assert bad.failed_checks == ("brain coverage",) and bad.scores["brain_coverage"] < 0.7


def test_the_tiny_phantom_pet_fails_on_its_voxel_size_alone(phantom_t1: dict[str, Path]) -> None:
    vol = dicom.read_any(phantom_t1["pet"])
    report = qc.assess(vol.data.mean(axis=3), vol.affine)
    assert report.failed_checks == ("voxel size",) and report.registration is None


@pytest.mark.slow
def test_phantom_flair_and_a_static_pet_fail_after_their_own_registration(phantom_t1: dict[str, Path],
                                                                          static_pet: Path) -> None:
    for path, check in ((phantom_t1["flair"], "contrast"), (static_pet, "scalp")):
        vol = dicom.read_any(path)
        report = qc.assess(vol.data, vol.affine)
        assert report.registration is not None and check in report.failed_checks, (path, report.scores)


@pytest.mark.slow
def test_preprocess_rejects_a_failing_t1_with_the_check_and_records_scores(phantom_t1: dict[str, Path],
                                                                           tmp_path: Path, local_ray: None) -> None:
    raw = phantom.write_cohort(tmp_path / "raw", 1, ("AV45",), "tiny", 0)
    pair = adni.ingest(raw, 365).pairs[0]
    t1_path = raw / pair.mri.files[0]
    img = nib.load(str(t1_path))
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image((data.max() - data).astype(np.int16), img.affine, img.header), str(t1_path))  # inverted
    from ganbert import config

    summary = preprocess.run(raw, tmp_path / "strict", config.tiny(), registration="none")
    assert (summary["written"], summary["rejected"]) == (0, 1)
    rejected = adni.read_issues(tmp_path / "strict" / "rejected.csv")
    assert rejected[0].file == pair.mri.files[0] and "T1 quality control failed: similarity" in rejected[0].reason
    summary = preprocess.run(raw, tmp_path / "kept", config.tiny(), registration="none", t1_qc=False)
    assert (summary["written"], summary["rejected"]) == (1, 0)
    row = shards.read_manifest(tmp_path / "kept")["rows"][0]
    assert row["t1_qc"]["passed"] is False and row["t1_qc"]["enforced"] is False
    assert "similarity" in row["t1_qc"]["failed_checks"] and "template_registration" not in row["t1_qc"]

