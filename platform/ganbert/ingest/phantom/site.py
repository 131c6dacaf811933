"""Phantom sites: the acquisition and population parameters that change when a model meets another scanner."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Site:
    """Where a phantom cohort was "acquired": ranges every subject's draws come from (uniform unless noted).

    Site A is the phantom every other command writes; site B (`ganbert phantom --site B`) is a cohort shift for
    testing models trained on A: wider anatomy, noisier T1s with stronger bias, blurrier and noisier PET with a
    wider scanner calibration spread, and a wider amyloid load and white-matter uptake.
    """

    name: str
    subject_base: int  # subject numbers start here (ids never collide across sites)
    warp_mm: float  # sd of the smooth anatomy warp's control points, mm
    head_scale: tuple[float, float]  # global head size factor
    t1_gain: tuple[float, float]  # T1 intensity scale (x 255 / 0.9)
    t1_noise: tuple[float, float]  # Rician noise sigma of the T1, intensity units
    t1_bias: float  # sd of the T1 bias field's quadratic polynomial coefficients (about +-15 % at 0.06)
    pet_fwhm_mm: tuple[float, float]  # PET point-spread function FWHM
    pet_scale: tuple[float, float]  # scanner calibration: the 99.99th percentile of the PET lands in this range
    pet_noise: tuple[float, float]  # PET noise floor sigma (plus 5 % of the signal)
    amyloid_load: tuple[float, float]  # AV45 cortical SUVR increase of an amyloid-positive subject (+0.25 if AD)
    wm_suvr: tuple[float, float]  # AV45 cerebral white-matter SUVR


SITES: dict[str, Site] = {
    "A": Site(name="A", subject_base=6000, warp_mm=3.0, head_scale=(0.93, 1.07), t1_gain=(0.86, 0.98),
              t1_noise=(2.0, 5.0), t1_bias=0.06, pet_fwhm_mm=(6.0, 8.0), pet_scale=(550.0, 950.0),
              pet_noise=(12.0, 20.0), amyloid_load=(0.45, 0.7), wm_suvr=(1.55, 1.8)),
    "B": Site(name="B", subject_base=7000, warp_mm=5.0, head_scale=(0.88, 1.12), t1_gain=(0.70, 0.95),
              t1_noise=(4.0, 8.0), t1_bias=0.10, pet_fwhm_mm=(8.0, 10.0), pet_scale=(350.0, 1300.0),
              pet_noise=(18.0, 30.0), amyloid_load=(0.35, 0.85), wm_suvr=(1.45, 1.95)),
}
