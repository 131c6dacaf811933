"""Preprocessing: conform T1, resample PET to the run geometry, split by subject, write Parquet shards on Ray Data.

Geometry: data.grid (the MRI cube and PET grid every stage sees).
Output (see data.shards): `<split>-<tracer>-<nnnnn>.parquet` (zstd, at most `shard_mb` of tensors each; rows of a
(split, tracer) ordered by a hash of the subject id), `manifest.json`, `pairs.csv`, `unpaired.csv`, `rejected.csv`.
Splits are by subject (about 80/10/10, at least one subject each from three subjects on) and never change
for a subject once recorded in the manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ganbert.atomic import write_text
from ganbert.config import TRACERS, Config, GeometryConfig
from ganbert.progress import Progress
from ganbert.raysession import ensure_ray
from ganbert.data import adni, shards, stats
from ganbert.data.datacontext import quiet_data_context
from ganbert.data.grid import HIGH_PERCENTILE, LOW_PERCENTILE
from ganbert.data.pair import REGISTRATIONS, message, pair_job, process_pair

SPLIT_ORDER = {name: i for i, name in enumerate(shards.SPLITS)}
PHANTOM_VERSION = 2
SETTINGS = {"mri_rescale": f"input percentiles {LOW_PERCENTILE}..{HIGH_PERCENTILE} -> 0..255, clipped, uint8",
            "interpolation": "linear (scipy.ndimage.affine_transform order 1), Gaussian anti-aliasing when coarser",
            "pet_frames": "contiguous groups (numpy.array_split) averaged", "orientation": "RAS",
            "centre": "centre of the T1 field of view", "pet_units": "scanner units of the input PET, float32"}


# --- one pair (runs in Ray Data tasks) ------------------------------------------------------------


def _ray_process(item: dict[str, Any], root: str, geometry: dict[str, Any]) -> dict[str, Any]:
    """Ray Data map function: one job (JSON) -> row with the result as bytes + JSON (a schema every row shares)."""
    job = json.loads(item["job"])
    try:
        result = process_pair(job, Path(root), _geometry(geometry))
    except Exception as err:  # noqa: BLE001 - a corrupt item is reported and skipped, never kills the run
        result = {"error": message(err, Path(root)), "file": job["pet_files"][0], "which": "pair"}
    if "error" in result:
        return {"key": item["key"], "meta": json.dumps(result), "mri": b"", "pet": b"", "brain_mask": b"",
                "labels": b""}
    meta = {k: result[k] for k in ("mri_mean", "mri_std", "stats", "sources", "has_labels", "registration",
                                   "template_registration")}
    meta["mri_affine"] = np.asarray(result["mri_affine"], dtype=np.float64).reshape(-1).tolist()
    return {"key": item["key"], "meta": json.dumps(meta), "mri": result["mri"].tobytes(),
            "pet": np.ascontiguousarray(result["pet"], dtype=np.float32).tobytes(),
            "brain_mask": np.ascontiguousarray(result["brain_mask"], dtype=np.uint8).tobytes(),
            "labels": np.ascontiguousarray(result["labels"], dtype=np.uint8).tobytes()}


def _geometry(record: dict[str, Any]) -> GeometryConfig:
    return GeometryConfig(mri_size=tuple(record["mri_size"]), pet_frames=int(record["pet_frames"]),
                          pet_size=tuple(record["pet_size"]), mri_fov_mm=float(record["mri_fov_mm"]),
                          pet_fov_mm=tuple(record["pet_fov_mm"]))


# --- splits ---------------------------------------------------------------------------------------

def _subject_hash(subject: str) -> str:
    return hashlib.sha256(f"ganbert-split:{subject}".encode()).hexdigest()


def assign_splits(subjects: Sequence[str], existing: dict[str, str] | None = None, val_fraction: float = 0.1,
                  test_fraction: float = 0.1) -> dict[str, str]:
    """Subject -> train/val/test, deterministic; subjects in `existing` keep their split (no leakage on reruns).

    A fresh cohort is ranked by a hash of the subject id: the first round(test_fraction * n) go to test,
    the next round(val_fraction * n) to val (at least one each when n >= 3), the rest to train. Subjects
    added later are placed by the same hash against the fractions.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1), sum < 1")
    existing = dict(existing or {})
    bad = {s: v for s, v in existing.items() if v not in shards.SPLITS}
    if bad:
        raise ValueError(f"existing splits must be one of {shards.SPLITS}, got {bad}")
    out = dict(existing)
    new = sorted(set(subjects) - set(existing), key=_subject_hash)
    if not existing:
        n = len(new)
        n_test = round(test_fraction * n)
        n_val = round(val_fraction * n)
        if n >= 3:
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
            n_val = max(n_val, 1 if val_fraction > 0 else 0)
        for i, subject in enumerate(new):
            out[subject] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    else:
        for subject in new:
            u = int(_subject_hash(subject)[:12], 16) / float(16**12)
            out[subject] = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
    return {s: out[s] for s in sorted(out)}


