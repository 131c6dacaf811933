"""The main job, `make demo` (= `ganbert demo --out runs/demo`): phantom cohort -> Ray Data preprocessing ->
Ray Train (demo preset, CPU workers) -> test-split evaluation -> synthesis of a held-out subject.

Everything is written under --out; the last three lines are `model:`, `tracking:` and `synthesized:`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn

from ganbert import config as config_mod
from ganbert.config import TRACERS, Config
from ganbert.data import loader, phantom, preprocess, shards
from ganbert.atomic import write_text
from ganbert.raysession import ensure_ray
from ganbert.synthesize import synthesize_file
from ganbert.train import loop
from ganbert.train.checkpoint import load_generator


class MeanPET(nn.Module):
    """Baseline 'generator': the mean normalised training PET, whatever the MRI (same shape as G's output)."""

    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)

    def forward(self, mri: torch.Tensor) -> torch.Tensor:
        return self.mean.expand(mri.shape[0], *self.mean.shape)


def mean_pet(data_dir: str, tracer: str) -> MeanPET:
    """Streamed mean of the normalised training PET volumes of a tracer."""
    total, n = None, 0
    for norm in loop.normalised_train_pet(data_dir, tracer):
        total = norm if total is None else total + norm
        n += 1
    assert total is not None  # normalised_train_pet raises on an empty split
    return MeanPET((total / n).float())


class Clock:
    """Progress lines with elapsed seconds."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[demo {time.perf_counter() - self.start:6.1f}s] {message}", flush=True)


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
    say("preprocessing on Ray Data (conform T1, resample PET, subject-level split, Parquet shards)")
    summary = preprocess.run(raw, Path(data_dir), cfg)
    say(f"shards: {summary.get('rows')} rows in {data_dir} ({summary.get('rejected')} rejected)")

    say(f"training {cfg.model.method} on {tracer}: {cfg.optim.epochs} epochs, {cfg.run.workers} Ray Train worker(s)")
    result = loop.fit(cfg, data_dir, tracking_uri)
    say(f"trained: {result.metrics.get('step')} steps; checkpoint {result.checkpoint}")

    generator, _ = load_generator(Path(result.model_dir))
    device = torch.device("cpu")
    figures = out / "figures"
    rows = [(cfg.model.method, loop.validate(cfg, generator, data_dir, device, figures, split="test")),
            ("mean-PET baseline", loop.validate(cfg, mean_pet(data_dir, tracer), data_dir, device, split="test"))]
    n_test = loader.count_rows(data_dir, "test", tracer)

    subject, t1 = held_out_t1(raw, data_dir, tracer)
    target = out / "synthesized" / f"{subject}_{tracer}_pet.nii.gz"
    say(f"synthesising held-out subject {subject} from {t1.name}")
    synthesize_file(generator, cfg, t1, target)

    print(f"\nResults on the test split ({n_test} {tracer} subjects never seen in training; restored PET units, "
          "paper range [-10, 1000]):")
    print("| model | PSNR | SSIM | RMSE | PSNR [0,1] | SSIM [0,1] |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, m in rows:
        print(f"| {name} | {m['test_psnr']:.2f} | {m['test_ssim']:.4f} | {m['test_rmse']:.2f} | "
              f"{m['test_psnr01']:.2f} | {m['test_ssim01']:.4f} |")
    say("done")
    print(f"\nfigures: {figures} (montage.png, histogram.png)")
    print(f"Ray Train storage: {cfg.run.storage}/{cfg.run.name}")
    print(f"open the MLflow UI: .venv/bin/mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1")
    print(f"synthesise another T1: .venv/bin/ganbert synthesize --model {result.model_uri or result.model_dir} "
          f"--tracking-uri {tracking_uri} --mri T1.nii.gz --out PET.nii.gz")
    print(f"model: {result.model_uri or result.model_dir}")
    print(f"tracking: {tracking_uri}")
    print(f"synthesized: {target}")
    return 0
