"""PET-to-T1 rigid registration with SimpleITK (what `ganbert preprocess` uses), ANTs and elastix, on one phantom.

Accuracy (mean displacement over the brain from the true pose) and seconds per pair on one thread, same inputs, each
library's Mattes-MI rigid defaults from a centre-of-mass start. ANTs and elastix are not project dependencies, so run
this in a throwaway venv:

    .venv/bin/ganbert phantom --out runs/regcmp --subjects 2 --tracers AV45,FDG --size paper --pet-space adni-standard
    python3 -m venv /tmp/regvenv
    /tmp/regvenv/bin/pip install -c constraints.txt antspyx itk-elastix SimpleITK nibabel scipy
    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 /tmp/regvenv/bin/python benchmarks/registration_libraries.py runs/regcmp
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
from ganbert.prep import registration  # noqa: E402  (numpy + SimpleITK only)

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    return (data.mean(axis=3) if data.ndim == 4 else data), img.affine


def _geometry(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(canonical data, origin, spacing, direction) in the voxel order and frame registration hands ITK."""
    data, aff = registration.canonical(data, affine)
    zooms = np.linalg.norm(aff[:3, :3], axis=0)
    return np.ascontiguousarray(data, dtype=np.float32), aff[:3, 3].copy(), zooms, aff[:3, :3] / zooms


def simpleitk(fixed: tuple, moving: tuple) -> np.ndarray:
    return registration.rigid(*fixed, *moving, threads=1, check=False).matrix


def ants(fixed: tuple, moving: tuple) -> np.ndarray:
    import ants as antspy

    def image(data: np.ndarray, affine: np.ndarray):  # type: ignore[no-untyped-def]
        arr, origin, spacing, direction = _geometry(data, affine)
        return antspy.from_numpy(arr, origin=list(origin), spacing=list(spacing), direction=direction)

    reg = antspy.registration(image(*fixed), image(*moving), type_of_transform="Rigid", aff_metric="mattes",
                              random_seed=1)
    tx = antspy.read_transform(reg["fwdtransforms"][0])
    p, c = np.asarray(tx.parameters, dtype=np.float64), np.asarray(tx.fixed_parameters, dtype=np.float64)
    a, t = p[:9].reshape(3, 3), p[9:12]
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = a, c + t - a @ c
    return out


def elastix(fixed: tuple, moving: tuple) -> np.ndarray:
    import itk
    import SimpleITK as sitk

    def image(data: np.ndarray, affine: np.ndarray):  # type: ignore[no-untyped-def]
        arr, origin, spacing, direction = _geometry(data, affine)
        img = itk.image_from_array(np.ascontiguousarray(arr.transpose(2, 1, 0)))
        img.SetOrigin(origin.tolist())
        img.SetSpacing(spacing.tolist())
        img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
        return img

    params = itk.ParameterObject.New()
    rigid = params.GetDefaultParameterMap("rigid")
    rigid["AutomaticTransformInitialization"] = ["true"]
    rigid["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
    params.AddParameterMap(rigid)
    with tempfile.TemporaryDirectory() as tmp:
        _, result = itk.elastix_registration_method(image(*fixed), image(*moving), parameter_object=params,
                                                    number_of_threads=1, log_to_console=False, output_directory=tmp)
    p = [float(v) for v in result.GetParameter(0, "TransformParameters")]
    centre = [float(v) for v in result.GetParameter(0, "CenterOfRotationPoint")]
    euler = sitk.Euler3DTransform(centre, p[0], p[1], p[2], p[3:6])
    return registration._matrix(euler)


def main(raw: Path) -> None:
    truth = json.loads((raw / "ground_truth.json").read_text())["subjects_truth"]
    rows: dict[str, list[tuple[float, float]]] = {"SimpleITK": [], "ANTs": [], "elastix": []}
    before = []
    for subject, info in sorted(truth.items()):
        t1_path = next((raw / "ADNI" / subject).glob("*MPRAGE*/*/*/*.nii*"), None) or next(
            p for p in (raw / "ADNI" / subject).rglob("*.nii*") if "_MR_" in p.name)
        fixed = _load(t1_path)
        labels = nib.load(str(raw / "truth" / f"{subject}_regions.nii.gz"))
        idx = np.argwhere(np.asarray(labels.dataobj) > 0).T
        pts = labels.affine[:3, :3] @ idx + labels.affine[:3, 3:4]
        for tracer, tinfo in sorted(info["tracers"].items()):
            pet_path = next(p for p in (raw / "ADNI" / subject).rglob("*.nii*") if f"_PT_{tracer}_" in p.name)
            moving = _load(pet_path)
            true = np.asarray(tinfo["t1_to_pet_header"], dtype=np.float64).reshape(4, 4)
            before.append(registration.mean_displacement(np.eye(4), true, pts))
            for name, fn in (("SimpleITK", simpleitk), ("ANTs", ants), ("elastix", elastix)):
                t0 = time.perf_counter()
                matrix = fn(fixed, moving)
                secs = time.perf_counter() - t0
                mm = registration.mean_displacement(matrix, true, pts)
                rows[name].append((mm, secs))
                print(f"{subject} {tracer} {name}: {mm:.2f} mm, {secs:.1f} s", flush=True)
    print(f"\n{len(before)} pairs, paper geometry, one thread; mean displacement before registration "
          f"{np.mean(before):.1f} mm\n")
    print("| library | mean displacement mm (mean / max) | seconds per pair (mean / max) |")
    print("| --- | --- | --- |")
    for name, vals in rows.items():
        mm, secs = np.array(vals).T
        print(f"| {name} | {mm.mean():.2f} / {mm.max():.2f} | {secs.mean():.1f} / {secs.max():.1f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
