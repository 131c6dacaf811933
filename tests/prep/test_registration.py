"""PET-to-T1 registration and the template brain mask on a phantom whose PET lies on ADNI's standard grid, moved."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ganbert.common import cache as cache_mod
from ganbert.ingest import phantom
from ganbert.prep import preprocess, registration
from ganbert.store import loader


@pytest.fixture(scope="module")
def standard_run(tmp_path_factory: pytest.TempPathFactory, tiny_cfg, local_ray: None) -> tuple[Path, Path]:
    """2 subjects x (AV45, FDG) written on the standard grid under random rigid motions, then preprocessed (rigid)."""
    raw = phantom.write_cohort(tmp_path_factory.mktemp("std") / "raw", 2, ("AV45", "FDG"), "tiny", 3,
                               pet_space="adni-standard")
    out = raw.parent / "out"
    summary = preprocess.run(raw, out, tiny_cfg)
    assert summary["rejected"] == 0, (out / "rejected.csv").read_text()
    return raw, out


def _brain_points(raw: Path, subject: str) -> np.ndarray:
    lab = nib.load(str(raw / "truth" / f"{subject}_regions.nii.gz"))
    idx = np.argwhere(np.asarray(lab.dataobj) > 0).T
    return lab.affine[:3, :3] @ idx + lab.affine[:3, 3:4]


@pytest.mark.slow
def test_registered_pet_within_2mm_of_truth(standard_run) -> None:
    raw, out = standard_run
    truth = json.loads((raw / "ground_truth.json").read_text())["subjects_truth"]
    rows = json.loads((out / "manifest.json").read_text())["rows"]
    assert len(rows) == 4
    for row in rows:
        true = np.asarray(truth[row["subject"]]["tracers"][row["tracer"]]["t1_to_pet_header"]).reshape(4, 4)
        est = np.asarray(row["registration"]["fixed_to_moving"]).reshape(4, 4)
        pts = _brain_points(raw, row["subject"])
        before = registration.mean_displacement(np.eye(4), true, pts)
        after = registration.mean_displacement(est, true, pts)
        assert before > 5.0  # the phantom really moved the PET
        assert after < 2.0, (row["subject"], row["tracer"], after)
        assert row["registration"]["mutual_information"] >= registration.MIN_MI


@pytest.mark.slow
def test_brain_mask_and_labels_columns(standard_run) -> None:
    _, out = standard_run
    rows = [row for split in ("train", "test", "val") for row in loader.read_rows(out, split)]
    assert rows
    for row in rows:
        mask, labels = np.asarray(row["brain_mask"]), np.asarray(row["labels"])
        assert mask.dtype == np.uint8 and labels.dtype == np.uint8 and mask.shape == labels.shape
        assert row["has_labels"] is True
        assert set(np.unique(labels)) >= {phantom.LABEL["cerebellum_gm"], phantom.LABEL["neocortex"]}
        brain = labels > 0
        dice = 2 * np.sum(brain & (mask > 0)) / (brain.sum() + mask.sum())
        assert dice > 0.85, dice
        # PET uptake sits inside the brain mask: the registered PET lines up with the T1's anatomy
        pet = np.asarray(row["pet"]).mean(axis=0)
        assert pet[mask > 0].mean() > 2 * pet[mask == 0].mean()


@pytest.mark.slow
def test_without_registration_the_standard_pet_is_misplaced(standard_run, tiny_cfg) -> None:
    """--registration none trusts the headers: the same cohort's PET then misses the brain mask (what ADNI would do)."""
    raw, out = standard_run
    other = out.parent / "none"
    preprocess.run(raw, other, tiny_cfg, registration="none")
    with pytest.raises(ValueError, match="registration"):
        preprocess.run(raw, other, tiny_cfg, registration="rigid")

    def match(data: Path) -> list[float]:  # correlation of the PET with the true brain, per pair
        rows = [r for s in ("train", "val", "test") for r in loader.read_rows(data, s)]
        return [float(np.corrcoef(np.asarray(r["pet"]).mean(0).ravel(), (np.asarray(r["labels"]) > 0).ravel())[0, 1])
                for r in rows]
    registered, trusted = match(out), match(other)
    assert min(registered) > 0.85 and min(registered) > max(trusted) - 0.1
    assert np.mean(registered) > np.mean(trusted) + 0.1


def test_registration_of_unrelated_images_fails_quality_check() -> None:
    rng = np.random.default_rng(0)
    t1 = np.zeros((40, 40, 40), np.float32)
    t1[8:32, 8:32, 8:32] = 100.0
    t1 += rng.normal(0, 1, t1.shape).astype(np.float32)
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    far = aff.copy()
    far[:3, 3] = 400.0  # a PET nowhere near the head
    with pytest.raises(registration.RegistrationError, match="quality check failed"):
        registration.rigid(t1, aff, rng.normal(0, 1, (20, 20, 20)).astype(np.float32), far)


