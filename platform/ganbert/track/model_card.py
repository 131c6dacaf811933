"""The model card of a published model folder: `model_card.md` (for people) and `metadata.json` (the same facts).

In the spirit of MONAI bundle metadata and Hugging Face model cards: task, tracer, geometry, method and config,
the training cohort (from the shards' manifest: rows and subjects per split, source, preprocessing, registration,
T1 QC, a fingerprint of the training files; no subject id), the code's git commit, the run (MLflow run id, epoch
chosen on val), test-split metrics with intervals when a study made them (`add_metrics`, the hook a study calls
after evaluating the model), intended use and limits. `train.loop.publish_best` writes both files into the model
folder before it is logged, so the MLflow model carries them too (they travel in its `model_dir` artifact).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import math
import subprocess
from pathlib import Path
from typing import Any

from ganbert.common.atomic import write_text
from ganbert.config import Config
from ganbert.models.saved import CARD_FILE, METADATA_FILE

SCHEMA = "ganbert-model-card/1"
INTENDED_USE = ("Research on MRI-to-PET synthesis: method development, ablations and studies of what a T1 predicts "
                "about PET. Not a medical device.")
LIMITATIONS = (
    "Not for diagnosis, screening or any clinical decision about a person.",
    "Amyloid (AV45) and tau (AV1451) PET from a T1 alone are ill-posed where atrophy and pathology disagree: "
    "Baron et al. (2026) report an amyloid-positivity AUC of about 0.6 from T1-only models. A synthetic PET's "
    "positivity read is not evidence about the person.",
    "Models trained on the phantom cohort (`ganbert phantom`) are demonstrations of the pipeline: the phantom's "
    "anatomy and uptake are simulated, so their outputs say nothing about human physiology.",
    "Validated only on inputs like its training cohort (scanner, protocol, population). Input QC rejects images that "
    "are not whole-head T1s but cannot certify that an input is within the training distribution.",
    "Outputs are in the training PET's scanner units (not calibrated SUV); regional SUVRs use a coarse atlas.",
)


def git_commit(path: Path | None = None) -> dict[str, Any]:
    """{"commit": HEAD of the checkout holding this package (or "unknown"), "dirty": uncommitted changes or None}."""
    where = str(path or Path(__file__).resolve().parent)

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", where, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit or "unknown", "dirty": None if status is None else bool(status)}


def training_cohort(data_dir: str, tracer: str) -> dict[str, Any]:
    """What the shards' manifest says about the training data of `tracer` (counts, settings, a fingerprint)."""
    from ganbert.store import shards

    manifest = shards.read_manifest(data_dir)
    rows = [r for r in manifest.get("rows", []) if r.get("tracer") == tracer]
    splits = {}
    for split in shards.SPLITS:
        mine = [r for r in rows if r.get("split") == split]
        groups: dict[str, int] = {}
        for r in mine:
            groups[str(r.get("group") or "unknown")] = groups.get(str(r.get("group") or "unknown"), 0) + 1
        splits[split] = {"rows": len(mine), "subjects": len({r.get("subject") for r in mine}),
                         "groups": dict(sorted(groups.items()))}
    train = sorted((s.get("sha256", "") for r in rows if r.get("split") == "train"
                    for kind in ("mri", "pet") for s in r.get("sources", {}).get(kind, [])))
    qc = [r.get("t1_qc") for r in rows if isinstance(r.get("t1_qc"), dict)]
    phantom = bool(rows) and all(bool(r.get("labels")) for r in rows)
    return {"data": str(data_dir), "format": manifest.get("format"),
            "source": "phantom cohort (ganbert phantom; ground-truth region labels)" if phantom
            else "ADNI-layout download",
            "splits": splits, "preprocessing": manifest.get("preprocess", {}),
            "registration": manifest.get("preprocess", {}).get("registration", "none"),
            "t1_qc": {"rows_scored": len(qc), "rows_failing": sum(1 for q in qc if not q.get("passed", True))},
            "train_files_sha256": hashlib.sha256("\n".join(train).encode()).hexdigest()}


