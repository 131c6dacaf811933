"""Image registration with SimpleITK: rigid PET-to-T1 and affine template-to-T1 by Mattes mutual information.

Images are given as numpy (X, Y, Z) arrays with nibabel-style voxel -> world (mm) affines. They are handed to
ITK in the same world frame (no RAS/LPS flip is needed because both images share it), so a transform returned
here maps a point of the fixed image's world (the T1) to the moving image's world, as ITK defines it, as a
(4, 4) matrix in the caller's frame.

A registration is optimised once per content (both images as the optimiser sees them, and the settings) and kept: in
the process and as a small JSON file in `$GANBERT_HOME/cache/registration` (`$GANBERT_CACHE`), so the tracers of one
subject, a rerun, another preset's preprocessing, synthesis of the same T1 and the NIfTI and DICOM reads of one scan
read the one result back. A process that needs a registration another process is making waits for it
(`common.cache.making`) rather than making it too.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ganbert.common import cache
from ganbert.common.atomic import write_text

LEVELS_MM = (8.0, 4.0, 2.0)  # target voxel size per resolution level (coarse to fine)
SMOOTH_MM = (4.0, 2.0, 1.0)  # Gaussian sigma per level, physical mm
MAX_ROTATION_DEG = 30.0  # a rigid PET-to-T1 motion beyond this is not believable
MIN_MI = 0.05  # Mattes MI (nats) after registration below this: the images do not match
MIN_COVERAGE = 0.7  # the moved PET must cover at least this fraction of the T1's head
MAX_SHIFT_MM = 300.0  # a PET whose header puts it further from its T1 than this is not the T1's subject/scan
MAX_IN_MEMORY = 8  # registrations this process keeps (a subject's tracers share one T1)


class RegistrationError(ValueError):
    """A registration that failed or did not pass the quality check; the message says why."""


@dataclass(frozen=True)
class Registration:
    """A transform (fixed world -> moving world, (4, 4)) and its quality figures."""

    matrix: np.ndarray
    mutual_information: float
    coverage: float
    rotation_deg: float
    translation_mm: float
    shift_mm: float  # how far the transform moves the centre of the T1's field of view
    iterations: int
    seconds: float

    def record(self) -> dict[str, object]:
        """JSON-ready record for the manifest (matrix row-major, figures rounded)."""
        return {"fixed_to_moving": [round(float(v), 6) for v in self.matrix.reshape(-1)],
                "mutual_information": round(self.mutual_information, 4), "coverage": round(self.coverage, 4),
                "rotation_deg": round(self.rotation_deg, 3), "translation_mm": round(self.translation_mm, 3),
                "shift_mm": round(self.shift_mm, 3),
                "iterations": self.iterations}  # no wall time: a rerun must write the same manifest


def _sitk():  # type: ignore[no-untyped-def]
    import SimpleITK as sitk  # imported lazily: only preprocessing and synthesis need it

    return sitk


def prepared(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An (X, Y, Z) image as registration sees it: canonical voxel order, the affine rounded to 1e-6 mm, intensities
    quantised to 1e-5 of their largest magnitude, float32; returns (data, (4, 4) affine).

    The same image read from NIfTI or DICOM can differ by float rounding (1 ulp, sub-micrometre positions), and MI
    optimisation amplifies any difference: quantised, both reads are one image, registered alike (and once).
    """
    if data.ndim != 3:
        raise ValueError(f"data must be 3D (X, Y, Z), got shape {data.shape}")
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise ValueError("affine must be a finite 4x4 matrix")
    data, aff = canonical(data, aff)
    quantum = max(float(np.abs(data).max()), 1e-30) * 1e-5
    data = np.rint(np.asarray(data, dtype=np.float64) / quantum) * quantum
    return np.ascontiguousarray(data, dtype=np.float32), np.round(aff, 6)


