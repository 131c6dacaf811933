"""One T1/PET pair: read, validate, conform, register and resample it onto the run geometry, with its statistics.

- Registration (`registration="rigid"`, the default): the PET (its frames averaged) is registered to its raw T1
  (rigid, 6 dof, Mattes mutual information, three resolutions, SimpleITK; data.registration) before it is
  resampled, since ADNI's "Co-registered" and standard-grid PET are not in the T1's space. The transform and its
  quality figures go into the manifest row; a pair failing the quality check is rejected with the reason.
  `registration="none"` trusts the headers (PET and T1 share world coordinates).
- Brain mask and T1 QC: the nilearn MNI152 template is registered (affine) to the T1, the T1 is scored by input
  QC (`ganbert.prep.qc`, the checks synthesis runs; a failing T1 is rejected with the reason unless the job says
  `t1_qc: false`; scores in the manifest row's `t1_qc`) and the template's brain mask resampled onto the PET grid
  (column `brain_mask`, uint8). Region labels (column `labels`, uint8, nearest neighbour) come from
  `<raw>/truth/<subject>_regions.nii.gz` when the cohort carries ground truth (the phantom), else zeros;
  column `has_labels` and the manifest row's `labels` say which.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ganbert.config import GeometryConfig
from ganbert.ingest import adni, dicom
from ganbert.ingest.nifti import Volume, VolumeError, read_volume, stack_frames
from ganbert.models.intensity import uint8_mri_stats
from ganbert.prep import brainmask, qc, registration
from ganbert.prep.grid import conform_array, pet_affine, resample_pet
from ganbert.store import shards


def _read_pet(paths: Sequence[Path]) -> Volume:
    return stack_frames([dicom.read_any(p) for p in paths])


REGISTRATIONS = ("rigid", "none")


def region_labels(root: Path, subject: str, grid_affine: np.ndarray, shape: Sequence[int]) -> np.ndarray | None:
    """Ground-truth region labels of a subject (root/truth/<subject>_regions.nii.gz) on a grid, nearest; None if
    absent."""
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
        template_reg = brainmask.fit(vol.data, vol.affine)
        t1_qc = qc.assess(vol.data, vol.affine, fit=template_reg)
        if not t1_qc.passed and job.get("t1_qc", True):
            return {"error": t1_qc.reason() + " (--skip-qc keeps it)", "file": mri_rel, "which": "mri"}
        brain = brainmask.on_grid(template_reg.matrix, grid, geometry.pet_size)
    except VolumeError as err:
        return {"error": err.reason, "file": mri_rel, "which": "mri"}
    except (ValueError, MemoryError, OSError) as err:
        return {"error": message(err, root), "file": mri_rel, "which": "mri"}
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
        return {"error": message(err, root), "file": pet_rels[0], "which": "pet"}
    if not np.any(pet):
        return {"error": "PET does not overlap the PET grid around the T1's centre (not in the T1's space?)",
                "file": pet_rels[0], "which": "pet"}
    try:
        labels = region_labels(root, job["subject"], grid, geometry.pet_size)
    except (VolumeError, ValueError, OSError) as err:
        return {"error": f"ground-truth labels: {message(err, root)}", "file": f"truth/{job['subject']}_regions.nii.gz",
                "which": "pair"}
    mean, std = uint8_mri_stats(mri)
    sources = {"mri": [_source(root, mri_rel)], "pet": [_source(root, p) for p in pet_rels]}
    stats = {"mri_mean": mean, "mri_std": std, "mri_input_p0.1": lo, "mri_input_p99.9": hi,
             "pet_min": float(pet.min()), "pet_max": float(pet.max()), "pet_mean": float(pet.mean(dtype=np.float64))}
    return {"mri": mri[None], "pet": pet, "mri_affine": affine, "mri_mean": mean, "mri_std": std,
            "stats": stats, "sources": sources, "brain_mask": brain, "has_labels": labels is not None,
            "labels": np.zeros(geometry.pet_size, np.uint8) if labels is None else labels,
            "registration": reg_record, "template_registration": template_reg.record(),
            "t1_qc": {k: v for k, v in t1_qc.record(enforced=job.get("t1_qc", True)).items()
                      if k != "template_registration"}}  # that one is the row's template_registration


def message(err: BaseException, root: Path) -> str:
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


def pair_job(pair: adni.Pair, split: str) -> dict[str, Any]:
    """The job of one pair (what `process_pair` reads): ids, split, days apart and the files under the raw root."""
    return {"subject": pair.subject, "tracer": pair.tracer, "split": split, "group": pair.group,
            "mri_image_id": pair.mri.image_id, "pet_image_id": pair.pet.image_id, "days_apart": pair.days_apart,
            "mri_file": pair.mri.files[0], "pet_files": list(pair.pet.files)}
