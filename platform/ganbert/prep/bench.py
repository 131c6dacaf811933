"""Benchmarks of the data stages: preprocessing and the loader on a phantom cohort, PET-to-T1 registration."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ganbert.common.raysession import ensure_ray
from ganbert.config import TRACERS, Config
from ganbert.ingest import adni, dicom, phantom
from ganbert.prep import registration
from ganbert.prep.pair import pair_job, process_pair
from ganbert.prep.phantom_cache import phantom_size
from ganbert.prep.preprocess import run
from ganbert.store import loader, shards


def _timed_rows(batches: Iterator[Any]) -> tuple[int, float, float]:
    """Consume an iterator of batches/rows: (rows, seconds to the first item, seconds in all)."""
    t0 = time.perf_counter()
    first, rows = 0.0, 0
    for item in batches:
        if not rows:
            first = time.perf_counter() - t0
        rows += len(item["subject"]) if isinstance(item["subject"], list) else 1
    return rows, first, time.perf_counter() - t0


def bench_preprocess(cfg: Config, subjects: int = 4, batch_size: int = 2) -> dict[str, float]:
    """Preprocess a fresh phantom cohort at cfg's geometry; compare the loader with a plain pyarrow read.

    Figures: pairs_per_s (Ray already started: ingest, Ray Data workers, shard writing, checksums),
    single_pair_s (one pair in this process, warm files: the per-core cost), phantom_s (raw cohort
    generation, not counted). Reading the train split once: loader_MBps (read_split + torch_batches) and
    pyarrow_MBps (read_rows) in uncompressed tensor MB per second, their ratio, the loader's start-up
    (seconds to its first batch: Ray Data plans and launches the read) and its MB/s after the first batch;
    compression = tensor bytes / bytes on disk.
    """
    size = phantom_size(cfg.geometry)
    work = Path(tempfile.mkdtemp(prefix="ganbert-bench-"))
    try:
        ensure_ray()
        t0 = time.perf_counter()
        phantom.write_cohort(work / "raw", subjects, TRACERS, size, seed=0)
        t1 = time.perf_counter()
        summary = run(work / "raw", work / "shards", cfg)
        t2 = time.perf_counter()
        data = work / "shards"
        pairs = adni.ingest(work / "raw", 365, min_frames=cfg.geometry.pet_frames).pairs
        t3 = time.perf_counter()
        process_pair(pair_job(pairs[0], "train"), work / "raw", cfg.geometry)
        single = time.perf_counter() - t3
        per_row = shards.row_bytes(cfg.geometry) / 1e6
        ds = loader.read_split(data, "train", geometry=cfg.geometry)
        n_loader, first, t_loader = _timed_rows(loader.torch_batches(ds, batch_size))
        n_plain, _, t_plain = _timed_rows(loader.read_rows(data, "train"))
        loader_mbps, plain_mbps = n_loader * per_row / t_loader, n_plain * per_row / t_plain
        after_first = (n_loader - min(batch_size, n_loader)) * per_row / max(t_loader - first, 1e-9)
        return {"pairs": float(summary["written"]), "pairs_per_s": summary["written"] / (t2 - t1),
                "single_pair_s": single, "phantom_s": t1 - t0, "row_MB": per_row, "train_rows": float(n_loader),
                "loader_MBps": loader_mbps, "pyarrow_MBps": plain_mbps, "loader_vs_pyarrow": loader_mbps / plain_mbps,
                "loader_first_batch_s": first, "loader_after_first_MBps": after_first,
                "compression": shards.compressed_ratio(data)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_registration(size: str = "paper", subjects: int = 1, tracers: Sequence[str] = ("AV45", "FDG"),
          seed: int = 0) -> dict[str, float]:
    """Rigid PET-to-T1 registration on a phantom written with --pet-space adni-standard, one thread.

    Figures: seconds per pair (mean, max), mean displacement over the brain after registration (mean, max mm)
    and before it (mean mm), and the phantom writing time (not counted).
    """
    work = Path(tempfile.mkdtemp(prefix="ganbert-bench-reg-"))
    try:
        t0 = time.perf_counter()
        raw = phantom.write_cohort(work / "raw", subjects, tracers, size, seed, pet_space="adni-standard")
        written = time.perf_counter() - t0
        truth = json.loads((raw / "ground_truth.json").read_text())["subjects_truth"]
        secs, after, before = [], [], []
        for pair in adni.ingest(raw, 365).pairs:
            t1 = dicom.read_any(raw / pair.mri.files[0])
            pets = [dicom.read_any(raw / f) for f in pair.pet.files]
            pet = np.concatenate([p.data.reshape(*p.data.shape[:3], -1) for p in pets], axis=3).mean(axis=3)
            t = time.perf_counter()
            reg = registration.rigid(t1.data, t1.affine, pet, pets[0].affine, threads=1)
            secs.append(time.perf_counter() - t)
            true = np.asarray(truth[pair.subject]["tracers"][pair.tracer]["t1_to_pet_header"]).reshape(4, 4)
            labels = dicom.read_any(raw / "truth" / f"{pair.subject}_regions.nii.gz")
            idx = np.argwhere(labels.data > 0).T
            pts = labels.affine[:3, :3] @ idx + labels.affine[:3, 3:4]
            after.append(registration.mean_displacement(reg.matrix, true, pts))
            before.append(registration.mean_displacement(np.eye(4), true, pts))
        return {"pairs": float(len(secs)), "seconds_per_pair": float(np.mean(secs)), "seconds_max": float(np.max(secs)),
                "displacement_mm_mean": float(np.mean(after)), "displacement_mm_max": float(np.max(after)),
                "displacement_before_mm_mean": float(np.mean(before)), "phantom_s": written}
    finally:
        shutil.rmtree(work, ignore_errors=True)