def _image(data: np.ndarray, aff: np.ndarray):  # type: ignore[no-untyped-def]
    """SimpleITK float32 image of a `prepared` (X, Y, Z) array and its affine, in the same world frame."""
    sitk = _sitk()
    zooms = np.linalg.norm(aff[:3, :3], axis=0)
    direction = aff[:3, :3] / zooms
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise ValueError("affine must have orthogonal voxel axes (no shear) for registration")
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    img.SetSpacing([float(z) for z in zooms])
    img.SetOrigin([float(v) for v in aff[:3, 3]])
    img.SetDirection([float(v) for v in direction.reshape(-1)])
    return img


def canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image with its voxel axes reordered/flipped to the closest RAS order (same world, same voxels).

    Registration then sees one array whatever order a file stored its voxels in (NIfTI LPS, DICOM slices).
    """
    from nibabel import orientations

    ornt = orientations.io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return data, affine
    out = orientations.apply_orientation(data, ornt)
    return np.ascontiguousarray(out), affine @ orientations.inv_ornt_aff(ornt, data.shape[:3])


def _shrink_factors(spacing: Sequence[float]) -> list[int]:
    finest = min(float(s) for s in spacing)
    return [max(1, int(round(mm / finest))) for mm in LEVELS_MM]


def _matrix(transform) -> np.ndarray:  # type: ignore[no-untyped-def]
    """4x4 of an ITK matrix-offset transform (x -> A (x - c) + c + t)."""
    a = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.asarray(transform.GetCenter(), dtype=np.float64)
    t = np.asarray(transform.GetTranslation(), dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = a
    out[:3, 3] = c + t - a @ c
    return out


def _sampling(fixed, samples: int) -> float:  # type: ignore[no-untyped-def]
    """Fraction of the finest level's voxels that gives about `samples` metric samples (at most all)."""
    shrink = _shrink_factors(fixed.GetSpacing())[-1]
    voxels = float(np.prod([max(1, n // shrink) for n in fixed.GetSize()]))
    return float(min(1.0, samples / voxels))


def _method(fixed, threads: int, seed: int, iterations: int, samples: int):  # type: ignore[no-untyped-def]
    sitk = _sitk()
    sampling = _sampling(fixed, samples)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, seed + 1)  # SimpleITK reads seed 0 as "seed from the wall clock"
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-4, numberOfIterations=iterations,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(_shrink_factors(fixed.GetSpacing()))
    reg.SetSmoothingSigmasPerLevel(list(SMOOTH_MM))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetNumberOfThreads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)  # pyramid filters too: one thread is reproducible
    return reg


def _coverage(fixed: np.ndarray, fixed_affine: np.ndarray, moving_shape: Sequence[int], moving_affine: np.ndarray,
              matrix: np.ndarray) -> float:
    """Fraction of the fixed image's head (voxels above 10% of its 99th percentile) inside the moving FOV."""
    step = max(1, int(round(max(fixed.shape) / 64)))
    sub = fixed[::step, ::step, ::step]
    head = np.argwhere(sub > 0.1 * float(np.percentile(sub, 99)))
    if head.size == 0:
        return 0.0
    world = fixed_affine[:3, :3] @ (head.T * step) + fixed_affine[:3, 3:4]
    moved = matrix[:3, :3] @ world + matrix[:3, 3:4]
    inv = np.linalg.inv(moving_affine)
    vox = inv[:3, :3] @ moved + inv[:3, 3:4]
    limit = np.asarray(moving_shape[:3], dtype=np.float64)[:, None] - 0.5
    return float(np.mean(np.all((vox >= -0.5) & (vox <= limit), axis=0)))


@functools.lru_cache(maxsize=1)
def _method_text() -> bytes:
    return Path(__file__).read_bytes()


def digest(kind: str, images: Sequence[tuple[np.ndarray, np.ndarray]], **settings: object) -> str:
    """Content key of one registration: its kind and settings, each image as the optimiser sees it (`prepared`:
    voxels and affine), the text of this module (any edit of the method makes registrations again) and the libraries'
    versions. Two reads of one scan that differ only below `prepared`'s rounding share the key."""
    return _key(kind, [prepared(data, affine) for data, affine in images], settings)


def _key(kind: str, seen: Sequence[tuple[np.ndarray, np.ndarray]], settings: dict[str, object]) -> str:
    meta = {"kind": kind, **settings, "images": [data.shape for data, _ in seen], "libraries": cache.versions()}
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    h.update(_method_text())
    for data, affine in seen:
        h.update(affine.tobytes())
        h.update(data.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class _Solution:
    """What the optimiser found (fixed world -> moving world) and what it cost: the part of a registration kept."""

    matrix: np.ndarray
    mutual_information: float
    iterations: int
    seconds: float


_IN_MEMORY: dict[str, _Solution] = {}


def _load(path: Path) -> _Solution | None:
    """A kept solution, or None when the file is missing or unreadable (then it is made again)."""
    try:
        record = json.loads(path.read_text())
        matrix = np.asarray(record["matrix"], dtype=np.float64)
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
            return None
        return _Solution(matrix=matrix, mutual_information=float(record["mutual_information"]),
                         iterations=int(record["iterations"]), seconds=float(record["seconds"]))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _store(path: Path, found: _Solution) -> None:
    """Keep a solution in a JSON file (atomic write); a folder that cannot be written only loses the reuse. The file
    holds the transform, its MI and cost, and is named by a hash: no name or header text."""
    try:
        write_text(path, json.dumps({**dataclasses.asdict(found), "matrix": found.matrix.tolist()}) + "\n")
    except OSError:
        pass


def _register(kind: str, fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray,
              threads: int, seed: int, iterations: int, samples: int) -> Registration:
    """Mattes-MI registration of `moving` onto `fixed` ("rigid" or "affine", initialised on the intensity
    centroids). The optimisation is made once per content (the images as it sees them and the settings: `digest`)
    and then read back: from this process, else from the cache folder (`common.cache`); the quality figures are
    computed from the images given."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    seen = [prepared(fixed, fixed_affine), prepared(moving, moving_affine)]
    key = _key(kind, seen, {"threads": threads, "seed": seed, "iterations": iterations, "samples": samples})
    found = _IN_MEMORY.get(key)
    folder = cache.folder("registration")
    if found is None and folder is not None:
        found = _load(folder / f"{key}.json")
    if found is None:
        with cache.making("registration", key):  # a process making the same registration finishes it first
            found = None if folder is None else _load(folder / f"{key}.json")
            if found is None:
                found = _optimise(kind, _image(*seen[0]), _image(*seen[1]), threads, seed, iterations, samples)
                if folder is not None:
                    _store(folder / f"{key}.json", found)
    if key not in _IN_MEMORY and len(_IN_MEMORY) >= MAX_IN_MEMORY:
        _IN_MEMORY.pop(next(iter(_IN_MEMORY)))
    _IN_MEMORY[key] = found
    return _result(found, fixed, fixed_affine, moving.shape, moving_affine)


def _optimise(kind: str, fixed_img, moving_img, threads: int, seed: int, iterations: int,  # type: ignore[no-untyped-def]
              samples: int) -> _Solution:
    import time

    sitk = _sitk()
    t0 = time.perf_counter()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    transform = sitk.Euler3DTransform() if kind == "rigid" else sitk.AffineTransform(3)
    init = sitk.CenteredTransformInitializer(fixed_img, moving_img, transform,
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = _method(fixed_img, threads, seed, iterations, samples)
    reg.SetInitialTransform(init, inPlace=True)
    try:
        reg.Execute(fixed_img, moving_img)
    except RuntimeError as err:
        raise RegistrationError(f"{kind} registration failed ({' '.join(str(err).split())[:200]})") from None
    return _Solution(matrix=_matrix(init), mutual_information=-float(reg.GetMetricValue()),
                     iterations=int(reg.GetOptimizerIteration()), seconds=time.perf_counter() - t0)


def rigid(fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray, *,
          threads: int = 1, seed: int = 0, iterations: int = 200, samples: int = 100_000,
          check: bool = True) -> Registration:
    """Rigid (6 dof) registration of `moving` (a PET) onto `fixed` (its T1) by Mattes MI, three resolutions.

    Initialised by aligning the images' intensity centroids. Returns the fixed -> moving world transform;
    with `check`, raises RegistrationError when the MI, the coverage of the head or the rotation is implausible.
    """
    result = _register("rigid", fixed, fixed_affine, moving, moving_affine, threads, seed, iterations, samples)
    if check:
        check_quality(result)
    return result


def _result(found: _Solution, fixed: np.ndarray, fixed_affine: np.ndarray, moving_shape: Sequence[int],
            moving_affine: np.ndarray) -> Registration:
    matrix = found.matrix
    u, _, vt = np.linalg.svd(matrix[:3, :3])
    rot = u @ vt
    angle = float(np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1.0, 1.0))))
    return Registration(matrix=matrix, mutual_information=found.mutual_information,
                        coverage=_coverage(fixed, fixed_affine, moving_shape, moving_affine, matrix),
                        rotation_deg=angle, translation_mm=float(np.linalg.norm(matrix[:3, 3])),
                        shift_mm=_shift(matrix, fixed_affine, fixed.shape), iterations=found.iterations,
                        seconds=found.seconds)


def _shift(matrix: np.ndarray, affine: np.ndarray, shape: Sequence[int]) -> float:
    centre = affine[:3, :3] @ ((np.asarray(shape[:3], dtype=np.float64) - 1) / 2) + affine[:3, 3]
    return float(np.linalg.norm(matrix[:3, :3] @ centre + matrix[:3, 3] - centre))


def check_quality(result: Registration) -> None:
    """Raise RegistrationError naming the failed figure (MI, coverage, rotation) of a rigid PET-to-T1 result."""
    if not np.isfinite(result.mutual_information) or result.mutual_information < MIN_MI:
        raise RegistrationError(f"registration quality check failed: mutual information {result.mutual_information:.3f}"
                                f" < {MIN_MI} (PET and T1 do not match)")
    if result.coverage < MIN_COVERAGE:
        raise RegistrationError(f"registration quality check failed: the registered PET covers {result.coverage:.0%} "
                                f"of the T1's head (< {MIN_COVERAGE:.0%})")
    if result.shift_mm > MAX_SHIFT_MM:
        raise RegistrationError(f"registration quality check failed: the PET lies {result.shift_mm:.0f} mm from its "
                                f"T1 (> {MAX_SHIFT_MM:g} mm): not in the T1's space or not the same subject")
    if result.rotation_deg > MAX_ROTATION_DEG:
        raise RegistrationError(f"registration quality check failed: rotation {result.rotation_deg:.1f} deg "
                                f"> {MAX_ROTATION_DEG} deg")


def affine(fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray, *,
           threads: int = 1, seed: int = 0, iterations: int = 100, samples: int = 30_000) -> Registration:
    """Affine (12 dof) registration by Mattes MI from aligned intensity centroids, e.g. a template onto a T1."""
    return _register("affine", fixed, fixed_affine, moving, moving_affine, threads, seed, iterations, samples)


def mean_displacement(estimate: np.ndarray, truth: np.ndarray, points: np.ndarray) -> float:
    """Mean distance (mm) between two (4, 4) transforms' images of world points (3, N)."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[0] != 3:
        raise ValueError(f"points must be (3, N), got shape {pts.shape}")
    a = estimate[:3, :3] @ pts + estimate[:3, 3:4]
    b = truth[:3, :3] @ pts + truth[:3, 3:4]
    return float(np.linalg.norm(a - b, axis=0).mean())


