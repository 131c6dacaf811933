"""A reference PET scored against one synthesised PET: registered to its T1 as preprocessing does, on the output grid.

`ganbert synthesize --mri T1 --out PET.nii.gz --reference-pet REAL_PET` runs this after synthesis: the real PET
(NIfTI, or a DICOM series folder or file; frames averaged for registration) is registered rigidly to the input T1
(`data.registration.rigid`, the same call and quality check as `ganbert preprocess --registration rigid`), resampled
onto the synthesised PET's grid with its frames grouped as in training, and both are scored inside the template brain
mask with `evaluate.subject_metrics`. The scores, the registration record and the mask source go to
`<out stem>_reference.json` beside the output. No header text of either input is read or written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ganbert.common.atomic import write_text
from ganbert.config import GeometryConfig
from ganbert.ingest import dicom
from ganbert.ingest.nifti import VolumeError
from ganbert.prep import brainmask
from ganbert.prep.grid import conform_array, pet_affine, resample_pet
from ganbert.prep.pair import REGISTRATIONS, registered_pet_affine
from ganbert.scoring.evaluate import subject_metrics

SUFFIX = "_reference.json"


def report_path(out_path: Path | str) -> Path:
    """`dir/sub_pet.nii.gz` -> `dir/sub_pet_reference.json`."""
    out_path = Path(out_path)
    name = out_path.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return out_path.with_name(name + SUFFIX)


def on_output_grid(reference: Path | str, t1: Path | str, geometry: GeometryConfig, registration: str = "rigid"
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(reference PET (T, d, h, w) float32 on the synthesis grid, brain mask (d, h, w) bool, registration record).

    `registration="rigid"` registers the reference to the T1 (raises `RegistrationError`, a ValueError naming the
    reason, when it fails the quality check); "none" trusts both headers. Raises ValueError (VolumeError) naming the
    file for an unreadable input.
    """
    if registration not in REGISTRATIONS:
        raise ValueError(f"registration must be one of {REGISTRATIONS}, got {registration!r}")
    t1_vol, pet_vol = dicom.read_any(t1), dicom.read_any(reference)
    if t1_vol.data.ndim == 4:
        raise VolumeError(t1_vol.path, f"T1 is 4D with {t1_vol.frames} frames (expected one 3D volume)")
    _, mri_affine, _, _ = conform_array(t1_vol.data, t1_vol.affine, geometry, str(t1))
    record: dict[str, Any] = {"mode": registration}
    affine = np.asarray(pet_vol.affine, dtype=np.float64)
    if registration == "rigid":
        try:
            affine, reg = registered_pet_affine(t1_vol.data, t1_vol.affine, pet_vol.data, affine)
        except ValueError as err:
            raise ValueError(f"reference PET {reference}: registration to {t1} failed: {err}") from None
        record.update(reg)
    real = resample_pet(pet_vol.data, affine, mri_affine, geometry)
    template = brainmask.fit(t1_vol.data, t1_vol.affine)
    mask = brainmask.on_grid(template.matrix, pet_affine(mri_affine, geometry), geometry.pet_size)
    return real, mask.astype(bool), record


def score(synthesised: np.ndarray, reference: Path | str, t1: Path | str, geometry: GeometryConfig, tracer: str,
          registration: str = "rigid") -> dict[str, Any]:
    """Metrics of a synthesised PET (d, h, w, T), as written, against the registered reference PET.

    Returns {"metrics": evaluate.subject_metrics(...), "registration": record, "mask_source": "template"}.
    """
    real, mask, record = on_output_grid(reference, t1, geometry, registration)
    fake = np.moveaxis(np.asarray(synthesised, dtype=np.float32), 3, 0)
    if fake.shape != real.shape:
        raise ValueError(f"synthesised PET shape {fake.shape} differs from the reference on its grid {real.shape}")
    values = subject_metrics(torch.from_numpy(fake), torch.from_numpy(real), mask, tracer)
    return {"metrics": values, "registration": record, "mask_source": "template"}


def write_report(path: Path, result: dict[str, Any]) -> Path:
    """Write the score JSON atomically (non-finite values as null)."""
    clean = {k: (v if isinstance(v, float) and np.isfinite(v) else None) for k, v in result["metrics"].items()}
    write_text(path, json.dumps({**result, "metrics": clean}, indent=2, sort_keys=True) + "\n")
    return path
