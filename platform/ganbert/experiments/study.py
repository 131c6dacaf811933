"""`ganbert study`: rows x tracers x seeds, cross-validated on K folds, compared per subject with paired intervals.

`ganbert study --space search_spaces/study.yaml --folds 5 --seeds 1 --preset demo` (SPEC section 9):
1. Folds: the non-test subjects are divided once into K folds by subject, stratified by diagnostic group
   (`data.folds`, written beside the manifest and reused). Fold i trains on the other folds (its validation
   subjects carved from them choose the checkpoint) and predicts fold i: every non-test subject gets exactly one
   out-of-fold prediction per row and seed (set `cv`). Each fold's statistics (token calibration, PET level, the
   mean PET volume and so the mean-PET baseline) come from its own training subjects.
2. Only when every fold of every row is trained is the locked test split read: each row's K fold models are
   averaged (the mean of their restored outputs, as nnU-Net ensembles folds) and scored (set `test`); so are any
   `--external` cohorts (set `external:<name>`). `--folds 1` is the fixed split: train on train, choose on val,
   score test.
3. Per set, tracer and metric, every row is paired with the reference row (`--reference`, default the L1-only
   U-Net when present) on the subjects both have, seeds and scans averaged within a subject first: mean
   difference, subject-bootstrap 95 % interval, Wilcoxon signed-rank p, Holm-adjusted over the rows
   (`ganbert.experiments.paired`); "better"/"worse" only when the interval excludes 0.
Writes study.md, study.json and forest-<set>.png under --out; one MLflow parent run, a child per fold x row x seed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import nn

from ganbert import config as config_mod
from ganbert.common import home
from ganbert.common.atomic import write_text
from ganbert.config import TRACERS, Config
from ganbert.experiments import paired
from ganbert.scoring.evaluate import (
    BASELINES,
    METRICS,
    SUBJECT_METRICS,
    Predictor,
    aggregate_subjects,
    check_out,
    generator_predictor,
    iter_subjects,
    mean_pet,
    predict_row,
)
from ganbert.store import folds as folds_mod
from ganbert.store.folds import Fold
from ganbert.store.part import Part
from ganbert.store.shards import SPLITS

STUDY_TAG = "ganbert.experiments.study"
ROW_TAG = "ganbert.row"
KIND_TAG = "ganbert.kind"
FOLD_TAG = "fold"
SEED_TAG = "seed"
CV, TEST = "cv", "test"
L1_ROW = "L1-only U-Net"
# Per-subject metrics compared between rows, and whether higher is better.
PAIRED_METRICS: dict[str, bool] = {
    "psnr": True, "ssim": True, "rmse": False, "psnr01": True, "ssim01": True, "psnr_brain": True,
    "ssim_brain": True, "psnr_rel": True, "ssim_rel": True, "wasserstein": False, "suvr_mape": False,
    "centiloid_abs_error": False, "braak_abs_error": False, "metaroi_abs_pct_error": False}
SHOWN = ("psnr", "ssim", "rmse", "psnr_rel", "ssim_rel", "wasserstein", "suvr_mape", "centiloid_abs_error",
         "braak_abs_error", "metaroi_abs_pct_error")  # in study.md
# Agreement of the generated with the real read over a row's subjects (evaluate.aggregate_subjects, module biomarkers).
AGREEMENT = (("centiloid.icc21", "Centiloid ICC"), ("centiloid.ba_bias", "Centiloid bias"),
             ("positivity.kappa", "positivity kappa"), ("positivity.sensitivity", "sensitivity"),
             ("positivity.specificity", "specificity"), ("braak.weighted_kappa_quadratic", "Braak kappa (quadratic)"),
             ("metaroi.icc21", "meta-ROI ICC"))
FOREST = ("psnr", "ssim_rel", "wasserstein", "suvr_mape")
DIGITS = {"psnr": 2, "ssim": 3, "rmse": 3, "psnr01": 2, "ssim01": 3, "psnr_brain": 2, "ssim_brain": 3,
          "psnr_rel": 2, "ssim_rel": 3, "wasserstein": 3, "suvr_mape": 2, "centiloid_abs_error": 1,
          "braak_abs_error": 2, "metaroi_abs_pct_error": 2}
LABELS = {"psnr": "PSNR", "ssim": "SSIM", "rmse": "RMSE", "psnr01": "PSNR [0,1]", "ssim01": "SSIM [0,1]",
          "psnr_brain": "PSNR brain", "ssim_brain": "SSIM brain", "psnr_rel": "PSNR rel", "ssim_rel": "SSIM rel",
          "wasserstein": "W1", "suvr_mape": "SUVR MAPE %", "centiloid_abs_error": "|CL error|",
          "braak_abs_error": "|Braak error|", "metaroi_abs_pct_error": "|meta-ROI error| %"}


# --- rows ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StudyRow:
    """One row of the table: a baseline (no training) or config overrides of a trained method."""

    name: str
    baseline: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """File- and run-name-safe form of the name: `L1-only U-Net` -> `l1-only-u-net`."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


@dataclass(frozen=True)
class Study:
    """The rows and tracers of a study YAML (`search_spaces/study.yaml`) or of a Tune grid."""

    rows: tuple[StudyRow, ...]
    tracers: tuple[str, ...]
    source: str = ""