def test_registration_arguments_checked() -> None:
    with pytest.raises(ValueError, match="data"):
        registration.prepared(np.zeros((4, 4)), np.eye(4))
    with pytest.raises(ValueError, match="threads"):
        registration.rigid(np.ones((4, 4, 4)), np.eye(4), np.ones((4, 4, 4)), np.eye(4), threads=0)
    with pytest.raises(ValueError, match="registration"):
        preprocess.run(Path("."), Path("x"), None, registration="affine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pet_space"):
        phantom.write_cohort(Path("unused"), 1, ("AV45",), "tiny", 0, pet_space="mni")


# --- made once, kept by content -------------------------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache folder and an empty in-process cache: every registration starts from nothing."""
    monkeypatch.setenv(cache_mod.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(registration, "_IN_MEMORY", {})
    return tmp_path / "cache" / "registration"


def _head() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noisy block 'head' (X, Y, Z), its affine, and the same image's affine moved by a few mm."""
    t1 = np.zeros((40, 40, 40), np.float32)
    t1[10:30, 8:32, 12:28] = 100.0
    t1 += np.random.default_rng(0).normal(0, 2, t1.shape).astype(np.float32)
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    moved = aff.copy()
    moved[:3, 3] = [3.0, -2.0, 1.0]
    return t1, aff, moved


def _figures(reg: registration.Registration) -> dict[str, object]:
    return {k: v for k, v in vars(reg).items() if k not in ("matrix", "seconds")}


def test_a_registration_is_made_once_and_read_back_from_its_file(cache: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    t1, aff, moved = _head()
    made = registration.rigid(t1, aff, t1, moved, check=False)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].name == registration.digest(
        "rigid", [(t1, aff), (t1, moved)], threads=1, seed=0, iterations=200, samples=100_000) + ".json"
    kept = files[0].read_text()
    files[0].unlink()  # this process: from memory, the file is not read (nor written again)
    assert _figures(registration.rigid(t1, aff, t1, moved, check=False)) == _figures(made) and not files[0].exists()
    files[0].write_text(kept)
    monkeypatch.setattr(registration, "_IN_MEMORY", {})  # another process: from the file, exactly
    again = registration.rigid(t1, aff, t1, moved, check=False)
    assert np.array_equal(again.matrix, made.matrix) and vars(again) | {"matrix": 0} == vars(made) | {"matrix": 0}
    record = json.loads(files[0].read_text())
    record["mutual_information"] = 9.0  # the file is what is read: nothing is made again
    files[0].write_text(json.dumps(record))
    monkeypatch.setattr(registration, "_IN_MEMORY", {})
    assert registration.rigid(t1, aff, t1, moved, check=False).mutual_information == 9.0


def test_the_key_follows_voxels_affines_settings_and_kind() -> None:
    t1, aff, moved = _head()
    key = registration.digest("rigid", [(t1, aff), (t1, moved)], threads=1)
    changed = t1.copy()
    changed[0, 0, 0] += 1
    nudged = moved.copy()
    nudged[0, 3] += 1e-5  # 10 micrometres: above the 1e-6 mm the optimiser's images are rounded to
    assert len({key, registration.digest("rigid", [(changed, aff), (t1, moved)], threads=1),
                registration.digest("rigid", [(t1, aff), (t1, nudged)], threads=1),
                registration.digest("rigid", [(t1, aff), (t1, moved)], threads=2),
                registration.digest("affine", [(t1, aff), (t1, moved)], threads=1)}) == 5


def test_two_reads_of_one_scan_share_one_registration(cache: Path) -> None:
    """A DICOM and a NIfTI read of one scan differ below what the optimiser sees (`registration.prepared`: here the
    dtype and a nanometre of position; the phantom's reads: tests/ingest/test_dicom.py), so it runs once."""
    t1, aff, moved = _head()
    other_read = t1.astype(np.float64), moved + 1e-9
    made = registration.rigid(t1, aff, t1, moved, check=False)
    again = registration.rigid(other_read[0], aff, other_read[0], other_read[1], check=False)
    assert len(list(cache.iterdir())) == 1
    assert np.array_equal(again.matrix, made.matrix) and _figures(again) == _figures(made)
    cut = t1[:, :, :30]  # a different moving image: its own optimisation
    registration.rigid(t1, aff, cut, moved, check=False)
    assert len(list(cache.iterdir())) == 2


def test_an_unreadable_cache_file_is_made_again(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t1, aff, moved = _head()
    made = registration.rigid(t1, aff, t1, moved, check=False)
    (path,) = cache.iterdir()
    for broken in ("not json", json.dumps({"matrix": [[float("nan")] * 4] * 4}), '{"matrix": [[1, 0]]}'):
        path.write_text(broken)
        monkeypatch.setattr(registration, "_IN_MEMORY", {})
        again = registration.rigid(t1, aff, t1, moved, check=False)
        assert np.array_equal(again.matrix, made.matrix) and _figures(again) == _figures(made)
        assert json.loads(path.read_text())["matrix"] == made.matrix.tolist()  # written again, whole


def test_cache_off_keeps_no_file(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache_mod.CACHE_ENV, "off")
    t1, aff, moved = _head()
    registration.rigid(t1, aff, t1, moved, check=False)
    assert cache_mod.folder("registration") is None and not cache.exists()
