"""Scoring a generator or the mean-PET baseline on a split: per-subject metrics, their summary, validation."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ganbert.common.atomic import write_csv, write_text
from ganbert.common.figures import histogram_png, montage_png
from ganbert.config import GeometryConfig
from ganbert.ingest.phantom import LABEL, REFERENCE, REGIONS
from ganbert.ingest.phantom.uptake import BRAAK_REGIONS
from ganbert.models import intensity
from ganbert.prep.grid import pet_affine, resample
from ganbert.scoring import biomarkers, metrics
from ganbert.store import folds, loader, shards, stats
from ganbert.store.folds import Fold
from ganbert.store.part import Part, as_part

BASELINES = ("mean-pet",)
SUBJECTS_CSV = "subjects.csv"
SUMMARY_JSON = "summary.json"
ID_COLUMNS = ("subject", "pet_image_id", "tracer", "split", "mask_source")
PAPER_METRICS = ("psnr", "ssim", "rmse", "psnr01", "ssim01")
BRAIN_METRICS = ("psnr_brain", "ssim_brain", "psnr_rel", "ssim_rel", "wasserstein")
REGION_METRICS = ("suvr_mape", "suvr_composite_real", "suvr_composite_fake", "positive_real", "positive_fake",
                  "positivity_agreement")
# Per-subject biomarkers (module `biomarkers`), NaN where the tracer or the labels do not give them:
# AV45 Centiloid of the composite SUVR (real, generated, generated - real, |generated - real|); AV1451 Braak stage
# code (0 none, 1 I-II, 2 III-IV, 3 V-VI; real, generated, |generated - real| in stages); FDG AD meta-ROI SUVR
# (real, generated, % error, |% error|).
BIOMARKER_METRICS = ("centiloid_real", "centiloid_fake", "centiloid_error", "centiloid_abs_error",
                     "braak_real", "braak_fake", "braak_abs_error",
                     "metaroi_real", "metaroi_fake", "metaroi_pct_error", "metaroi_abs_pct_error")
METRICS = PAPER_METRICS + BRAIN_METRICS + REGION_METRICS + BIOMARKER_METRICS
# Regional SUVRs of every phantom region, real and generated (subjects.csv only; NaN for the reference region).
REGIONAL_SUVR = tuple(f"suvr_{side}.{name}" for name in REGIONS.values() for side in ("real", "fake"))
SUBJECT_METRICS = METRICS + REGIONAL_SUVR

# FDG AD meta-ROI (Landau et al. 2011, Neurobiology of Aging 32:1207): left and right angular gyri, bilateral
# posterior cingulate, left and right inferior temporal gyri. The phantom's closest regions: temporoparietal
# (lateral parietal ellipsoids around the angular gyri and the midline posterior cingulate / precuneus one) and
# inferior_temporal; normalised by the FDG reference region, the pons (phantom.REFERENCE).
META_ROI = ("temporoparietal", "inferior_temporal")

# Positivity read as in ADNI practice: a composite of target regions over the tracer's reference region
# (phantom.REFERENCE) against a published cut-off. AV45: cortical composite, whole-cerebellum reference,
# SUVR > 1.11 (Landau et al. 2013); AV1451: meta-temporal composite, SUVR > 1.23 (Jack et al. 2017);
# FDG: the AD meta-ROI (META_ROI) over pons, hypometabolic when SUVR < 1.21 (Landau et al. 2011).
POSITIVITY: dict[str, tuple[tuple[str, ...], float, str]] = {
    "AV45": (("temporoparietal", "neocortex", "inferior_temporal"), 1.11, ">"),
    "AV1451": (("medial_temporal", "inferior_temporal"), 1.23, ">"),
    "FDG": (META_ROI, 1.21, "<"),
}

BIOMARKER_KEYS = biomarkers.summary_keys(tuple(REGIONS.values()))

# Braak ROIs (stage code -> phantom regions) from the phantom's stage map: I-II, III-IV, V-VI.
BRAAK_ROIS = {code: tuple(sorted({r for s, r in BRAAK_REGIONS.items() if (s + 1) // 2 == code})) for code in (1, 2, 3)}

# A restored PET volume (T, d, h, w) in original units from one shard row.
Predictor = Callable[[dict[str, Any]], torch.Tensor]


# --- predictors -----------------------------------------------------------------------------------

class MeanPET(nn.Module):
    """Baseline 'generator': the mean normalised training PET (T, d, h, w), whatever the MRI."""

    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)

    def forward(self, mri: torch.Tensor) -> torch.Tensor:
        """mri (B, 1, D, H, W) -> (B, T, d, h, w), the same mean volume for every sample."""
        return self.mean.expand(mri.shape[0], *self.mean.shape)


def mean_pet(data_dir: str, tracer: str, fold: Fold | None = None) -> MeanPET:
    """The mean normalised training PET of a tracer (restored per subject like G's output): recorded at
    preprocessing (`stats.record`), or with the folds (`fold`: its training subjects only), else streamed from the
    training rows (of the split or the fold) for older shards."""
    volume = (stats.recorded_mean_volume(data_dir, tracer) if fold is None
              else folds.recorded_mean_volume(data_dir, fold, tracer))
    if volume is not None:
        return MeanPET(torch.from_numpy(np.asarray(volume)).float())
    total, n = None, 0
    for norm in stats.normalised_train_pet(data_dir, tracer, part="train" if fold is None else fold.part("train")):
        total = norm if total is None else total + norm
        n += 1
    assert total is not None  # normalised_train_pet raises on an empty split
    return MeanPET((total / n).float())


def predict_row(generator: nn.Module, row: dict[str, Any], device: torch.device | str = "cpu") -> torch.Tensor:
    """One shard row -> restored PET (T, d, h, w) float32 on `device`: MRI normalised by its stored statistics,
    G, restore_pet."""
    mri = torch.from_numpy(np.array(row["mri"], dtype=np.uint8))[None].to(device)
    mean = torch.tensor([float(row["mri_mean"])], dtype=torch.float32, device=device)
    std = torch.tensor([float(row["mri_std"])], dtype=torch.float32, device=device)
    with torch.no_grad():
        out = generator(intensity.normalise_mri(mri, mean, std)).float()
    return intensity.restore_pet(out, mean, std)[0]


def generator_predictor(generator: nn.Module, device: torch.device | str = "cpu") -> Predictor:
    """Row -> restored PET (T, d, h, w) float32 on the CPU (`predict_row` in eval mode)."""
    generator.eval()

    def predict(row: dict[str, Any]) -> torch.Tensor:
        return predict_row(generator, row, device).cpu()

    return predict


# --- masks and labels -----------------------------------------------------------------------------

def geometry_of(data_dir: str | Path) -> GeometryConfig:
    """The geometry the shards were preprocessed for (manifest.json)."""
    g = shards.read_manifest(data_dir).get("geometry") or {}
    try:
        return GeometryConfig(mri_size=tuple(int(v) for v in g["mri_size"]), pet_frames=int(g["pet_frames"]),
                              pet_size=tuple(int(v) for v in g["pet_size"]), mri_fov_mm=float(g["mri_fov_mm"]),
                              pet_fov_mm=tuple(float(v) for v in g["pet_fov_mm"]))
    except (KeyError, TypeError) as err:
        raise ValueError(f"data {data_dir}: manifest.json has no complete geometry record ({err})") from None


def t1_brain_mask(mri: np.ndarray, mri_affine: np.ndarray, geometry: GeometryConfig) -> np.ndarray:
    """Fallback brain mask (d, h, w) bool from the conformed T1 (1, D, H, W) sampled on the PET grid.

    Head foreground of the T1: voxels above half the mean of the non-background voxels, opened once,
    the largest connected component, holes filled. Coarser than a skull-stripped mask (scalp can stay).
    """
    t1 = resample(np.asarray(mri, dtype=np.float32).reshape(geometry.mri_size), np.asarray(mri_affine, np.float64),
                  pet_affine(np.asarray(mri_affine, np.float64), geometry), geometry.pet_size)
    fg = t1 > 0.1 * float(t1.max())
    if not fg.any():
        raise ValueError("mri: no signal on the PET grid to derive a brain mask from")
    mask = ndimage.binary_opening(t1 > 0.5 * float(t1[fg].mean()))
    lab, n = ndimage.label(mask)
    if n == 0:
        return fg
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    return ndimage.binary_fill_holes(lab == 1 + int(np.argmax(sizes)))


def _pet_grid(row: dict[str, Any], key: str, geometry: GeometryConfig) -> np.ndarray | None:
    """Column `key` (brain_mask or labels) of a row as a (d, h, w) array, None when the row lacks it."""
    value = row.get(key)
    if value is None:
        return None
    return np.asarray(value).reshape(geometry.pet_size)


def brain_mask(row: dict[str, Any], geometry: GeometryConfig) -> tuple[np.ndarray, str]:
    """(mask (d, h, w) bool, source): the row's `brain_mask` column when present and non-empty, else from the T1."""
    mask = _pet_grid(row, "brain_mask", geometry)
    if mask is not None and mask.any():
        return mask.astype(bool), "brain_mask"
    return t1_brain_mask(row["mri"], row["mri_affine"], geometry), "t1"


# --- metrics of one subject -----------------------------------------------------------------------

def _safe(fn: Callable[[], float]) -> float:
    """fn(), or NaN where the metric is undefined for this volume (e.g. a non-positive in-brain mean)."""
    try:
        return float(fn())
    except ValueError:
        return float("nan")


def positivity(composite: float, tracer: str) -> float:
    """1.0 if a composite SUVR reads positive for the tracer (POSITIVITY), else 0.0; NaN if not finite."""
    if tracer not in POSITIVITY:
        raise ValueError(f"tracer must be one of {sorted(POSITIVITY)}, got {tracer!r}")
    if not math.isfinite(composite):
        return float("nan")
    _, cut, sense = POSITIVITY[tracer]
    return float(composite > cut if sense == ">" else composite < cut)


def paper_metrics(fake: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """psnr, ssim, rmse, psnr01, ssim01 of one subject: `metrics.evaluate` on restored PET (T, d, h, w)."""
    return {k: float(v[0]) for k, v in metrics.evaluate(fake[None], real[None]).items()}


def subject_metrics(fake: torch.Tensor, real: torch.Tensor, mask: np.ndarray, tracer: str,
                    labels: np.ndarray | None = None) -> dict[str, float]:
    """Every metric of one subject (SPEC section 9).

    fake, real: restored PET (T, d, h, w) in original units; mask: (d, h, w) brain mask; labels: (d, h, w)
    region ids (phantom.LABEL) or None / all zeros when there is no truth. Returns
    - psnr, ssim, rmse, psnr01, ssim01: `metrics.evaluate` (paper range, and [0,1]-scaled);
    - psnr_brain, ssim_brain: paper-range clipped volumes, data range 1010, inside the mask;
    - psnr_rel, ssim_rel: each volume divided by its own in-brain mean, inside the mask, data range the
      real relative volume's in-brain max - min (scale-free: the uptake pattern alone);
    - wasserstein: 1-D Wasserstein distance of real vs generated in-brain voxel values (all frames);
    - with labels: suvr_mape (regional SUVR vs the tracer's reference region, % error), the composite
      SUVRs, positive_real / positive_fake and positivity_agreement (1 when they agree); else NaN.
    """
    real64, fake64 = real.to(torch.float64), fake.to(torch.float64)
    out = paper_metrics(fake64, real64)
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))
    fc, rc = metrics.clip_paper(fake64), metrics.clip_paper(real64)
    out["psnr_brain"] = metrics.masked_psnr(fc, rc, m, metrics.PAPER_DATA_RANGE)
    out["ssim_brain"] = _safe(lambda: metrics.masked_ssim(fc, rc, m, metrics.PAPER_DATA_RANGE))
    try:
        rr, fr = metrics.relative(real64, m), metrics.relative(fake64, m)
        inside = rr[:, m]
        rng = float(inside.max() - inside.min()) or 1.0
        out["psnr_rel"] = metrics.masked_psnr(fr, rr, m, rng)
        out["ssim_rel"] = _safe(lambda: metrics.masked_ssim(fr, rr, m, rng))
    except ValueError:
        out["psnr_rel"] = out["ssim_rel"] = float("nan")
    out["wasserstein"] = metrics.wasserstein1d(real64[:, m], fake64[:, m])
    if labels is not None and np.any(labels) and tracer in REFERENCE:
        out.update(region_metrics(fake64, real64, torch.from_numpy(np.asarray(labels, dtype=np.int64)), tracer))
    else:
        out.update(dict.fromkeys(REGION_METRICS + BIOMARKER_METRICS + REGIONAL_SUVR, float("nan")))
    return out


