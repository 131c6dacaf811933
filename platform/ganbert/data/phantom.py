"""Phantom cohort in ADNI download layout: MNI152-based T1 and multi-frame PET (AV45, AV1451, FDG) with ground truth."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from ganbert.atomic import write_csv, write_text
from ganbert.config import TRACERS
from ganbert.data.adni import ADNI_COLUMNS as COLUMNS

GROUPS = ("CN", "MCI", "AD")
FRAMES = {"AV45": 4, "AV1451": 6, "FDG": 6}  # ADNI3: AV45 4x5 min, AV1451 6x5 min, FDG 6x5 min
PET_DESCRIPTIONS = {"AV45": "AV45 Co-registered Dynamic", "AV1451": "AV1451 Co-registered Dynamic",
                    "FDG": "FDG Co-registered Dynamic"}
T1_DESCRIPTIONS = ("Accelerated Sagittal MPRAGE", "Sagittal 3D Accelerated MPRAGE", "MPRAGE")
FLAIR_DESCRIPTION = "Sagittal 3D FLAIR"
DOWNLOADED = dt.date(2024, 1, 15)
SITES = (2, 3, 6, 11, 13, 18, 22, 23, 27, 31, 32, 33, 35, 36, 37, 41, 53, 67, 70, 73, 82, 94, 98, 99, 100,
         109, 114, 116, 123, 126, 127, 128, 129, 130, 131, 135, 136, 137, 141, 153, 168, 177, 301, 305, 941)

# Region labels of the ground truth (template space, then warped with each subject).
REGIONS = {1: "cerebellum_gm", 2: "cerebellum_wm", 3: "pons", 4: "medial_temporal", 5: "inferior_temporal",
           6: "temporoparietal", 7: "neocortex", 8: "cerebral_wm", 9: "csf", 10: "subcortical_gm"}
LABEL = {name: key for key, name in REGIONS.items()}
REFERENCE = {"AV45": ("cerebellum_gm", "cerebellum_wm"), "AV1451": ("cerebellum_gm",), "FDG": ("pons",)}
BRAAK_REGIONS = {1: "medial_temporal", 2: "medial_temporal", 3: "inferior_temporal", 4: "inferior_temporal",
                 5: "neocortex", 6: "neocortex"}

# Ellipsoids in MNI mm: (centre, radii); "+-x" ones are mirrored across the midline.
_ELLIPSOIDS: dict[str, list[tuple[tuple[float, float, float], tuple[float, float, float]]]] = {
    "cerebellum": [((24, -62, -38), (24, 26, 20)), ((-24, -62, -38), (24, 26, 20))],
    "pons": [((0, -26, -32), (10, 12, 12))],
    "medial_temporal": [((25, -20, -16), (9, 17, 9)), ((-25, -20, -16), (9, 17, 9))],
    "inferior_temporal": [((46, -24, -24), (16, 32, 13)), ((-46, -24, -24), (16, 32, 13))],
    "temporoparietal": [((45, -58, 32), (17, 22, 18)), ((-45, -58, 32), (17, 22, 18)), ((0, -56, 32), (12, 20, 16))],
    "subcortical_gm": [((15, -8, 4), (13, 18, 12)), ((-15, -8, 4), (13, 18, 12))],
}
HEADER_TEXT = "free text: phantom header"  # must never reach shards, logs or reports
_VENTRICLES = np.array([0.0, -12.0, 14.0])


@dataclass(frozen=True)
class SizeSpec:
    """Raw volume geometry of one phantom size (voxel counts and mm per voxel)."""

    template_res: int
    t1_shape: tuple[int, int, int]
    t1_zooms: tuple[float, float, float]
    pet_shape: tuple[int, int, int]
    pet_zooms: tuple[float, float, float]


SIZES = {
    "tiny": SizeSpec(2, (48, 56, 56), (4.4, 4.3, 4.3), (32, 32, 24), (7.5, 7.5, 8.0)),
    "demo": SizeSpec(2, (88, 120, 128), (2.4, 2.0, 2.0), (80, 80, 48), (3.0, 3.0, 4.0)),
    "paper": SizeSpec(1, (176, 240, 256), (1.2, 1.0, 1.0), (160, 160, 96), (1.5, 1.5, 2.0)),
}


@dataclass(frozen=True)
class Template:
    """MNI152 2009a maps (padded for a scalp), all (X, Y, Z) float32 or uint8, and their voxel -> mm affine."""

    affine: np.ndarray
    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    skull: np.ndarray
    scalp: np.ndarray
    labels: np.ndarray
    gm_region: np.ndarray
    wm_region: np.ndarray
    atrophy: np.ndarray


def _ellipsoid(mm: np.ndarray, centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    d = sum(((mm[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
    return d <= 1.0


def _region(mm: np.ndarray, name: str) -> np.ndarray:
    out = np.zeros(mm.shape[1:], dtype=bool)
    for centre, radii in _ELLIPSOIDS[name]:
        out |= _ellipsoid(mm, centre, radii)
    return out


@functools.lru_cache(maxsize=2)
def template(res: int) -> Template:
    """Load (once per process) the nilearn MNI152 maps at 1 or 2 mm and derive tissue, shell and region maps."""
    if res not in (1, 2):
        raise ValueError(f"res must be 1 or 2 mm, got {res}")
    from nilearn import datasets  # heavy import, only when a phantom is written

    t1_img = datasets.load_mni152_template(resolution=res)
    pad = int(round(16 / res))
    def prep(img: Any) -> np.ndarray:
        return np.pad(np.asarray(img.get_fdata(), dtype=np.float32), pad)
    t1 = prep(t1_img)
    gm = prep(datasets.load_mni152_gm_template(resolution=res))
    wm = prep(datasets.load_mni152_wm_template(resolution=res))
    mask = prep(datasets.load_mni152_brain_mask(resolution=res)) > 0.5
    affine = np.array(t1_img.affine, dtype=np.float64)
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, pad)
    csf = np.clip(mask.astype(np.float32) - gm - wm, 0.0, 1.0)
    # Skull (dark) 2-7 mm and scalp (bright fat) 7-13 mm outside the brain, smooth edges.
    dist = ndimage.distance_transform_edt(~mask).astype(np.float32) * res
    def band(lo: float, hi: float) -> np.ndarray:
        edge = 1.5
        return (np.clip((dist - lo) / edge + 0.5, 0, 1) * np.clip((hi - dist) / edge + 0.5, 0, 1)).astype(np.float32)
    skull, scalp = band(2.0, 7.0), band(7.0, 13.0)
    t1 = np.maximum(t1, 0.06 * skull + 0.62 * scalp).astype(np.float32)
    mm = _mm_grid(t1.shape, affine)
    tissue = np.argmax(np.stack([gm, wm, csf]), axis=0)
    brain = (gm + wm + csf) >= 0.3
    is_gm, is_wm = brain & (tissue == 0), brain & (tissue == 1)
    labels = np.zeros(t1.shape, dtype=np.uint8)
    labels[brain & (tissue == 2)] = LABEL["csf"]
    labels[is_wm] = LABEL["cerebral_wm"]
    labels[is_gm] = LABEL["neocortex"]
    for name in ("subcortical_gm", "temporoparietal", "inferior_temporal", "medial_temporal"):
        labels[is_gm & _region(mm, name)] = LABEL[name]
    cereb = _region(mm, "cerebellum") & (mm[2] < -10)
    labels[is_gm & cereb] = LABEL["cerebellum_gm"]
    labels[is_wm & cereb] = LABEL["cerebellum_wm"]
    labels[(is_gm | is_wm) & _region(mm, "pons")] = LABEL["pons"]
    gm_like = np.isin(labels, [LABEL[n] for n in ("cerebellum_gm", "pons", "medial_temporal", "inferior_temporal",
                                                  "temporoparietal", "neocortex", "subcortical_gm")])
    idx = ndimage.distance_transform_edt(~gm_like, return_distances=False, return_indices=True)
    gm_region = labels[tuple(idx)]
    del idx
    wm_region = np.where(cereb, LABEL["cerebellum_wm"], LABEL["cerebral_wm"]).astype(np.uint8)
    weights = {"medial_temporal": 1.0, "inferior_temporal": 0.7, "temporoparietal": 0.6, "neocortex": 0.35,
               "subcortical_gm": 0.3, "cerebellum_gm": 0.1, "pons": 0.0}
    atrophy = np.zeros(t1.shape, dtype=np.float32)
    for name, w in weights.items():
        atrophy[gm_region == LABEL[name]] = w
    atrophy = ndimage.gaussian_filter(atrophy, 4.0 / res)
    return Template(affine=affine, t1=t1, gm=gm, wm=wm, csf=csf, skull=skull, scalp=scalp, labels=labels,
                    gm_region=gm_region.astype(np.uint8), wm_region=wm_region, atrophy=atrophy)


def _mm_grid(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World mm of every voxel centre: (3, X, Y, Z) float32."""
    idx = np.indices(shape, dtype=np.float32)
    flat = idx.reshape(3, -1)
    out = affine[:3, :3].astype(np.float32) @ flat + affine[:3, 3:4].astype(np.float32)
    return out.reshape((3, *shape))


