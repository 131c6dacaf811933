"""Cached phantom shards for training without --data: one phantom cohort per geometry, built once and preprocessed."""

from __future__ import annotations

import fcntl
import hashlib
import json
from pathlib import Path

from ganbert.common import cache, home
from ganbert.common.atomic import write_text
from ganbert.config import TRACERS, Config, GeometryConfig
from ganbert.ingest import phantom
from ganbert.prep.preprocess import run
from ganbert.store import shards

# 3: no PET-to-T1 registration (the phantom PET is in its T1 space); 4: T1 QC scores in the manifest
PHANTOM_VERSION = 4


def phantom_size(geometry: GeometryConfig) -> str:
    """The phantom raw size suited to a geometry: tiny (<= 32^3 MRI), demo (<= 96^3), else paper."""
    side = geometry.mri_size[0]
    return "tiny" if side <= 32 else "demo" if side <= 96 else "paper"


def ensure_phantom(cfg: Config, cache_root: Path, subjects: int = 12, seed: int = 0) -> Path:
    """Shards of a phantom cohort (all tracers) for cfg.geometry, built once and cached; returns the shards dir.

    The cache key is the geometry, phantom size, subject count and seed; concurrent callers wait on a lock. The
    phantom's PET is written in its T1's world, so PET-to-T1 registration (seconds a pair, most of the build) has
    nothing to correct and is skipped, as `make demo` does.
    """
    if subjects < 3:
        raise ValueError(f"subjects must be >= 3 (one per split), got {subjects}")
    size = phantom_size(cfg.geometry)
    key_src = json.dumps({"geometry": shards.geometry_record(cfg.geometry), "size": size, "subjects": subjects,
                          "seed": seed, "version": PHANTOM_VERSION}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    base = Path(cache_root) / f"phantom-{size}-{subjects}s-seed{seed}-{key}"
    out, done = base / "shards", base / "DONE"
    if done.exists():
        return out
    base.mkdir(parents=True, exist_ok=True)
    with (base / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return out
        raw = base / "raw"
        if not (raw / ".complete").exists():
            phantom.write_cohort(raw, subjects, TRACERS, size, seed)
            (raw / ".complete").write_text(key_src + "\n")
        summary = run(raw, out, cfg, registration="none")
        if summary["rejected"]:
            raise ValueError(f"phantom cohort {raw}: {summary['rejected']} inputs rejected "
                             f"(see {out / 'rejected.csv'})")
        write_text(done, json.dumps(summary, sort_keys=True) + "\n")
    return out


def data_dir_for(cfg: Config, data: str | None) -> str:
    """`--data`, else a phantom cohort of the config's geometry built on first use and kept in the cache
    (`common.cache.root`: $GANBERT_CACHE, else <home>/cache; <home>/cache when the cache is "off", as shards must be
    written somewhere)."""
    if data:
        return home.resolve(data)
    return str(ensure_phantom(cfg, cache.root() or home.home() / "cache"))
