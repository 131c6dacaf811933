"""Preprocessing: conform T1, resample PET to the run geometry, split by subject, write Parquet shards on Ray Data.

Geometry (what training, evaluation and synthesis all see):
- MRI: a cube of `geometry.mri_size` voxels of `geometry.mri_voxel_mm` mm, RAS axes (array axis 0 runs
  left->right, 1 posterior->anterior, 2 inferior->superior), centred on the centre of the input's field of view.
  Linear interpolation (Gaussian anti-aliasing first when the output voxel is coarser than the input's).
  Intensities: the input's 0.1th and 99.9th percentiles map to 0 and 255 (values beyond are clipped), uint8.
- PET: `geometry.pet_frames` frames of `geometry.pet_size` voxels of `geometry.pet_voxel_mm`, RAS, centred on
  the same world point as the conformed MRI. The F input frames are split into T contiguous groups
  (numpy.array_split order) and each group is averaged; values stay in the scanner's units (float32).
- Registration (`registration="rigid"`, the default): the PET (its frames averaged) is registered to its raw T1
  (rigid, 6 dof, Mattes mutual information, three resolutions, SimpleITK; data.registration) before it is
  resampled, since ADNI's "Co-registered" and standard-grid PET are not in the T1's space. The transform and its
  quality figures go into the manifest row; a pair failing the quality check is rejected with the reason.
  `registration="none"` trusts the headers (PET and T1 share world coordinates).
- Brain mask: the nilearn MNI152 template is registered (affine) to the T1 and its brain mask resampled onto
  the PET grid (column `brain_mask`, uint8). Region labels (column `labels`, uint8, nearest neighbour) come from
  `<raw>/truth/<subject>_regions.nii.gz` when the cohort carries ground truth (the phantom), else zeros;
  column `has_labels` and the manifest row's `labels` say which.

Output (see data.shards): `<split>-<tracer>-<nnnnn>.parquet` (zstd, at most `shard_mb` of tensors each; rows of a
(split, tracer) ordered by a hash of the subject id), `manifest.json`, `pairs.csv`, `unpaired.csv`, `rejected.csv`.
Splits are by subject (about 80/10/10, at least one subject each from three subjects on) and never change
for a subject once recorded in the manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from nibabel.spatialimages import SpatialImage
from scipy import ndimage

from ganbert.atomic import write_text
from ganbert.config import TRACERS, Config, GeometryConfig
from ganbert.progress import Progress
from ganbert.raysession import ensure_ray
from ganbert.data import adni, brainmask, dicom, registration, shards, stats
from ganbert.data.datacontext import quiet_data_context
from ganbert.data.nifti import Volume, VolumeError, check_values, image_data, read_volume, stack_frames

LOW_PERCENTILE, HIGH_PERCENTILE = 0.1, 99.9
SPLIT_ORDER = {name: i for i, name in enumerate(shards.SPLITS)}
PHANTOM_VERSION = 2
SETTINGS = {"mri_rescale": f"input percentiles {LOW_PERCENTILE}..{HIGH_PERCENTILE} -> 0..255, clipped, uint8",
            "interpolation": "linear (scipy.ndimage.affine_transform order 1), Gaussian anti-aliasing when coarser",
            "pet_frames": "contiguous groups (numpy.array_split) averaged", "orientation": "RAS",
            "centre": "centre of the T1 field of view", "pet_units": "scanner units of the input PET, float32"}


# --- geometry (pure numpy; synthesis uses the same functions) ---------------------------------------

def _centred_affine(centre: np.ndarray, voxel: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """RAS affine with voxel sizes `voxel` whose grid centre ((shape - 1) / 2) lies at world `centre`."""
    aff = np.eye(4)
    aff[:3, :3] = np.diag(np.asarray(voxel, dtype=np.float64))
    aff[:3, 3] = np.asarray(centre, dtype=np.float64) - aff[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1) / 2)
    return aff


def fov_centre(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """World mm (3,) of the centre of a grid's field of view."""
    mid = (np.asarray(shape[:3], dtype=np.float64) - 1) / 2
    return np.asarray(affine, dtype=np.float64)[:3, :3] @ mid + np.asarray(affine, dtype=np.float64)[:3, 3]


