"""`ganbert bench overhead --preset tiny optim.epochs=20`: a run's wall time minus its step compute, broken down."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ganbert import config as config_mod
from ganbert.config import Config

# Timings rank 0 logs to MLflow (train/loop.py): per epoch (step = epoch), and per attempt of the worker loop.
EPOCH_KEYS = ("epoch_seconds", "step_seconds", "validate_seconds", "checkpoint_seconds", "log_seconds",
              "setup_seconds", "report_seconds", "loop_seconds")


def epoch_sums(tracking_uri: str, run_id: str) -> dict[str, float]:
    """Sum over the run's epochs of each of EPOCH_KEYS (from MLflow's metric history, one value per epoch)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    return {key: float(sum(m.value for m in client.get_metric_history(run_id, key))) for key in EPOCH_KEYS}


def breakdown(wall: float, ray_start: float, driver: dict[str, float], sums: dict[str, float]) -> dict[str, float]:
    """Seconds of one run by where they went: `step compute` (inside `gan_step`) and everything else.

    `wall` covers Ray's start and `fit`; `driver` is `TrainResult.seconds`; `sums` is `epoch_sums`.
    """
    timed = sum(sums[k] for k in ("setup_seconds", "epoch_seconds", "validate_seconds", "checkpoint_seconds",
                                  "log_seconds", "report_seconds"))
    parts = {
        "step compute": sums["step_seconds"],
        "Ray start": ray_start,
        "run inputs (manifest, token health, trainer)": driver["inputs"],
        "Ray Train worker group start and end": driver["train"] - sums["loop_seconds"],
        "worker setup (networks, DDP, MLflow run, rows)": sums["setup_seconds"],
        "data loading (training pass minus steps)": sums["epoch_seconds"] - sums["step_seconds"],
        "validation and figures": sums["validate_seconds"],
        "checkpoint writes": sums["checkpoint_seconds"],
        "MLflow figure uploads": sums["log_seconds"],
        "Ray Train reports (hand-off, checkpoint upload)": sums["report_seconds"],
        "MLflow metric writes and the rest of the loop": sums["loop_seconds"] - timed,
        "publish best model": driver["publish"],
    }
    parts["overhead (wall - step compute)"] = wall - sums["step_seconds"]
    parts["wall"] = wall
    return parts


def overhead_figures(cfg: Config, data_dir: str) -> dict[str, float]:
    """Train `cfg` once from scratch in a temporary storage and MLflow store; return `breakdown`."""
    import ray

    from ganbert.common.raysession import ensure_ray
    from ganbert.train.loop import fit

    if ray.is_initialized():
        raise ValueError("bench overhead: Ray is already running in this process; its start would not be measured")
    with tempfile.TemporaryDirectory(prefix="ganbert-overhead-") as tmp:
        cfg = config_mod.apply(cfg, {"run.name": "overhead", "run.storage": str(Path(tmp) / "ray"),
                                     "run.log_every": 0})
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        start = time.perf_counter()
        ensure_ray(dashboard=True)
        ray_start = time.perf_counter() - start
        out = fit(cfg, data_dir, uri)
        wall = time.perf_counter() - start
        if out.run_id is None:
            raise ValueError("bench overhead: the run published no model, so it has no MLflow run to read")
        return breakdown(wall, ray_start, out.seconds, epoch_sums(uri, out.run_id))


def main(args: argparse.Namespace, cfg: Config, data_dir: str) -> int:
    """`ganbert bench overhead`: one fresh run on `data_dir` (built by the caller before the clock starts)."""
    if not data_dir:
        raise ValueError("data_dir must name a shards folder")
    parts = overhead_figures(cfg, data_dir)
    o = cfg.optim
    print(f"bench overhead: preset {cfg.preset}, {o.epochs} epochs, {cfg.run.workers} worker(s), method "
          f"{cfg.model.method}; seconds of one fresh run (Ray start + train + publish)")
    width = max(len(k) for k in parts)
    for key, value in parts.items():
        print(f"  {key:{width}s} {value:8.2f}")
    return 0