def _check_rows(rows: list[StudyRow], source: str) -> None:
    if not rows:
        raise ValueError(f"--space {source}: 'rows' must list at least one row")
    slugs = [r.slug for r in rows]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"--space {source}: row names must differ (as run names): {slugs}")


def load_study(path: str | Path, base: Config) -> Study:
    """A study YAML (`study: {tracers: [...], rows: [{name, baseline | overrides}, ...]}`) or a Tune search space
    whose grid becomes the rows (`rows_from_space`).

    Every row's overrides are applied to `base` here, so a bad key or value fails before anything trains.
    """
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"--space {path}: {err}") from None
    if isinstance(tree, dict) and "study" not in tree:
        return rows_from_space(path, base)
    spec = (tree or {}).get("study") if isinstance(tree, dict) else None
    if not isinstance(spec, dict):
        raise ValueError(f"--space {path}: needs a top-level 'study' mapping with 'rows' and 'tracers'")
    tracers = tuple(str(t) for t in spec.get("tracers", TRACERS))
    bad = [t for t in tracers if t not in TRACERS]
    if not tracers or bad:
        raise ValueError(f"--space {path}: tracers must be a non-empty subset of {TRACERS}, got {list(tracers)}")
    rows: list[StudyRow] = []
    for i, item in enumerate(spec.get("rows") or []):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise ValueError(f"--space {path}: rows[{i}] must be a mapping with a non-empty 'name'")
        baseline, overrides = item.get("baseline"), item.get("overrides") or {}
        if baseline is not None and baseline not in BASELINES:
            raise ValueError(f"--space {path}: rows[{i}].baseline must be one of {BASELINES}, got {baseline!r}")
        if baseline is None and not isinstance(overrides, dict):
            raise ValueError(f"--space {path}: rows[{i}].overrides must be a mapping of config keys")
        if baseline is None:
            try:
                config_mod.apply(base, dict(overrides))
            except ValueError as err:
                raise ValueError(f"--space {path}: rows[{i}] ({item['name']}): {err}") from None
        rows.append(StudyRow(item["name"], baseline, dict(overrides)))
    _check_rows(rows, str(path))
    return Study(tuple(rows), tracers, str(path))


