"""Input quality control of a T1: header checks, then the MNI152 head template registered to it and scored.

What is checked, in this order (every failure is named; thresholds in `Thresholds`, chosen in `qc_bench`):
- dimensions: one 3D volume.
- voxel size: every voxel edge within `voxel_mm` (a 3D T1 has 0.5-1.5 mm; the tiny phantom 4.4 mm).
- field of view: every axis's extent within `fov_mm` (a slab, a 2D slice or a whole body is not a head T1).
- registration: the shipped MNI152 head template (`data.brainmask.template`: the nilearn template given a dark
  skull and bright scalp) registered affinely to the T1 by Mattes mutual information (`data.brainmask.fit`, the
  registration preprocessing already runs for the brain mask); it must converge.
- brain coverage: the fraction of the template brain inside the T1's field of view after registration.
- similarity: Pearson correlation of the T1 (resampled into template space) with the template head, over the
  brain and the 16 mm around it (skull and scalp): a T1 of a head correlates, noise, CT or an inverted image not.
- contrast: medians of the T1 in the template's white matter, grey matter and CSF: GM / WM within
  `min_gm_wm`..`max_gm_wm` and CSF / GM at most `max_csf_gm` (white brighter than grey brighter than CSF: T1
  weighting; FLAIR, T2, CT and FDG PET fail, and so does a tissue probability map with black grey matter).
- scalp: median in the template's scalp band over WM at least `min_scalp_wm` (scalp fat is bright on a T1; a
  skull-stripped T1, a PET or a CT has none).
Scores are robust medians and correlations on the 2 mm template grid; no header text is read.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from ganbert.prep import brainmask
from ganbert.prep.registration import Registration

HEAD_MARGIN_MM = 16.0  # the similarity region: the template brain and this far around it (skull and scalp)
MIN_VOXELS = 1000  # fewer template voxels inside the field of view than this: a score is undefined


@dataclass(frozen=True)
class Thresholds:
    """Pass limits of each check (`qc_bench` prints the evidence they were chosen on)."""

    voxel_mm: tuple[float, float] = (0.2, 6.0)
    fov_mm: tuple[float, float] = (120.0, 400.0)
    min_coverage: float = 0.9
    min_similarity: float = 0.5
    min_gm_wm: float = 0.4
    max_gm_wm: float = 0.85
    max_csf_gm: float = 0.95
    min_scalp_wm: float = 0.3


THRESHOLDS = Thresholds()
CHECKS = ("dimensions", "voxel size", "field of view", "registration", "brain coverage", "similarity", "contrast",
          "scalp")


@dataclass(frozen=True)
class Report:
    """The verdict on one T1: `failures` holds one "check: detail" line per failed check (empty when passed)."""

    scores: dict[str, Any]
    failures: tuple[str, ...]
    registration: Registration | None = None
    thresholds: Thresholds = field(default=THRESHOLDS)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def failed_checks(self) -> tuple[str, ...]:
        return tuple(f.split(":", 1)[0] for f in self.failures)

    def reason(self) -> str:
        """One line naming every failed check with its score and limit."""
        return "T1 quality control failed: " + "; ".join(self.failures)

    def record(self, enforced: bool = True) -> dict[str, Any]:
        """JSON-ready: passed, failed checks, failures, scores, thresholds, the template registration record.

        `enforced` false (`--skip-qc`) says a failure did not reject the input. No wall time (reruns write alike).
        """
        return {"passed": self.passed, "enforced": bool(enforced), "failed_checks": list(self.failed_checks),
                "failures": list(self.failures), "scores": _json(self.scores),
                "thresholds": _json(asdict(self.thresholds)),
                "template_registration": self.registration.record() if self.registration is not None else None}


def _json(value: Any) -> Any:
    """Floats rounded to 4 decimals, NaN/inf as None, tuples as lists."""
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return round(float(value), 4) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


@dataclass(frozen=True)
class TemplateRegions:
    """Masks on the template grid (X, Y, Z) bool: brain, white matter, grey matter, CSF, scalp, similarity region."""

    head: np.ndarray
    affine: np.ndarray
    brain: np.ndarray
    wm: np.ndarray
    gm: np.ndarray
    csf: np.ndarray
    scalp: np.ndarray
    region: np.ndarray


@functools.lru_cache(maxsize=1)
def template_regions() -> TemplateRegions:
    """The registered template (brainmask.template) and its tissue masks (phantom anatomy's maps, same grid), once."""
    from ganbert.ingest.phantom.anatomy import template as anatomy_template

    head, mask, affine = brainmask.template()
    tissue = anatomy_template(brainmask.TEMPLATE_RES_MM)
    if tissue.t1.shape != head.shape or not np.allclose(tissue.affine, affine):
        raise RuntimeError("the phantom template and the brain-mask template are not on one grid")
    brain = mask > 0.5
    dist = ndimage.distance_transform_edt(~brain) * brainmask.TEMPLATE_RES_MM
    return TemplateRegions(head=head, affine=affine, brain=brain, wm=brain & (tissue.wm > 0.9),
                           gm=brain & (tissue.gm > 0.7), csf=brain & (tissue.csf > 0.8), scalp=tissue.scalp > 0.9,
                           region=dist <= HEAD_MARGIN_MM)


def header_scores(shape: tuple[int, ...], affine: np.ndarray) -> dict[str, Any]:
    """Voxel size (mm per voxel axis) and field of view (mm per voxel axis) from the affine and the shape."""
    zooms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return {"shape": [int(v) for v in shape], "voxel_mm": [float(v) for v in zooms],
            "fov_mm": [float(z * n) for z, n in zip(zooms, shape[:3])]}


def _header_failures(scores: dict[str, Any], limits: Thresholds) -> list[str]:
    out = []
    shape = scores["shape"]
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        out.append(f"dimensions: shape {tuple(shape)} (expected one 3D volume)")
        return out
    lo, hi = limits.voxel_mm
    bad = [v for v in scores["voxel_mm"] if not lo <= v <= hi]
    if bad:
        out.append(f"voxel size: {bad[0]:.3g} mm outside {lo:g}-{hi:g} mm (voxel sizes {_mm(scores['voxel_mm'])})")
    lo, hi = limits.fov_mm
    fov = scores["fov_mm"]
    if min(fov) < lo:
        out.append(f"field of view: {min(fov):.0f} mm along voxel axis {int(np.argmin(fov))} < {lo:g} mm "
                   f"(field of view {_mm(fov)}: a slab, a 2D image or a cropped head)")
    elif max(fov) > hi:
        out.append(f"field of view: {max(fov):.0f} mm along voxel axis {int(np.argmax(fov))} > {hi:g} mm "
                   f"(field of view {_mm(fov)}: not a head image, or a wrong voxel size in the header)")
    return out


def _mm(values: list[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in values) + " mm"


def in_template_space(data: np.ndarray, affine: np.ndarray, fit: Registration) -> np.ndarray:
    """The T1 resampled (linear) onto the template grid through the registration; NaN outside its field of view."""
    tpl = template_regions()
    mapping = np.linalg.inv(np.asarray(affine, np.float64)) @ np.linalg.inv(fit.matrix) @ tpl.affine
    return ndimage.affine_transform(np.asarray(data, dtype=np.float32), mapping[:3, :3], offset=mapping[:3, 3],
                                    output_shape=tpl.head.shape, output=np.float32, order=1, mode="constant",
                                    cval=np.nan)


def image_scores(warped: np.ndarray) -> dict[str, float]:
    """Coverage, similarity and tissue ratios of a T1 on the template grid (`in_template_space`)."""
    tpl = template_regions()
    inside = np.isfinite(warped)
    region = tpl.region & inside
    similarity = float("nan")
    if int(region.sum()) >= MIN_VOXELS:
        a, b = warped[region].astype(np.float64), tpl.head[region].astype(np.float64)
        if a.std() > 0:
            similarity = float(np.corrcoef(a, b)[0, 1])

    def median(mask: np.ndarray) -> float:
        sel = mask & inside
        return float(np.median(warped[sel])) if sel.any() else float("nan")

    wm, gm, csf, scalp = (median(m) for m in (tpl.wm, tpl.gm, tpl.csf, tpl.scalp))

    def ratio(a: float, b: float) -> float:
        return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else float("nan")

    return {"brain_coverage": float(inside[tpl.brain].mean()), "similarity": similarity,
            "gm_wm": ratio(gm, wm), "csf_gm": ratio(csf, gm), "scalp_wm": ratio(scalp, wm),
            "median_wm": wm, "median_gm": gm, "median_csf": csf, "median_scalp": scalp}


def _image_failures(s: dict[str, float], limits: Thresholds) -> list[str]:
    out = []
    if not s["brain_coverage"] >= limits.min_coverage:
        out.append(f"brain coverage: {s['brain_coverage']:.0%} of the template brain inside the field of view "
                   f"(< {limits.min_coverage:.0%}; cropped?)")
    if not s["similarity"] >= limits.min_similarity:
        out.append(f"similarity: correlation {s['similarity']:.2f} with the MNI152 head template after registration "
                   f"(< {limits.min_similarity:g}; not a T1 of a head?)")
    bad = []
    if not s["gm_wm"] <= limits.max_gm_wm:
        bad.append(f"GM/WM {s['gm_wm']:.2f} > {limits.max_gm_wm:g} (white matter not brighter than grey matter)")
    elif not s["gm_wm"] >= limits.min_gm_wm:
        bad.append(f"GM/WM {s['gm_wm']:.2f} < {limits.min_gm_wm:g} (grey matter nearly black: a tissue map?)")
    if not s["csf_gm"] <= limits.max_csf_gm:
        bad.append(f"CSF/GM {s['csf_gm']:.2f} > {limits.max_csf_gm:g} (CSF not darker than grey matter)")
    if bad:
        out.append("contrast: " + ", ".join(bad) + " (not T1-weighted: FLAIR, T2, CT or PET?)")
    if not s["scalp_wm"] >= limits.min_scalp_wm:
        out.append(f"scalp: scalp/WM {s['scalp_wm']:.2f} < {limits.min_scalp_wm:g} (no bright scalp fat: "
                   "skull-stripped, or a PET or CT rather than a T1)")
    return out


def assess(data: np.ndarray, affine: np.ndarray, *, fit: Registration | None = None,
           thresholds: Thresholds = THRESHOLDS, threads: int = 1) -> Report:
    """Score a T1 (X, Y, Z) with its (4, 4) affine; returns the Report (never raises for a bad image).

    `fit`: a template registration already made for this T1 (preprocessing's brain mask), else it is made here
    (`brainmask.fit`: once per T1 content, then reused). Header checks come first; when they fail, nothing is
    registered.
    """
    scores = header_scores(tuple(np.shape(data)), affine)
    failures = _header_failures(scores, thresholds)
    if failures:
        return Report(scores, tuple(failures), None, thresholds)
    volume = np.asarray(data, dtype=np.float32).reshape(np.shape(data)[:3])
    if fit is None:
        try:
            fit = brainmask.fit(volume, np.asarray(affine, np.float64), threads=threads)
        except ValueError as err:  # RegistrationError, or an affine ITK cannot take (shear)
            return Report(scores, (f"registration: {' '.join(str(err).split())[:200]}",), None, thresholds)
    scores.update(image_scores(in_template_space(volume, affine, fit)))
    scores.update({"mutual_information": fit.mutual_information,
                   "template_scale": float(abs(np.linalg.det(fit.matrix[:3, :3])) ** (-1 / 3))})
    return Report(scores, tuple(_image_failures(scores, thresholds)), fit, thresholds)
