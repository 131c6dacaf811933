"""DICOM series -> validated volume (pydicom): classic one file a slice and enhanced multi-frame, PET frames by timing.

Only geometry, pixel data, rescale and frame timing are read; no text field of the header (patient name, ids,
dates) is kept or reported. A series is rejected (VolumeError naming the file and the reason) for mixed series
UIDs, missing pixel data, an unsupported (compressed) transfer syntax, a missing slice, uneven slice spacing,
inconsistent orientation/shape, or a frame count that does not match the slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ganbert.ingest.nifti import Volume, VolumeError, check_geometry, check_values, read_volume

UNCOMPRESSED = {"1.2.840.10008.1.2": "Implicit VR Little Endian", "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
                "1.2.840.10008.1.2.2": "Explicit VR Big Endian"}
SPACING_TOLERANCE = 0.01  # relative spread of slice gaps still called even
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom_file(path: Path) -> bool:
    """True for a file with the DICOM preamble ('DICM' at byte 128) or a .dcm name."""
    path = Path(path)
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with path.open("rb") as fobj:
            head = fobj.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


@dataclass(frozen=True)
class _Slice:
    """One 2D image of a series: geometry, rescale, frame time and where its pixels are."""

    file: Path
    position: np.ndarray  # (3,) LPS mm of the first pixel
    orientation: np.ndarray  # (6,) row and column direction cosines, LPS
    spacing: tuple[float, float]  # (between rows, between columns) mm
    shape: tuple[int, int]
    slope: float
    intercept: float
    time: float  # frame start (ms), 0 for a single-frame series
    frame: int  # index into a multi-frame file's pixel array, -1 for a single-frame file


def _float(ds: Any, name: str, default: float) -> float:
    value = getattr(ds, name, None)
    try:
        return float(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default


def _read(path: Path, pixels: bool) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # header pass: large elements (the pixel data) stay on disk but their presence is known
        return pydicom.dcmread(str(path), defer_size=None if pixels else 4096)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise VolumeError(path, f"not a readable DICOM file ({type(err).__name__})") from None


def _check_file(ds: Any, path: Path) -> None:
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "1.2.840.10008.1.2"))
    if syntax not in UNCOMPRESSED:
        raise VolumeError(path, f"unsupported transfer syntax {syntax} (only uncompressed DICOM is read: "
                                f"{', '.join(UNCOMPRESSED.values())})")
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise VolumeError(path, "missing pixel data")
    for name in ("Rows", "Columns"):
        if int(getattr(ds, name, 0) or 0) < 2:
            raise VolumeError(path, f"missing or absurd {name}")


def _geometry(item: Any, path: Path, what: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    try:
        pos = np.asarray([float(v) for v in item.ImagePositionPatient], dtype=np.float64)
        ori = np.asarray([float(v) for v in item.ImageOrientationPatient], dtype=np.float64)
        sp = tuple(float(v) for v in item.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        raise VolumeError(path, f"{what}: missing ImagePositionPatient, ImageOrientationPatient "
                                "or PixelSpacing") from None
    if pos.shape != (3,) or ori.shape != (6,) or len(sp) != 2 or min(sp) <= 0:
        raise VolumeError(path, f"{what}: absurd position, orientation or pixel spacing")
    return pos, ori, sp  # type: ignore[return-value]


def _classic(ds: Any, path: Path) -> list[_Slice]:
    pos, ori, sp = _geometry(ds, path, "slice")
    time = _float(ds, "FrameReferenceTime", 0.0)
    return [_Slice(path, pos, ori, sp, (int(ds.Rows), int(ds.Columns)), _float(ds, "RescaleSlope", 1.0),
                   _float(ds, "RescaleIntercept", 0.0), time, -1)]


def _enhanced(ds: Any, path: Path) -> list[_Slice]:
    """Slices of an enhanced multi-frame file (PerFrame/SharedFunctionalGroupsSequence)."""
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    frames = ds.PerFrameFunctionalGroupsSequence
    if len(frames) != int(ds.NumberOfFrames):
        raise VolumeError(path, f"frame-count mismatch: NumberOfFrames {int(ds.NumberOfFrames)} but "
                                f"{len(frames)} per-frame groups")
    def pick(frame: Any, seq: str) -> Any:
        for group in (frame, shared):
            if group is not None and seq in group:
                return group[seq].value[0]
        raise VolumeError(path, f"enhanced DICOM: no {seq}")
    out = []
    for i, frame in enumerate(frames):
        plane = pick(frame, "PlanePositionSequence")
        orient = pick(frame, "PlaneOrientationSequence")
        measures = pick(frame, "PixelMeasuresSequence")
        holder = type("G", (), {"ImagePositionPatient": plane.ImagePositionPatient,
                                "ImageOrientationPatient": orient.ImageOrientationPatient,
                                "PixelSpacing": measures.PixelSpacing})
        pos, ori, sp = _geometry(holder, path, f"frame {i + 1}")
        slope, intercept = 1.0, 0.0
        try:
            pvt = pick(frame, "PixelValueTransformationSequence")
            slope, intercept = _float(pvt, "RescaleSlope", 1.0), _float(pvt, "RescaleIntercept", 0.0)
        except VolumeError:
            pass
        time = 0.0
        if "FrameContentSequence" in frame:
            content = frame.FrameContentSequence[0]
            time = _float(content, "TemporalPositionIndex", 0.0)
        out.append(_Slice(path, pos, ori, sp, (int(ds.Rows), int(ds.Columns)), slope, intercept, time, i))
    return out


def _slices(files: Sequence[Path]) -> tuple[list[_Slice], int | None]:
    """Every 2D slice of the files with their header checks; and the declared frame count (PET) if any."""
    uids: dict[str, Path] = {}
    declared: set[int] = set()
    slices: list[_Slice] = []
    for path in files:
        ds = _read(path, pixels=False)
        _check_file(ds, path)
        uids.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), path)
        if len(uids) > 1:
            raise VolumeError(path, f"mixed series: {len(uids)} different SeriesInstanceUIDs in one image folder")
        if "NumberOfTimeSlices" in ds:
            declared.add(int(ds.NumberOfTimeSlices))
        multi = int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 and "PerFrameFunctionalGroupsSequence" in ds
        slices.extend(_enhanced(ds, path) if multi else _classic(ds, path))
    if len(declared) > 1:
        raise VolumeError(files[0], f"frame-count mismatch: files declare NumberOfTimeSlices {sorted(declared)}")
    return slices, (declared.pop() if declared else None)


def _frames(slices: list[_Slice], declared: int | None, where: Path) -> list[list[_Slice]]:
    times = sorted({s.time for s in slices})
    groups = [[s for s in slices if s.time == t] for t in times]
    if declared is not None and declared != len(groups):
        raise VolumeError(where, f"frame-count mismatch: NumberOfTimeSlices says {declared} frames, the slices carry "
                                 f"{len(groups)} frame times")
    sizes = {len(g) for g in groups}
    if len(sizes) > 1:
        raise VolumeError(where, f"frame-count mismatch: frames hold different slice counts {sorted(sizes)} "
                                 f"(missing slice in a frame?)")
    return groups


def _order(group: list[_Slice], where: Path) -> tuple[list[_Slice], np.ndarray, float]:
    """Slices sorted along the normal; (sorted, normal, spacing); rejects missing slices and uneven spacing."""
    ori = group[0].orientation
    for s in group:
        if not np.allclose(s.orientation, ori, atol=1e-4) or s.shape != group[0].shape or \
                not np.allclose(s.spacing, group[0].spacing, rtol=1e-4):
            raise VolumeError(s.file, "slices differ in orientation, matrix size or pixel spacing")
    normal = np.cross(ori[:3], ori[3:])
    dist = np.array([float(s.position @ normal) for s in group])
    order = np.argsort(dist, kind="stable")
    group, dist = [group[i] for i in order], dist[order]
    if len(group) < 2:
        raise VolumeError(where, f"only {len(group)} slice(s): not a volume")
    gaps = np.diff(dist)
    if np.any(gaps < 1e-3):
        raise VolumeError(where, "two slices at the same position (duplicate slice or mixed series)")
    step = float(np.median(gaps))
    big = gaps > 1.5 * step
    if np.any(big):
        at = int(np.argmax(big))
        raise VolumeError(group[at + 1].file, f"missing slice: gap of {gaps[at]:.2f} mm where slices are "
                                              f"{step:.2f} mm apart")
    if float(gaps.max() - gaps.min()) > SPACING_TOLERANCE * step:
        raise VolumeError(where, f"uneven slice spacing: gaps from {gaps.min():.3f} to {gaps.max():.3f} mm")
    return group, normal, step


def _pixels(slices: list[_Slice]) -> dict[Path, np.ndarray]:
    out: dict[Path, np.ndarray] = {}
    for path in dict.fromkeys(s.file for s in slices):
        ds = _read(path, pixels=True)
        try:
            arr = np.asarray(ds.pixel_array, dtype=np.float32)
        except Exception as err:  # noqa: BLE001 - pydicom raises many types for bad pixel data
            raise VolumeError(path, f"unreadable pixel data ({type(err).__name__})") from None
        out[path] = arr
    return out


def read_series(files: Sequence[Path]) -> Volume:
    """A DICOM series (its files) -> float32 Volume (X, Y, Z) or (X, Y, Z, F) with a RAS affine, rescale applied."""
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("files must not be empty")
    slices, declared = _slices(files)
    groups = _frames(slices, declared, files[0])
    ordered = [_order(g, files[0]) for g in groups]
    first, normal, step = ordered[0]
    for group, _, other in ordered[1:]:
        if abs(other - step) > SPACING_TOLERANCE * step or not np.allclose(group[0].position, first[0].position,
                                                                          atol=1e-2):
            raise VolumeError(files[0], "frames cover different slice positions")
    pixels = _pixels(slices)
    rows, cols = first[0].shape
    data = np.empty((cols, rows, len(first), len(ordered)), dtype=np.float32)
    for f, (group, _, _) in enumerate(ordered):
        for k, s in enumerate(group):
            arr = pixels[s.file] if s.frame < 0 else pixels[s.file][s.frame]
            if arr.shape != (rows, cols):
                raise VolumeError(s.file, f"pixel data shape {arr.shape} differs from Rows x Columns {(rows, cols)}")
            data[:, :, k, f] = arr.T.astype(np.float64) * s.slope + s.intercept
    ori = first[0].orientation
    lps = np.eye(4)
    lps[:3, 0] = ori[:3] * first[0].spacing[1]
    lps[:3, 1] = ori[3:] * first[0].spacing[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = first[0].position
    affine = LPS_TO_RAS @ lps
    volume = data[..., 0] if data.shape[3] == 1 else data
    check_geometry(volume.shape, affine, [first[0].spacing[1], first[0].spacing[0], step], files[0])
    check_values(volume, files[0])
    return Volume(data=volume, affine=affine, path=files[0])


def series_frames(files: Sequence[Path]) -> tuple[int, ...]:
    """Header-only check of a series (no pixel decoding): its shape (X, Y, Z[, F]) or VolumeError."""
    files = [Path(f) for f in files]
    slices, declared = _slices(files)
    groups = _frames(slices, declared, files[0])
    ordered = [_order(g, files[0]) for g in groups]
    rows, cols = ordered[0][0][0].shape
    shape = (cols, rows, len(ordered[0][0]))
    return shape if len(ordered) == 1 else (*shape, len(ordered))


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files of an image folder (sorted by name; hidden files skipped)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom_file(p))


def is_series(path: Path | str) -> bool:
    """True for a DICOM file, or a folder that holds DICOM files and no NIfTI file (one series, not a batch)."""
    from ganbert.ingest.nifti import is_nifti_name

    path = Path(path)
    if path.is_file():
        return is_dicom_file(path)
    if not path.is_dir():
        return False
    names = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    return not any(is_nifti_name(p.name) for p in names) and any(is_dicom_file(p) for p in names)


def open_image(path: Path | str) -> Any:
    """A T1 for synthesis: a NIfTI (header validated, voxels lazy) or a DICOM series/file as an in-memory NIfTI."""
    import nibabel as nib

    from ganbert.ingest.nifti import load_header

    path = Path(path)
    if is_series(path):
        vol = read_any(path)
        return nib.Nifti1Image(vol.data, vol.affine)
    return load_header(path)[0]


def read_any(path: Path | str) -> Volume:
    """A NIfTI file, a DICOM file (enhanced multi-frame) or a folder holding one DICOM series -> validated Volume."""
    path = Path(path)
    if path.is_dir():
        files = dicom_files(path)
        if not files:
            raise VolumeError(path, "no DICOM files in the folder")
        return read_series(files)
    if is_dicom_file(path):
        return read_series([path])
    return read_volume(path)


# --- writing (the phantom's DICOM download, tests' malformed series) --------------------------------

MR_STORAGE, PET_STORAGE = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.128"
ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"


def _base(modality: str, series_uid: str, identity: dict[str, str], sop_class: str, sop_uid: str) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = _uid(series_uid, "study")
    for key, value in identity.items():  # PatientName, PatientID, PatientBirthDate, ... (never read back)
        setattr(ds, key, value)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) as close to `value` as that allows."""
    for digits in range(16, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return "0"


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def write_series(folder: Path, stem: str, stored: np.ndarray, affine: np.ndarray, modality: str,
                 slope: float | Sequence[float] = 1.0, intercept: float | Sequence[float] = 0.0,
                 frame_ms: Sequence[float] | None = None,
                 identity: dict[str, str] | None = None, enhanced: bool = False) -> list[Path]:
    """Write int16 stored values (X, Y, Z[, F]) as a DICOM series: one file per slice (per frame), or one enhanced
    multi-frame file. Real value = stored * slope + intercept; `affine` is RAS (nibabel). Returns the files."""
    stored = np.asarray(stored)
    if stored.ndim not in (3, 4):
        raise ValueError(f"stored must be (X, Y, Z) or (X, Y, Z, F), got shape {stored.shape}")
    if modality not in ("MR", "PT"):
        raise ValueError(f"modality must be MR or PT, got {modality!r}")
    vol = stored[..., None] if stored.ndim == 3 else stored
    frames = vol.shape[3]
    times = list(frame_ms) if frame_ms is not None else [0.0] * frames
    slopes = [float(v) for v in np.broadcast_to(np.asarray(slope, dtype=np.float64), (frames,))]
    intercepts = [float(v) for v in np.broadcast_to(np.asarray(intercept, dtype=np.float64), (frames,))]
    if len(times) != frames:
        raise ValueError(f"frame_ms must have {frames} entries, got {len(times)}")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    zooms = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / zooms[0], lps[:3, 1] / zooms[1]
    orientation = [_ds(float(v)) for v in (*row_dir, *col_dir)]
    spacing = [_ds(float(zooms[1])), _ds(float(zooms[0]))]
    series = _uid(stem, "series")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = np.clip(np.rint(vol), -32768, 32767).astype(np.int16)
    if enhanced:
        return [_write_enhanced(folder, stem, data, lps, orientation, spacing, slopes[0], intercepts[0], series,
                                identity or {})]
    out = []
    for f in range(frames):
        for k in range(vol.shape[2]):
            sop = _uid(stem, f, k)
            ds = _base(modality, series, identity or {}, MR_STORAGE if modality == "MR" else PET_STORAGE, sop)
            ds.Rows, ds.Columns = int(vol.shape[1]), int(vol.shape[0])
            ds.PixelSpacing = spacing
            ds.ImageOrientationPatient = orientation
            ds.ImagePositionPatient = [_ds(float(v)) for v in lps[:3, :3] @ np.array([0.0, 0.0, k]) + lps[:3, 3]]
            ds.SliceThickness = _ds(float(zooms[2]))
            ds.InstanceNumber = f * vol.shape[2] + k + 1
            ds.RescaleSlope, ds.RescaleIntercept = _ds(slopes[f]), _ds(intercepts[f])
            if modality == "PT":
                ds.NumberOfTimeSlices = frames
                ds.NumberOfSlices = int(vol.shape[2])
                ds.FrameReferenceTime = _ds(times[f])
            ds.PixelData = np.ascontiguousarray(data[:, :, k, f].T).tobytes()
            path = folder / f"{stem}_{f + 1:02d}_{k + 1:04d}.dcm"
            tmp = folder / f".tmp-{path.name}"
            ds.save_as(str(tmp), enforce_file_format=True)
            tmp.replace(path)
            out.append(path)
    return out


def _write_enhanced(folder: Path, stem: str, data: np.ndarray, lps: np.ndarray, orientation: list[float],
                    spacing: list[float], slope: float, intercept: float, series: str,
                    identity: dict[str, str]) -> Path:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DSequence

    ds = _base("MR", series, identity, ENHANCED_MR_STORAGE, _uid(stem, "enhanced"))
    n_x, n_y, n_z, frames = data.shape
    ds.Rows, ds.Columns, ds.NumberOfFrames = int(n_y), int(n_x), int(n_z * frames)
    shared = Dataset()
    po, pm, pvt = Dataset(), Dataset(), Dataset()
    po.ImageOrientationPatient = orientation
    pm.PixelSpacing = spacing
    pm.SliceThickness = _ds(float(np.linalg.norm(lps[:3, 2])))
    pvt.RescaleSlope, pvt.RescaleIntercept = _ds(slope), _ds(intercept)
    shared.PlaneOrientationSequence = DSequence([po])
    shared.PixelMeasuresSequence = DSequence([pm])
    shared.PixelValueTransformationSequence = DSequence([pvt])
    ds.SharedFunctionalGroupsSequence = DSequence([shared])
    per = []
    for f in range(frames):
        for k in range(n_z):
            item, pp, fc = Dataset(), Dataset(), Dataset()
            pp.ImagePositionPatient = [_ds(float(v)) for v in lps[:3, :3] @ np.array([0.0, 0.0, k]) + lps[:3, 3]]
            fc.TemporalPositionIndex = f + 1
            item.PlanePositionSequence = DSequence([pp])
            item.FrameContentSequence = DSequence([fc])
            per.append(item)
    ds.PerFrameFunctionalGroupsSequence = DSequence(per)
    ds.PixelData = np.ascontiguousarray(np.transpose(data, (3, 2, 1, 0))).tobytes()
    path = folder / f"{stem}.dcm"
    tmp = folder / f".tmp-{path.name}"
    ds.save_as(str(tmp), enforce_file_format=True)
    tmp.replace(path)
    return path
