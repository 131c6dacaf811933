"""DICOM ingest: classic and enhanced series round trip, malformed series rejected with reasons, no identifier leaks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ganbert.ingest import adni, dicom, phantom
from ganbert.ingest.nifti import VolumeError
from ganbert.prep import preprocess, registration
from ganbert.store import loader

AFFINE = np.array([[-2.0, 0, 0, 50], [0, 1.5, 0, -60], [0, 0, 3, -40], [0, 0, 0, 1]])


def _stored(frames: int = 1) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(-100, 3000, (10, 12, 8, frames)).astype(np.int16)


def _world(vol) -> np.ndarray:  # noqa: ANN001 - values at the world points of AFFINE's grid
    from ganbert.prep.registration import canonical
    return canonical(vol.data, vol.affine)


def test_classic_pet_series_round_trip(tmp_path: Path) -> None:
    st = _stored(3)
    files = dicom.write_series(tmp_path / "s", "pet", st, AFFINE, "PT", slope=[0.5, 0.25, 2.0], intercept=1.5,
                               frame_ms=[0, 300000, 600000])
    vol = dicom.read_series(files)
    ref_data, ref_aff = _world(type(vol)(data=(st * np.array([0.5, 0.25, 2.0]) + 1.5).astype(np.float32),
                                         affine=AFFINE, path=files[0]))
    got_data, got_aff = _world(vol)
    np.testing.assert_allclose(got_aff, ref_aff, atol=1e-9)
    np.testing.assert_allclose(got_data, ref_data, rtol=1e-6)
    assert dicom.series_frames(files) == (10, 12, 8, 3)


def test_enhanced_multiframe_round_trip(tmp_path: Path) -> None:
    st = _stored(1)[..., 0]
    (path,) = dicom.write_series(tmp_path / "e", "mr", st, AFFINE, "MR", slope=2.0, enhanced=True)
    vol = dicom.read_any(path)
    got, aff = _world(vol)
    ref, ref_aff = _world(type(vol)(data=st.astype(np.float32) * 2, affine=AFFINE, path=path))
    np.testing.assert_allclose(aff, ref_aff, atol=1e-9)
    np.testing.assert_array_equal(got, ref)


def _series(tmp_path: Path, name: str) -> list[Path]:
    return dicom.write_series(tmp_path / name, name, _stored(2), AFFINE, "PT", frame_ms=[0, 300000])


def _break(case: str, files: list[Path], tmp_path: Path) -> None:
    """Damage a written series the way a bad download would."""
    if case == "missing slice":
        for f in files:  # the same slice of every frame, so the frames still agree
            if f.stem.endswith("_0004"):
                f.unlink()
    elif case == "mixed series":
        other = dicom.write_series(tmp_path / "other", "other", _stored(2), AFFINE, "PT", frame_ms=[0, 300000])
        shutil.copy(other[0], files[0].parent / "zz_other.dcm")
    elif case == "uneven spacing":
        for f in files:
            ds = pydicom.dcmread(f)
            k = int(f.stem.split("_")[-1]) - 1
            ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                                       float(ds.ImagePositionPatient[2]) + (0.4 if k >= 4 else 0.0)]
            ds.save_as(f)
    elif case == "missing pixel data":
        ds = pydicom.dcmread(files[5])
        del ds.PixelData
        ds.save_as(files[5])
    elif case == "unsupported transfer syntax":
        from pydicom.encaps import encapsulate
        ds = pydicom.dcmread(files[2])
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"  # JPEG 2000 (the bytes are not even JPEG)
        ds.PixelData = encapsulate([ds.PixelData])
        ds["PixelData"].is_undefined_length = True
        ds.save_as(files[2])
    elif case == "frame-count mismatch":
        for f in files:
            ds = pydicom.dcmread(f)
            ds.NumberOfTimeSlices = int(ds.NumberOfTimeSlices) + 1
            ds.save_as(f)


CASES = {"missing slice": "missing slice", "mixed series": "mixed series", "uneven spacing": "uneven slice spacing",
         "missing pixel data": "missing pixel data", "unsupported transfer syntax": "unsupported transfer syntax",
         "frame-count mismatch": "frame-count mismatch"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_series_rejected_with_reason(case: str, tmp_path: Path) -> None:
    files = _series(tmp_path, "bad")
    _break(case, files, tmp_path)
    with pytest.raises(VolumeError, match=CASES[case]):
        dicom.read_any(files[0].parent)


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory: pytest.TempPathFactory, tiny_cfg,
              local_ray: None) -> tuple[Path, Path, Path, Path, set[str]]:
    """The same 3-subject cohort written as NIfTI and as DICOM, then six DICOM scans broken; all three preprocessed:
    (out_nii, out_dcm, out_bad, dcm, nii). Seed 0: the tiny cohort's first 3 subjects, file for file, so the session
    cache's registrations serve both (whichever preprocesses first makes them)."""
    base = tmp_path_factory.mktemp("dicom")
    nii = phantom.write_cohort(base / "nii", 3, ("AV45", "FDG"), "tiny", 0)
    dcm = phantom.write_cohort(base / "dcm", 3, ("AV45", "FDG"), "tiny", 0, fmt="dicom")
    bad = base / "bad"
    shutil.copytree(dcm, bad)
    ing = adni.ingest(bad, 365)
    pets = sorted(p.pet.files[0] for p in ing.pairs)
    assert len(pets) == 6
    for case, rel in zip(sorted(CASES), pets):
        _break(case, dicom.dicom_files(bad / rel), bad / ".scratch" / case)
    shutil.rmtree(bad / ".scratch", ignore_errors=True)
    out_nii, out_dcm, out_bad = base / "out_nii", base / "out_dcm", base / "out_bad"
    preprocess.run(nii, out_nii, tiny_cfg)
    preprocess.run(dcm, out_dcm, tiny_cfg)
    preprocess.run(bad, out_bad, tiny_cfg)
    return out_nii, out_dcm, out_bad, dcm, nii


