"""The run's grids: the conformed MRI cube and the PET grid, resampling onto them, the T1's uint8 scale.

What training, evaluation and synthesis all see (pure numpy; synthesis uses the same functions):
- MRI: a cube of `geometry.mri_size` voxels of `geometry.mri_voxel_mm` mm, RAS axes (array axis 0 runs
  left->right, 1 posterior->anterior, 2 inferior->superior), centred on the centre of the input's field of view.
  Linear interpolation (Gaussian anti-aliasing first when the output voxel is coarser than the input's).
  Intensities: the input's 0.1th and 99.9th percentiles map to 0 and 255 (values beyond are clipped), uint8.
- PET: `geometry.pet_frames` frames of `geometry.pet_size` voxels of `geometry.pet_voxel_mm`, RAS, centred on
  the same world point as the conformed MRI. The F input frames are split into T contiguous groups
  (numpy.array_split order) and each group is averaged; values stay in the scanner's units (float32).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from nibabel.spatialimages import SpatialImage
from scipy import ndimage

from ganbert.config import GeometryConfig
from ganbert.ingest.nifti import VolumeError, check_values, image_data

LOW_PERCENTILE, HIGH_PERCENTILE = 0.1, 99.9


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
