"""Phantom anatomy: the MNI152 template and its regions, one subject's draw and warp, and its synthetic T1."""

from __future__ import annotations

import datetime as dt
import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ganbert.common import cache
from ganbert.ingest.phantom.site import SITES, Site

GROUPS = ("CN", "MCI", "AD")
T1_DESCRIPTIONS = ("Accelerated Sagittal MPRAGE", "Sagittal 3D Accelerated MPRAGE", "MPRAGE")
SITES_CODES = (2, 3, 6, 11, 13, 18, 22, 23, 27, 31, 32, 33, 35, 36, 37, 41, 53, 67, 70, 73, 82, 94, 98, 99, 100,
         109, 114, 116, 123, 126, 127, 128, 129, 130, 131, 135, 136, 137, 141, 153, 168, 177, 301, 305, 941)

# Region labels of the ground truth (template space, then warped with each subject).
REGIONS = {1: "cerebellum_gm", 2: "cerebellum_wm", 3: "pons", 4: "medial_temporal", 5: "inferior_temporal",
           6: "temporoparietal", 7: "neocortex", 8: "cerebral_wm", 9: "csf", 10: "subcortical_gm"}
LABEL = {name: key for key, name in REGIONS.items()}


# Ellipsoids in MNI mm: (centre, radii); "+-x" ones are mirrored across the midline.
_ELLIPSOIDS: dict[str, list[tuple[tuple[float, float, float], tuple[float, float, float]]]] = {
    "cerebellum": [((24, -62, -38), (24, 26, 20)), ((-24, -62, -38), (24, 26, 20))],
    "pons": [((0, -26, -32), (10, 12, 12))],
    "medial_temporal": [((25, -20, -16), (9, 17, 9)), ((-25, -20, -16), (9, 17, 9))],
    "inferior_temporal": [((46, -24, -24), (16, 32, 13)), ((-46, -24, -24), (16, 32, 13))],
    "temporoparietal": [((45, -58, 32), (17, 22, 18)), ((-45, -58, 32), (17, 22, 18)), ((0, -56, 32), (12, 20, 16))],
    "subcortical_gm": [((15, -8, 4), (13, 18, 12)), ((-15, -8, 4), (13, 18, 12))],
}
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
    """The nilearn MNI152 maps at 1 or 2 mm and their tissue, shell and region maps: made once (seconds, with
    nilearn's import) and kept in the cache (`common.cache`), then read back, once per process."""
    if res not in (1, 2):
        raise ValueError(f"res must be 1 or 2 mm, got {res}")
    return Template(**cache.arrays("templates", lambda: vars(_make_template(res)), [__file__], what="anatomy",
                                   res=res))


def _make_template(res: int) -> Template:
    from nilearn import datasets  # heavy import, only when the maps are made

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
    site: Site = SITES["A"]


BRAIN_CENTRE = np.array([0.0, -17.0, 12.0])


