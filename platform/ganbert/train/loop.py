"""Ray Train boundary: `ganbert train --preset tiny [--data DIR] [key=value ...]` runs the GAN on a TorchTrainer.

Rerunning the same command (same run.name and run.storage) resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from ganbert.common import home
from ganbert.common.raysession import ensure_ray
from ganbert.config import Config, from_dict
from ganbert.models import Networks, build_networks, tokens
from ganbert.models.saved import (
    CONFIG_FILE,
    MODEL_URI_FILE,
    STATE_FILE,
    load_generator,
    place_networks,
    save_model_dir,
    unwrap,
)
from ganbert.scoring.evaluate import validate_generator
from ganbert.store import folds, loader, stats
from ganbert.store.folds import Fold
from ganbert.store.part import Part
from ganbert.track.model_card import write_model_card
from ganbert.track.tracking import MLflowTracker, Tracker, end_open_run, make_tracker
from ganbert.train.checkpoint import load_state, save_state
from ganbert.train.step import Batch, Optimisers, gan_step, make_optimisers, seed_everything, to_batch

FAULT_ENV = "GANBERT_FAULT_AT"  # "epoch:step:rank:marker-file": SIGKILL that worker once (failure tests)
STOP_ENV = "GANBERT_STOP_AFTER_EPOCH"  # "N": stop cleanly after epoch N (checkpointed); rerunning continues at N + 1
# Train V2's controller takes one report per worker per poll, every 2 s by default, and a worker's next report waits
# for the last to be taken: epochs shorter than the interval would each last it. The driver's value reaches the
# controller (Train propagates it); a value the user exported wins.
POLL_ENV, POLL_SECONDS = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"


@dataclass
class TrainResult:
    """What a finished `fit` tells the caller."""

    metrics: dict[str, Any]
    checkpoint: str | None
    best_checkpoint: str | None
    model_uri: str | None
    run_id: str | None
    model_dir: str | None
    seconds: dict[str, float]  # driver wall time: inputs (manifest, trainer), train (TorchTrainer.fit), publish


def steps_per_epoch(cfg: Config, train_rows: int) -> int:
    """Optimiser steps per epoch for `train_rows` rows split over the workers (whole accumulation groups)."""
    o = cfg.optim
    steps = train_rows // cfg.run.workers // o.batch_size // o.accumulation
    if steps < 1:
        raise ValueError(f"{train_rows} training rows are too few for {cfg.run.workers} workers x batch "
                         f"{o.batch_size} x accumulation {o.accumulation}")
    return steps


def _micro_batches(cfg: Config, data_dir: str, epoch: int, device: torch.device,
                   rows: loader.SplitRows | None, train: str | Part = "train") -> Iterator[list[Batch]]:
    """Groups of `accumulation` normalised micro-batches: this worker's part of the epoch's seeded permutation of
    the training rows (the split, or a fold's training subjects), from `rows` held in memory when given, else read
    through Ray Data (the same rows in the same order)."""
    ctx = ray.train.get_context()
    rank, world, size = ctx.get_world_rank(), ctx.get_world_size(), cfg.optim.batch_size
    if rows is not None:
        raws = rows.batches(loader.epoch_positions(rows.positions, cfg.run.seed, epoch, rank, world), size,
                            drop_last=True)
    else:
        ds = loader.epoch_dataset(data_dir, train, cfg.geometry.tracer, cfg.run.seed, epoch, rank, world)
        raws = loader.torch_batches(ds, size, drop_last=True)
    group: list[Batch] = []
    for raw in raws:
        group.append(to_batch(raw, device))
        if len(group) == cfg.optim.accumulation:
            yield group
            group = []


def validates(cfg: Config, epoch: int, last: int) -> bool:
    """Whether `epoch` is validated: every `run.validate_every`-th epoch, and `last` (the session's last)."""
    return (epoch + 1) % cfg.run.validate_every == 0 or epoch == last


def best_after(val_psnr: float, best: float | None) -> float | None:
    """The best val PSNR so far once an epoch scored `val_psnr` (None before any finite score; NaN never counts)."""
    return float(val_psnr) if math.isfinite(val_psnr) and (best is None or val_psnr > best) else best


def keeps(cfg: Config, epoch: int, last: int, val_psnr: float, best: float | None) -> bool:
    """Whether a validated epoch is checkpointed: every `run.checkpoint_every`-th epoch, `last`, and every epoch
    whose val PSNR beats `best` (the best so far), so the best validated epoch always has its checkpoint."""
    return (epoch + 1) % cfg.run.checkpoint_every == 0 or epoch == last or best_after(val_psnr, best) != best


def last_epoch(cfg: Config, stop_after: int | None) -> int:
    """The last epoch this session trains: the run's last, or `stop_after` ($GANBERT_STOP_AFTER_EPOCH) if earlier."""
    return cfg.optim.epochs - 1 if stop_after is None else min(cfg.optim.epochs - 1, stop_after)


def stop_after_epoch() -> int | None:
    """$GANBERT_STOP_AFTER_EPOCH as an epoch index, or None when unset; ValueError naming it otherwise."""
    value = os.environ.get(STOP_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"${STOP_ENV} must be an epoch index (an integer >= 0), got {value!r}")
    return int(value)


def _maybe_fault(spec: str | None, epoch: int, step: int, rank: int) -> None:
    """Failure drill: SIGKILL this worker once at (epoch, step, rank) given by $GANBERT_FAULT_AT."""
    if not spec:
        return
    e, s, r, marker = spec.split(":", 3)
    if (int(e), int(s), int(r)) == (epoch, step, rank) and not Path(marker).exists():
        Path(marker).write_text(f"killed rank {rank} at epoch {epoch} step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def training_state(cfg: Config, device: torch.device, total_steps: int, checkpoint_dir: Path | None,
                   pet_stats: tuple[np.ndarray | float, float]) -> tuple[Networks, Optimisers, dict[str, Any]]:
    """Networks on `device`, then their optimisers, then the checkpoint (if any) loaded into both.

    The networks are placed first so every optimiser state tensor lands on its parameter's device (a state
    loaded before the move would stay on the CPU and the first step after a resume would mix devices).
    """
    nets = build_networks(cfg)
    if checkpoint_dir is None and cfg.model.init_output_mean:
        nets.generator.init_output(torch.tensor(np.asarray(pet_stats[0]), dtype=torch.float64), pet_stats[1])
    nets = place_networks(nets, cfg, device)
    opt = make_optimisers(nets, cfg, total_steps)
    meta: dict[str, Any] = {"epoch": -1, "step": 0, "mlflow_run_id": None}
    if checkpoint_dir is not None:
        meta = load_state(checkpoint_dir, nets, opt)
    return nets, opt, meta


def _quiet_train_reports() -> None:
    """Silence Train V2's per-report INFO dump ("Reporting training result N: TrainingReport(...)"), logged by a
    logger named after its module's file, so neither ray.train's level nor Ray's LoggingConfig reach it."""
    # Private on purpose: Ray 2.60 has no public setting for this logger (it is logging.getLogger(__file__) in
    # ray/train/v2/_internal/execution/context.py), so only its module's file names it.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def parts(fold: Fold | None) -> tuple[str | Part, str | Part]:
    """(training rows, validation rows): the shards' train and val splits, or a fold's training and validation
    subjects."""
    return (fold.part("train"), fold.part("val")) if fold is not None else ("train", "val")


def train_loop_per_worker(loop_cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: resume if a checkpoint exists, then epochs of GAN steps.

    Resume is exact without saving any RNG state: every epoch reseeds Python, NumPy and torch from
    (run.seed, epoch, rank) before its first step and reads the seeded permutation of (run.seed, epoch), and a
    checkpoint holds every network, optimiser and scheduler state at an epoch's end.
    """
    entered = time.perf_counter()
    cfg = from_dict(loop_cfg["config"])
    train_part, val_part = parts(Fold.from_dict(loop_cfg["fold"]) if loop_cfg.get("fold") else None)
    _quiet_train_reports()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    if cfg.run.threads_per_worker:
        torch.set_num_threads(cfg.run.threads_per_worker)
    seed_everything(cfg.run.seed, rank)
    total = loop_cfg["steps_per_epoch"] * cfg.optim.epochs
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            nets, opt, meta = training_state(cfg, device, total, Path(d), loop_cfg["pet_stats"])
    else:
        nets, opt, meta = training_state(cfg, device, total, None, loop_cfg["pet_stats"])
    for name, module in nets.named().items():
        setattr(nets, name, ray.train.torch.prepare_model(module, move_to_device=False))
    tracker: Tracker = make_tracker(rank, tracking_uri=loop_cfg["tracking_uri"], experiment=cfg.run.experiment,
                                    run_name=cfg.run.name, run_id=meta["mlflow_run_id"],
                                    parent_run_id=loop_cfg.get("parent_run_id"), tags=loop_cfg.get("tags"))
    if meta["epoch"] < 0:
        tracker.log_params(cfg.flat())
        tracker.log_metrics(loop_cfg["token_health"], step=0)
    rows = loader.SplitRows(loop_cfg["data_dir"], train_part, cfg.geometry.tracer) if loop_cfg["in_memory"] else None
    step, best, last = meta["step"], meta.get("best_val_psnr"), last_epoch(cfg, loop_cfg.get("stop_after"))
    setup, reporting = {"setup_seconds": time.perf_counter() - entered}, 0.0  # setup: with the first epoch
    for epoch in range(meta["epoch"] + 1, last + 1):
        report, step = train_epoch(cfg, loop_cfg, nets, opt, epoch, step, device, rank, rows, train_part)
        report.update(setup)
        setup = {}
        if not validates(cfg, epoch, last):  # no Ray Train report: Tune and checkpoint ranking see validated epochs
            tracker.log_metrics({a: float(b) for a, b in report.items() if a != "epoch"}, step=epoch)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ckpt, best = end_validated_epoch(cfg, loop_cfg, nets, opt, tracker, report, device, rank, last, best,
                                             Path(tmp), val_part)
            began = time.perf_counter()
            ray.train.report(report, checkpoint=ckpt)
            reporting += time.perf_counter() - began
    # this attempt's time in ray.train.report (hand-off, checkpoint upload) and in this function, for bench overhead
    tracker.log_metrics({"report_seconds": reporting, "loop_seconds": time.perf_counter() - entered}, step=last)
    if last < cfg.optim.epochs - 1 and rank == 0:
        print(f"[train] stopped after epoch {last} of {cfg.optim.epochs} (${STOP_ENV}); rerun the same command "
              "to continue", flush=True)
    # the driver logs the best epoch's generator as the run's model (publish_best)
    tracker.finish("FINISHED" if last == cfg.optim.epochs - 1 else "KILLED")


def train_epoch(cfg: Config, loop_cfg: dict[str, Any], nets: Networks, opt: Optimisers, epoch: int, step: int,
                device: torch.device, rank: int, rows: loader.SplitRows | None,
                train: str | Part = "train") -> tuple[dict[str, Any], int]:
    """One epoch of GAN steps on this worker: (the epoch's report so far, the step count after it).

    The report holds the mean training losses (`train_*`), `epoch`, `step`, `epoch_seconds` (the whole training
    pass: data loading and steps) and `step_seconds` (the time spent inside `gan_step` alone).
    """
    per_epoch = loop_cfg["steps_per_epoch"]
    seed_everything(cfg.run.seed + 1000 * (epoch + 1), rank)
    started, sums, k, in_steps = time.perf_counter(), {}, 0, 0.0
    for k, group in enumerate(_micro_batches(cfg, loop_cfg["data_dir"], epoch, device, rows, train)):
        if k >= per_epoch:
            continue  # drain the shard so every worker finishes the epoch together
        _maybe_fault(loop_cfg.get("fault"), epoch, k, rank)
        began = time.perf_counter()
        losses = gan_step(group, nets, opt, cfg)
        in_steps += time.perf_counter() - began
        for key, value in losses.items():
            sums[key] = value if key == "lr" else sums.get(key, 0.0) + value  # lr: the latest
        step += 1
        if rank == 0 and cfg.run.log_every and step % cfg.run.log_every == 0:
            print(f"[train] epoch {epoch} step {step} " + " ".join(f"{a}={b:.4f}" for a, b in
                  sorted(group_losses(sums, k + 1).items())), flush=True)
    report: dict[str, Any] = {f"train_{a}": b for a, b in group_losses(sums, min(k + 1, per_epoch)).items()}
    report.update(epoch=epoch, step=step, epoch_seconds=time.perf_counter() - started, step_seconds=in_steps)
    return report, step


def end_validated_epoch(cfg: Config, loop_cfg: dict[str, Any], nets: Networks, opt: Optimisers, tracker: Tracker,
                        report: dict[str, Any], device: torch.device, rank: int, last: int, best: float | None,
                        tmp: Path, val: str | Part = "val") -> tuple[ray.train.Checkpoint | None, float | None]:
    """On rank 0: validate the epoch into `report`, checkpoint it under `tmp` if `keeps` says so, log it (timed:
    `validate_seconds`, `checkpoint_seconds`, `log_seconds` for the figures' upload).

    Returns (the checkpoint to report or None, the best val PSNR so far, which each checkpoint records); other
    ranks return (None, `best`) at once.
    """
    if rank != 0:
        return None, best
    epoch, ckpt = report["epoch"], None
    figures = tmp / "figures"
    began = time.perf_counter()
    # the plain module: a DDP forward would sync buffers with ranks that are not validating
    report.update(validate_generator(unwrap(nets.generator), loop_cfg["data_dir"], cfg.geometry.tracer, device,
                                     figures, val))
    saving = time.perf_counter()
    keep = keeps(cfg, epoch, last, report["val_psnr"], best)
    best = best_after(report["val_psnr"], best)
    if keep:
        meta = {"epoch": epoch, "step": report["step"], "mlflow_run_id": tracker.run_id,
                "val_psnr": report["val_psnr"], "best_val_psnr": best}
        ckpt = ray.train.Checkpoint.from_directory(str(save_state(tmp / "state", cfg, nets, opt, meta)))
    logging_ = time.perf_counter()
    for png in sorted(figures.glob("*.png")):
        tracker.log_artifact(png, f"figures/epoch_{epoch:04d}")
    report.update(validate_seconds=saving - began, checkpoint_seconds=logging_ - saving,
                  log_seconds=time.perf_counter() - logging_)
    tracker.log_metrics({a: float(b) for a, b in report.items() if a != "epoch"}, step=epoch)
    print(f"[val] epoch {epoch}: " + " ".join(f"{a}={float(b):.4f}" for a, b in sorted(report.items())
                                             if a.startswith("val_")), flush=True)
    return ckpt, best


def group_losses(sums: dict[str, float], count: int) -> dict[str, float]:
    """Means of summed per-step losses (lr is the last, not a mean)."""
    return {a: (b / max(count, 1) if a != "lr" else b) for a, b in sums.items()}


def loop_config(cfg: Config, data_dir: str, tracking_uri: str, parent_run_id: str | None = None,
                tags: dict[str, str] | None = None, fold: Fold | None = None) -> tuple[Config, dict[str, Any]]:
    """(the run config with its token space calibrated, the workers' `train_loop_config`) of one run.

    The shards' manifest is read once: it fails early on a wrong geometry or a missing split, and gives the
    training statistics (`stats.for_run`: token calibration, PET level and mean volume; computed in one logged
    pass over the training rows only for shards that lack them) and the training row count. The val split's
    token health reads its rows once (its summaries are not recorded at preprocessing). With a `fold`, the run
    trains on the fold's training subjects, chooses its checkpoint on the fold's validation subjects, and uses the
    fold's own statistics (`folds.fold_stats`, from its training subjects only).
    """
    tracer = cfg.geometry.tracer
    train_part, val_part = parts(fold)
    manifest = loader.checked_manifest(data_dir, (train_part, val_part), tracer, cfg.geometry)
    found = (folds.fold_stats(data_dir, fold, tracer, cfg.sequence.length) if fold is not None
             else stats.for_run(data_dir, tracer, cfg.sequence.length, manifest))
    cfg = tokens.calibrate_token_space(cfg, found)
    health = tokens.token_health(cfg, stats.split_summaries(data_dir, val_part, tracer, cfg.sequence.length))
    return cfg, {"config": cfg.to_dict(), "data_dir": home.resolve(data_dir), "tracking_uri": tracking_uri,
                 "steps_per_epoch": steps_per_epoch(cfg, loader.rows_in(manifest, train_part, tracer)),
                 "pet_stats": (found["pet_mean_volume"], found["pet_std"]),
                 "token_health": health,
                 "fold": fold.to_dict() if fold is not None else None,
                 "in_memory": loader.fits_in_memory(manifest, train_part, tracer, cfg.geometry, cfg.run.in_memory_mb),
                 "parent_run_id": parent_run_id, "tags": tags, "fault": os.environ.get(FAULT_ENV),
                 "stop_after": stop_after_epoch()}


def trainer_for(cfg: Config, data_dir: str, tracking_uri: str, parent_run_id: str | None = None,
                tags: dict[str, str] | None = None, callbacks: list[Any] | None = None,
                fold: Fold | None = None) -> ray.train.torch.TorchTrainer:
    """The `TorchTrainer` of one run (of a fold, when given): rows from the shards, best-by-val-PSNR checkpoints,
    retries."""
    cfg, loop_cfg = loop_config(cfg, data_dir, tracking_uri, parent_run_id, tags, fold)
    storage = home.resolve(cfg.run.storage)
    os.environ.setdefault(POLL_ENV, POLL_SECONDS)
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.run.workers, use_gpu=cfg.run.use_gpu,
                                               resources_per_worker={"CPU": cfg.run.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage, callbacks=callbacks,
            # Train V2 turns worker print() into log records that never reach the console; keep our progress.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_psnr",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),  # our [train]/[val] lines only
    )  # each worker reads its part of a per-epoch permutation itself (loader.epoch_dataset): exact resume


def publish_best(cfg: Config, checkpoint: ray.train.Checkpoint, tracking_uri: str,
                 data_dir: str | None = None) -> tuple[str, str | None, str]:
    """Save the generator of `checkpoint` (the epoch chosen on val) as the run's model dir and MLflow model.

    Returns (model dir, model URI, MLflow run id). The model dir (`generator.safetensors`, `config.yaml`,
    `model_card.md`, `metadata.json`, `MODEL_URI`) is built locally and copied beside the run's checkpoints in
    `run.storage`, a path or URI every node reads; its config is the checkpoint's (calibrated token space included);
    its model card describes the training data of `data_dir` (model_card.write_model_card).
    """
    dest = home.join(home.resolve(cfg.run.storage), cfg.run.name, "model")
    with checkpoint.as_directory() as d:
        generator, ckpt_cfg = load_generator(Path(d))
        meta = json.loads((Path(d) / STATE_FILE).read_text())["meta"]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model_dir(Path(tmp) / "model", ckpt_cfg, generator)
        write_model_card(model_dir, ckpt_cfg, data_dir=data_dir, run={
            "mlflow_run_id": meta["mlflow_run_id"], "best_epoch": meta["epoch"], "best_val_psnr": meta["val_psnr"]})
        tracker = MLflowTracker(tracking_uri, cfg.run.experiment, cfg.run.name, run_id=meta["mlflow_run_id"])
        with tracker:
            tracker.set_tags({"best_epoch": str(meta["epoch"]), "best_val_psnr": f"{meta['val_psnr']:.4f}"})
            tracker.log_artifact(model_dir / CONFIG_FILE)
            uri = tracker.log_model(model_dir)
        if uri:
            (model_dir / MODEL_URI_FILE).write_text(uri + "\n")
        home.upload_dir(model_dir, dest)
    return dest, uri, meta["mlflow_run_id"]


def fit(cfg: Config, data_dir: str, tracking_uri: str, **kwargs: Any) -> TrainResult:
    """Train (or resume) one run, then publish its best-on-val epoch; returns metrics, checkpoints, model URI.

    The run's MLflow run ends FINISHED, or FAILED (training failed for good) or KILLED (interrupted) here, on the
    driver, even when the worker that logged it died.
    """
    began = time.perf_counter()
    try:
        trainer = trainer_for(cfg, data_dir, tracking_uri, **kwargs)
        training = time.perf_counter()
        result = trainer.fit()
    except KeyboardInterrupt:
        end_open_run(tracking_uri, cfg.run.experiment, cfg.run.name, "KILLED")
        raise
    except Exception:
        end_open_run(tracking_uri, cfg.run.experiment, cfg.run.name, "FAILED")
        raise
    publishing = time.perf_counter()
    best = result.get_best_checkpoint(metric="val_psnr", mode="max")
    model_dir, uri, run_id = publish_best(cfg, best, tracking_uri, data_dir) if best is not None else (None, None, None)
    if int((result.metrics or {}).get("epoch", cfg.optim.epochs - 1)) < cfg.optim.epochs - 1:  # stopped early
        end_open_run(tracking_uri, cfg.run.experiment, cfg.run.name, "KILLED", replace=("FINISHED",))
    seconds = {"inputs": training - began, "train": publishing - training, "publish": time.perf_counter() - publishing}
    return TrainResult(metrics=dict(result.metrics or {}),
                       checkpoint=result.checkpoint.path if result.checkpoint else None,
                       best_checkpoint=best.path if best is not None else None, model_uri=uri, run_id=run_id,
                       model_dir=model_dir, seconds=seconds)


def main(args: argparse.Namespace, cfg: Config, data_dir: str) -> int:
    """`ganbert train`: fit on the shards in `data_dir` (the CLI resolves `--data` or builds the phantom first)."""
    if not data_dir:
        raise ValueError("data_dir must name a shards folder")
    ensure_ray(dashboard=True)
    tracking_uri = args.tracking_uri or home.default_tracking_uri()
    print(f"[train] run {cfg.run.name} ({cfg.model.method}, {cfg.geometry.tracer}, preset {cfg.preset}) on "
          f"{cfg.run.workers} worker(s); data {data_dir}; tracking {tracking_uri}", flush=True)
    out = fit(cfg, data_dir, tracking_uri)
    print("[train] final: " + " ".join(f"{k}={v:.4f}" for k, v in sorted(out.metrics.items())
                                       if isinstance(v, float) and k.startswith("val_")))
    print(f"checkpoint: {out.checkpoint}\nbest checkpoint: {out.best_checkpoint}\n"
          f"model: {out.model_uri or out.model_dir}"
          f"\ntracking: {tracking_uri}")
    return 0