def _rows(out: Path) -> list[dict]:
    return [r for s in ("train", "val", "test") for r in loader.read_rows(out, s)]


@pytest.mark.slow
def test_dicom_cohort_gives_the_nifti_shards(dicom_run) -> None:
    """The same shards, and no registration made again: the DICOM read of every T1 and PET is its NIfTI read as the
    optimiser sees it (`registration.prepared`: voxels and affine), so the registrations of the DICOM run (T1 to
    template, PET to T1) have the NIfTI run's keys and are read back from the cache."""
    out_nii, out_dcm, _, dcm, nii = dicom_run
    scans = {root: {s.image_id: s for s in adni.ingest(root, 365).scans} for root in (nii, dcm)}
    assert scans[nii].keys() == scans[dcm].keys() and len(scans[nii]) == 9
    for image_id, scan in scans[nii].items():
        a, b = (dicom.read_any(root / scans[root][image_id].files[0]) for root in (nii, dcm))
        seen = [registration.prepared(v.data.mean(axis=3) if v.data.ndim == 4 else v.data, v.affine) for v in (a, b)]
        assert np.array_equal(seen[0][0], seen[1][0]) and np.array_equal(seen[0][1], seen[1][1]), (image_id, scan.kind)
    a, b = _rows(out_nii), _rows(out_dcm)
    assert [(r["split"], r["pet_image_id"], r["mri_image_id"]) for r in a] == \
        [(r["split"], r["pet_image_id"], r["mri_image_id"]) for r in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x["mri"]), np.asarray(y["mri"]))
        np.testing.assert_allclose(np.asarray(y["pet"]), np.asarray(x["pet"]), rtol=0,
                                   atol=1e-3 * float(np.abs(np.asarray(x["pet"])).max()))
        np.testing.assert_array_equal(np.asarray(x["brain_mask"]), np.asarray(y["brain_mask"]))
        np.testing.assert_array_equal(np.asarray(x["labels"]), np.asarray(y["labels"]))


@pytest.mark.slow
def test_malformed_dicom_rejected_rest_written(dicom_run) -> None:
    _, out_dcm, out_bad, _, _ = dicom_run
    issues = adni.read_issues(out_bad / "rejected.csv")
    for reason in CASES.values():
        assert any(reason in i.reason for i in issues), (reason, [i.reason for i in issues])
    good = {r["pet_image_id"] for r in _rows(out_dcm)}
    written = {r["pet_image_id"] for r in _rows(out_bad)}
    assert written == good - {i.image_id for i in issues}
    assert len(written) >= len(good) - 6


@pytest.mark.slow
def test_no_dicom_identifier_in_outputs(dicom_run) -> None:
    _, out_dcm, out_bad, raw, _ = dicom_run
    planted = [v.encode() for v in phantom.DICOM_IDENTITY.values()] + [b"Planted^Secret", b"Secret"]
    assert any(planted[0] in f.read_bytes() for f in raw.rglob("*.dcm"))  # they are there to be leaked
    for out in (out_dcm, out_bad):
        for f in out.rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                assert not any(p in data for p in planted), f


def test_synthesize_reads_a_dicom_series(tmp_path: Path) -> None:
    """`ganbert synthesize --mri <DICOM series folder>` gives the PET that the same T1 as NIfTI gives."""
    import nibabel as nib
    import torch
    from scipy import ndimage

    from ganbert import cli, config
    from ganbert.models import build_generator
    from ganbert.models.saved import save_model_dir

    torch.manual_seed(0)
    cfg = config.tiny()
    model_dir = save_model_dir(tmp_path / "model", cfg, build_generator(cfg))
    rng = np.random.default_rng(0)
    stored = (ndimage.gaussian_filter(rng.random((40, 44, 36)), 2.5) * 3000).astype(np.int16)
    affine = np.array([[-4.5, 0, 0, 90], [0, -4.5, 0, 100], [0, 0, 4.5, -70], [0, 0, 0, 1]])
    nifti = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(stored.astype(np.float32), affine), str(nifti))
    series = tmp_path / "t1_dicom"
    dicom.write_series(series, "t1", stored, affine, "MR", identity=phantom.DICOM_IDENTITY)
    outs = []
    for src, name in ((nifti, "a.nii.gz"), (series, "b.nii.gz")):
        assert cli.main(["synthesize", "--model", str(model_dir), "--mri", str(src), "--out", str(tmp_path / name),
                         "--skip-qc"]) == 0  # a random volume, not a head T1
        outs.append(nib.load(str(tmp_path / name)))
    np.testing.assert_allclose(outs[1].affine, outs[0].affine, atol=1e-6)
    np.testing.assert_allclose(outs[1].get_fdata(), outs[0].get_fdata(), rtol=1e-4, atol=1e-3)
    assert b"Planted" not in (tmp_path / "b.nii.gz").read_bytes()
