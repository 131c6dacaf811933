"""Preprocessing: pair each PET with its T1, process the pairs on Ray Data, write Parquet shards and statistics.

The data flow, one module per stage: data.adni (scans and pairs of an ADNI-layout download, read through
data.nifti / data.dicom) -> data.splits (subject -> train/val/test) -> data.pair (one pair read, registered with
data.registration and data.brainmask, resampled onto data.grid; run here as Ray Data tasks) -> data.shards
(Parquet shards and manifest) -> data.stats (training-split statistics, computed once, here). data.loader reads
the shards back; data.phantom_cache builds cached phantom shards with `run`.

Output (see data.shards): `<split>-<tracer>-<nnnnn>.parquet` (zstd, at most `shard_mb` of tensors each; rows of a
(split, tracer) ordered by a hash of the subject id), `manifest.json`, `pairs.csv`, `unpaired.csv`, `rejected.csv`.
Splits are by subject (about 80/10/10, at least one subject each from three subjects on) and never change
for a subject once recorded in the manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ganbert.common.progress import Progress
from ganbert.common.raysession import ensure_ray
from ganbert.config import Config, GeometryConfig
from ganbert.ingest import adni
from ganbert.prep.grid import HIGH_PERCENTILE, LOW_PERCENTILE
from ganbert.prep.pair import REGISTRATIONS, message, pair_job, process_pair
from ganbert.store import shards, stats
from ganbert.store.datacontext import quiet_data_context
from ganbert.store.splits import assign_splits, subject_hash

SPLIT_ORDER = {name: i for i, name in enumerate(shards.SPLITS)}
SETTINGS = {"mri_rescale": f"input percentiles {LOW_PERCENTILE}..{HIGH_PERCENTILE} -> 0..255, clipped, uint8",
            "interpolation": "linear (scipy.ndimage.affine_transform order 1), Gaussian anti-aliasing when coarser",
            "pet_frames": "contiguous groups (numpy.array_split) averaged", "orientation": "RAS",
            "centre": "centre of the T1 field of view", "pet_units": "scanner units of the input PET, float32"}


# --- one pair in a Ray Data task ------------------------------------------------------------------

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
                                   "template_registration", "t1_qc")}
    meta["mri_affine"] = np.asarray(result["mri_affine"], dtype=np.float64).reshape(-1).tolist()
    return {"key": item["key"], "meta": json.dumps(meta), "mri": result["mri"].tobytes(),
            "pet": np.ascontiguousarray(result["pet"], dtype=np.float32).tobytes(),
            "brain_mask": np.ascontiguousarray(result["brain_mask"], dtype=np.uint8).tobytes(),
            "labels": np.ascontiguousarray(result["labels"], dtype=np.uint8).tobytes()}


def _geometry(record: dict[str, Any]) -> GeometryConfig:
    return GeometryConfig(mri_size=tuple(record["mri_size"]), pet_frames=int(record["pet_frames"]),
                          pet_size=tuple(record["pet_size"]), mri_fov_mm=float(record["mri_fov_mm"]),
                          pet_fov_mm=tuple(record["pet_fov_mm"]))


# --- the pipeline ---------------------------------------------------------------------------------

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
                     key=lambda m: (abs((pet.acq_date - m.acq_date).days), m.acq_date, adni.natural(m.image_id)))
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
    return sorted(pairs, key=lambda p: (p.subject, p.tracer, adni.natural(p.pet.image_id)))


def run(raw: Path, out: Path, cfg: Config, window_days: int = 365, *, shard_mb: float = shards.DEFAULT_SHARD_MB,
        val_fraction: float = 0.1, test_fraction: float = 0.1, num_cpus: int | None = None,
        registration: str = "rigid", t1_qc: bool = True) -> dict[str, Any]:
    """`_run` holding the output folder's lock (two runs into one folder would delete each other's files).

    `t1_qc` false (`--skip-qc`) keeps T1s that fail input QC (their scores are still recorded)."""
    if registration not in REGISTRATIONS:
        raise ValueError(f"registration must be one of {REGISTRATIONS}, got {registration!r}")
    raw, out = Path(raw).resolve(), Path(out).resolve()
    if raw == out:
        raise ValueError(f"out must differ from raw ({raw}): outputs would be read back as inputs")
    out.mkdir(parents=True, exist_ok=True)
    with out_lock(out):
        return _run(raw, out, cfg, window_days, shard_mb=shard_mb, val_fraction=val_fraction,
                    test_fraction=test_fraction, num_cpus=num_cpus, registration=registration, t1_qc=t1_qc)


def _run(raw: Path, out: Path, cfg: Config, window_days: int = 365, *, shard_mb: float = shards.DEFAULT_SHARD_MB,
         val_fraction: float = 0.1, test_fraction: float = 0.1, num_cpus: int | None = None,
         registration: str = "rigid", t1_qc: bool = True) -> dict[str, Any]:
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
    jobs = sorted((pair_job(p, splits[p.subject]) | {"registration": registration, "t1_qc": t1_qc}
                   for p in ingest.pairs if p.pet.image_id not in done),
                  # within a (split, tracer) group, rows follow a hash of the subject id: sites and groups are mixed
                  key=lambda j: (SPLIT_ORDER[j["split"]], j["tracer"], subject_hash(j["subject"]),
                                 adni.natural(j["pet_image_id"])))
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
                    "t1_qc": meta["t1_qc"], "shapes": {"mri": list(mri_shape), "pet": list(pet_shape)}}
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
                  registration=str(getattr(args, "registration", "rigid")),
                  t1_qc=not getattr(args, "skip_qc", False))
    print(f"preprocess: {summary['pairs']} pairs, {summary['written']} written, "
          f"{summary['skipped_existing']} already done, {summary['rejected']} rejected "
          f"(see {Path(summary['out']) / 'rejected.csv'}), {summary['unpaired']} unpaired, "
          f"{summary['shards']} shards / {summary['rows']} rows in {summary['out']}")
    print("subjects per split: " + ", ".join(f"{k} {v}" for k, v in summary["splits"].items()))
    return 1 if summary["rejected"] else 0
