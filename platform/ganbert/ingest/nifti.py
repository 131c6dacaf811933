"""NIfTI readers with validation: header sanity before any voxel is read, then finite, non-constant data."""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener
from nibabel.spatialimages import SpatialImage

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_DIM = 2048  # voxels along one axis (ADNI volumes are <= 512)
MAX_VOXELS = 1 << 28  # voxels in one file, frames included (about 1 GiB as float32)
MAX_FRAMES = 512
MAX_VOXEL_MM = 50.0  # a voxel wider than 5 cm is not a brain image


class VolumeError(ValueError):
    """A volume that cannot be used: `path` names the file, `reason` says why (no header free text)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class Volume:
    """Voxel data of one validated file: `data` float32 (X, Y, Z) or (X, Y, Z, F); `affine` (4, 4) voxel -> mm."""

    data: np.ndarray
    affine: np.ndarray
    path: Path

    @property
    def frames(self) -> int:
        """Number of frames: 1 for a 3D volume, F for (X, Y, Z, F)."""
        return 1 if self.data.ndim == 3 else int(self.data.shape[3])

    @property
    def zooms(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three voxel axes (column norms of the affine)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


def is_nifti_name(name: str) -> bool:
    """True for `*.nii` / `*.nii.gz` (case-insensitive)."""
    return name.lower().endswith(NIFTI_SUFFIXES)


def inside(root: Path, path: Path) -> bool:
    """True when `path`, with symlinks resolved, lies inside `root` (resolved)."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def effective_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Drop trailing singleton axes beyond the third: (X, Y, Z, 1) -> (X, Y, Z); (X, Y, Z, 1, F) -> (X, Y, Z, F)."""
    dims = [int(v) for v in shape]
    if len(dims) <= 3:
        return tuple(dims)
    extra = [d for d in dims[3:] if d != 1]
    return tuple(dims[:3] + extra)


def check_geometry(shape: Sequence[int], affine: np.ndarray, zooms: Sequence[float],
                   path: Path | str) -> tuple[int, ...]:
    """Validate dimensionality, dims, voxel sizes and affine; return the effective shape or raise VolumeError."""
    eff = effective_shape(shape)
    if len(eff) not in (3, 4):
        raise VolumeError(path, f"wrong dimensionality: shape {tuple(int(v) for v in shape)} "
                                f"is not a 3D volume or a 4D frame series")
    for axis, dim in enumerate(eff[:3]):
        if dim < 2 or dim > MAX_DIM:
            raise VolumeError(path, f"absurd header: dimension {axis} has {dim} voxels (allowed 2..{MAX_DIM})")
    if len(eff) == 4 and not 1 <= eff[3] <= MAX_FRAMES:
        raise VolumeError(path, f"absurd header: {eff[3]} frames (allowed 1..{MAX_FRAMES})")
    total = int(np.prod(np.asarray(eff, dtype=np.int64)))
    if total > MAX_VOXELS:
        raise VolumeError(path, f"absurd header: {total} voxels exceed the limit {MAX_VOXELS}")
    zooms3 = [float(z) for z in list(zooms)[:3]]
    if len(zooms3) < 3 or not all(np.isfinite(zooms3)) or min(zooms3) <= 0:
        raise VolumeError(path, f"absurd header: voxel size {tuple(zooms3)} mm is not positive and finite")
    if max(zooms3) > MAX_VOXEL_MM:
        raise VolumeError(path, f"absurd header: voxel size {tuple(zooms3)} mm exceeds {MAX_VOXEL_MM} mm")
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise VolumeError(path, "absurd header: affine is not a finite 4x4 matrix")
    cols = np.linalg.norm(aff[:3, :3], axis=0)
    if min(cols) <= 0 or abs(np.linalg.det(aff[:3, :3])) < 1e-9 * float(np.prod(cols)):
        raise VolumeError(path, "absurd header: affine is singular (a voxel axis has zero length)")
    if max(cols) > MAX_VOXEL_MM:
        raise VolumeError(path, f"absurd header: affine voxel size {tuple(round(float(c), 3) for c in cols)} mm "
                                f"exceeds {MAX_VOXEL_MM} mm")
    return eff