def _ids(names: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(LABEL[n] for n in names)


def _regional(volume: torch.Tensor, labels: torch.Tensor, reference: tuple[int, ...]) -> dict[int, float]:
    """`metrics.regional_suvr`, or {} where the volume has no usable reference region."""
    try:
        return metrics.regional_suvr(volume, labels, reference)
    except ValueError:
        return {}


def region_metrics(fake: torch.Tensor, real: torch.Tensor, labels: torch.Tensor, tracer: str) -> dict[str, float]:
    """REGION_METRICS, BIOMARKER_METRICS and REGIONAL_SUVR of one subject; NaN where not defined.

    fake, real: restored PET (T, d, h, w); labels: (d, h, w) region ids (phantom.LABEL), not all zero.
    The biomarkers of other tracers stay NaN: Centiloid is AV45's, Braak stage AV1451's, the meta-ROI FDG's.
    """
    ref = _ids(REFERENCE[tracer])

    def composite(volume: torch.Tensor, names: tuple[str, ...]) -> float:
        return _safe(lambda: metrics.composite_suvr(volume, labels, _ids(names), ref))

    out = dict.fromkeys(REGION_METRICS + BIOMARKER_METRICS + REGIONAL_SUVR, float("nan"))
    out["suvr_mape"] = _safe(lambda: metrics.suvr_mape(fake, real, labels, ref))
    for side, volume in (("real", real), ("fake", fake)):
        regional = _regional(volume, labels, ref)
        out.update({f"suvr_{side}.{name}": regional.get(key, float("nan")) for key, name in REGIONS.items()})
        out[f"suvr_composite_{side}"] = composite(volume, POSITIVITY[tracer][0])
        out[f"positive_{side}"] = positivity(out[f"suvr_composite_{side}"], tracer)
        if tracer == "AV45":
            out[f"centiloid_{side}"] = biomarkers.centiloid(out[f"suvr_composite_{side}"])
        elif tracer == "AV1451":
            out[f"braak_{side}"] = biomarkers.braak_stage(*(composite(volume, BRAAK_ROIS[c]) for c in (1, 2, 3)))
        elif tracer == "FDG":
            out[f"metaroi_{side}"] = composite(volume, META_ROI)
    if math.isfinite(out["positive_real"]) and math.isfinite(out["positive_fake"]):
        out["positivity_agreement"] = float(out["positive_real"] == out["positive_fake"])
    if tracer == "AV45":
        out["centiloid_error"] = out["centiloid_fake"] - out["centiloid_real"]
        out["centiloid_abs_error"] = abs(out["centiloid_error"])
    elif tracer == "AV1451":
        out["braak_abs_error"] = abs(out["braak_fake"] - out["braak_real"])
    elif tracer == "FDG":
        real_roi = out["metaroi_real"]
        out["metaroi_pct_error"] = 100.0 * (out["metaroi_fake"] - real_roi) / real_roi if real_roi > 0 else float("nan")
        out["metaroi_abs_pct_error"] = abs(out["metaroi_pct_error"])
    return out


# --- a split --------------------------------------------------------------------------------------

@dataclass
class Evaluation:
    """Per-subject rows (ids + METRICS) and the summary (n + the mean of each metric over its finite values)."""

    subjects: list[dict[str, Any]]
    summary: dict[str, Any]


def iter_predictions(predict: Predictor, data_dir: str, split: str | Part, tracer: str,
                     geometry: GeometryConfig | None = None) -> Iterator[tuple[dict[str, Any], torch.Tensor,
                                                                               torch.Tensor]]:
    """(shard row, real PET (T, d, h, w) float32 on the CPU, fake) for every row of a split (or Part) and tracer.

    With `geometry`, raises ValueError when the shards were made for another geometry.
    """
    for row in loader.read_rows(data_dir, split, tracer, geometry):
        fake = predict(row)
        real = torch.from_numpy(np.array(row["pet"], dtype=np.float32))
        if tuple(fake.shape) != tuple(real.shape):
            raise ValueError(f"model output shape {tuple(fake.shape)} differs from the shards' PET {tuple(real.shape)}")
        yield row, real, fake


def iter_subjects(predict: Predictor, data_dir: str, split: str | Part, tracer: str,
                  geometry: GeometryConfig | None = None) -> Iterator[tuple[dict[str, Any], dict[str, Any],
                                                                            torch.Tensor, torch.Tensor]]:
    """(subject row = ids + metrics, shard row, real, fake (T, d, h, w)) for every row of a split and tracer."""
    geo = geometry or geometry_of(data_dir)
    for row, real, fake in iter_predictions(predict, data_dir, split, tracer, geo):
        mask, source = brain_mask(row, geo)
        values = subject_metrics(fake, real, mask, tracer, _pet_grid(row, "labels", geo))
        ids = {"subject": row.get("subject", ""), "pet_image_id": row.get("pet_image_id", ""), "tracer": tracer,
               "split": as_part(split).name, "mask_source": source}
        yield {**ids, **values}, row, real, fake


def write_figures(row: dict[str, Any], real: torch.Tensor, fake: torch.Tensor, figures: Path) -> None:
    """Montage and histogram PNGs (`figures`/montage.png, histogram.png) of one row's real vs generated PET."""
    figures.mkdir(parents=True, exist_ok=True)
    real_np, fake_np = real.cpu().numpy(), fake.cpu().numpy()
    montage_png(np.asarray(row["mri"])[0], real_np, fake_np, figures / "montage.png")
    histogram_png(real_np, fake_np, figures / "histogram.png")


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def aggregate_subjects(subjects: list[dict[str, Any]], tracer: str | None = None) -> dict[str, Any]:
    """{"n": subjects, metric: mean over subjects with a finite value (null if none)} for every metric, plus the
    biomarker agreement over the labelled subjects (`biomarkers.summary`: BIOMARKER_KEYS and NOTES_KEY; tracer:
    the subjects' own when not given)."""
    out: dict[str, Any] = {"n": len(subjects)}
    for key in METRICS:
        vals = [float(s[key]) for s in subjects if _finite(s.get(key))]
        out[key] = float(np.mean(vals)) if vals else None
    out["n_labelled"] = sum(1 for s in subjects if _finite(s.get("suvr_mape")))
    if tracer is None:
        found = {s.get("tracer") for s in subjects}
        tracer = found.pop() if len(found) == 1 else None
    labelled = [s for s in subjects if _finite(s.get("suvr_mape"))]
    out.update(biomarkers.summary(labelled, tracer, tuple(REGIONS.values()), REFERENCE.get(str(tracer), ())))
    return out


def evaluate_split(predict: Predictor, data_dir: str, split: str | Part, tracer: str,
                   geometry: GeometryConfig | None = None, figures: Path | None = None) -> Evaluation:
    """Evaluate `predict` on every row of a split (or Part) and tracer; optionally montage + histogram of the first
    row."""
    subjects: list[dict[str, Any]] = []
    for i, (values, row, real, fake) in enumerate(iter_subjects(predict, data_dir, split, tracer, geometry)):
        subjects.append(values)
        if figures is not None and i == 0:
            write_figures(row, real, fake, figures)
    if not subjects:
        raise ValueError(f"{as_part(split).describe()}: no rows for tracer {tracer} in {data_dir}")
    return Evaluation(subjects, aggregate_subjects(subjects))


@torch.no_grad()
def validate_generator(generator: nn.Module, data_dir: str, tracer: str, device: torch.device,
             figures: Path | None = None, split: str | Part = "val") -> dict[str, float]:
    """Mean PSNR/SSIM/RMSE of a split or Part (restored PET units, paper range) and on [0,1], keys `<name>_psnr` ...

    The per-epoch check of a training run: `paper_metrics` on `device`, the generator left in train mode.
    Optionally writes the montage and histogram PNGs of the split's first row into `figures`.
    """
    generator.eval()
    sums: dict[str, float] = {}
    n = 0
    for row, real, fake in iter_predictions(lambda r: predict_row(generator, r, device), data_dir, split, tracer):
        for key, value in paper_metrics(fake, real.to(device)).items():
            sums[key] = sums.get(key, 0.0) + value
        if figures is not None and n == 0:
            write_figures(row, real, fake, figures)
        n += 1
    generator.train()
    part = as_part(split)
    if n == 0:
        raise ValueError(f"{part.describe()}: no rows for tracer {tracer} in {data_dir}")
    return {f"{part.name}_{k}": v / n for k, v in sums.items()}


def _json_value(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_evaluation(out: Path, evaluation: Evaluation, info: dict[str, Any]) -> tuple[Path, Path]:
    """Write `out/subjects.csv` (one row per subject) and `out/summary.json` (summary + info), atomically."""
    columns = list(ID_COLUMNS) + list(SUBJECT_METRICS)
    csv = write_csv(out / SUBJECTS_CSV, columns,
                    ([("" if isinstance(v, float) and not math.isfinite(v) else v)
                      for v in (s.get(c, float("nan")) for c in columns)] for s in evaluation.subjects))
    summary = {**info, **{k: _json_value(v) for k, v in evaluation.summary.items()}}
    js = write_text(out / SUMMARY_JSON, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return csv, js


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty `out` folder unless `overwrite` (user files are never replaced unasked)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out}: folder is not empty (pass --overwrite to replace its results)")