@dataclass(frozen=True)
class Subject:
    """One phantom subject: demographics, pathology and its pose/warp from template to scanner space."""

    index: int
    subject: str
    group: str
    sex: str
    age: float
    amyloid_positive: bool
    braak_stage: int
    atrophy: float
    rotation: np.ndarray  # (3, 3)
    scale: np.ndarray  # (3,)
    centre: np.ndarray  # (3,) world mm of the template's brain centre
    warp: np.ndarray  # (3, a, b, c) displacement control grid, mm
    warp_affine: np.ndarray  # template mm -> control grid index
    baseline: dt.date
    follow_up: bool
    flair: bool
    t1_description: str


_BRAIN_CENTRE = np.array([0.0, -17.0, 12.0])


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_subject(index: int, seed: int, warp_mm: float = 3.0) -> Subject:
    """Draw subject `index` of cohort `seed` (independent of every other subject and of the tracers chosen)."""
    rng = np.random.default_rng([seed, index, 0])
    group = GROUPS[index % 3]
    p_amyloid = {"CN": 0.3, "MCI": 0.55, "AD": 0.9}[group]
    amyloid = bool(rng.random() < p_amyloid)
    lo, hi = {("CN", False): (0, 1), ("MCI", False): (0, 2), ("AD", False): (1, 3),
              ("CN", True): (1, 3), ("MCI", True): (2, 4), ("AD", True): (4, 6)}[(group, amyloid)]
    braak = int(rng.integers(lo, hi + 1))
    atrophy = float(rng.uniform(*{"CN": (0.0, 0.03), "MCI": (0.03, 0.08), "AD": (0.08, 0.16)}[group]))
    age = float(rng.uniform(*{"CN": (62, 86), "MCI": (58, 88), "AD": (58, 90)}[group]))
    sex = "F" if rng.random() < 0.5 else "M"
    rotation = _rotation(np.deg2rad(rng.uniform(-8, 8, 3)))
    scale = rng.uniform(0.93, 1.07) * rng.uniform(0.97, 1.03, 3)
    centre = rng.uniform(-10, 10, 3)
    lo_mm, hi_mm = np.array([-110.0, -150.0, -90.0]), np.array([110.0, 115.0, 135.0])
    shape = np.ceil((hi_mm - lo_mm) / 40.0).astype(int) + 1
    warp = ndimage.gaussian_filter(rng.normal(0.0, warp_mm, (3, *shape)), (0, 0.6, 0.6, 0.6)) * 1.6
    warp_affine = np.eye(4)
    warp_affine[:3, :3] = np.diag(1.0 / 40.0 * np.ones(3))
    warp_affine[:3, 3] = -lo_mm / 40.0
    baseline = dt.date(2017, 9, 1) + dt.timedelta(days=int(rng.integers(0, 4 * 365)))
    t1_description = T1_DESCRIPTIONS[int(rng.integers(0, len(T1_DESCRIPTIONS)))]
    site = SITES[index % len(SITES)]
    return Subject(index=index, subject=f"{site:03d}_S_{6000 + index:04d}", group=group, sex=sex, age=age,
                   amyloid_positive=amyloid, braak_stage=braak, atrophy=atrophy, rotation=rotation, scale=scale,
                   centre=centre, warp=warp.astype(np.float32), warp_affine=warp_affine, baseline=baseline,
                   follow_up=index % 4 == 3, flair=index % 6 == 0, t1_description=t1_description)


