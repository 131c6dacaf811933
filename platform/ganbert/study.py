"""`ganbert study`: every row x tracer x seed trained, its checkpoint chosen on val, evaluated on test (Tables 1/2)."""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ganbert import config as config_mod
from ganbert.atomic import write_text
from ganbert.config import TRACERS, Config
from ganbert.evaluate import BASELINES, METRICS, check_out, evaluate_split, generator_predictor, mean_pet, write_evaluation

STUDY_TAG = "ganbert.study"
ROW_TAG = "ganbert.row"
KIND_TAG = "ganbert.kind"
TABLE_METRICS = ("psnr", "ssim", "rmse")
DETAIL_METRICS = ("psnr_brain", "ssim_brain", "psnr_rel", "ssim_rel", "wasserstein", "suvr_mape",
                  "positivity_agreement")


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
    """The rows and tracers of a study YAML (`search_spaces/study.yaml`)."""

    rows: tuple[StudyRow, ...]
    tracers: tuple[str, ...]
    source: str = ""


def load_study(path: str | Path, base: Config) -> Study:
    """Parse and validate a study YAML: `study: {tracers: [...], rows: [{name, baseline | overrides}, ...]}`.

    Every row's overrides are applied to `base` here, so a bad key or value fails before anything trains.
    """
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"--space {path}: {err}") from None
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
    if not rows:
        raise ValueError(f"--space {path}: 'rows' must list at least one row")
    slugs = [r.slug for r in rows]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"--space {path}: row names must differ (as run names): {slugs}")
    return Study(tuple(rows), tracers, str(path))


def trial_config(base: Config, row: StudyRow, tracer: str, seed: int, study: str) -> Config:
    """The config of one trained cell: base + row overrides, tracer, seed, its own run name and storage."""
    cfg = config_mod.apply(base, dict(row.overrides))
    storage = str(Path(base.run.storage).resolve() / study)
    return config_mod.apply(cfg, {"geometry.tracer": tracer, "run.seed": seed, "run.storage": storage,
                                  "run.name": f"{study}-{row.slug}-{tracer}-s{seed}"})


# --- the table ------------------------------------------------------------------------------------