def rotation_matrix(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_subject(index: int, seed: int, site: Site = SITES["A"]) -> Subject:
    """Draw subject `index` of cohort `seed` at `site` (independent of every other subject and of the tracers)."""
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
    rotation = rotation_matrix(np.deg2rad(rng.uniform(-8, 8, 3)))
    scale = rng.uniform(*site.head_scale) * rng.uniform(0.97, 1.03, 3)
    centre = rng.uniform(-10, 10, 3)
    lo_mm, hi_mm = np.array([-110.0, -150.0, -90.0]), np.array([110.0, 115.0, 135.0])
    shape = np.ceil((hi_mm - lo_mm) / 40.0).astype(int) + 1
    warp = ndimage.gaussian_filter(rng.normal(0.0, site.warp_mm, (3, *shape)), (0, 0.6, 0.6, 0.6)) * 1.6
    warp_affine = np.eye(4)
    warp_affine[:3, :3] = np.diag(1.0 / 40.0 * np.ones(3))
    warp_affine[:3, 3] = -lo_mm / 40.0
    baseline = dt.date(2017, 9, 1) + dt.timedelta(days=int(rng.integers(0, 4 * 365)))
    t1_description = T1_DESCRIPTIONS[int(rng.integers(0, len(T1_DESCRIPTIONS)))]
    code = SITES_CODES[index % len(SITES_CODES)]
    return Subject(index=index, subject=f"{code:03d}_S_{site.subject_base + index:04d}", group=group, sex=sex, age=age,
                   amyloid_positive=amyloid, braak_stage=braak, atrophy=atrophy, rotation=rotation, scale=scale,
                   centre=centre, warp=warp.astype(np.float32), warp_affine=warp_affine, baseline=baseline,
                   follow_up=index % 4 == 3, flair=index % 6 == 0, t1_description=t1_description, site=site)


def grid_affine(shape: Sequence[int], zooms: Sequence[float], flips: Sequence[int], centre: np.ndarray) -> np.ndarray:
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


def template_coords(subj: Subject, tpl: Template, shape: Sequence[int], affine: np.ndarray,
                     step: int = 4) -> np.ndarray:
    """Template voxel coordinates (3, X, Y, Z) sampled by every voxel of a scanner-space grid.

    The mapping (pose, smooth warp, ventricular expansion) is evaluated on a coarse grid every `step`
    voxels and upsampled trilinearly: exact for the affine part, sub-0.1 mm for the smooth rest.
    """
    axes = _coarse_axes(shape, step)
    coarse_shape = tuple(len(a) for a in axes)
    idx = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ idx + affine[:3, 3:4]
    centre_w = subj.rotation @ (subj.scale * BRAIN_CENTRE) + subj.centre
    inv = np.linalg.inv(subj.rotation @ np.diag(subj.scale))
    mm = inv @ (world - centre_w[:, None]) + BRAIN_CENTRE[:, None]
    grid = subj.warp_affine[:3, :3] @ mm + subj.warp_affine[:3, 3:4]
    for axis in range(3):
        mm[axis] += ndimage.map_coordinates(subj.warp[axis].astype(np.float64), grid, order=3, mode="nearest")
    rel = mm - _VENTRICLES[:, None]
    mm -= (2.5 * subj.atrophy) * rel * np.exp(-(rel**2).sum(0) / (2 * 22.0**2))[None]
    inv_t = np.linalg.inv(tpl.affine)
    vox = (inv_t[:3, :3] @ mm + inv_t[:3, 3:4]).reshape((3, *coarse_shape))
    return np.stack([_upsample(vox[a], shape) for a in range(3)])


def sample_at(volume: np.ndarray, coords: np.ndarray, order: int = 1) -> np.ndarray:
    """Sample a template map at coordinates (3, X, Y, Z) -> (X, Y, Z) (order 0 for label maps)."""
    return ndimage.map_coordinates(volume, coords, order=order, mode="constant", cval=0.0, prefilter=False)


def atrophy_loss(subj: Subject, atw: np.ndarray) -> np.ndarray:
    return np.clip(3.0 * subj.atrophy * atw, 0.0, 0.8).astype(np.float32)


def _bias(shape: Sequence[int], rng: np.random.Generator, sd: float = 0.06) -> np.ndarray:
    """Smooth multiplicative bias field (X, Y, Z): exp of a random quadratic polynomial (about +-15% at sd 0.06)."""
    axes = [np.linspace(-1, 1, len(a)) for a in _coarse_axes(shape, 8)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    coef = rng.normal(0, sd, len(terms))
    return _upsample(np.exp(sum(c * t for c, t in zip(coef, terms))), shape)


def t1_anatomy(subj: Subject, spec: SizeSpec, affine: np.ndarray, flair: bool = False) -> dict[str, np.ndarray]:
    """Template T1 intensity, GM and atrophy weight (and CSF for FLAIR) sampled on a raw T1 grid."""
    tpl = template(spec.template_res)
    coords = template_coords(subj, tpl, spec.t1_shape, affine)
    anat = {"t1": sample_at(tpl.t1, coords), "gm": sample_at(tpl.gm, coords), "atrophy": sample_at(tpl.atrophy, coords)}
    if flair:
        anat["csf"] = sample_at(tpl.csf, coords)
    return anat


def synth_t1(subj: Subject, anat: dict[str, np.ndarray], rng: np.random.Generator, flair: bool = False) -> np.ndarray:
    """T1-weighted volume (int16, 0..255) from sampled anatomy: atrophy, bias field, Rician noise."""
    gm = anat["gm"]
    t1 = anat["t1"] - gm * atrophy_loss(subj, anat["atrophy"]) * 0.35
    if flair:
        t1 = np.clip(t1 - 0.55 * anat["csf"], 0, None) + 0.2 * gm
    shape = t1.shape
    t1 *= _bias(shape, rng, subj.site.t1_bias) * np.float32(255.0 * rng.uniform(*subj.site.t1_gain) / 0.9)
    sigma = rng.uniform(*subj.site.t1_noise)
    noisy = np.sqrt((t1 + rng.normal(0, sigma, shape).astype(np.float32)) ** 2
                    + rng.normal(0, sigma, shape).astype(np.float32) ** 2)
    return np.clip(np.rint(noisy), 0, 255).astype(np.int16)