def build_metadata(cfg: Config, *, data_dir: str | None = None, run: dict[str, Any] | None = None,
                   metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metadata.json content of a model of `cfg` (see the module docstring); `metrics` see `add_metrics`."""
    g = cfg.geometry
    try:
        version = importlib.metadata.version("ganbert")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    meta: dict[str, Any] = {
        "schema": SCHEMA, "name": cfg.run.name, "task": f"T1 MRI -> {g.tracer} PET synthesis",
        "tracer": g.tracer, "method": cfg.model.method, "preset": cfg.preset,
        "created": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "geometry": {"mri_size": list(g.mri_size), "mri_voxel_mm": g.mri_voxel_mm, "pet_size": list(g.pet_size),
                     "pet_voxel_mm": list(g.pet_voxel_mm), "pet_frames": g.pet_frames},
        "inputs": "one whole-head T1-weighted MRI (NIfTI or DICOM), conformed by ganbert: RAS cube, percentiles "
                  "0.1..99.9 -> 0..255",
        "outputs": f"{g.pet_frames}-frame {g.tracer} PET (d, h, w, T) float32 in the training PET's units, "
                   "overlaying the input T1",
        "config": cfg.to_dict(), "training": training_cohort(data_dir, g.tracer) if data_dir else None,
        "run": run or {}, "code": {"package": "ganbert", "version": version, **git_commit()},
        "metrics": metrics, "intended_use": INTENDED_USE, "limitations": list(LIMITATIONS)}
    meta["summary"] = summary(meta)
    return meta


def summary(meta: dict[str, Any]) -> str:
    """One line: tracer, method, geometry, training cohort, commit, test metrics or their absence, intended use."""
    g = meta.get("geometry", {})
    train = ((meta.get("training") or {}).get("splits") or {}).get("train")
    cohort = (f"trained on {train['subjects']} subjects ({train['rows']} rows) of a "
              f"{(meta['training']['source'] or '').split(' (')[0]}" if train else "training cohort not recorded")
    metrics = meta.get("metrics") or {}
    psnr = (metrics.get("values") or {}).get("psnr")
    tested = (f"test PSNR {psnr['mean']:.2f} dB (n={metrics.get('n')})" if isinstance(psnr, dict) and "mean" in psnr
              else "no test-split metrics recorded")
    commit = str((meta.get("code") or {}).get("commit", "unknown"))[:10]
    return (f"{meta.get('method')} {meta.get('tracer')} generator '{meta.get('name')}' "
            f"(MRI {'x'.join(map(str, g.get('mri_size', [])))} -> PET {'x'.join(map(str, g.get('pet_size', [])))} "
            f"x {g.get('pet_frames')} frames), {cohort}; {tested}; code {commit}; research use only, not for diagnosis")


def _metrics_table(metrics: dict[str, Any] | None) -> list[str]:
    if not metrics or not metrics.get("values"):
        return ["No test-split metrics are recorded for this model. A study that evaluates it on the locked test "
                "split records them here (`model_card.add_metrics`)."]
    lines = [f"Split: {metrics.get('split', 'test')}, n = {metrics.get('n')}; source: {metrics.get('source', '')}.",
             "", "| metric | mean | 95 % interval |", "| --- | --- | --- |"]
    for name, value in metrics["values"].items():
        ci = value.get("ci95")
        lines.append(f"| {name} | {value.get('mean'):.4g} | "
                     + (f"{ci[0]:.4g} .. {ci[1]:.4g}" if ci else "–") + " |")
    return lines


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "unknown"


def render(meta: dict[str, Any]) -> str:
    """model_card.md from the metadata."""
    train = meta.get("training") or {}
    g = meta["geometry"]
    lines = [f"# Model card: {meta['name']} ({meta['method']}, {meta['tracer']})", "", meta["summary"], "",
             "## Task", "", f"{meta['task']}. Input: {meta['inputs']}. Output: {meta['outputs']}.", "",
             "## Geometry", "",
             f"MRI cube {g['mri_size']} at {g['mri_voxel_mm']:g} mm; PET grid {g['pet_size']} at "
             f"{[round(v, 3) for v in g['pet_voxel_mm']]} mm, {g['pet_frames']} frame groups.", "",
             "## Training data", ""]
    if train:
        lines += [f"Source: {train['source']}; shards `{train['data']}` ({train['format']}).",
                  f"Preprocessing: registration {train['registration']}; " + "; ".join(
                      f"{k}: {v}" for k, v in sorted(train["preprocessing"].items()) if k != "registration") + ".",
                  f"T1 QC: {train['t1_qc']['rows_scored']} {meta['tracer']} rows scored, "
                  f"{train['t1_qc']['rows_failing']} failing (kept with --skip-qc).",
                  f"Training files fingerprint (sha256 over the sorted file checksums): {train['train_files_sha256']}.",
                  "", "| split | rows | subjects | groups |", "| --- | --- | --- | --- |"]
        lines += [f"| {s} | {v['rows']} | {v['subjects']} | "
                  + ", ".join(f"{k} {n}" for k, n in v["groups"].items()) + " |" for s, v in train["splits"].items()]
    else:
        lines.append("Not recorded.")
    run = meta.get("run") or {}
    code = meta["code"]
    lines += ["", "## Method and run", "",
              f"Method `{meta['method']}`, preset `{meta['preset']}` (full config in metadata.json and config.yaml). "
              + (f"Epoch {run['best_epoch']} chosen on val PSNR {_num(run.get('best_val_psnr'))} dB; "
                 if "best_epoch" in run else "")
              + (f"MLflow run {run['mlflow_run_id']}. " if run.get("mlflow_run_id") else ""),
              f"Code: ganbert {code['version']}, git commit {code['commit']}"
              + (" (with uncommitted changes)" if code.get("dirty") else "") + ".", "",
              "## Test-split metrics", ""] + _metrics_table(meta.get("metrics")) + [
              "", "## Intended use", "", meta["intended_use"], "", "## Limits", ""]
    lines += [f"- {item}" for item in meta["limitations"]]
    return "\n".join(lines) + "\n"


def write_model_card(model_dir: Path | str, cfg: Config, *, data_dir: str | None = None,
                     run: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write `model_card.md` and `metadata.json` into a local model folder (atomically); returns both paths."""
    return _write(Path(model_dir), build_metadata(cfg, data_dir=data_dir, run=run, metrics=metrics))


def _finite(value: Any) -> Any:
    """Non-finite floats as None (JSON has no NaN), recursively."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write(model_dir: Path, meta: dict[str, Any]) -> tuple[Path, Path]:
    meta = _finite(meta)
    meta["summary"] = summary(meta)
    path = write_text(model_dir / METADATA_FILE, json.dumps(meta, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return write_text(model_dir / CARD_FILE, render(meta)), path


def read_metadata(model_dir: Path | str) -> dict[str, Any] | None:
    """metadata.json of a model folder, or None when the folder has none (a model published before cards)."""
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"model card {path}: unreadable ({err})") from None
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise ValueError(f"model card {path}: not a {SCHEMA} file")
    return meta


def add_metrics(model_dir: Path | str, metrics: dict[str, Any]) -> tuple[Path, Path]:
    """Record test-split metrics in a local model folder's card (the hook for `ganbert study`); rewrites both files.

    metrics: {"split": "test", "n": subjects, "source": e.g. "ganbert study <name>, ensemble of 5 folds",
    "values": {metric: {"mean": float, "ci95": [low, high] or None}}}. The MLflow model keeps the card it was
    logged with; log the same metrics on its run.
    """
    model_dir = Path(model_dir)
    meta = read_metadata(model_dir)
    if meta is None:
        raise ValueError(f"model_dir {model_dir}: no {METADATA_FILE} (write_model_card first)")
    values = metrics.get("values") if isinstance(metrics, dict) else None
    if not isinstance(values, dict) or not all(isinstance(v, dict) and "mean" in v for v in values.values()):
        raise ValueError('metrics must be {"n", "split", "source", "values": {metric: {"mean", "ci95"}}}')
    meta["metrics"] = metrics
    return _write(model_dir, meta)