def aggregate(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, tuple[float, float, int]]]:
    """{(row, tracer): {metric: (mean, sample sd (0 for one value), n)}} over the seeds with a finite value."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["row"], r["tracer"]), []).append(r["test"])
    out: dict[tuple[str, str], dict[str, tuple[float, float, int]]] = {}
    for key, tests in groups.items():
        cell: dict[str, tuple[float, float, int]] = {}
        for metric in METRICS:
            vals = [float(t[metric]) for t in tests if t.get(metric) is not None and math.isfinite(float(t[metric]))]
            if vals:
                cell[metric] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals))
        out[key] = cell
    return out


def _cell(stats: dict[str, tuple[float, float, int]], metric: str, digits: int) -> str:
    if metric not in stats:
        return "–"
    mean, sd, n = stats[metric]
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


DIGITS = {"psnr": 2, "ssim": 3, "rmse": 3, "psnr_brain": 2, "ssim_brain": 3, "psnr_rel": 2, "ssim_rel": 3,
          "wasserstein": 3, "suvr_mape": 2, "positivity_agreement": 2}


def render_markdown(study: Study, name: str, results: list[dict[str, Any]], seeds: int, seconds: float) -> str:
    """study.md: the Tables 1/2 layout (rows x tracers, PSNR/SSIM/RMSE mean ± sd) and the SPEC 9 detail table."""
    from ganbert.report import PAPER_RESULTS

    agg = aggregate(results)
    tracers = list(study.tracers)
    lines = [f"# GANBERT study `{name}`: test split, mean ± sd over {seeds} seed(s)", "",
             "Each trained cell: its checkpoint with the best validation PSNR (chosen on val, never on test), "
             "evaluated on the test split. PSNR / SSIM / RMSE on restored PET clipped to [-10, 1000] "
             "(data range 1010). The mean-PET baseline has no seed (one value). "
             f"Wall time {seconds / 60:.1f} min for {len(results)} evaluated cells.", "",
             "## Table 1/2 layout", ""]
    head = ["method"] + [f"{t} {m.upper()}" for t in tracers for m in TABLE_METRICS]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in study.rows:
        cells = [row.name] + [_cell(agg.get((row.name, t), {}), m, DIGITS[m]) for t in tracers for m in TABLE_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## In-brain, scale-free and regional metrics (SPEC section 9)", "",
              "`brain`: inside the brain mask; `rel`: each volume divided by its own in-brain mean (dose and "
              "scanner scale cancel); W1: Wasserstein distance of in-brain intensities (PET units); SUVR MAPE: "
              "mean absolute % error of regional SUVR; positivity: agreement of real and generated reads.", "",
              "| method | tracer | n | PSNR brain | SSIM brain | PSNR rel | SSIM rel | W1 | SUVR MAPE % | positivity |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in study.rows:
        for t in tracers:
            stats = agg.get((row.name, t), {})
            n = stats.get("psnr", (0, 0, 0))[2]
            lines.append(f"| {row.name} | {t} | {n} | " + " | ".join(_cell(stats, m, DIGITS[m]) for m in DETAIL_METRICS)
                         + " |")
    lines += ["", "## The paper's numbers (text only: ADNI3 PET units and ranges, not comparable to the phantom's)", "",
              "| method | tracer | PSNR | SSIM | RMSE |", "|---|---|---:|---:|---:|"]
    for (method, tracer), (p, s, r) in PAPER_RESULTS.items():
        lines.append(f"| {method} | {tracer} | {p:.2f} | {s:.2f} | {r:.2f} |")
    return "\n".join(lines) + "\n"


def render_png(study: Study, results: list[dict[str, Any]], path: Path) -> Path:
    """Two panels, rows grouped by tracer with sd error bars: test PSNR (paper range) and test SSIM rel."""
    from matplotlib.figure import Figure

    from ganbert.figures import save_png

    agg = aggregate(results)
    tracers = list(study.tracers)
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2)
    width = 0.8 / len(study.rows)
    for ax, metric, label in ((axes[0], "psnr", "test PSNR (dB, paper range)"), (axes[1], "ssim_rel", "test SSIM rel")):
        for i, row in enumerate(study.rows):
            xs, hs, es = [], [], []
            for j, t in enumerate(tracers):
                stats = agg.get((row.name, t), {})
                if metric in stats:
                    xs.append(j + (i - (len(study.rows) - 1) / 2) * width)
                    hs.append(stats[metric][0])
                    es.append(stats[metric][1])
            ax.bar(xs, hs, width, yerr=es, capsize=2, color=f"C{i % 10}", label=row.name)
        ax.set_xticks(range(len(tracers)), tracers)
        ax.set_ylabel(label)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("test split, mean ± sd over seeds (checkpoints chosen on val)")
    fig.tight_layout()
    return save_png(fig, path)


# --- running it -----------------------------------------------------------------------------------

def _log_test(tracking_uri: str, experiment: str, run_id: str, test: dict[str, Any], tags: dict[str, str],
              params: dict[str, Any] | None = None) -> None:
    """Write `test_<metric>` (and tags/params) into an existing run, which ends FINISHED again."""
    from ganbert.tracking import MLflowTracker

    with MLflowTracker(tracking_uri, experiment, "study-cell", run_id=run_id) as tracker:
        tracker.set_tags(tags)
        if params:
            tracker.log_params(params)
        tracker.log_metrics({f"test_{k}": v for k, v in test.items() if isinstance(v, (int, float))
                             and v is not None and math.isfinite(float(v))}, step=0)


def run_study(study: Study, base: Config, data_dir: str, tracking_uri: str, seeds: int, out: Path,
              name: str) -> list[dict[str, Any]]:
    """Train (sequential `loop.fit`, resumable), select on val, evaluate on test; returns one dict per cell.

    All runs are children of one MLflow parent run named `name`; every child gets test_* metrics.
    """
    import torch

    from ganbert.tracking import MLflowTracker, find_run
    from ganbert.train import loop
    from ganbert.train.checkpoint import load_generator

    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    experiment = base.run.experiment
    parent = MLflowTracker(tracking_uri, experiment, name, run_id=find_run(tracking_uri, experiment, name),
                           tags={STUDY_TAG: name, KIND_TAG: "study"})
    parent.log_params({"study.space": Path(study.source).name, "study.seeds": seeds, "study.preset": base.preset,
                       "study.rows": ",".join(r.name for r in study.rows), "study.tracers": ",".join(study.tracers)})
    results: list[dict[str, Any]] = []
    try:
        for tracer in study.tracers:
            for row in study.rows:
                if row.baseline is not None:
                    started = time.perf_counter()
                    evaluation = evaluate_split(generator_predictor(mean_pet(data_dir, tracer)), data_dir, "test", tracer)
                    cell = out / "cells" / f"{row.slug}-{tracer}"
                    write_evaluation(cell, evaluation, {"name": row.name, "tracer": tracer, "split": "test"})
                    run_name = f"{name}-{row.slug}-{tracer}"
                    with MLflowTracker(tracking_uri, experiment, run_name, parent_run_id=parent.run_id,
                                       run_id=find_run(tracking_uri, experiment, run_name)) as child:
                        child_id = child.run_id
                    _log_test(tracking_uri, experiment, str(child_id), evaluation.summary,
                              {STUDY_TAG: name, ROW_TAG: row.name},
                              {"model.method": row.baseline, "geometry.tracer": tracer})
                    results.append({"row": row.name, "tracer": tracer, "seed": None, "run_id": child_id,
                                    "checkpoint": None, "seconds": time.perf_counter() - started,
                                    "test": evaluation.summary})
                    print(f"[study] {row.name} {tracer}: test psnr={evaluation.summary['psnr']:.3f}", flush=True)
                    continue
                for k in range(seeds):
                    cfg = trial_config(base, row, tracer, base.run.seed + k, name)
                    started = time.perf_counter()
                    print(f"[study] training {row.name} on {tracer}, seed {cfg.run.seed} ({cfg.run.name})", flush=True)
                    fit = loop.fit(cfg, data_dir, tracking_uri, parent_run_id=parent.run_id,
                                   tags={STUDY_TAG: name, ROW_TAG: row.name})
                    trained = time.perf_counter() - started
                    chosen = fit.best_checkpoint or fit.model_dir  # best val_psnr epoch (Ray keeps it)
                    if chosen is None:
                        raise RuntimeError(f"run {cfg.run.name}: no checkpoint to evaluate")
                    generator, _ = load_generator(Path(chosen), torch.device("cpu"))
                    evaluation = evaluate_split(generator_predictor(generator), data_dir, "test", tracer)
                    write_evaluation(out / "cells" / cfg.run.name, evaluation,
                                     {"name": row.name, "tracer": tracer, "split": "test", "checkpoint": chosen})
                    run_id = find_run(tracking_uri, experiment, cfg.run.name)
                    if run_id:
                        _log_test(tracking_uri, experiment, run_id, evaluation.summary,
                                  {STUDY_TAG: name, ROW_TAG: row.name, "selected_checkpoint": str(chosen)})
                    seconds = time.perf_counter() - started
                    results.append({"row": row.name, "tracer": tracer, "seed": cfg.run.seed, "run_id": run_id,
                                    "checkpoint": chosen, "seconds": seconds, "train_seconds": trained,
                                    "test": evaluation.summary})
                    print(f"[study] {row.name} {tracer} seed {cfg.run.seed}: test psnr={evaluation.summary['psnr']:.3f} "
                          f"({seconds:.0f} s, training {trained:.0f} s)", flush=True)
    except KeyboardInterrupt:
        parent.finish("KILLED")
        raise
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    return results


VIEW_PARAMS = ["model.method", "geometry.tracer", "run.seed", "optim.lambda_nsp", "optim.lambda_mlm"]
VIEW_METRICS = ["val_psnr", "test_psnr", "test_ssim", "test_rmse", "test_psnr_rel", "test_ssim_rel", "test_wasserstein",
                "test_suvr_mape", "test_positivity_agreement"]


def link_best_models(tracking_uri: str, parent_run_id: str, results: list[dict[str, Any]]) -> list[str]:
    """List on the parent run the logged model of each trained row x tracer's best seed by validation PSNR."""
    from mlflow import MlflowClient

    from ganbert.tracking import link_model

    client = MlflowClient(tracking_uri)
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for r in results:
        if not r.get("run_id") or r.get("seed") is None:
            continue
        vals = [m.value for m in client.get_metric_history(r["run_id"], "val_psnr") if math.isfinite(m.value)]
        uri = client.get_run(r["run_id"]).data.tags.get("model_uri")
        key = (r["row"], r["tracer"])
        if vals and uri and (key not in best or max(vals) > best[key][0]):
            best[key] = (max(vals), uri)
    for _, uri in best.values():
        link_model(tracking_uri, parent_run_id, uri)
    return [uri for _, uri in best.values()]


