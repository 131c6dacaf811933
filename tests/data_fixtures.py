"""Data-stage fixtures (ingest, prep, store): one tiny phantom cohort per session, its shards, and bad inputs."""

from __future__ import annotations

import csv
import gzip
import io
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ganbert.config import TRACERS, Config, tiny
from ganbert.ingest import phantom
from ganbert.prep import preprocess

SHARD_MB = 0.12  # tiny rows are ~55 kB: 2 rows per shard, so groups span several shards


@pytest.fixture(scope="session")
def tiny_cfg() -> Config:
    return tiny()


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 subjects (2 CN, 2 MCI, 2 AD), AV45/AV1451/FDG, tiny raw sizes, seed 0: 18 pairs, one FLAIR, one follow-up
    T1."""
    return phantom.write_cohort(tmp_path_factory.mktemp("cohort") / "raw", 6, TRACERS, "tiny", 0)


@dataclass(frozen=True)
class Run:
    raw: Path
    out: Path
    summary: dict
    cfg: Config


@pytest.fixture(scope="session")
def tiny_run(tiny_cohort: Path, tiny_cfg: Config, tmp_path_factory: pytest.TempPathFactory, local_ray: None) -> Run:
    """The tiny cohort preprocessed on the local Ray into small shards."""
    out = tmp_path_factory.mktemp("shards") / "out"
    summary = preprocess.run(tiny_cohort, out, tiny_cfg, shard_mb=SHARD_MB)
    return Run(tiny_cohort, out, summary, tiny_cfg)


# --- the bad-input corpus ------------------------------------------------------------------------

BAD_CSV = "BAD_COLLECTION_1_15_2024.csv"


@dataclass(frozen=True)
class BadCorpus:
    raw: Path
    out: Path
    exit_code: int
    stdout: str
    cases: dict[str, str]  # case -> image id expected in rejected.csv
    good_pairs: int


def _good_files(raw: Path) -> tuple[Path, Path]:
    """A good T1 (.nii) and a good 4D PET (.nii.gz) of the first phantom subject."""
    t1 = sorted(raw.glob("ADNI/002_S_6000/MPRAGE/*/*/*.nii"))[0]
    pet = sorted(raw.glob("ADNI/002_S_6000/AV45_Co-registered_Dynamic/*/*/*.nii.gz"))[0]
    return t1, pet


def _set_header_field(path: Path, offset: int, fmt: str, value: float | int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))


class _Builder:
    """Writes extra subjects (each one T1 + one PET) into a copy of the good cohort and their CSV rows."""

    def __init__(self, raw: Path) -> None:
        self.raw = raw
        self.rows: list[dict[str, str]] = []
        self.good_t1, self.good_pet = _good_files(raw)
        self.n = 0

    def folder(self, subject: str, desc: str, image_id: str) -> Path:
        path = self.raw / "ADNI" / subject / desc.replace(" ", "_") / "2019-05-01_10_00_00.0" / image_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def row(self, image_id: str, subject: str, modality: str, desc: str, **extra: str) -> None:
        row = {"Image Data ID": image_id, "Subject": subject, "Group": "CN", "Sex": "F", "Age": "71", "Visit": "bl",
               "Modality": modality, "Description": desc, "Type": "Original", "Acq Date": "5/1/2019",
               "Format": "NiFTI", "Downloaded": "1/15/2024", "Path": ""}
        row.update(extra)
        self.rows.append(row)

    def subject(self) -> tuple[str, str, str]:
        """A fresh subject id and its T1 and PET image ids."""
        self.n += 1
        return f"9{self.n:02d}_S_9{self.n:03d}", f"I90{self.n:02d}00", f"I90{self.n:02d}10"

    def t1(self, subject: str, image_id: str, write: bool = True, **extra: str) -> Path:
        folder = self.folder(subject, "MPRAGE", image_id)
        path = folder / f"ADNI_{subject}_MR_MPRAGE_{image_id}.nii"
        if write:
            shutil.copy(self.good_t1, path)
        self.row(image_id, subject, "MRI", "MPRAGE", **extra)
        return path

    def pet(self, subject: str, image_id: str, write: bool = True, **extra: str) -> Path:
        folder = self.folder(subject, "AV45 Co-registered Dynamic", image_id)
        path = folder / f"ADNI_{subject}_PT_AV45_{image_id}.nii.gz"
        if write:
            shutil.copy(self.good_pet, path)
        self.row(image_id, subject, "PET", "AV45 Co-registered Dynamic", **extra)
        return path

    def write_csv(self) -> None:
        with (self.raw / BAD_CSV).open("w", newline="") as fobj:
            writer = csv.DictWriter(fobj, fieldnames=list(self.rows[0]), quoting=csv.QUOTE_ALL)
            writer.writeheader()
            writer.writerows(self.rows)


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(data, affine), str(path))


def build_bad_corpus(raw: Path, outside: Path) -> dict[str, str]:
    """Add one subject per bad case; return case -> the image id that must be rejected."""
    b = _Builder(raw)
    t1_img = nib.load(str(b.good_t1))
    t1_data = np.asarray(t1_img.dataobj).astype(np.float32)
    cases: dict[str, str] = {}

    def with_good_pet(case: str) -> tuple[str, str, str]:
        subject, t1_id, pet_id = b.subject()
        b.pet(subject, pet_id)
        cases[case] = t1_id
        return subject, t1_id, pet_id

    def with_good_t1(case: str) -> tuple[str, str, str]:
        subject, t1_id, pet_id = b.subject()
        b.t1(subject, t1_id)
        cases[case] = pet_id
        return subject, t1_id, pet_id

    s, t, _ = with_good_pet("t1_truncated_nii")
    path = b.t1(s, t)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    s, _, p = with_good_t1("pet_truncated_gz")
    path = b.pet(s, p)
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])

    s, t, _ = with_good_pet("t1_not_nifti")
    b.t1(s, t, write=False).write_text("this is a text file, not an image\n" * 20)

    s, _, p = with_good_t1("pet_dicom_only")
    folder = b.pet(s, p, write=False).parent
    (folder / "ADNI_PT_1.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)

    s, t, _ = with_good_pet("t1_2d_image")
    _save(t1_data[:, :, 20], t1_img.affine, b.t1(s, t, write=False))

    s, _, p = with_good_t1("pet_5d_image")
    _save(np.ones((8, 8, 8, 2, 3), np.float32), np.eye(4), b.pet(s, p, write=False))

    s, t, _ = with_good_pet("t1_nan_voxels")
    data = t1_data.copy()
    data[10:12, 10:12, 10:12] = np.nan
    _save(data, t1_img.affine, b.t1(s, t, write=False))

    s, _, p = with_good_t1("pet_inf_voxels")
    pet_img = nib.load(str(b.good_pet))
    pet_data = pet_img.get_fdata(dtype=np.float32)
    pet_data[5, 5, 5, 0] = np.inf
    _save(pet_data, pet_img.affine, b.pet(s, p, write=False))

    s, t, _ = with_good_pet("t1_constant")
    _save(np.full(t1_data.shape, 100.0, np.float32), t1_img.affine, b.t1(s, t, write=False))

    s, t, _ = with_good_pet("t1_zero_voxel_size")
    path = b.t1(s, t)
    _set_header_field(path, 80, "<f", 0.0)  # pixdim[1]

    s, _, p = with_good_t1("pet_negative_voxel_size")
    path = b.pet(s, p, write=False)
    uncompressed = path.with_name("plain.nii")
    _save(pet_data[..., :2].copy(), pet_img.affine, uncompressed)
    blob = bytearray(uncompressed.read_bytes())
    uncompressed.unlink()
    struct.pack_into("<f", blob, 84, -3.0)  # pixdim[2]; nibabel would "fix" it on save, so patch the bytes
    path.write_bytes(gzip.compress(bytes(blob), mtime=0))

    s, t, _ = with_good_pet("t1_enormous_dims")
    path = b.t1(s, t)
    _set_header_field(path, 42, "<h", 30000)  # dim[1]
    _set_header_field(path, 44, "<h", 30000)  # dim[2]

    s, t, _ = with_good_pet("t1_4d_several_frames")
    _save(np.stack([t1_data] * 3, axis=3), t1_img.affine, b.t1(s, t, write=False))

    s, _, p = with_good_t1("pet_single_frame")
    _save(pet_data[..., 0].copy(), pet_img.affine, b.pet(s, p, write=False))

    s, _, p = with_good_t1("pet_outside_t1_space")
    far = pet_img.affine.copy()
    far[:3, 3] += 2000.0
    _save(nib.load(str(b.good_pet)).get_fdata(dtype=np.float32), far, b.pet(s, p, write=False))

    s, t, p = b.subject()  # a CSV row whose image folder does not exist
    b.pet(s, p)
    b.row(t, s, "MRI", "MPRAGE")
    cases["csv_row_missing_file"] = t

    s, _, p = with_good_t1("symlink_outside_root")
    outside.mkdir(parents=True, exist_ok=True)
    target = outside / "elsewhere.nii.gz"
    shutil.copy(b.good_pet, target)
    link = b.pet(s, p, write=False)
    os.symlink(target, link)

    s, _, p = with_good_t1("path_column_outside_root")
    b.pet(s, p, write=False, Path="../outside/elsewhere.nii.gz")

    s, t, p = b.subject()  # one image id claimed by two different subjects
    b.t1(s, t)
    b.pet(s, p)
    s2, _, _ = b.subject()
    b.row(p, s2, "PET", "FDG Co-registered Dynamic")
    cases["duplicate_image_id"] = p

    s, t, _ = with_good_pet("implausible_age")
    b.t1(s, t, Age="250")

    s, t, _ = with_good_pet("malformed_acq_date")
    b.t1(s, t, **{"Acq Date": "13/45/2019"})

    s, t, _ = with_good_pet("implausible_acq_date")
    b.t1(s, t, **{"Acq Date": "1/1/1890"})

    b.write_csv()
    return cases


@pytest.fixture(scope="session")
def bad_corpus(tiny_cohort: Path, tiny_cfg: Config, tmp_path_factory: pytest.TempPathFactory,
               local_ray: None) -> BadCorpus:
    """The good tiny cohort plus one subject per bad case (second CSV), preprocessed through the CLI entry."""
    import argparse
    import contextlib

    base = tmp_path_factory.mktemp("bad")
    raw = base / "raw"
    shutil.copytree(tiny_cohort, raw, symlinks=True)
    cases = build_bad_corpus(raw, base / "outside")
    out = base / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = preprocess.main(argparse.Namespace(raw=str(raw), out=str(out), window_days=365), tiny_cfg)
    return BadCorpus(raw=raw, out=out, exit_code=code, stdout=buf.getvalue(), cases=cases, good_pairs=18)