def _grid_affine(shape: Sequence[int], zooms: Sequence[float], flips: Sequence[int], centre: np.ndarray) -> np.ndarray:
    """Axis-aligned affine whose voxel axes run along +-x, +-y, +-z (flips) and whose FOV centre is `centre`."""
    aff = np.eye(4)
    aff[:3, :3] = np.diag(np.asarray(zooms, dtype=float) * np.asarray(flips, dtype=float))
    aff[:3, 3] = centre - aff[:3, :3] @ ((np.asarray(shape, dtype=float) - 1) / 2)
    return aff


def _coarse_axes(shape: Sequence[int], step: int) -> list[np.ndarray]:
    """Index positions of a coarse grid spanning a full grid corner to corner (about every `step` voxels)."""
    return [np.linspace(0.0, n - 1.0, max(2, math.ceil((n - 1) / step) + 1)) for n in shape]


def _interp_matrix(n: int, m: int) -> np.ndarray:
    """(n, m) weights of corner-aligned linear interpolation from m samples to n."""
    pos = np.linspace(0.0, m - 1.0, n)
    lo = np.minimum(np.floor(pos).astype(int), m - 2)
    frac = pos - lo
    mat = np.zeros((n, m), dtype=np.float32)
    mat[np.arange(n), lo] = 1.0 - frac
    mat[np.arange(n), lo + 1] += frac
    return mat