# --- the pipeline ---------------------------------------------------------------------------------

def _natural(text: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _run_jobs(jobs: list[dict[str, Any]], root: Path, geometry: GeometryConfig,
              num_cpus: int | None) -> Iterator[dict[str, Any]]:
    """Process jobs on Ray Data (one task per pair, at most one per CPU) and yield results in job order."""
    import ray

    ensure_ray(num_cpus)
    quiet_data_context()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    concurrency = max(1, min(cpus if num_cpus is None else num_cpus, len(jobs)))
    items = [{"key": i, "job": json.dumps(job)} for i, job in enumerate(jobs)]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map(
        _ray_process, fn_kwargs={"root": str(root), "geometry": shards.geometry_record(geometry)},
        num_cpus=1, compute=ray.data.TaskPoolStrategy(size=concurrency))
    pending: dict[int, dict[str, Any]] = {}
    expect = 0
    for row in ds.iter_rows():
        pending[int(row["key"])] = row
        while expect in pending:
            yield pending.pop(expect)
            expect += 1
    if pending or expect != len(jobs):
        raise RuntimeError(f"Ray Data returned {expect} of {len(jobs)} results")


def _clean_tmp(out: Path) -> None:
    for path in out.glob(".tmp-*"):
        if path.is_file():
            path.unlink()


LOCK_FILE = ".preprocess.lock"


@contextlib.contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` for one preprocess run; ValueError at once if another run holds it."""
    with (out / LOCK_FILE).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"out {out}: another `ganbert preprocess` is writing there (lock {out / LOCK_FILE}); "
                             "wait for it to finish or choose another folder") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fallback_t1(pet: adni.Scan, scans: list[adni.Scan], window_days: int, refused: set[str]) -> adni.Scan | None:
    """The subject's next-nearest T1 within the window for `pet`, skipping T1 image ids in `refused`."""
    options = sorted((m for m in scans if m.kind == "T1" and m.subject == pet.subject and m.image_id not in refused
                      and abs((pet.acq_date - m.acq_date).days) <= window_days),
                     key=lambda m: (abs((pet.acq_date - m.acq_date).days), m.acq_date, _natural(m.image_id)))
    return options[0] if options else None


def _fallback_job(job: dict[str, Any], mri: adni.Scan, pet: adni.Scan) -> dict[str, Any]:
    """The job of `job`'s PET paired with another T1 (its nearest one was rejected)."""
    return job | {"mri_image_id": mri.image_id, "mri_file": mri.files[0], "group": pet.group or mri.group,
                  "days_apart": (pet.acq_date - mri.acq_date).days}


def pairs_in_shards(manifest: dict[str, Any], scans: list[adni.Scan]) -> list[adni.Pair]:
    """The pairs the shards hold (manifest rows), so pairs.csv always agrees with them after any rerun."""
    by_id = {s.image_id: s for s in scans}
    pairs = []
    for row in manifest["rows"]:
        pet, mri = by_id.get(row["pet_image_id"]), by_id.get(row["mri_image_id"])
        if pet is not None and mri is not None:
            pairs.append(adni.Pair(pet=pet, mri=mri, days_apart=int(row["days_apart"])))
    return sorted(pairs, key=lambda p: (p.subject, p.tracer, _natural(p.pet.image_id)))


def run(raw: Path, out: Path, cfg: Config, window_days: int = 365, *, shard_mb: float = shards.DEFAULT_SHARD_MB,
        val_fraction: float = 0.1, test_fraction: float = 0.1, num_cpus: int | None = None,
        registration: str = "rigid") -> dict[str, Any]:
    """`_run` holding the output folder's lock (two runs into one folder would delete each other's files)."""
    if registration not in REGISTRATIONS:
        raise ValueError(f"registration must be one of {REGISTRATIONS}, got {registration!r}")
    raw, out = Path(raw).resolve(), Path(out).resolve()
    if raw == out:
        raise ValueError(f"out must differ from raw ({raw}): outputs would be read back as inputs")
    out.mkdir(parents=True, exist_ok=True)
    with out_lock(out):
        return _run(raw, out, cfg, window_days, shard_mb=shard_mb, val_fraction=val_fraction,
                    test_fraction=test_fraction, num_cpus=num_cpus, registration=registration)


def _run(raw: Path, out: Path, cfg: Config, window_days: int = 365, *, shard_mb: float = shards.DEFAULT_SHARD_MB,
         val_fraction: float = 0.1, test_fraction: float = 0.1, num_cpus: int | None = None,
         registration: str = "rigid") -> dict[str, Any]:
    """Ingest an ADNI-layout download, preprocess every new pair on Ray Data and append Parquet shards.

    Writes out/{manifest.json, <split>-<tracer>-<n>.parquet, pairs.csv, unpaired.csv, rejected.csv}.
    Pairs already in the manifest are skipped, so a rerun writes nothing new and leaves every file as it was.
    A PET whose nearest T1 is rejected falls back to the next-nearest T1 in the window. pairs.csv lists
    exactly the pairs in the shards.
    Returns a summary: pairs, written, skipped_existing, rejected, unpaired, shards, rows.
    """
    geometry = cfg.geometry
    ingest = adni.ingest(raw, window_days, min_frames=geometry.pet_frames)
    out.mkdir(parents=True, exist_ok=True)
    _clean_tmp(out)
    if (out / shards.MANIFEST).exists():
        manifest = shards.read_manifest(out)
        shards.check_geometry(manifest, geometry, out)
    else:
        manifest = shards.new_manifest(geometry, SETTINGS | {"window_days": window_days, "registration": registration})
    had = manifest["preprocess"].get("registration", "none")
    if had != registration:
        raise ValueError(f"registration: the shards in {out} were made with registration {had!r}, not "
                         f"{registration!r}; use the same setting or another --out")
    splits = assign_splits(sorted({p.subject for p in ingest.pairs}), manifest["splits"], val_fraction, test_fraction)
    manifest["splits"] = splits
    shards.save_manifest(out, manifest)
    done = {row["pet_image_id"] for row in manifest["rows"]}
    jobs = sorted((pair_job(p, splits[p.subject]) | {"registration": registration}
                   for p in ingest.pairs if p.pet.image_id not in done),
                  # within a (split, tracer) group, rows follow a hash of the subject id: sites and groups are mixed
                  key=lambda j: (SPLIT_ORDER[j["split"]], j["tracer"], _subject_hash(j["subject"]),
                                 _natural(j["pet_image_id"])))
    rejected, unpaired = list(ingest.rejected), list(ingest.unpaired)
    writer = shards.ShardWriter(out, geometry, manifest, shard_mb)
    mri_shape, pet_shape = shards.mri_shape(geometry), shards.pet_shape(geometry)
    scans = {s.image_id: s for s in ingest.scans}
    refused: set[str] = set()
    progress, n_jobs = Progress("preprocess", len(jobs)), len(jobs)
    try:
        while jobs:
            retry: list[dict[str, Any]] = []
            for job, result in zip(jobs, _run_jobs(jobs, raw, geometry, num_cpus)):
                progress.step()
                meta = json.loads(result["meta"])
                if "error" in meta:
                    bad_id = job["mri_image_id"] if meta["which"] == "mri" else job["pet_image_id"]
                    rejected.append(adni.Issue(meta["file"], bad_id, job["subject"], "data", meta["error"]))
                    if meta["which"] == "mri":
                        refused.add(bad_id)
                        pet = scans[job["pet_image_id"]]
                        other = fallback_t1(pet, ingest.scans, window_days, refused)
                        if other is not None:
                            retry.append(_fallback_job(job, other, pet))
                            progress.total += 1
                            continue
                        unpaired.append(adni.Issue(job["pet_files"][0], job["pet_image_id"], job["subject"], "pair",
                                                   f"its T1 {job['mri_image_id']} was rejected (see rejected.csv)"))
                    continue
                row = {k: job[k] for k in shards.STRING_COLUMNS} | {
                    "days_apart": job["days_apart"], "mri_mean": meta["mri_mean"], "mri_std": meta["mri_std"],
                    "mri": np.frombuffer(result["mri"], dtype=np.uint8).reshape(mri_shape),
                    "pet": np.frombuffer(result["pet"], dtype=np.float32).reshape(pet_shape),
                    "mri_affine": np.asarray(meta["mri_affine"], dtype=np.float64).reshape(4, 4),
                    "brain_mask": np.frombuffer(result["brain_mask"], dtype=np.uint8).reshape(geometry.pet_size),
                    "labels": np.frombuffer(result["labels"], dtype=np.uint8).reshape(geometry.pet_size),
                    "has_labels": bool(meta["has_labels"])}
                record = {k: job[k] for k in (*shards.STRING_COLUMNS, "days_apart")} | {
                    "sources": meta["sources"], "stats": meta["stats"], "labels": bool(meta["has_labels"]),
                    "registration": meta["registration"], "template_registration": meta["template_registration"],
                    "shapes": {"mri": list(mri_shape), "pet": list(pet_shape)}}
                writer.add(row, record)
            jobs = retry
        writer.close()
    except BaseException:
        writer.abort()
        raise
    if writer.written or stats.KEY not in manifest:
        stats.record(out, manifest, cfg.sequence.length)  # token calibration and PET level, once, here
    adni.write_pairs(out / "pairs.csv", pairs_in_shards(manifest, ingest.scans))
    adni.write_issues(out / "unpaired.csv", unpaired)
    adni.write_issues(out / "rejected.csv", rejected)
    n_rejected = len({(i.file, i.image_id, i.reason) for i in rejected})
    return {"pairs": len(ingest.pairs), "written": writer.written, "skipped_existing": len(ingest.pairs) - n_jobs,
            "rejected": n_rejected, "unpaired": len({(i.file, i.image_id) for i in unpaired}),
            "shards": len(manifest["shards"]), "rows": len(manifest["rows"]),
            "splits": {s: sum(1 for v in splits.values() if v == s) for s in shards.SPLITS}, "out": str(out)}


def main(args: argparse.Namespace, cfg: Config) -> int:
    """CLI `ganbert preprocess --raw DIR --out DIR`: exit 1 when any input was rejected, else 0."""
    summary = run(Path(args.raw), Path(args.out), cfg, int(getattr(args, "window_days", 365)),
                  registration=str(getattr(args, "registration", "rigid")))
    print(f"preprocess: {summary['pairs']} pairs, {summary['written']} written, "
          f"{summary['skipped_existing']} already done, {summary['rejected']} rejected "
          f"(see {Path(summary['out']) / 'rejected.csv'}), {summary['unpaired']} unpaired, "
          f"{summary['shards']} shards / {summary['rows']} rows in {summary['out']}")
    print("subjects per split: " + ", ".join(f"{k} {v}" for k, v in summary["splits"].items()))
    return 1 if summary["rejected"] else 0


# --- cached phantom data for training without --data --------------------------------------------

def phantom_size(geometry: GeometryConfig) -> str:
    """The phantom raw size suited to a geometry: tiny (<= 32^3 MRI), demo (<= 96^3), else paper."""
    side = geometry.mri_size[0]
    return "tiny" if side <= 32 else "demo" if side <= 96 else "paper"


def ensure_phantom(cfg: Config, cache_root: Path, subjects: int = 12, seed: int = 0) -> Path:
    """Shards of a phantom cohort (all tracers) for cfg.geometry, built once and cached; returns the shards dir.

    The cache key is the geometry, phantom size, subject count and seed; concurrent callers wait on a lock.
    """
    from ganbert.data import phantom

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
        summary = run(raw, out, cfg)
        if summary["rejected"]:
            raise ValueError(f"phantom cohort {raw}: {summary['rejected']} inputs rejected (see {out / 'rejected.csv'})")
        write_text(done, json.dumps(summary, sort_keys=True) + "\n")
    return out


# --- benchmark ------------------------------------------------------------------------------------

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
    from ganbert.data import loader, phantom

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
