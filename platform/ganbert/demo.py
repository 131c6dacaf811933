"""The main job, `make demo` (= `ganbert demo --out runs/demo`): phantom cohort -> Ray Data preprocessing ->
Ray Train (demo preset, CPU workers: the configured method, then the L1-only U-Net) -> test-split evaluation
(`ganbert.scoring.evaluate`, checkpoints chosen on val, beside the mean-PET baseline) -> synthesis of a held-out
subject.

Everything is written under --out; the last four lines are `model:`, `tracking:`, `synthesized:` and `qc picture:`
(the synthesised subject's QC picture: its T1 with the registered template's brain outline and the PET over it).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

from ganbert import config as config_mod
from ganbert.common.atomic import write_text
from ganbert.common.raysession import ensure_ray
from ganbert.config import TRACERS, Config
from ganbert.ingest import phantom
from ganbert.models.saved import load_generator
from ganbert.prep import preprocess
from ganbert.scoring.evaluate import Evaluation, evaluate_split, generator_predictor, mean_pet, write_evaluation
from ganbert.serve.synthesize import load_members, synthesize_file
from ganbert.store import loader, shards
from ganbert.track.tracking import set_runs_view
from ganbert.train import loop


class Clock:
    """Progress lines with elapsed seconds."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[demo {time.perf_counter() - self.start:6.1f}s] {message}", flush=True)