def load_header(path: Path) -> tuple[nib.Nifti1Image | nib.Nifti2Image, tuple[int, ...]]:
    """Open a NIfTI lazily and validate its header (no voxel read); return (image, effective shape).

    Raises VolumeError for a missing file, a non-NIfTI file, an unsupported data type, a wrong
    dimensionality, absurd dims/voxel sizes/affine, or an uncompressed file shorter than its header needs.
    """
    path = Path(path)
    if not path.is_file():
        raise VolumeError(path, "missing file")
    if not is_nifti_name(path.name):
        raise VolumeError(path, "not a NIfTI file name (expected .nii or .nii.gz)")
    try:
        img = nib.load(str(path))
    except (ImageFileError, OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, TypeError) as err:
        raise VolumeError(path, f"not a readable NIfTI file ({type(err).__name__}: {_short(err, path)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) or type(img).__name__.startswith("Cifti"):
        raise VolumeError(path, f"not a NIfTI volume ({type(img).__name__})")
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise VolumeError(path, f"unsupported voxel data type {dtype}")
    hdr = img.header
    eff = check_geometry(img.shape, img.affine, _raw_zooms(img, path), path)
    if path.name.lower().endswith(".nii"):
        need = int(hdr.get_data_offset()) + int(np.prod(img.shape, dtype=np.int64)) * dtype.itemsize
        have = os.path.getsize(path)
        if have < need:
            raise VolumeError(path, f"truncated: file has {have} bytes, its header needs {need}")
    return img, eff


def _raw_zooms(img: nib.Nifti1Image | nib.Nifti2Image, path: Path) -> list[float]:
    """pixdim[1:4] as stored: nibabel silently replaces zero or negative voxel sizes when loading."""
    try:
        with ImageOpener(str(path)) as fobj:
            raw = type(img.header).from_fileobj(fobj, check=False)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as err:
        raise VolumeError(path, f"not a readable NIfTI header ({type(err).__name__}: {_short(err, path)})") from None
    return [float(v) for v in raw["pixdim"][1:4]]


def _short(err: BaseException, path: Path | str | None = None, limit: int = 160) -> str:
    """One line of an exception's message; the file's full path (if quoted in it) becomes its name only."""
    text = str(err)
    if path is not None:
        for form in {str(path), str(Path(path).resolve())}:
            text = text.replace(form, Path(path).name)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_values(data: np.ndarray, path: Path | str) -> None:
    """Raise VolumeError for NaN/Inf voxels or a constant image."""
    finite = np.isfinite(data)
    if not finite.all():
        bad = int(data.size - np.count_nonzero(finite))
        raise VolumeError(path, f"{bad} non-finite voxels (NaN/Inf)")
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        raise VolumeError(path, f"constant image (every voxel = {lo:g})")


def read_volume(path: Path | str) -> Volume:
    """Read and validate one NIfTI file: float32 data (X, Y, Z) or (X, Y, Z, F) with its affine.

    Header checks come first (see load_header); then the data are read (a truncated or corrupt
    compressed stream is reported as such) and checked for NaN/Inf and constancy.
    """
    path = Path(path)
    img, eff = load_header(path)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as err:
        raise VolumeError(path, f"truncated or corrupt voxel data "
                                f"({type(err).__name__}: {_short(err, path)})") from None
    data = data.reshape(eff)
    check_values(data, path)
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), path=path)


def image_data(img: SpatialImage, name: str = "img") -> tuple[np.ndarray, np.ndarray]:
    """Validated float32 voxels (X, Y, Z[, F]) and (4, 4) affine of any nibabel spatial image."""
    if not isinstance(img, SpatialImage):
        raise ValueError(f"{name} must be a nibabel SpatialImage, got {type(img).__name__}")
    path = img.get_filename() or name
    eff = check_geometry(img.shape, img.affine, img.header.get_zooms(), path)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32).reshape(eff)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as err:
        raise VolumeError(path, f"truncated or corrupt voxel data "
                                f"({type(err).__name__}: {_short(err, path)})") from None
    check_values(data, path)
    return data, np.asarray(img.affine, dtype=np.float64)


def stack_frames(volumes: Sequence[Volume]) -> Volume:
    """Frames given as several files (sorted) -> one (X, Y, Z, F) Volume; shapes and affines must agree."""
    if not volumes:
        raise ValueError("volumes must not be empty")
    if len(volumes) == 1:
        return volumes[0]
    first = volumes[0]
    parts = []
    for vol in volumes:
        if vol.data.shape[:3] != first.data.shape[:3]:
            raise VolumeError(vol.path, f"frame file shape {vol.data.shape[:3]} differs from "
                                        f"{first.path.name} {first.data.shape[:3]}")
        if not np.allclose(vol.affine, first.affine, atol=1e-3):
            raise VolumeError(vol.path, f"frame file affine differs from {first.path.name}")
        parts.append(vol.data if vol.data.ndim == 4 else vol.data[..., None])
    return Volume(data=np.concatenate(parts, axis=3), affine=first.affine, path=first.path)