def mri_affine_for(affine: np.ndarray, shape: Sequence[int], geometry: GeometryConfig) -> np.ndarray:
    """Conformed MRI affine (4, 4): RAS, isotropic geometry.mri_voxel_mm, centred on the input FOV centre."""
    return _centred_affine(fov_centre(affine, shape), [geometry.mri_voxel_mm] * 3, geometry.mri_size)


def pet_affine(mri_affine: np.ndarray, geometry: GeometryConfig) -> np.ndarray:
    """PET grid affine (4, 4): RAS, geometry.pet_voxel_mm, centred on the conformed MRI's centre."""
    mri_affine = np.asarray(mri_affine, dtype=np.float64)
    if mri_affine.shape != (4, 4) or not np.all(np.isfinite(mri_affine)):
        raise ValueError(f"mri_affine must be a finite 4x4 matrix, got shape {mri_affine.shape}")
    return _centred_affine(fov_centre(mri_affine, geometry.mri_size), geometry.pet_voxel_mm, geometry.pet_size)


def resample(volume: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, shape: Sequence[int],
             cval: float = 0.0) -> np.ndarray:
    """Linear resampling of a 3D volume (X, Y, Z) onto the grid (shape, dst_affine) -> float32 `shape`.

    When an output voxel spans more than one input voxel along an input axis, the input is first
    smoothed with a Gaussian (sigma = (ratio - 1) / 2 input voxels) against aliasing.
    """
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D (X, Y, Z), got shape {volume.shape}")
    mapping = np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(dst_affine, dtype=np.float64)
    ratio = np.abs(mapping[:3, :3]).max(axis=1)
    sigma = np.maximum(0.0, (ratio - 1.0) / 2.0)
    data = np.asarray(volume, dtype=np.float32)
    if np.any(sigma > 0.25):
        data = ndimage.gaussian_filter(data, sigma, mode="nearest")
    return ndimage.affine_transform(data, mapping[:3, :3], offset=mapping[:3, 3], output_shape=tuple(shape),
                                    output=np.float32, order=1, mode="constant", cval=cval, prefilter=False)