def format_table(rows: list[tuple[str, Evaluation]]) -> str:
    """The demo's closing Markdown table: one line per model, mean over the test subjects."""
    cols = (("psnr", "PSNR", 2), ("ssim", "SSIM", 4), ("rmse", "RMSE", 2), ("psnr_rel", "PSNR rel", 2),
            ("ssim_rel", "SSIM rel", 4), ("wasserstein", "W1", 2), ("suvr_mape", "SUVR MAPE %", 2))
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "| --- |" + " --- |" * len(cols)]
    for name, evaluation in rows:
        s = evaluation.summary
        cells = ["–" if s.get(k) is None or not math.isfinite(s[k]) else f"{s[k]:.{d}f}" for k, _, d in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def held_out_t1(raw: Path, data_dir: str, tracer: str) -> tuple[str, Path]:
    """(subject, raw T1 path) of the first test-split row of `tracer` (a subject never trained on)."""
    row = next(loader.read_rows(data_dir, "test", tracer), None)
    if row is None:
        raise ValueError(f"no test rows for tracer {tracer} in {data_dir}")
    for entry in shards.read_manifest(data_dir)["rows"]:
        if entry["pet_image_id"] == row["pet_image_id"]:
            return row["subject"], raw / entry["sources"]["mri"][0]["path"]
    raise ValueError(f"manifest of {data_dir} has no row for {row['pet_image_id']}")


def main(args: argparse.Namespace, cfg: Config) -> int:
    say = Clock()
    # Only the demo's own lines and the per-epoch [val] line: no per-step [train] lines, no MLflow download bars
    # (set before Ray starts, so its workers inherit it).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    raw, data_dir, tracking_uri = out / "raw", str(out / "shards"), f"sqlite:///{out}/mlflow.db"
    cfg = config_mod.apply(cfg, {"run.storage": str(out / "ray"), "run.experiment": "demo", "run.log_every": 0})
    tracer = cfg.geometry.tracer

    if (raw / "COMPLETE").exists():
        say(f"phantom cohort already in {raw}")
    else:
        say(f"writing a phantom cohort: {args.subjects} subjects x {len(TRACERS)} tracers in ADNI layout -> {raw}")
        phantom.write_cohort(raw, args.subjects, TRACERS, "demo", cfg.run.seed)
        write_text(raw / "COMPLETE", "ok\n")
    ensure_ray(dashboard=True)
    # The demo cohort's PET is written in its T1's space, so PET-to-T1 registration (the default for real
    # downloads, about 5 s a pair on one core) has nothing to correct here: skip it to stay within minutes.
    say("preprocessing on Ray Data (conform T1, template brain mask, resample PET, subject-level split, Parquet "
        "shards; registration none: the phantom PET is in its T1's space)")
    summary = preprocess.run(raw, Path(data_dir), cfg, registration="none")
    say(f"shards: {summary.get('rows')} rows in {data_dir} ({summary.get('rejected')} rejected)")

    trained = []
    l1 = config_mod.apply(cfg, {"model.method": "ganbert", "optim.lambda_nsp": 0.0, "optim.lambda_mlm": 0.0,
                                "run.name": f"{cfg.run.name}-l1"})
    for label, run_cfg in ((cfg.model.method, cfg), ("L1-only U-Net", l1)):
        say(f"training {label} on {tracer}: {run_cfg.optim.epochs} epochs, {run_cfg.run.workers} Ray Train worker(s)")
        res = loop.fit(run_cfg, data_dir, tracking_uri)
        say(f"trained {label}: {res.metrics.get('step')} steps; best-val checkpoint {res.best_checkpoint}")
        trained.append((label, res))
    result = trained[0][1]

    say("evaluating on the test split (checkpoints chosen on val)")
    figures = out / "figures"
    rows: list[tuple[str, Evaluation]] = []
    for label, res in trained:
        generator, _ = load_generator(Path(res.best_checkpoint or res.model_dir))
        rows.append((label, evaluate_split(generator_predictor(generator), data_dir, "test", tracer,
                                           figures=figures if not rows else None)))
    rows.append(("mean-PET baseline", evaluate_split(generator_predictor(mean_pet(data_dir, tracer)), data_dir,
                                                     "test", tracer)))
    for label, evaluation in rows:
        write_evaluation(out / "evaluation" / label.replace(" ", "-"), evaluation, {"name": label, "split": "test",
                                                                                  "tracer": tracer})
    n_test = loader.count_rows(data_dir, "test", tracer)
    members = load_members([str(result.model_dir)])  # the logged model (`model:` below) and its model card

    subject, t1 = held_out_t1(raw, data_dir, tracer)
    target = out / "synthesized" / f"{subject}_{tracer}_pet.nii.gz"
    say(f"synthesising held-out subject {subject} from {t1.name}")
    synthesized = synthesize_file(members, members.cfg, t1, target, overwrite=True)  # input QC first; a rerun redoes it
    say(f"model card: {members.cards[0]}")

    print(f"\nResults on the test split ({n_test} {tracer} subjects never seen in training; checkpoints chosen on "
          "val; PSNR/SSIM/RMSE on restored PET in the paper range [-10, 1000]; rel = each volume over its own "
          "in-brain mean; W1 = Wasserstein distance of in-brain intensities):")
    print(format_table(rows))
    view = set_runs_view(tracking_uri, cfg.run.experiment, ["model.method", "optim.lambda_nsp", "optim.lambda_mlm"],
                         ["val_psnr", "val_ssim", "val_rmse", "val_psnr01", "val_ssim01"])
    say("done")
    print(f"\nfigures: {figures} (montage.png, histogram.png)")
    print(f"Ray Train storage: {cfg.run.storage}/{cfg.run.name}")
    print(f"open the MLflow UI: .venv/bin/mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1, then "
          f"http://127.0.0.1:5000/{view} (runs side by side: swept params, val metrics, models)")
    print(f"synthesise another T1: .venv/bin/ganbert synthesize --model {result.model_uri or result.model_dir} "
          f"--tracking-uri {tracking_uri} --mri T1.nii.gz --out PET.nii.gz")
    print(f"model: {result.model_uri or result.model_dir}")
    print(f"tracking: {tracking_uri}")
    print(f"synthesized: {target}")
    print(f"qc picture: {next(f for f in synthesized.files if f.endswith('_qc.png'))}")
    return 0