def main(args: argparse.Namespace, cfg: Config) -> int:
    from ganbert.home import default_tracking_uri
    from ganbert.raysession import ensure_ray
    from ganbert.tracking import MLflowTracker, find_run, set_runs_view
    from ganbert.train.loop import data_dir_for

    study = load_study(args.space, cfg)
    name = f"{cfg.run.name}-{Path(args.space).stem}"
    out = Path(args.out or f"runs/study/{name}").resolve()
    check_out(out, args.overwrite)
    cfg = config_mod.apply(cfg, {"run.storage": str(Path(cfg.run.storage).resolve())})
    ensure_ray(dashboard=True)
    data_dir = data_dir_for(cfg, args.data)
    tracking_uri = args.tracking_uri or default_tracking_uri()
    started = time.perf_counter()
    results = run_study(study, cfg, data_dir, tracking_uri, args.seeds, out, name)
    seconds = time.perf_counter() - started
    md = write_text(out / "study.md", render_markdown(study, name, results, args.seeds, seconds))
    png = render_png(study, results, out / "study.png")
    js = write_text(out / "study.json", json.dumps({"name": name, "seeds": args.seeds, "seconds": seconds,
                                                     "results": results}, indent=2, default=str) + "\n")
    with MLflowTracker(tracking_uri, cfg.run.experiment, name,
                       run_id=find_run(tracking_uri, cfg.run.experiment, name)) as parent:
        for path in (md, png, js):
            parent.log_artifact(path)
        parent.log_metrics({"study_seconds": seconds}, step=0)
        link_best_models(tracking_uri, str(parent.run_id), results)
    view = set_runs_view(tracking_uri, cfg.run.experiment, VIEW_PARAMS, VIEW_METRICS, tags=["ganbert.row"])
    print(md.read_text())
    print(f"wrote {md}, {png} and {js}; wall time {seconds:.0f} s; tracking: {tracking_uri}")
    print(f"compare in the MLflow UI: mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1, then open "
          f"http://127.0.0.1:5000/{view}")
    return 0