def conform_array(data: np.ndarray, affine: np.ndarray, geometry: GeometryConfig,
                  name: str = "mri") -> tuple[np.ndarray, np.ndarray, float, float]:
    """(X, Y, Z) float T1 -> (uint8 (D, H, W), affine (4, 4), lo, hi): the input values mapped to 0 and 255."""
    if data.ndim != 3:
        raise VolumeError(name, f"T1 must be one 3D volume, got shape {data.shape}")
    check_values(data, name)
    lo, hi = (float(v) for v in np.percentile(data, [LOW_PERCENTILE, HIGH_PERCENTILE]))
    if hi <= lo:
        lo, hi = float(data.min()), float(data.max())
    out_affine = mri_affine_for(affine, data.shape, geometry)
    res = resample(data, affine, out_affine, geometry.mri_size, cval=lo)
    scaled = np.clip(np.rint((res - lo) * np.float32(255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    if not scaled.any():
        raise VolumeError(name, "empty after conforming (no signal inside the conformed field of view)")
    return scaled, out_affine, lo, hi


def conform_mri(img: SpatialImage, geometry: GeometryConfig) -> tuple[np.ndarray, np.ndarray]:
    """Conform a T1 image: uint8 array (D, H, W) = geometry.mri_size and its RAS affine (4, 4).

    Raises ValueError (VolumeError) naming the reason for a bad volume: wrong dimensionality, absurd
    header, NaN/Inf or constant voxels, no signal in the field of view.
    """
    data, affine = image_data(img, "img")
    if data.ndim == 4:
        raise VolumeError(img.get_filename() or "img", f"T1 is 4D with {data.shape[3]} frames (expected one 3D volume)")
    out, out_affine, _, _ = conform_array(data, affine, geometry, img.get_filename() or "img")
    return out, out_affine


def group_frames(data: np.ndarray, frames: int) -> np.ndarray:
    """(X, Y, Z, F) or (X, Y, Z) -> (X, Y, Z, T): F frames in T contiguous groups (array_split), each averaged."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if data.ndim == 3:
        data = data[..., None]
    have = data.shape[3]
    if have < frames:
        raise ValueError(f"PET has {have} frame(s); geometry.pet_frames needs at least {frames}")
    groups = np.array_split(np.arange(have), frames)
    return np.stack([data[..., g].mean(axis=3, dtype=np.float64).astype(np.float32) for g in groups], axis=3)


def resample_pet(data: np.ndarray, affine: np.ndarray, mri_affine: np.ndarray,
                 geometry: GeometryConfig) -> np.ndarray:
    """PET (X, Y, Z[, F]) in scanner units -> float32 (T, d, h, w) on the PET grid of a conformed MRI."""
    grouped = group_frames(data, geometry.pet_frames)
    dst = pet_affine(mri_affine, geometry)
    return np.stack([resample(grouped[..., t], affine, dst, geometry.pet_size, cval=0.0)
                     for t in range(grouped.shape[3])])


def mri_stats(mri_uint8: np.ndarray) -> tuple[float, float]:
    """Mean and population std (float64) over all voxels of a stored uint8 MRI (any shape)."""
    arr = np.asarray(mri_uint8)
    if arr.dtype != np.uint8:
        raise ValueError(f"mri_uint8 must be uint8, got {arr.dtype}")
    if arr.size == 0:
        raise ValueError("mri_uint8 must not be empty")
    return float(arr.mean(dtype=np.float64)), float(arr.std(dtype=np.float64))


# --- one pair (runs in Ray Data tasks) ------------------------------------------------------------

def _read_pet(paths: Sequence[Path]) -> Volume:
    return stack_frames([dicom.read_any(p) for p in paths])


REGISTRATIONS = ("rigid", "none")


def region_labels(root: Path, subject: str, grid_affine: np.ndarray, shape: Sequence[int]) -> np.ndarray | None:
    """Ground-truth region labels of a subject (root/truth/<subject>_regions.nii.gz) on a grid, nearest; None if absent."""
    path = Path(root) / "truth" / f"{subject}_regions.nii.gz"
    if not path.is_file():
        return None
    vol = read_volume(path)
    mapping = np.linalg.inv(vol.affine) @ np.asarray(grid_affine, dtype=np.float64)
    return ndimage.affine_transform(np.rint(vol.data).astype(np.uint8), mapping[:3, :3], offset=mapping[:3, 3],
                                    output_shape=tuple(shape), order=0, mode="constant", cval=0)


def registered_pet_affine(t1: np.ndarray, t1_affine: np.ndarray, pet: np.ndarray,
                          pet_affine_in: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Rigid PET-to-T1 registration: (the PET's affine into the T1's world, the manifest record); raises on failure."""
    average = pet.mean(axis=3) if pet.ndim == 4 else pet
    reg = registration.rigid(t1, t1_affine, average, pet_affine_in)
    return np.linalg.inv(reg.matrix) @ np.asarray(pet_affine_in, dtype=np.float64), reg.record()


def process_pair(job: dict[str, Any], root: Path, geometry: GeometryConfig) -> dict[str, Any]:
    """Read, validate, conform, register and resample one pair -> arrays and stats, or {"error", "file", "which"}."""
    mri_rel, pet_rels = job["mri_file"], list(job["pet_files"])
    mode = job.get("registration", "rigid")
    if mode not in REGISTRATIONS:
        raise ValueError(f"registration must be one of {REGISTRATIONS}, got {mode!r}")
    try:
        vol = dicom.read_any(root / mri_rel)
        if vol.data.ndim == 4:
            raise VolumeError(vol.path, f"T1 is 4D with {vol.frames} frames (expected one 3D volume)")
        mri, affine, lo, hi = conform_array(vol.data, vol.affine, geometry, mri_rel)
        grid = pet_affine(affine, geometry)
        stat = (root / mri_rel).stat()
        template_reg = brainmask.fit(vol.data, vol.affine, key=f"{root / mri_rel}:{stat.st_size}:{stat.st_mtime_ns}")
        brain = brainmask.on_grid(template_reg.matrix, grid, geometry.pet_size)
    except VolumeError as err:
        return {"error": err.reason, "file": mri_rel, "which": "mri"}
    except (ValueError, MemoryError, OSError) as err:
        return {"error": _message(err, root), "file": mri_rel, "which": "mri"}
    try:
        pet_vol = _read_pet([root / p for p in pet_rels])
        pet_aff, reg_record = pet_vol.affine, None
        if mode == "rigid":
            pet_aff, reg_record = registered_pet_affine(vol.data, vol.affine, pet_vol.data, pet_vol.affine)
        pet = resample_pet(pet_vol.data, pet_aff, affine, geometry)
        del pet_vol, vol
    except VolumeError as err:
        return {"error": err.reason, "file": _rel_to(root, err.path, pet_rels[0]), "which": "pet"}
    except registration.RegistrationError as err:
        return {"error": str(err), "file": pet_rels[0], "which": "pet"}
    except (ValueError, MemoryError, OSError) as err:
        return {"error": _message(err, root), "file": pet_rels[0], "which": "pet"}
    if not np.any(pet):
        return {"error": "PET does not overlap the PET grid around the T1's centre (not in the T1's space?)",
                "file": pet_rels[0], "which": "pet"}
    try:
        labels = region_labels(root, job["subject"], grid, geometry.pet_size)
    except (VolumeError, ValueError, OSError) as err:
        return {"error": f"ground-truth labels: {_message(err, root)}", "file": f"truth/{job['subject']}_regions.nii.gz",
                "which": "pair"}
    mean, std = mri_stats(mri)
    sources = {"mri": [_source(root, mri_rel)], "pet": [_source(root, p) for p in pet_rels]}
    stats = {"mri_mean": mean, "mri_std": std, "mri_input_p0.1": lo, "mri_input_p99.9": hi,
             "pet_min": float(pet.min()), "pet_max": float(pet.max()), "pet_mean": float(pet.mean(dtype=np.float64))}
    return {"mri": mri[None], "pet": pet, "mri_affine": affine, "mri_mean": mean, "mri_std": std,
            "stats": stats, "sources": sources, "brain_mask": brain, "has_labels": labels is not None,
            "labels": np.zeros(geometry.pet_size, np.uint8) if labels is None else labels,
            "registration": reg_record, "template_registration": template_reg.record()}


def _message(err: BaseException, root: Path) -> str:
    """`Type: message` on one line, paths under the download root shown relative to it."""
    text = " ".join(str(err).replace(f"{root}/", "").split())
    return f"{type(err).__name__}: {text[:300]}"


def _rel_to(root: Path, path: str, default: str) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return default


def _source(root: Path, rel: str) -> dict[str, Any]:
    path = root / rel
    if path.is_dir():  # a DICOM series: sha256 over its files' names and hashes, in name order
        files = dicom.dicom_files(path)
        digest = hashlib.sha256("".join(f"{f.name}:{shards.sha256_file(f)}\n" for f in files).encode()).hexdigest()
        return {"path": rel, "sha256": digest, "bytes": sum(f.stat().st_size for f in files), "files": len(files)}
    return {"path": rel, "sha256": shards.sha256_file(path), "bytes": path.stat().st_size}


def _ray_process(item: dict[str, Any], root: str, geometry: dict[str, Any]) -> dict[str, Any]:
    """Ray Data map function: one job (JSON) -> row with the result as bytes + JSON (a schema every row shares)."""
    job = json.loads(item["job"])
    try:
        result = process_pair(job, Path(root), _geometry(geometry))
    except Exception as err:  # noqa: BLE001 - a corrupt item is reported and skipped, never kills the run
        result = {"error": _message(err, Path(root)), "file": job["pet_files"][0], "which": "pair"}
    if "error" in result:
        return {"key": item["key"], "meta": json.dumps(result), "mri": b"", "pet": b"", "brain_mask": b"",
                "labels": b""}
    meta = {k: result[k] for k in ("mri_mean", "mri_std", "stats", "sources", "has_labels", "registration",
                                   "template_registration")}
    meta["mri_affine"] = np.asarray(result["mri_affine"], dtype=np.float64).reshape(-1).tolist()
    return {"key": item["key"], "meta": json.dumps(meta), "mri": result["mri"].tobytes(),
            "pet": np.ascontiguousarray(result["pet"], dtype=np.float32).tobytes(),
            "brain_mask": np.ascontiguousarray(result["brain_mask"], dtype=np.uint8).tobytes(),
            "labels": np.ascontiguousarray(result["labels"], dtype=np.uint8).tobytes()}


def _geometry(record: dict[str, Any]) -> GeometryConfig:
    return GeometryConfig(mri_size=tuple(record["mri_size"]), pet_frames=int(record["pet_frames"]),
                          pet_size=tuple(record["pet_size"]), mri_fov_mm=float(record["mri_fov_mm"]),
                          pet_fov_mm=tuple(record["pet_fov_mm"]))


# --- splits ---------------------------------------------------------------------------------------

def _subject_hash(subject: str) -> str:
    return hashlib.sha256(f"ganbert-split:{subject}".encode()).hexdigest()


def assign_splits(subjects: Sequence[str], existing: dict[str, str] | None = None, val_fraction: float = 0.1,
                  test_fraction: float = 0.1) -> dict[str, str]:
    """Subject -> train/val/test, deterministic; subjects in `existing` keep their split (no leakage on reruns).

    A fresh cohort is ranked by a hash of the subject id: the first round(test_fraction * n) go to test,
    the next round(val_fraction * n) to val (at least one each when n >= 3), the rest to train. Subjects
    added later are placed by the same hash against the fractions.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1), sum < 1")
    existing = dict(existing or {})
    bad = {s: v for s, v in existing.items() if v not in shards.SPLITS}
    if bad:
        raise ValueError(f"existing splits must be one of {shards.SPLITS}, got {bad}")
    out = dict(existing)
    new = sorted(set(subjects) - set(existing), key=_subject_hash)
    if not existing:
        n = len(new)
        n_test = round(test_fraction * n)
        n_val = round(val_fraction * n)
        if n >= 3:
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
            n_val = max(n_val, 1 if val_fraction > 0 else 0)
        for i, subject in enumerate(new):
            out[subject] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    else:
        for subject in new:
            u = int(_subject_hash(subject)[:12], 16) / float(16**12)
            out[subject] = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
    return {s: out[s] for s in sorted(out)}


# --- the pipeline ---------------------------------------------------------------------------------

def _natural(text: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _run_jobs(jobs: list[dict[str, Any]], root: Path, geometry: GeometryConfig,
              num_cpus: int | None) -> Iterator[dict[str, Any]]:
    """Process jobs on Ray Data (one task per pair, at most one per CPU) and yield results in job order."""
    import ray

    ensure_ray(num_cpus)
    quiet_data_context()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    concurrency = max(1, min(cpus if num_cpus is None else num_cpus, len(jobs)))
    items = [{"key": i, "job": json.dumps(job)} for i, job in enumerate(jobs)]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map(
        _ray_process, fn_kwargs={"root": str(root), "geometry": shards.geometry_record(geometry)},
        num_cpus=1, compute=ray.data.TaskPoolStrategy(size=concurrency))
    pending: dict[int, dict[str, Any]] = {}
    expect = 0
    for row in ds.iter_rows():
        pending[int(row["key"])] = row
        while expect in pending:
            yield pending.pop(expect)
            expect += 1
    if pending or expect != len(jobs):
        raise RuntimeError(f"Ray Data returned {expect} of {len(jobs)} results")


def _job(pair: adni.Pair, split: str) -> dict[str, Any]:
    return {"subject": pair.subject, "tracer": pair.tracer, "split": split, "group": pair.group,
            "mri_image_id": pair.mri.image_id, "pet_image_id": pair.pet.image_id, "days_apart": pair.days_apart,
            "mri_file": pair.mri.files[0], "pet_files": list(pair.pet.files)}


def _clean_tmp(out: Path) -> None:
    for path in out.glob(".tmp-*"):
        if path.is_file():
            path.unlink()


LOCK_FILE = ".preprocess.lock"


@contextlib.contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` for one preprocess run; ValueError at once if another run holds it."""
    with (out / LOCK_FILE).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"out {out}: another `ganbert preprocess` is writing there (lock {out / LOCK_FILE}); "
                             "wait for it to finish or choose another folder") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fallback_t1(pet: adni.Scan, scans: list[adni.Scan], window_days: int, refused: set[str]) -> adni.Scan | None:
    """The subject's next-nearest T1 within the window for `pet`, skipping T1 image ids in `refused`."""
    options = sorted((m for m in scans if m.kind == "T1" and m.subject == pet.subject and m.image_id not in refused
                      and abs((pet.acq_date - m.acq_date).days) <= window_days),
                     key=lambda m: (abs((pet.acq_date - m.acq_date).days), m.acq_date, _natural(m.image_id)))
    return options[0] if options else None


def _fallback_job(job: dict[str, Any], mri: adni.Scan, pet: adni.Scan) -> dict[str, Any]:
    """The job of `job`'s PET paired with another T1 (its nearest one was rejected)."""
    return job | {"mri_image_id": mri.image_id, "mri_file": mri.files[0], "group": pet.group or mri.group,
                  "days_apart": (pet.acq_date - mri.acq_date).days}


def pairs_in_shards(manifest: dict[str, Any], scans: list[adni.Scan]) -> list[adni.Pair]:
    """The pairs the shards hold (manifest rows), so pairs.csv always agrees with them after any rerun."""
    by_id = {s.image_id: s for s in scans}
    pairs = []
    for row in manifest["rows"]:
        pet, mri = by_id.get(row["pet_image_id"]), by_id.get(row["mri_image_id"])
        if pet is not None and mri is not None:
            pairs.append(adni.Pair(pet=pet, mri=mri, days_apart=int(row["days_apart"])))
    return sorted(pairs, key=lambda p: (p.subject, p.tracer, _natural(p.pet.image_id)))


def run(raw: Path, out: Path, cfg: Config, window_days: int = 365, *, shard_mb: float = shards.DEFAULT_SHARD_MB,
        val_fraction: float = 0.1, test_fraction: float = 0.1, num_cpus: int | None = None,
        registration: str = "rigid") -> dict[str, Any]:
    """`_run` holding the output folder's lock (two runs into one folder would delete each other's files)."""
    if registration not in REGISTRATIONS:
        raise ValueError(f"registration must be one of {REGISTRATIONS}, got {registration!r}")
    raw, out = Path(raw).resolve(), Path(out).resolve()
    if raw == out:
        raise ValueError(f"out must differ from raw ({raw}): outputs would be read back as inputs")
    out.mkdir(parents=True, exist_ok=True)
    with out_lock(out):
        return _run(raw, out, cfg, window_days, shard_mb=shard_mb, val_fraction=val_fraction,
                    test_fraction=test_fraction, num_cpus=num_cpus, registration=registration)


def _run(raw: Path, out: Path, cfg: Config, window_days: int = 365, *, shard_mb: float = shards.DEFAULT_SHARD_MB,
         val_fraction: float = 0.1, test_fraction: float = 0.1, num_cpus: int | None = None,
         registration: str = "rigid") -> dict[str, Any]:
    """Ingest an ADNI-layout download, preprocess every new pair on Ray Data and append Parquet shards.

    Writes out/{manifest.json, <split>-<tracer>-<n>.parquet, pairs.csv, unpaired.csv, rejected.csv}.
    Pairs already in the manifest are skipped, so a rerun writes nothing new and leaves every file as it was.
    A PET whose nearest T1 is rejected falls back to the next-nearest T1 in the window. pairs.csv lists
    exactly the pairs in the shards.
    Returns a summary: pairs, written, skipped_existing, rejected, unpaired, shards, rows.
    """
    geometry = cfg.geometry
    ingest = adni.ingest(raw, window_days, min_frames=geometry.pet_frames)
    out.mkdir(parents=True, exist_ok=True)
    _clean_tmp(out)
    if (out / shards.MANIFEST).exists():
        manifest = shards.read_manifest(out)
        shards.check_geometry(manifest, geometry, out)
    else:
        manifest = shards.new_manifest(geometry, SETTINGS | {"window_days": window_days, "registration": registration})
    had = manifest["preprocess"].get("registration", "none")
    if had != registration:
        raise ValueError(f"registration: the shards in {out} were made with registration {had!r}, not "
                         f"{registration!r}; use the same setting or another --out")
    splits = assign_splits(sorted({p.subject for p in ingest.pairs}), manifest["splits"], val_fraction, test_fraction)
    manifest["splits"] = splits
    shards.save_manifest(out, manifest)
    done = {row["pet_image_id"] for row in manifest["rows"]}
    jobs = sorted((_job(p, splits[p.subject]) | {"registration": registration}
                   for p in ingest.pairs if p.pet.image_id not in done),
                  # within a (split, tracer) group, rows follow a hash of the subject id: sites and groups are mixed
                  key=lambda j: (SPLIT_ORDER[j["split"]], j["tracer"], _subject_hash(j["subject"]),
                                 _natural(j["pet_image_id"])))
    rejected, unpaired = list(ingest.rejected), list(ingest.unpaired)
    writer = shards.ShardWriter(out, geometry, manifest, shard_mb)
    mri_shape, pet_shape = shards.mri_shape(geometry), shards.pet_shape(geometry)
    scans = {s.image_id: s for s in ingest.scans}
    refused: set[str] = set()
    progress, n_jobs = Progress("preprocess", len(jobs)), len(jobs)
    try:
        while jobs:
            retry: list[dict[str, Any]] = []
            for job, result in zip(jobs, _run_jobs(jobs, raw, geometry, num_cpus)):
                progress.step()
                meta = json.loads(result["meta"])
                if "error" in meta:
                    bad_id = job["mri_image_id"] if meta["which"] == "mri" else job["pet_image_id"]
                    rejected.append(adni.Issue(meta["file"], bad_id, job["subject"], "data", meta["error"]))
                    if meta["which"] == "mri":
                        refused.add(bad_id)
                        pet = scans[job["pet_image_id"]]
                        other = fallback_t1(pet, ingest.scans, window_days, refused)
                        if other is not None:
                            retry.append(_fallback_job(job, other, pet))
                            progress.total += 1
                            continue
                        unpaired.append(adni.Issue(job["pet_files"][0], job["pet_image_id"], job["subject"], "pair",
                                                   f"its T1 {job['mri_image_id']} was rejected (see rejected.csv)"))
                    continue
                row = {k: job[k] for k in shards.STRING_COLUMNS} | {
                    "days_apart": job["days_apart"], "mri_mean": meta["mri_mean"], "mri_std": meta["mri_std"],
                    "mri": np.frombuffer(result["mri"], dtype=np.uint8).reshape(mri_shape),
                    "pet": np.frombuffer(result["pet"], dtype=np.float32).reshape(pet_shape),
                    "mri_affine": np.asarray(meta["mri_affine"], dtype=np.float64).reshape(4, 4),
                    "brain_mask": np.frombuffer(result["brain_mask"], dtype=np.uint8).reshape(geometry.pet_size),
                    "labels": np.frombuffer(result["labels"], dtype=np.uint8).reshape(geometry.pet_size),
                    "has_labels": bool(meta["has_labels"])}
                record = {k: job[k] for k in (*shards.STRING_COLUMNS, "days_apart")} | {
                    "sources": meta["sources"], "stats": meta["stats"], "labels": bool(meta["has_labels"]),
                    "registration": meta["registration"], "template_registration": meta["template_registration"],
                    "shapes": {"mri": list(mri_shape), "pet": list(pet_shape)}}
                writer.add(row, record)
            jobs = retry
        writer.close()
    except BaseException:
        writer.abort()
        raise
    if writer.written or stats.KEY not in manifest:
        stats.record(out, manifest, cfg.sequence.length)  # token calibration and PET level, once, here
    adni.write_pairs(out / "pairs.csv", pairs_in_shards(manifest, ingest.scans))
    adni.write_issues(out / "unpaired.csv", unpaired)
    adni.write_issues(out / "rejected.csv", rejected)
    n_rejected = len({(i.file, i.image_id, i.reason) for i in rejected})
    return {"pairs": len(ingest.pairs), "written": writer.written, "skipped_existing": len(ingest.pairs) - n_jobs,
            "rejected": n_rejected, "unpaired": len({(i.file, i.image_id) for i in unpaired}),
            "shards": len(manifest["shards"]), "rows": len(manifest["rows"]),
            "splits": {s: sum(1 for v in splits.values() if v == s) for s in shards.SPLITS}, "out": str(out)}


def main(args: argparse.Namespace, cfg: Config) -> int:
    """CLI `ganbert preprocess --raw DIR --out DIR`: exit 1 when any input was rejected, else 0."""
    summary = run(Path(args.raw), Path(args.out), cfg, int(getattr(args, "window_days", 365)),
                  registration=str(getattr(args, "registration", "rigid")))
    print(f"preprocess: {summary['pairs']} pairs, {summary['written']} written, "
          f"{summary['skipped_existing']} already done, {summary['rejected']} rejected "
          f"(see {Path(summary['out']) / 'rejected.csv'}), {summary['unpaired']} unpaired, "
          f"{summary['shards']} shards / {summary['rows']} rows in {summary['out']}")
    print("subjects per split: " + ", ".join(f"{k} {v}" for k, v in summary["splits"].items()))
    return 1 if summary["rejected"] else 0


# --- cached phantom data for training without --data --------------------------------------------

def phantom_size(geometry: GeometryConfig) -> str:
    """The phantom raw size suited to a geometry: tiny (<= 32^3 MRI), demo (<= 96^3), else paper."""
    side = geometry.mri_size[0]
    return "tiny" if side <= 32 else "demo" if side <= 96 else "paper"


def ensure_phantom(cfg: Config, cache_root: Path, subjects: int = 12, seed: int = 0) -> Path:
    """Shards of a phantom cohort (all tracers) for cfg.geometry, built once and cached; returns the shards dir.

    The cache key is the geometry, phantom size, subject count and seed; concurrent callers wait on a lock.
    """
    from ganbert.data import phantom

    if subjects < 3:
        raise ValueError(f"subjects must be >= 3 (one per split), got {subjects}")
    size = phantom_size(cfg.geometry)
    key_src = json.dumps({"geometry": shards.geometry_record(cfg.geometry), "size": size, "subjects": subjects,
                          "seed": seed, "version": PHANTOM_VERSION}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    base = Path(cache_root) / f"phantom-{size}-{subjects}s-seed{seed}-{key}"
    out, done = base / "shards", base / "DONE"
    if done.exists():
        return out
    base.mkdir(parents=True, exist_ok=True)
    with (base / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return out
        raw = base / "raw"
        if not (raw / ".complete").exists():
            phantom.write_cohort(raw, subjects, TRACERS, size, seed)
            (raw / ".complete").write_text(key_src + "\n")
        summary = run(raw, out, cfg)
        if summary["rejected"]:
            raise ValueError(f"phantom cohort {raw}: {summary['rejected']} inputs rejected (see {out / 'rejected.csv'})")
        write_text(done, json.dumps(summary, sort_keys=True) + "\n")
    return out


# --- benchmark ------------------------------------------------------------------------------------

def _timed_rows(batches: Iterator[Any]) -> tuple[int, float, float]:
    """Consume an iterator of batches/rows: (rows, seconds to the first item, seconds in all)."""
    t0 = time.perf_counter()
    first, rows = 0.0, 0
    for item in batches:
        if not rows:
            first = time.perf_counter() - t0
        rows += len(item["subject"]) if isinstance(item["subject"], list) else 1
    return rows, first, time.perf_counter() - t0


def bench_preprocess(cfg: Config, subjects: int = 4, batch_size: int = 2) -> dict[str, float]:
    """Preprocess a fresh phantom cohort at cfg's geometry; compare the loader with a plain pyarrow read.

    Figures: pairs_per_s (Ray already started: ingest, Ray Data workers, shard writing, checksums),
    single_pair_s (one pair in this process, warm files: the per-core cost), phantom_s (raw cohort
    generation, not counted). Reading the train split once: loader_MBps (read_split + torch_batches) and
    pyarrow_MBps (read_rows) in uncompressed tensor MB per second, their ratio, the loader's start-up
    (seconds to its first batch: Ray Data plans and launches the read) and its MB/s after the first batch;
    compression = tensor bytes / bytes on disk.
    """
    from ganbert.data import loader, phantom

    size = phantom_size(cfg.geometry)
    work = Path(tempfile.mkdtemp(prefix="ganbert-bench-"))
    try:
        ensure_ray()
        t0 = time.perf_counter()
        phantom.write_cohort(work / "raw", subjects, TRACERS, size, seed=0)
        t1 = time.perf_counter()
        summary = run(work / "raw", work / "shards", cfg)
        t2 = time.perf_counter()
        data = work / "shards"
        pairs = adni.ingest(work / "raw", 365, min_frames=cfg.geometry.pet_frames).pairs
        t3 = time.perf_counter()
        process_pair(_job(pairs[0], "train"), work / "raw", cfg.geometry)
        single = time.perf_counter() - t3
        per_row = shards.row_bytes(cfg.geometry) / 1e6
        ds = loader.read_split(data, "train", geometry=cfg.geometry)
        n_loader, first, t_loader = _timed_rows(loader.torch_batches(ds, batch_size))
        n_plain, _, t_plain = _timed_rows(loader.read_rows(data, "train"))
        loader_mbps, plain_mbps = n_loader * per_row / t_loader, n_plain * per_row / t_plain
        after_first = (n_loader - min(batch_size, n_loader)) * per_row / max(t_loader - first, 1e-9)
        return {"pairs": float(summary["written"]), "pairs_per_s": summary["written"] / (t2 - t1),
                "single_pair_s": single, "phantom_s": t1 - t0, "row_MB": per_row, "train_rows": float(n_loader),
                "loader_MBps": loader_mbps, "pyarrow_MBps": plain_mbps, "loader_vs_pyarrow": loader_mbps / plain_mbps,
                "loader_first_batch_s": first, "loader_after_first_MBps": after_first,
                "compression": shards.compressed_ratio(data)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