def _value_text(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def rows_from_space(path: str | Path, base: Config) -> Study:
    """A Tune search space's grid as study rows: one row per grid point (`geometry.tracer` becomes the tracers),
    named by the values that vary (`pet_mask_ratio=0.1`); fixed values apply to every row. Sampled domains
    (choice, uniform, ...) cannot be rows: ValueError naming the key."""
    from ganbert.experiments.search_space import BUNDLE_KEY, load_space

    space = load_space(path, base)
    axes: list[list[dict[str, Any]]] = []
    fixed: dict[str, Any] = {}
    tracers: tuple[str, ...] = (base.geometry.tracer,)
    for key, spec in space.specs.items():
        if not isinstance(spec, dict):
            fixed[key] = spec
        elif "grid" not in spec:
            raise ValueError(f"--space {path}: key {key} is sampled ({next(iter(spec))}); a study's rows need grid "
                             "values")
        elif key == "geometry.tracer":
            tracers = tuple(spec["grid"])
        else:
            axes.append([dict(v) if key == BUNDLE_KEY else {key: v} for v in spec["grid"]])
    rows = []
    for combo in itertools.product(*axes) if axes else [()]:
        overrides = dict(fixed)
        for part in combo:
            overrides.update(part)
        varying = {k: v for part in combo for k, v in part.items()}
        name = ", ".join(f"{k.split('.', 1)[1]}={_value_text(v)}" for k, v in varying.items()) or "preset"
        rows.append(StudyRow(name, None, overrides))
    _check_rows(rows, str(path))
    return Study(tuple(rows), tracers, str(path))


def default_reference(study: Study, base: Config) -> str:
    """The L1-only U-Net row when present, else the row whose overrides leave the base config as it is, else the
    first row."""
    names = [r.name for r in study.rows]
    if L1_ROW in names:
        return L1_ROW
    for row in study.rows:
        if row.baseline is None and config_mod.apply(base, row.overrides) == base:
            return row.name
    return names[0]


def trial_config(base: Config, row: StudyRow, tracer: str, seed: int, study: str, fold: Fold | None = None) -> Config:
    """The config of one trained cell: base + row overrides, tracer, seed, its own run name and storage (a path
    or URI under `run.storage/<study>`)."""
    cfg = config_mod.apply(base, dict(row.overrides))
    storage = home.join(home.resolve(base.run.storage), study)
    name = f"{study}-{row.slug}-{tracer}-s{seed}" + (f"-{fold.tag}" if fold is not None else "")
    return config_mod.apply(cfg, {"geometry.tracer": tracer, "run.seed": seed, "run.storage": storage,
                                  "run.name": name})


# --- predictions -----------------------------------------------------------------------------------

def load_checkpoint(path: str) -> nn.Module:
    """The generator (eval mode, CPU) of a checkpoint or model folder at a path or URI (downloaded first)."""
    from ganbert.models.saved import load_generator

    if not home.is_uri(path):
        return load_generator(Path(path))[0]
    with tempfile.TemporaryDirectory(prefix="ganbert-ckpt-") as tmp:
        return load_generator(home.download_dir(path, Path(tmp) / "ckpt"))[0]


def ensemble_predictor(members: list[nn.Module]) -> Predictor:
    """Row -> the mean of the members' restored PET `(T, d, h, w)` (float32, CPU): the fold ensemble."""
    if not members:
        raise ValueError("members must hold at least one generator")
    for m in members:
        m.eval()

    def predict(row: dict[str, Any]) -> torch.Tensor:
        return torch.stack([predict_row(m, row).cpu() for m in members]).mean(dim=0)

    return predict


@dataclass
class Cell:
    """The fold models of one row x tracer x seed (checkpoint paths; None = the baseline's fold mean volumes)."""

    row: StudyRow
    tracer: str
    seed: int | None
    checkpoints: list[str | None]
    folds: list[Fold | None]
    model_dirs: list[str] = field(default_factory=list)  # the published fold models (their cards get test metrics)


def _members(cell: Cell, data_dir: str) -> list[nn.Module]:
    if cell.row.baseline is not None:
        return [mean_pet(data_dir, cell.tracer, fold) for fold in cell.folds]
    return [load_checkpoint(str(path)) for path in cell.checkpoints]


def subject_records(predict: Predictor, data_dir: str, part: str | Part, tracer: str, meta: dict[str, Any]
                    ) -> list[dict[str, Any]]:
    """One record per subject of a part (its scans averaged): `meta` (set, row, tracer, fold, seed), `subject`,
    `scans` and each per-subject value of `evaluate.subject_metrics` (SUBJECT_METRICS; None where undefined)."""
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for values, _, _, _ in iter_subjects(predict, data_dir, part, tracer):
        by_subject.setdefault(str(values["subject"]), []).append(values)
    out = []
    for subject in sorted(by_subject):
        scans = by_subject[subject]
        rec: dict[str, Any] = {**meta, "subject": subject, "scans": len(scans)}
        for metric in SUBJECT_METRICS:
            vals = [float(s[metric]) for s in scans if math.isfinite(float(s.get(metric, float("nan"))))]
            rec[metric] = float(np.mean(vals)) if vals else None
        out.append(rec)
    return out


# --- statistics ------------------------------------------------------------------------------------

def subject_values(records: list[dict[str, Any]], set_name: str, tracer: str, row: str,
                   metric: str) -> dict[str, float]:
    """{subject: the metric averaged over that subject's seeds} of one set, tracer and row (finite values only)."""
    acc: dict[str, list[float]] = {}
    for r in records:
        v = r.get(metric)
        if r["set"] == set_name and r["tracer"] == tracer and r["row"] == row and v is not None and math.isfinite(v):
            acc.setdefault(r["subject"], []).append(float(v))
    return {s: float(np.mean(v)) for s, v in acc.items()}


def cell_summary(records: list[dict[str, Any]], set_name: str, tracer: str, row: str, metric: str,
                 resamples: int, seed: int) -> dict[str, Any] | None:
    """{"n", "mean", "ci_low", "ci_high"} over a row's subject values (bootstrap interval), None without values."""
    values = subject_values(records, set_name, tracer, row, metric)
    if not values:
        return None
    x = np.array([values[s] for s in sorted(values)])
    lo, hi = paired.bootstrap_ci(x, resamples, seed)
    return {"n": int(x.size), "mean": float(x.mean()), "ci_low": lo, "ci_high": hi}


def paired_table(records: list[dict[str, Any]], rows: list[str], reference: str, resamples: int,
                 seed: int) -> list[dict[str, Any]]:
    """Every row against `reference` per set, tracer and metric of PAIRED_METRICS; Holm over the rows of one
    (set, tracer, metric). Entries: set, tracer, row, reference, metric, n, mean_diff, ci_low, ci_high, p_wilcoxon,
    p_holm, verdict."""
    out: list[dict[str, Any]] = []
    keys = sorted({(r["set"], r["tracer"]) for r in records}, key=lambda k: (k[0] != CV, k[0] != TEST, k))
    for set_name, tracer in keys:
        for metric, higher in PAIRED_METRICS.items():
            ref = subject_values(records, set_name, tracer, reference, metric)
            family = []
            for row in rows:
                if row == reference:
                    continue
                c = paired.compare(subject_values(records, set_name, tracer, row, metric), ref, resamples, seed)
                if c is not None:
                    family.append({"set": set_name, "tracer": tracer, "row": row, "reference": reference,
                                   "metric": metric, "n": c.n, "mean_diff": c.mean_diff, "ci_low": c.ci_low,
                                   "ci_high": c.ci_high, "p_wilcoxon": c.p_wilcoxon,
                                   "verdict": paired.verdict(c.ci_low, c.ci_high, higher, c.n)})
            for entry, p in zip(family, paired.holm([e["p_wilcoxon"] for e in family])):
                entry["p_holm"] = p
            out += family
    return out


# --- rendering -------------------------------------------------------------------------------------

def set_title(set_name: str) -> str:
    if set_name == CV:
        return "out-of-fold (cross-validation over the non-test subjects)"
    if set_name == TEST:
        return "locked test split"
    return f"external cohort `{set_name.split(':', 1)[1]}`"


def _p(value: float | None) -> str:
    return "–" if value is None else (f"{value:.3f}" if value >= 0.001 else f"{value:.1e}")


def render_markdown(name: str, study: Study, info: dict[str, Any], summaries: dict[str, Any],
                    pairs: list[dict[str, Any]]) -> str:
    """study.md: per set and tracer, mean [95 % CI] of every row, then the paired table against the reference."""
    ref = info["reference"]
    lines = [f"# GANBERT study `{name}`", "",
             f"{info['description']}. Reference row: **{ref}**. Every interval is a subject-bootstrap 95 % interval "
             f"({info['bootstrap']['resamples']} resamples, seed {info['bootstrap']['seed']}); a row is better or "
             "worse than the reference only when the interval of its paired difference excludes 0, else "
             f"\"no difference at this n\" (always below {paired.MIN_SUBJECTS} subjects, "
             "where no two-sided Wilcoxon test "
             "can reach p < 0.05). Seeds and scans are averaged within a subject first. PSNR / SSIM / RMSE "
             "on restored PET clipped to [-10, 1000] (data range 1010); rel = each volume over its own in-brain "
             "mean; W1 = Wasserstein distance of in-brain intensities; SUVR MAPE = regional SUVR % error. "
             f"Wall time {info['seconds'] / 60:.1f} min; {info['overhead']}.", ""]
    if not info.get("labels", True):
        lines += ["Regional metrics are absent: the shards carry no region labels.", ""]
    for set_name in info["sets"]:
        for tracer in study.tracers:
            cells = summaries.get(set_name, {}).get(tracer, {})
            if not cells:
                continue
            n = max((c["n"] for row in cells.values() for k, c in row.items() if c and k != "agreement"), default=0)
            lines += [f"## {tracer}: {set_title(set_name)}, {n} subjects", "",
                      "| row | " + " | ".join(LABELS[m] for m in SHOWN) + " |", "|---|" + "---:|" * len(SHOWN)]
            for row in study.rows:
                stats = cells.get(row.name, {})
                shown = [("–" if not stats.get(m) else
                          f"{stats[m]['mean']:.{DIGITS[m]}f} [{stats[m]['ci_low']:.{DIGITS[m]}f}, "
                          f"{stats[m]['ci_high']:.{DIGITS[m]}f}]") for m in SHOWN]
                lines.append(f"| {row.name} | " + " | ".join(shown) + " |")
            agree = [(key, label) for key, label in AGREEMENT
                     if any((cells.get(r.name) or {}).get("agreement", {}).get(key) is not None for r in study.rows)]
            if agree:
                lines += ["", "Agreement of the generated with the real biomarker read over these subjects "
                          "(first seed; "
                          "ICC(2,1), Bland-Altman bias generated - real, Cohen's kappa; module `biomarkers`):", "",
                          "| row | " + " | ".join(label for _, label in agree) + " |", "|---|" + "---:|" * len(agree)]
                for row in study.rows:
                    a = (cells.get(row.name) or {}).get("agreement", {})
                    lines.append(f"| {row.name} | " + " | ".join("–" if a.get(k) is None else f"{a[k]:.3f}"
                                                                for k, _ in agree) + " |")
            entries = [e for e in pairs if e["set"] == set_name and e["tracer"] == tracer and e["metric"] in SHOWN]
            if entries:
                lines += ["", f"Paired against {ref} (row - reference; Wilcoxon p Holm-adjusted over the rows):", "",
                          "| row | metric | n | mean diff [95 % CI] | p | p Holm | verdict |",
                          "|---|---|---:|---:|---:|---:|---|"]
                for e in entries:
                    d = DIGITS[e["metric"]] + 1
                    lines.append(f"| {e['row']} | {LABELS[e['metric']]} | {e['n']} | {e['mean_diff']:+.{d}f} "
                                 f"[{e['ci_low']:+.{d}f}, {e['ci_high']:+.{d}f}] | {_p(e['p_wilcoxon'])} | "
                                 f"{_p(e['p_holm'])} | {e['verdict']} |")
            lines.append("")
    return "\n".join(lines)


def render_forest(set_name: str, study: Study, reference: str, pairs: list[dict[str, Any]], path: Path) -> Path:
    """Forest plot of one set: per tracer (rows of panels) and metric (columns), each row's mean paired difference
    against the reference with its 95 % interval; green better, red worse, grey no difference."""
    from matplotlib.figure import Figure

    from ganbert.common.figures import save_png

    tracers = [t for t in study.tracers if any(e["set"] == set_name and e["tracer"] == t for e in pairs)]
    rows = [r.name for r in study.rows if r.name != reference]
    colours = {paired.BETTER: "tab:green", paired.WORSE: "tab:red", paired.NO_DIFFERENCE: "0.45"}
    cols = 2  # metrics side by side, two per line: readable where MLflow shows the image at its page width
    lines_per_tracer = -(-len(FOREST) // cols)
    height = 0.42 * len(rows) + 1.3
    fig = Figure(figsize=(10.0, height * lines_per_tracer * len(tracers) + 0.6))
    axes = fig.subplots(lines_per_tracer * len(tracers), cols, squeeze=False)
    for i, tracer in enumerate(tracers):
        for j, metric in enumerate(FOREST):
            ax = axes[i * lines_per_tracer + j // cols, j % cols]
            ax.axvline(0.0, color="black", lw=0.8)
            for y, row in enumerate(rows):
                e = next((e for e in pairs if (e["set"], e["tracer"], e["row"], e["metric"])
                          == (set_name, tracer, row, metric)), None)
                if e is None:
                    continue
                ax.errorbar(e["mean_diff"], y, xerr=[[e["mean_diff"] - e["ci_low"]], [e["ci_high"] - e["mean_diff"]]],
                            fmt="o", color=colours[e["verdict"]], capsize=3)
                ax.annotate(f"n={e['n']}", (1.0, y), xycoords=("axes fraction", "data"), xytext=(3, 0),
                            textcoords="offset points", va="center", fontsize=7)
            ax.set_yticks(range(len(rows)), rows if j % cols == 0 else [""] * len(rows), fontsize=8)
            ax.set_ylim(-0.6, len(rows) - 0.4)
            ax.invert_yaxis()
            better = "higher" if PAIRED_METRICS[metric] else "lower"
            ax.set_title(f"{tracer}: {LABELS[metric]} ({better} is better)", fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{set_title(set_name)}:\ndifference to {reference}, mean and subject-bootstrap 95 % interval "
                 "(green better, red worse, grey no difference at this n)", fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


# --- MLflow ----------------------------------------------------------------------------------------

def _log(tracking_uri: str, experiment: str, run_id: str, values: dict[str, Any], prefix: str,
         tags: dict[str, str] | None = None, params: dict[str, Any] | None = None) -> None:
    """Write `<prefix><metric>` (finite values; plus tags / params) into an existing run, which ends FINISHED."""
    from ganbert.track.tracking import MLflowTracker

    with MLflowTracker(tracking_uri, experiment, "study-cell", run_id=run_id) as tracker:
        if tags:
            tracker.set_tags(tags)
        if params:
            tracker.log_params(params)
        tracker.log_metrics({f"{prefix}{k}": float(v) for k, v in values.items()
                             if isinstance(v, (int, float)) and v is not None and math.isfinite(float(v))}, step=0)


def _child(tracking_uri: str, experiment: str, parent_id: str, run_name: str, tags: dict[str, str],
           params: dict[str, Any]) -> str:
    """A child run of the study (reused by name on a rerun), ended FINISHED; returns its id."""
    from ganbert.track.tracking import MLflowTracker, find_run

    with MLflowTracker(tracking_uri, experiment, run_name, parent_run_id=parent_id, tags=tags,
                       run_id=find_run(tracking_uri, experiment, run_name)) as child:
        child.log_params(params)
        return str(child.run_id)


def _mean(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of each metric over records (finite values)."""
    out = {}
    for metric in METRICS:
        vals = [r[metric] for r in records if r.get(metric) is not None and math.isfinite(r[metric])]
        if vals:
            out[metric] = float(np.mean(vals))
    return out


def parent_metrics(pairs: list[dict[str, Any]], rows: list[StudyRow]) -> dict[str, float]:
    """`<tracer>/<row slug>.<set>_<metric>.delta|ci_lo|ci_hi|p` of every paired comparison (p Holm-adjusted)."""
    slug = {r.name: r.slug for r in rows}
    out: dict[str, float] = {}
    for e in pairs:
        key = f"{e['tracer']}/{slug[e['row']]}.{e['set'].replace(':', '_')}_{e['metric']}"
        out.update({f"{key}.delta": e["mean_diff"], f"{key}.ci_lo": e["ci_low"], f"{key}.ci_hi": e["ci_high"]})
        if e["p_holm"] is not None:
            out[f"{key}.p"] = e["p_holm"]
    return out


# --- running it ------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What a study runs: rows x tracers x seeds on these folds (None = the fixed split), then these sets."""

    study: Study
    name: str
    base: Config
    data_dir: str
    tracking_uri: str
    seeds: int
    folds: list[Fold | None]
    reference: str
    externals: dict[str, str] = field(default_factory=dict)
    resamples: int = paired.RESAMPLES
    boot_seed: int = paired.SEED

    @property
    def sets(self) -> list[str]:
        return ([CV] if self.folds[0] is not None else []) + [TEST] + [f"external:{n}" for n in self.externals]


def _seeds(plan: Plan, row: StudyRow) -> list[int | None]:
    return [None] if row.baseline is not None else [plan.base.run.seed + k for k in range(plan.seeds)]


def _fold_name(fold: Fold | None) -> str:
    return "fixed" if fold is None else str(fold.index)


def epoch_compute(tracking_uri: str, run_id: str) -> float:
    """Sum of a run's per-epoch step compute: its `step_seconds` metric history (time inside `gan_step`, the latest
    value per epoch), as `ganbert bench overhead` counts it."""
    from mlflow import MlflowClient

    points = sorted(MlflowClient(tracking_uri).get_metric_history(run_id, "step_seconds"), key=lambda m: m.timestamp)
    return float(sum({m.step: m.value for m in points}.values()))


def overhead_line(timings: list[dict[str, float]]) -> str:
    """`per-run fixed overhead (wall - sum of epoch compute): median X s ...` over the trained runs of a study."""
    if not timings:
        return "no trained runs"
    over = np.array([t["wall"] - t["compute"] for t in timings])
    wall = np.array([t["wall"] for t in timings])
    return (f"{len(timings)} training runs: wall median {np.median(wall):.1f} s, per-run fixed overhead (wall - sum "
            f"of epoch step compute) median {np.median(over):.1f} s (min {over.min():.1f}, max {over.max():.1f}), "
            f"{100 * over.sum() / wall.sum():.0f} % of the training wall time")


def run_folds(plan: Plan, parent_id: str, say: Callable[[str], None]
              ) -> tuple[list[Cell], list[dict[str, Any]], list[dict[str, float]]]:
    """Phase 1: every row x tracer x seed x fold trained (or the baseline's fold mean) and its held-out fold
    scored; returns the cells (fold checkpoints), the out-of-fold subject records and each training run's wall and
    epoch-compute seconds. Never reads the test split."""
    from ganbert.train import loop

    experiment = plan.base.run.experiment
    cells: list[Cell] = []
    records: list[dict[str, Any]] = []
    timings: list[dict[str, float]] = []
    for tracer in plan.study.tracers:
        for row in plan.study.rows:
            for seed in _seeds(plan, row):
                cell = Cell(row, tracer, seed, [], list(plan.folds))
                for fold in plan.folds:
                    tags = {STUDY_TAG: plan.name, ROW_TAG: row.name, FOLD_TAG: _fold_name(fold),
                            SEED_TAG: "none" if seed is None else str(seed)}
                    if row.baseline is not None:
                        cell.checkpoints.append(None)
                        run_id = _child(plan.tracking_uri, experiment, parent_id,
                                        f"{plan.name}-{row.slug}-{tracer}-{_fold_name(fold)}", tags,
                                        {"model.method": row.baseline, "geometry.tracer": tracer,
                                         FOLD_TAG: _fold_name(fold)})
                        predict = generator_predictor(mean_pet(plan.data_dir, tracer, fold))
                    else:
                        cfg = trial_config(plan.base, row, tracer, seed, plan.name, fold)
                        say(f"training {row.name} on {tracer}, seed {seed}, fold {_fold_name(fold)} ({cfg.run.name})")
                        started = time.perf_counter()
                        fit = loop.fit(cfg, plan.data_dir, plan.tracking_uri, parent_run_id=parent_id, tags=tags,
                                       fold=fold)
                        if fit.run_id:
                            timings.append({"wall": time.perf_counter() - started,
                                            "compute": epoch_compute(plan.tracking_uri, fit.run_id)})
                        chosen = fit.best_checkpoint or fit.model_dir  # best val_psnr epoch (Ray keeps it)
                        if chosen is None:
                            raise RuntimeError(f"run {cfg.run.name}: no checkpoint to evaluate")
                        cell.checkpoints.append(str(chosen))
                        cell.model_dirs += [fit.model_dir] if fit.model_dir else []
                        run_id = fit.run_id or ""
                        predict = generator_predictor(load_checkpoint(str(chosen)))
                    if fold is None:
                        continue  # the fixed split has no held-out fold: its test split waits for phase 2
                    found = subject_records(predict, plan.data_dir, fold.part("held_out"), tracer,
                                            {"set": CV, "row": row.name, "tracer": tracer, "fold": fold.index,
                                             "seed": seed})
                    records += found
                    if run_id:
                        _log(plan.tracking_uri, experiment, run_id, _mean(found), "oof_")
                    say(f"{row.name} {tracer} seed {seed} fold {fold.index}: out-of-fold psnr "
                        f"{_mean(found).get('psnr', float('nan')):.3f} on {len(found)} subjects")
                cells.append(cell)
    return cells, records, timings


def score_locked(plan: Plan, cells: list[Cell], parent_id: str, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Phase 2: each cell's fold ensemble scored on the locked test split and on every external cohort."""
    experiment = plan.base.run.experiment
    records: list[dict[str, Any]] = []
    targets = [(TEST, plan.data_dir, TEST)] + [(f"external:{n}", d, Part("all", SPLITS))
                                               for n, d in plan.externals.items()]
    for cell in cells:
        predict = ensemble_predictor(_members(cell, plan.data_dir))
        seed_text = "none" if cell.seed is None else str(cell.seed)
        run_name = f"{plan.name}-{cell.row.slug}-{cell.tracer}-s{seed_text}-ensemble"
        run_id = _child(plan.tracking_uri, experiment, parent_id, run_name,
                        {STUDY_TAG: plan.name, ROW_TAG: cell.row.name, FOLD_TAG: "ensemble", SEED_TAG: seed_text},
                        {"model.method": (cell.row.baseline
                                          or config_mod.apply(plan.base, cell.row.overrides).model.method),
                         "geometry.tracer": cell.tracer, "study.members": len(cell.folds)})
        for set_name, data_dir, part in targets:
            found = subject_records(predict, data_dir, part, cell.tracer,
                                    {"set": set_name, "row": cell.row.name, "tracer": cell.tracer, "fold": None,
                                     "seed": cell.seed})
            records += found
            prefix = "test_" if set_name == TEST else f"{set_name.replace(':', '_')}_"
            _log(plan.tracking_uri, experiment, run_id, _mean(found), prefix)
            say(f"{cell.row.name} {cell.tracer} seed {cell.seed}: {set_name} psnr "
                f"{_mean(found).get('psnr', float('nan')):.3f} on {len(found)} subjects ({len(cell.folds)} members)")
    return records


def record_on_cards(plan: Plan, cells: list[Cell], summaries: dict[str, Any]) -> int:
    """Write each row's locked-test figures (the fold ensemble's mean and bootstrap interval) into the model card
    of every fold model it trained (paths or URIs; an MLflow model keeps the card it was logged with).
    Returns the number of cards written."""
    from ganbert.track import model_card

    k = plan.folds[0].k if plan.folds[0] is not None else 1
    written = 0
    for cell in cells:
        stats = summaries.get(TEST, {}).get(cell.tracer, {}).get(cell.row.name) or {}
        values = {m: {"mean": s["mean"], "ci95": [s["ci_low"], s["ci_high"]]}
                  for m, s in stats.items() if m in PAIRED_METRICS and s}
        if cell.row.baseline is not None or not values:
            continue
        source = (f"ganbert study {plan.name}, row {cell.row.name}: the ensemble of its {k} fold models (this model "
                  "is one of them)" if k > 1 else f"ganbert study {plan.name}, row {cell.row.name}")
        metrics = {"split": TEST, "n": max(s["n"] for s in stats.values() if s and "n" in s), "source": source,
                   "values": values}
        for model_dir in cell.model_dirs:
            if "://" not in model_dir:
                model_card.add_metrics(model_dir, metrics)
            else:  # a URI: the card's two files round-trip through a local copy
                with tempfile.TemporaryDirectory() as tmp:
                    local = home.download_dir(model_dir, Path(tmp) / "model")
                    cards = Path(tmp) / "cards"
                    cards.mkdir()
                    for path in model_card.add_metrics(local, metrics):
                        shutil.copy2(path, cards / path.name)
                    home.upload_dir(cards, model_dir)
            written += 1
    return written


def agreement(records: list[dict[str, Any]], set_name: str, tracer: str, row: str) -> dict[str, Any]:
    """The biomarker agreement (`evaluate.aggregate_subjects`'s keys) of a row's first seed over a set's subjects."""
    mine = [r for r in records if (r["set"], r["tracer"], r["row"]) == (set_name, tracer, row)]
    first = [r for r in mine if r["seed"] == mine[0]["seed"]] if mine else []
    found = aggregate_subjects([{k: (float("nan") if v is None else v) for k, v in r.items()} for r in first], tracer)
    return {k: found.get(k) for k, _ in AGREEMENT}


def analyse(plan: Plan, records: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summaries {set: {tracer: {row: {metric: cell_summary, "agreement": {...}}}}}, paired table) of all subject
    records."""
    rows = [r.name for r in plan.study.rows]
    summaries: dict[str, Any] = {}
    for set_name in plan.sets:
        for tracer in plan.study.tracers:
            for row in rows:
                stats = {m: cell_summary(records, set_name, tracer, row, m, plan.resamples, plan.boot_seed)
                         for m in PAIRED_METRICS}
                if any(stats.values()):
                    summaries.setdefault(set_name, {}).setdefault(tracer, {})[row] = stats | {
                        "agreement": agreement(records, set_name, tracer, row)}
    return summaries, paired_table(records, rows, plan.reference, plan.resamples, plan.boot_seed)


def run_study(plan: Plan, out: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Phase 1 (folds), phase 2 (locked test and external cohorts), the statistics and every output; returns the
    study.json content. All runs are children of one MLflow parent run named `plan.name`."""
    from ganbert.track.tracking import MLflowTracker, find_run

    started = time.perf_counter()
    experiment = plan.base.run.experiment
    parent = MLflowTracker(plan.tracking_uri, experiment, plan.name,
                           run_id=find_run(plan.tracking_uri, experiment, plan.name),
                           tags={STUDY_TAG: plan.name, KIND_TAG: "study"})
    k = plan.folds[0].k if plan.folds[0] is not None else 1
    parent.log_params({"study.space": Path(plan.study.source).name, "study.seeds": plan.seeds, "study.folds": k,
                       "study.fold_seed": plan.folds[0].seed if plan.folds[0] is not None else "none",
                       "study.reference": plan.reference, "study.preset": plan.base.preset,
                       "study.rows": ",".join(r.name for r in plan.study.rows),
                       "study.tracers": ",".join(plan.study.tracers), "study.bootstrap": plan.resamples,
                       "study.external": ",".join(plan.externals) or "none"})
    try:
        cells, records, timings = run_folds(plan, str(parent.run_id), say)
        records += score_locked(plan, cells, str(parent.run_id), say)
        summaries, pairs = analyse(plan, records)
        record_on_cards(plan, cells, summaries)
        seconds = time.perf_counter() - started
        description = (f"{k}-fold cross-validation (fold seed {plan.folds[0].seed}) over the non-test subjects, the "
                       f"locked test split scored by each row's {k}-fold ensemble" if k > 1 else
                       "fixed split: trained on train, checkpoint chosen on val, scored on test")
        info = {"name": plan.name, "description": description, "reference": plan.reference, "sets": plan.sets,
                "folds": k, "seeds": plan.seeds, "seconds": seconds, "timings": timings,
                "overhead": overhead_line(timings),
                "labels": any(r.get("suvr_mape") is not None for r in records),
                "bootstrap": {"resamples": plan.resamples, "seed": plan.boot_seed, "level": paired.LEVEL,
                              "method": "percentile; subjects sorted by id; numpy.random.default_rng(seed)"
                                        ".integers(0, n, size=(resamples, n))"},
                "wilcoxon": "scipy.stats.wilcoxon(differences) with its defaults (two-sided, zero_method 'wilcox')",
                "external": plan.externals, "data": plan.data_dir}
        result = {**info, "rows": [{"name": r.name, "baseline": r.baseline, "overrides": r.overrides}
                                   for r in plan.study.rows],
                  "tracers": list(plan.study.tracers),
                  "fold_subjects": [f.to_dict() for f in plan.folds if f is not None],
                  "cells": [{"row": c.row.name, "tracer": c.tracer, "seed": c.seed, "checkpoints": c.checkpoints,
                             "models": c.model_dirs}
                            for c in cells],
                  "summaries": summaries, "subjects": records, "paired": pairs}
        md = write_text(out / "study.md", render_markdown(plan.name, plan.study, info, summaries, pairs))
        js = write_text(out / "study.json", json.dumps(result, indent=1, default=str) + "\n")
        pngs = [render_forest(s, plan.study, plan.reference, pairs, out / f"forest-{s.replace(':', '-')}.png")
                for s in plan.sets if any(e["set"] == s for e in pairs)]
        for path in (md, js, *pngs):
            parent.log_artifact(path)
        over = [t["wall"] - t["compute"] for t in timings]
        overhead = {"run_overhead_median_s": float(np.median(over))} if over else {}
        parent.log_metrics({"study_seconds": seconds, **overhead,
                            **parent_metrics(pairs, list(plan.study.rows))}, step=0)
    except KeyboardInterrupt:
        parent.finish("KILLED")
        raise
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    return result


VIEW_PARAMS = ["model.method", "geometry.tracer", "run.seed", "optim.lambda_nsp", "optim.lambda_mlm",
               "sequence.pet_mask_ratio", "sequence.mri_mask_ratio"]
VIEW_METRICS = ["val_psnr", "oof_psnr", "oof_ssim", "oof_psnr_rel", "test_psnr", "test_ssim", "test_rmse",
                "test_psnr_rel", "test_ssim_rel", "test_wasserstein", "test_suvr_mape"]


def parse_externals(items: list[str]) -> dict[str, str]:
    """`--external NAME=SHARDS` (or just SHARDS, named by its folder) -> {name: shards path or URI}."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item.rstrip("/")).name, item
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")
        if not name or not path:
            raise ValueError(f"--external {item!r}: expected NAME=SHARDS or a shards folder")
        if name in out:
            raise ValueError(f"--external: the name {name!r} is given twice")
        out[name] = home.resolve(path)
    return out


def main(args: argparse.Namespace, cfg: Config) -> int:
    """`ganbert study --space FILE [--folds K] [--seeds N] [--reference ROW] [--external NAME=SHARDS] ...`."""
    from ganbert.common.raysession import ensure_ray
    from ganbert.prep.phantom_cache import data_dir_for
    from ganbert.store import loader
    from ganbert.track.tracking import set_runs_view

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no download bars between [study] lines
    study = load_study(args.space, cfg)
    names = [r.name for r in study.rows]
    reference = args.reference or default_reference(study, cfg)
    if reference not in names:
        raise ValueError(f"--reference {reference!r}: no such row (rows: {', '.join(names)})")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.folds < 1:
        raise ValueError(f"--folds must be >= 1, got {args.folds}")
    name = f"{cfg.run.name}-{Path(args.space).stem}"
    out = Path(home.resolve(args.out or f"runs/study/{name}"))
    check_out(out, args.overwrite)
    cfg = config_mod.apply(cfg, {"run.storage": home.resolve(cfg.run.storage)})
    externals = parse_externals(args.external or [])
    data_dir = data_dir_for(cfg, args.data)
    for ext in externals.values():
        loader.checked_manifest(ext, (), None, cfg.geometry)
    folds = (folds_mod.ensure(data_dir, args.folds, args.fold_seed, cfg.sequence.length) if args.folds > 1
             else [None])
    ensure_ray(dashboard=True)
    plan = Plan(study, name, cfg, data_dir, args.tracking_uri or home.default_tracking_uri(), args.seeds, folds,
                reference, externals, args.bootstrap)
    # saved first, so the runs can be followed while they train (sorted by a metric: children listed flat)
    view = set_runs_view(plan.tracking_uri, cfg.run.experiment, VIEW_PARAMS, VIEW_METRICS,
                         tags=[ROW_TAG, FOLD_TAG, SEED_TAG], order_by="val_psnr")
    watch = (f"mlflow ui --backend-store-uri {plan.tracking_uri} --host 127.0.0.1, then open "
             f"http://127.0.0.1:5000/{view}")
    print(f"[study] follow the runs in the MLflow UI: {watch} (Chart view for val_psnr per epoch)", flush=True)
    result = run_study(plan, out, lambda m: print(f"[study] {m}", flush=True))
    print((out / "study.md").read_text())
    print(f"wrote {out / 'study.md'}, {out / 'study.json'} and the forest plots; wall time {result['seconds']:.0f} s; "
          f"{result['overhead']}; tracking: {plan.tracking_uri}")
    print(f"compare in the MLflow UI: {watch}")
    return 0
