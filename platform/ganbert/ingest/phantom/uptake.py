"""Phantom PET uptake: regional SUVRs per tracer and disease stage, the PET truth and its noisy frames."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ganbert.config import TRACERS
from ganbert.ingest.phantom.anatomy import (
    LABEL,
    REGIONS,
    SizeSpec,
    Subject,
    atrophy_loss,
    sample_at,
    template,
    template_coords,
)
from ganbert.ingest.phantom.site import SITES, Site

FRAMES = {"AV45": 4, "AV1451": 6, "FDG": 6}  # ADNI3: AV45 4x5 min, AV1451 6x5 min, FDG 6x5 min
REFERENCE = {"AV45": ("cerebellum_gm", "cerebellum_wm"), "AV1451": ("cerebellum_gm",), "FDG": ("pons",)}
BRAAK_REGIONS = {1: "medial_temporal", 2: "medial_temporal", 3: "inferior_temporal", 4: "inferior_temporal",
                 5: "neocortex", 6: "neocortex"}


def suvr_params(subj: Subject, tracer: str,
                rng: np.random.Generator) -> tuple[dict[int, float], dict[int, float], float]:
    """Per-region grey-matter SUVR, white-matter SUVR per WM region, and CSF SUVR of one subject and tracer."""
    gm_names = ("cerebellum_gm", "pons", "medial_temporal", "inferior_temporal", "temporoparietal", "neocortex",
                "subcortical_gm")
    if tracer == "AV45":
        gm = dict.fromkeys(gm_names, 1.05) | {"cerebellum_gm": 0.9, "pons": 1.6, "subcortical_gm": 1.15}
        wm = {"cerebral_wm": rng.uniform(*subj.site.wm_suvr), "cerebellum_wm": 1.3}
        csf = 0.35
        if subj.amyloid_positive:
            load = rng.uniform(*subj.site.amyloid_load) + (0.25 if subj.group == "AD" else 0.0)
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
    coords = template_coords(subj, tpl, spec.pet_shape, affine)
    gm, wm, csf = (sample_at(m, coords) for m in (tpl.gm, tpl.wm, tpl.csf))
    loss = atrophy_loss(subj, sample_at(tpl.atrophy, coords))
    anat = {"gm": gm * (1.0 - loss), "wm": wm, "csf": csf + gm * loss,
            "skull": sample_at(tpl.skull, coords), "scalp": sample_at(tpl.scalp, coords)}
    for name in ("gm_region", "wm_region", "labels"):
        anat[name] = sample_at(getattr(tpl, name), coords, order=0).astype(np.uint8)
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


def synth_frames(truth: PetTruth, tracer: str, spec: SizeSpec, rng: np.random.Generator,
                 site: Site = SITES["A"]) -> np.ndarray:
    """Raw multi-frame PET (X, Y, Z, F) float32: PSF blur, per-scan scanner scale, correlated noise per frame
    (ranges of the `site`)."""
    fwhm = rng.uniform(*site.pet_fwhm_mm)
    sigma = [fwhm / 2.3548 / z for z in spec.pet_zooms]
    blurred = ndimage.gaussian_filter(truth.suvr, sigma)
    scale = rng.uniform(*site.pet_scale) / float(np.percentile(blurred, 99.99))
    signal = blurred * scale
    frames = FRAMES[tracer]
    drift = rng.uniform(-0.06, 0.06)
    sigma0 = rng.uniform(*site.pet_noise)
    out = np.empty((*spec.pet_shape, frames), dtype=np.float32)
    white = rng.standard_normal((frames, *spec.pet_shape), dtype=np.float32)
    for k in range(frames):
        noise = ndimage.gaussian_filter(white[k], 0.8)
        noise /= max(float(noise.std()), 1e-6)
        level = signal * (1.0 + drift * (k - (frames - 1) / 2) / frames)
        out[..., k] = level + noise * (sigma0 + 0.05 * level)
    return out