def _upsample(coarse: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Trilinear corner-aligned upsampling of a smooth coarse field (a, b, c) to `shape` (float32), separably."""
    out = coarse.astype(np.float32)
    for axis, n in enumerate(shape):
        mat = _interp_matrix(int(n), out.shape[axis])
        out = np.moveaxis(np.tensordot(mat, out, axes=([1], [axis])), 0, axis)
    return np.ascontiguousarray(out)


def _template_coords(subj: Subject, tpl: Template, shape: Sequence[int], affine: np.ndarray,
                     step: int = 4) -> np.ndarray:
    """Template voxel coordinates (3, X, Y, Z) sampled by every voxel of a scanner-space grid.

    The mapping (pose, smooth warp, ventricular expansion) is evaluated on a coarse grid every `step`
    voxels and upsampled trilinearly: exact for the affine part, sub-0.1 mm for the smooth rest.
    """
    axes = _coarse_axes(shape, step)
    coarse_shape = tuple(len(a) for a in axes)
    idx = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ idx + affine[:3, 3:4]
    centre_w = subj.rotation @ (subj.scale * _BRAIN_CENTRE) + subj.centre
    inv = np.linalg.inv(subj.rotation @ np.diag(subj.scale))
    mm = inv @ (world - centre_w[:, None]) + _BRAIN_CENTRE[:, None]
    grid = subj.warp_affine[:3, :3] @ mm + subj.warp_affine[:3, 3:4]
    for axis in range(3):
        mm[axis] += ndimage.map_coordinates(subj.warp[axis].astype(np.float64), grid, order=3, mode="nearest")
    rel = mm - _VENTRICLES[:, None]
    mm -= (2.5 * subj.atrophy) * rel * np.exp(-(rel**2).sum(0) / (2 * 22.0**2))[None]
    inv_t = np.linalg.inv(tpl.affine)
    vox = (inv_t[:3, :3] @ mm + inv_t[:3, 3:4]).reshape((3, *coarse_shape))
    return np.stack([_upsample(vox[a], shape) for a in range(3)])


def _sample(volume: np.ndarray, coords: np.ndarray, order: int = 1) -> np.ndarray:
    """Sample a template map at coordinates (3, X, Y, Z) -> (X, Y, Z) (order 0 for label maps)."""
    return ndimage.map_coordinates(volume, coords, order=order, mode="constant", cval=0.0, prefilter=False)


def _atrophy_loss(subj: Subject, atw: np.ndarray) -> np.ndarray:
    return np.clip(3.0 * subj.atrophy * atw, 0.0, 0.8).astype(np.float32)


def _bias(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative bias field (X, Y, Z): exp of a random quadratic polynomial, about +-15%."""
    axes = [np.linspace(-1, 1, len(a)) for a in _coarse_axes(shape, 8)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    coef = rng.normal(0, 0.06, len(terms))
    return _upsample(np.exp(sum(c * t for c, t in zip(coef, terms))), shape)


def t1_anatomy(subj: Subject, spec: SizeSpec, affine: np.ndarray, flair: bool = False) -> dict[str, np.ndarray]:
    """Template T1 intensity, GM and atrophy weight (and CSF for FLAIR) sampled on a raw T1 grid."""
    tpl = template(spec.template_res)
    coords = _template_coords(subj, tpl, spec.t1_shape, affine)
    anat = {"t1": _sample(tpl.t1, coords), "gm": _sample(tpl.gm, coords), "atrophy": _sample(tpl.atrophy, coords)}
    if flair:
        anat["csf"] = _sample(tpl.csf, coords)
    return anat


def synth_t1(subj: Subject, anat: dict[str, np.ndarray], rng: np.random.Generator, flair: bool = False) -> np.ndarray:
    """T1-weighted volume (int16, 0..255) from sampled anatomy: atrophy, bias field, Rician noise."""
    gm = anat["gm"]
    t1 = anat["t1"] - gm * _atrophy_loss(subj, anat["atrophy"]) * 0.35
    if flair:
        t1 = np.clip(t1 - 0.55 * anat["csf"], 0, None) + 0.2 * gm
    shape = t1.shape
    t1 *= _bias(shape, rng) * np.float32(255.0 * rng.uniform(0.86, 0.98) / 0.9)
    sigma = rng.uniform(2.0, 5.0)
    noisy = np.sqrt((t1 + rng.normal(0, sigma, shape).astype(np.float32)) ** 2
                    + rng.normal(0, sigma, shape).astype(np.float32) ** 2)
    return np.clip(np.rint(noisy), 0, 255).astype(np.int16)


def suvr_params(subj: Subject, tracer: str, rng: np.random.Generator) -> tuple[dict[int, float], dict[int, float], float]:
    """Per-region grey-matter SUVR, white-matter SUVR per WM region, and CSF SUVR of one subject and tracer."""
    gm_names = ("cerebellum_gm", "pons", "medial_temporal", "inferior_temporal", "temporoparietal", "neocortex",
                "subcortical_gm")
    if tracer == "AV45":
        gm = dict.fromkeys(gm_names, 1.05) | {"cerebellum_gm": 0.9, "pons": 1.6, "subcortical_gm": 1.15}
        wm = {"cerebral_wm": rng.uniform(1.55, 1.8), "cerebellum_wm": 1.3}
        csf = 0.35
        if subj.amyloid_positive:
            load = rng.uniform(0.45, 0.7) + (0.25 if subj.group == "AD" else 0.0)
            for name, w in {"temporoparietal": 1.0, "neocortex": 0.85, "inferior_temporal": 0.7,
                            "medial_temporal": 0.25, "subcortical_gm": 0.5}.items():
                gm[name] += load * w * rng.uniform(0.9, 1.1)
    elif tracer == "AV1451":
        gm = dict.fromkeys(gm_names, 1.05) | {"cerebellum_gm": 1.0, "pons": 1.0, "subcortical_gm": 1.25}
        wm = {"cerebral_wm": rng.uniform(1.08, 1.16), "cerebellum_wm": 1.05}
        csf = 0.45
        s, k = subj.braak_stage, rng.uniform(0.9, 1.3)
        gm["medial_temporal"] += k * (0.25 * min(s, 2) + 0.15 * max(0, s - 2))
        gm["inferior_temporal"] += k * (0.25 * max(0, min(s, 4) - 2) + 0.1 * max(0, s - 4))
        gm["temporoparietal"] += k * 0.4 * max(0, s - 4)
        gm["neocortex"] += k * 0.3 * max(0, s - 4)
    elif tracer == "FDG":
        gm = dict.fromkeys(gm_names, 1.55) | {"cerebellum_gm": 1.35, "pons": 1.0, "subcortical_gm": 1.6,
                                              "medial_temporal": 1.15}
        wm = {"cerebral_wm": 0.8, "cerebellum_wm": 0.8}
        csf = 0.15
        h = {"CN": 0.0, "MCI": rng.uniform(0.03, 0.08), "AD": rng.uniform(0.18, 0.30)}[subj.group]
        for name, w in {"temporoparietal": 1.0, "medial_temporal": 0.7, "inferior_temporal": 0.6,
                        "neocortex": 0.25}.items():
            gm[name] *= 1.0 - w * h
    else:
        raise ValueError(f"tracer must be one of {TRACERS}, got {tracer!r}")
    return {LABEL[k]: float(v) for k, v in gm.items()}, {LABEL[k]: float(v) for k, v in wm.items()}, float(csf)


@dataclass(frozen=True)
class PetTruth:
    """Noise-free SUVR image (X, Y, Z) on the raw PET grid, its region labels and regional mean SUVR."""

    suvr: np.ndarray
    labels: np.ndarray
    regional: dict[str, float]


def pet_anatomy(subj: Subject, spec: SizeSpec, affine: np.ndarray) -> dict[str, np.ndarray]:
    """Tissue fractions (atrophy applied), shell and region labels sampled on a raw PET grid (shared by tracers)."""
    tpl = template(spec.template_res)
    coords = _template_coords(subj, tpl, spec.pet_shape, affine)
    gm, wm, csf = (_sample(m, coords) for m in (tpl.gm, tpl.wm, tpl.csf))
    loss = _atrophy_loss(subj, _sample(tpl.atrophy, coords))
    anat = {"gm": gm * (1.0 - loss), "wm": wm, "csf": csf + gm * loss,
            "skull": _sample(tpl.skull, coords), "scalp": _sample(tpl.scalp, coords)}
    for name in ("gm_region", "wm_region", "labels"):
        anat[name] = _sample(getattr(tpl, name), coords, order=0).astype(np.uint8)
    return anat


def synth_suvr(subj: Subject, tracer: str, anat: dict[str, np.ndarray], rng: np.random.Generator) -> PetTruth:
    """Noise-free, unblurred SUVR (reference region mean = 1) of one subject and tracer on its raw PET grid."""
    gm_val, wm_val, csf_val = suvr_params(subj, tracer, rng)
    g_lut = np.zeros(256, np.float32)
    w_lut = np.zeros(256, np.float32)
    for key, val in gm_val.items():
        g_lut[key] = val
    for key, val in wm_val.items():
        w_lut[key] = val
    labels = anat["labels"]
    suvr = (anat["gm"] * g_lut[anat["gm_region"]] + anat["wm"] * w_lut[anat["wm_region"]] + anat["csf"] * csf_val
            + 0.25 * anat["scalp"] + 0.05 * anat["skull"])
    ref = np.isin(labels, [LABEL[n] for n in REFERENCE[tracer]])
    if not ref.any():
        raise RuntimeError(f"phantom {subj.subject}: reference region of {tracer} outside the PET field of view")
    suvr = (suvr / float(suvr[ref].mean())).astype(np.float32)
    regional = {name: round(float(suvr[labels == key].mean()), 4) for key, name in REGIONS.items()
                if (labels == key).any()}
    return PetTruth(suvr=suvr, labels=labels, regional=regional)


def synth_frames(truth: PetTruth, tracer: str, spec: SizeSpec, rng: np.random.Generator) -> np.ndarray:
    """Raw multi-frame PET (X, Y, Z, F) float32: PSF blur, per-scan scanner scale, correlated noise per frame."""
    fwhm = rng.uniform(6.0, 8.0)
    sigma = [fwhm / 2.3548 / z for z in spec.pet_zooms]
    blurred = ndimage.gaussian_filter(truth.suvr, sigma)
    scale = rng.uniform(550.0, 950.0) / float(np.percentile(blurred, 99.99))
    signal = blurred * scale
    frames = FRAMES[tracer]
    drift = rng.uniform(-0.06, 0.06)
    sigma0 = rng.uniform(12.0, 20.0)
    out = np.empty((*spec.pet_shape, frames), dtype=np.float32)
    white = rng.standard_normal((frames, *spec.pet_shape), dtype=np.float32)
    for k in range(frames):
        noise = ndimage.gaussian_filter(white[k], 0.8)
        noise /= max(float(noise.std()), 1e-6)
        level = signal * (1.0 + drift * (k - (frames - 1) / 2) / frames)
        out[..., k] = level + noise * (sigma0 + 0.05 * level)
    return out


def _atomic_save(img: nib.Nifti1Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name[: -len(suffix)]}{suffix}")
    nib.save(img, str(tmp))
    os.replace(tmp, path)


def _nifti(data: np.ndarray, affine: np.ndarray, dtype: type, descrip: str, frame_s: float | None = None) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    if frame_s is not None and data.ndim == 4:
        img.header.set_zooms((*img.header.get_zooms()[:3], frame_s))
    img.header["descrip"] = descrip.encode()[:79]
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def _acq_date(d: dt.date) -> str:
    """ADNI's M/D/YYYY (no leading zeros)."""
    return f"{d.month}/{d.day}/{d.year}"


@dataclass(frozen=True)
class Scan:
    """One scan as written: its CSV row values and where its files went."""

    image_id: str
    modality: str
    description: str
    kind: str
    visit: str
    date: dt.date
    files: tuple[str, ...]


def _scan_dir(root: Path, subj: Subject, description: str, when: dt.datetime, image_id: str) -> Path:
    folder = description.replace(" ", "_").replace("/", "_")
    stamp = f"{when:%Y-%m-%d_%H_%M_%S}.0"
    return root / "ADNI" / subj.subject / folder / stamp / image_id


def _file_name(subj: Subject, modality: str, description: str, when: dt.datetime, series: int, image_id: str,
               suffix: str) -> str:
    folder = description.replace(" ", "_").replace("/", "_")
    mod = "MR" if modality == "MRI" else "PT"
    return f"ADNI_{subj.subject}_{mod}_{folder}_br_raw_{when:%Y%m%d%H%M%S}{when.microsecond // 1000:03d}_1_S{series}_{image_id}{suffix}"


PET_SPACES = ("t1", "adni-standard")
# ADNI's "Coreg, Avg, Std Img and Vox Siz" grid (160 x 160 x 96, 1.5 mm) at paper size; smaller phantom sizes keep
# its field of view (240 x 240 x 144 mm) with coarser voxels.
STANDARD_GRIDS = {"tiny": ((48, 48, 29), (5.0, 5.0, 5.0)), "demo": ((80, 80, 48), (3.0, 3.0, 3.0)),
                  "paper": ((160, 160, 96), (1.5, 1.5, 1.5))}
MAX_MOTION_DEG, MAX_MOTION_MM = 10.0, 15.0


def standard_motion(subj: Subject, seed: int, tracer_index: int, brain_world: np.ndarray) -> np.ndarray:
    """(4, 4) true pose of a standard-grid PET: header world (AC-PC-like, brain centre at _BRAIN_CENTRE) -> subject world.

    The subject's head pose is undone, then a random rigid motion (rotations up to MAX_MOTION_DEG about each
    axis, translation up to MAX_MOTION_MM along each) is applied about the brain centre.
    """
    rng = np.random.default_rng([seed, subj.index, 40 + tracer_index])
    rot = _rotation(np.deg2rad(rng.uniform(-MAX_MOTION_DEG, MAX_MOTION_DEG, 3)))
    shift = rng.uniform(-MAX_MOTION_MM, MAX_MOTION_MM, 3)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = brain_world + shift - rot @ _BRAIN_CENTRE
    return out


def standard_affine(size: str) -> np.ndarray:
    """Header affine of the phantom's ADNI standard PET grid (LAS voxel axes, centred on the brain centre)."""
    shape, zooms = STANDARD_GRIDS[size]
    return _grid_affine(shape, zooms, (-1, 1, 1), _BRAIN_CENTRE)


FORMATS = ("nifti", "dicom")
# Planted in every phantom DICOM header: a test checks that none of them reaches shards, outputs or logs.
DICOM_IDENTITY = {"PatientName": "Planted^Secret^Name", "PatientID": "PLANTED-PID-7731",
                  "PatientBirthDate": "19391231", "OtherPatientIDs": "PLANTED-OTHER-4410",
                  "InstitutionName": "Planted Institution Text"}


def _to_dicom(root: Path, scan: Scan) -> Scan:
    """Rewrite one written scan (its NIfTI files) as a DICOM series in the same folder, one file per slice."""
    paths = [root / f for f in scan.files]
    folder = paths[0].parent
    imgs = [nib.load(str(p)) for p in paths]
    stored, slopes, inters = [], [], []
    for img in imgs:
        raw = np.asarray(img.dataobj.get_unscaled())
        raw = raw[..., None] if raw.ndim == 3 else raw
        for k in range(raw.shape[3]):
            stored.append(raw[..., k])
            slope, inter = img.dataobj.slope, img.dataobj.inter
            slopes.append(1.0 if slope is None or not np.isfinite(slope) else float(slope))
            inters.append(0.0 if inter is None or not np.isfinite(inter) else float(inter))
    data = np.stack(stored, axis=3)
    modality = "MR" if scan.modality == "MRI" else "PT"
    frame_ms = [300_000.0 * k for k in range(data.shape[3])] if modality == "PT" else None
    from ganbert.data import dicom

    dicom.write_series(folder, paths[0].name.split(".")[0][:60], data if modality == "PT" else data[..., 0],
                       imgs[0].affine, modality, slopes if modality == "PT" else slopes[0],
                       inters if modality == "PT" else inters[0], frame_ms, DICOM_IDENTITY)
    for p in paths:
        p.unlink()
    return dataclasses.replace(scan, files=(folder.relative_to(root).as_posix(),))


def write_subject(root: Path, subj: Subject, tracers: Sequence[str], size: str, seed: int,
                  pet_space: str = "t1", fmt: str = "nifti") -> tuple[list[Scan], dict[str, Any]]:
    """Write every scan of one subject under root/ADNI and its region map under root/truth; return rows and truth.

    pet_space "t1": each PET shares the T1's world coordinates. "adni-standard": each PET is written on the
    standard grid (STANDARD_GRIDS) under its own random rigid motion; its true pose goes to the truth record.
    """
    if pet_space not in PET_SPACES:
        raise ValueError(f"pet_space must be one of {PET_SPACES}, got {pet_space!r}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    spec = SIZES[size]
    scans: list[Scan] = []
    base_rng = np.random.default_rng([seed, subj.index, 100])
    t1_centre = subj.rotation @ (subj.scale * _BRAIN_CENTRE) + subj.centre + base_rng.uniform(-5, 5, 3)
    t1_aff = _grid_affine(spec.t1_shape, spec.t1_zooms, (-1, -1, 1), t1_centre)  # LPS voxel axes
    pet_centre = t1_centre + base_rng.uniform(-4, 4, 3)
    pet_aff = _grid_affine(spec.pet_shape, spec.pet_zooms, (-1, 1, 1), pet_centre)  # LAS voxel axes
    image_base = 1_000_000 + 100 * subj.index
    series_base = 500_000 + 100 * subj.index

    def when(day: dt.date, rng: np.random.Generator) -> dt.datetime:
        return dt.datetime.combine(day, dt.time(int(rng.integers(8, 17)), int(rng.integers(0, 60)),
                                                int(rng.integers(0, 60)), int(rng.integers(0, 1000)) * 1000))

    mri_list = [("T1", subj.t1_description, "bl", subj.baseline, 0)]
    if subj.follow_up:
        mri_list.append(("T1", subj.t1_description, "y1", subj.baseline + dt.timedelta(days=365), 1))
    if subj.flair:
        mri_list.append(("FLAIR", FLAIR_DESCRIPTION, "bl", subj.baseline, 2))
    t1_anat = t1_anatomy(subj, spec, t1_aff, flair=subj.flair)
    for kind, desc, visit, day, k in mri_list:
        rng = np.random.default_rng([seed, subj.index, 10 + k])
        stamp = when(day, rng)
        image_id = f"I{image_base + k}"
        data = synth_t1(subj, t1_anat, rng, flair=kind == "FLAIR")
        name = _file_name(subj, "MRI", desc, stamp, series_base + k, image_id, ".nii")
        path = _scan_dir(root, subj, desc, stamp, image_id) / name
        _atomic_save(_nifti(data, t1_aff, np.int16, f"{HEADER_TEXT} {subj.subject}"), path)
        scans.append(Scan(image_id, "MRI", desc, kind, visit, day, (path.relative_to(root).as_posix(),)))
    del t1_anat
    brain_world = subj.rotation @ (subj.scale * _BRAIN_CENTRE) + subj.centre
    pet_spec, header_aff = spec, pet_aff
    if pet_space == "adni-standard":
        shape, zooms = STANDARD_GRIDS[size]
        pet_spec = dataclasses.replace(spec, pet_shape=shape, pet_zooms=zooms)
        header_aff = standard_affine(size)
    else:
        pet_anat = pet_anatomy(subj, spec, pet_aff)
    truth_rows: dict[str, Any] = {}
    labels_written = False
    for tracer in tracers:
        t_index = TRACERS.index(tracer)
        rng = np.random.default_rng([seed, subj.index, 20 + t_index])
        offset = {"AV45": (-45, 45), "AV1451": (0, 90), "FDG": (-30, 60)}[tracer]
        days = int(rng.integers(offset[0], offset[1] + 1))
        if subj.follow_up and tracer == "AV1451":
            days = int(rng.integers(300, 360))  # nearer the follow-up T1
        day = subj.baseline + dt.timedelta(days=days)
        stamp = when(day, rng)
        image_id = f"I{image_base + 10 + t_index}"
        desc = PET_DESCRIPTIONS[tracer]
        motion = None
        if pet_space == "adni-standard":
            motion = standard_motion(subj, seed, t_index, brain_world)
            pet_aff = motion @ header_aff  # where the voxels really are (subject world)
            pet_anat = pet_anatomy(subj, pet_spec, pet_aff)
        truth = synth_suvr(subj, tracer, pet_anat, rng)
        frames = synth_frames(truth, tracer, pet_spec, rng)
        folder = _scan_dir(root, subj, desc, stamp, image_id)
        descrip = f"{HEADER_TEXT} {subj.subject}"
        files: list[str] = []
        if tracer == "AV1451":  # one 3D file per frame, as some converters write dynamic series
            for k in range(frames.shape[3]):
                name = _file_name(subj, "PET", desc, stamp, series_base + 10 + t_index, image_id, f"_{k + 1:02d}.nii.gz")
                _atomic_save(_nifti(frames[..., k], header_aff, np.int16, descrip), folder / name)
                files.append((folder / name).relative_to(root).as_posix())
        else:
            name = _file_name(subj, "PET", desc, stamp, series_base + 10 + t_index, image_id, ".nii.gz")
            _atomic_save(_nifti(frames, header_aff, np.int16, descrip, frame_s=300.0), folder / name)
            files.append((folder / name).relative_to(root).as_posix())
        scans.append(Scan(image_id, "PET", desc, tracer, "init", day, tuple(files)))
        if not labels_written:
            _atomic_save(_nifti(truth.labels, pet_aff, np.uint8, "regions"), root / "truth" / f"{subj.subject}_regions.nii.gz")
            labels_written = True
        truth_rows[tracer] = {"image_id": image_id, "reference": list(REFERENCE[tracer]), "suvr": truth.regional,
                              "frames": int(frames.shape[3]), "raw_min": round(float(frames.min()), 2),
                              "raw_max": round(float(frames.max()), 2), "pet_space": pet_space}
        if motion is not None:  # T1 world -> PET header world, what PET-to-T1 registration must recover
            truth_rows[tracer]["t1_to_pet_header"] = np.linalg.inv(motion).reshape(-1).round(9).tolist()
    record = {"group": subj.group, "sex": subj.sex, "age": round(subj.age, 1),
              "amyloid_positive": subj.amyloid_positive, "braak_stage": subj.braak_stage,
              "braak_regions": sorted({BRAAK_REGIONS[s] for s in range(1, subj.braak_stage + 1)}),
              "atrophy": round(subj.atrophy, 4),
              "regions_file": f"truth/{subj.subject}_regions.nii.gz" if labels_written else None,
              "tracers": truth_rows,
              "scans": [s.image_id for s in scans]}
    if fmt == "dicom":
        scans = [_to_dicom(root, scan) for scan in scans]
    return scans, record


def _subject_job(args: tuple[str, int, tuple[str, ...], str, int, str, str]) -> tuple[list[Scan], dict[str, Any]]:
    """Process-pool entry: write subject `index` of cohort `seed` under `out`."""
    out, index, tracers, size, seed, pet_space, fmt = args
    return write_subject(Path(out), make_subject(index, seed), tracers, size, seed, pet_space, fmt)


def write_cohort(out: Path, subjects: int, tracers: Sequence[str], size: str, seed: int,
                 workers: int | None = None, pet_space: str = "t1", fmt: str = "nifti") -> Path:
    """Write `subjects` phantom subjects (groups CN/MCI/AD in turn) as an ADNI download under `out`; return `out`.

    Layout: out/ADNI/<subject>/<description>/<YYYY-MM-DD_HH_MM_SS.0>/<image id>/*.nii(.gz), the collection
    CSV out/PHANTOM_<size>_<seed>_<download date>.csv with ADNI's columns, out/ground_truth.json and
    out/truth/<subject>_regions.nii.gz. The same (seed, subject index) always gives the same subject, whichever
    tracers are written and however many `workers` processes write (default: one for tiny, else one per CPU).
    """
    if subjects < 1:
        raise ValueError(f"subjects must be >= 1, got {subjects}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    tracers = list(dict.fromkeys(tracers))
    bad = [t for t in tracers if t not in TRACERS]
    if bad or not tracers:
        raise ValueError(f"tracers must be a non-empty subset of {TRACERS}, got {list(tracers)}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if pet_space not in PET_SPACES:
        raise ValueError(f"pet_space must be one of {PET_SPACES}, got {pet_space!r}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if workers is None:
        workers = 1 if size == "tiny" else min(subjects, os.cpu_count() or 1)
    jobs = [(str(out), index, tuple(tracers), size, seed, pet_space, fmt) for index in range(subjects)]
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: safe even when this process already runs Ray or other threads
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_subject_job, jobs))
    else:
        results = [_subject_job(job) for job in jobs]
    rows: list[list[str]] = []
    truth: dict[str, Any] = {}
    for index, (scans, record) in enumerate(results):
        subj = make_subject(index, seed)
        truth[subj.subject] = record
        for scan in scans:
            age = subj.age + (scan.date - subj.baseline).days / 365.25
            rows.append([scan.image_id, subj.subject, subj.group, subj.sex, f"{age:.0f}", scan.visit, scan.modality,
                         scan.description, "Original" if scan.modality == "MRI" else "Pre-processed",
                         _acq_date(scan.date), "DCM" if fmt == "dicom" else "NiFTI", _acq_date(DOWNLOADED)])
    csv_path = out / f"PHANTOM_{size}_{seed}_{DOWNLOADED.month}_{DOWNLOADED.day:02d}_{DOWNLOADED.year}.csv"
    write_csv(csv_path, COLUMNS, rows, quoting=csv.QUOTE_ALL)
    meta = {"generator": "ganbert.data.phantom", "size": size, "seed": seed, "subjects": subjects, "pet_space": pet_space, "format": fmt,
            "tracers": tracers, "regions": {str(k): v for k, v in REGIONS.items()},
            "reference_regions": {t: list(REFERENCE[t]) for t in tracers},
            "units": "regional SUVR: mean of the noise-free, unblurred SUVR image in each region of the PET grid",
            "subjects_truth": truth}
    write_text(out / "ground_truth.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return out


def main(args: argparse.Namespace) -> int:
    """CLI: `ganbert phantom --out DIR --subjects N --tracers AV45,AV1451,FDG --size tiny --seed S`."""
    tracers = [t.strip() for t in str(args.tracers).split(",") if t.strip()]
    out = write_cohort(Path(args.out), int(args.subjects), tracers, str(args.size), int(args.seed),
                       pet_space=str(getattr(args, "pet_space", "t1")), fmt=str(getattr(args, "format", "nifti")))
    print(f"phantom cohort: {args.subjects} subjects, tracers {','.join(tracers)}, size {args.size}, "
          f"seed {args.seed} -> {out}")
    return 0
