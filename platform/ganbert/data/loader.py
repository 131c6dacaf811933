"""Shard loader: Ray Data datasets of one split/tracer, torch batches (streaming), and a plain pyarrow reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ganbert.config import GeometryConfig
from ganbert.data import shards

STRING_KEYS = ("subject", "tracer", "split", "group", "mri_image_id", "pet_image_id")


def _manifest(data_dir: Path | str, geometry: GeometryConfig | None = None) -> dict[str, Any]:
    manifest = shards.read_manifest(data_dir)
    if geometry is not None:
        shards.check_geometry(manifest, geometry, data_dir)
    return manifest


READ_CPUS = 0.25


def shard_paths(data_dir: Path | str, split: str, tracer: str | None = None,
                geometry: GeometryConfig | None = None) -> list[Path]:
    """Shard files of a split (and tracer) in manifest order; ValueError when there are none."""
    manifest = _manifest(data_dir, geometry)
    entries = shards.shards_for(manifest, split, tracer)
    if not entries:
        have = sorted({(s["split"], s["tracer"]) for s in manifest["shards"]})
        raise ValueError(f"split {split!r}" + (f" tracer {tracer!r}" if tracer else "") +
                         f": no rows in {data_dir} (present: {have})")
    return [Path(data_dir) / s["file"] for s in entries]


def count_rows(data_dir: Path | str, split: str, tracer: str | None = None) -> int:
    """Rows of a split (and tracer), from the manifest."""
    return sum(s["rows"] for s in shards.shards_for(shards.read_manifest(data_dir), split, tracer))


def read_split(data_dir: Path | str, split: str, tracer: str | None = None,
               geometry: GeometryConfig | None = None) -> Any:
    """A lazy `ray.data.Dataset` over the shards of one split (and tracer), rows in manifest order.

    With `geometry`, raises ValueError when the shards were made for another geometry. Starts a local
    Ray if none is running, and sets DataContext.execution_options.preserve_order so that iteration order
    (and a seeded local shuffle) is deterministic. Nothing is read until the dataset is iterated.
    """
    import ray

    from ganbert.data.preprocess import _quiet_data_context
    from ganbert.raysession import ensure_ray

    paths = shard_paths(data_dir, split, tracer, geometry)
    ensure_ray()
    _quiet_data_context()
    # Reads are I/O: a quarter CPU each, so they still run beside Train workers (and Tune drivers) that
    # hold every whole CPU of a small node.
    return ray.data.read_parquet([str(p) for p in paths], partitioning=None, shuffle=None,
                                 override_num_blocks=len(paths), num_cpus=READ_CPUS)


def train_data_config() -> Any:
    """`ray.train.DataConfig` that keeps shard order deterministic for every worker (preserve_order)."""
    import ray.train
    from ray.data import ExecutionOptions

    options = ExecutionOptions()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


def _tensor(values: np.ndarray, dtype: type) -> torch.Tensor:
    """A writable torch tensor owning its memory (Ray hands out read-only Arrow buffers)."""
    return torch.from_numpy(np.array(values, dtype=dtype, copy=True, order="C"))


def _to_torch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "mri": _tensor(batch["mri"], np.uint8),
        "pet": _tensor(batch["pet"], np.float32),
        "mri_mean": _tensor(batch["mri_mean"], np.float32),
        "mri_std": _tensor(batch["mri_std"], np.float32),
        "mri_affine": _tensor(batch["mri_affine"], np.float64).reshape(-1, 4, 4),
    }
    for key in ("brain_mask", "labels"):  # uint8 (B, d, h, w) PET-grid maps
        if key in batch:
            out[key] = _tensor(batch[key], np.uint8)
    for key in STRING_KEYS:
        if key in batch:
            out[key] = [str(v) for v in batch[key]]
    return out


def torch_batches(dataset_or_shard: Any, batch_size: int, shuffle_seed: int | None = None,
                  drop_last: bool = False, shuffle_buffer: int | None = None) -> Iterator[dict[str, Any]]:
    """Stream torch batches from a Ray Dataset or a Ray Train `get_dataset_shard` DataIterator.

    Yields {"mri": uint8 (B, 1, D, H, W), "pet": float32 (B, T, d, h, w), "mri_mean"/"mri_std": float32 (B,),
    "mri_affine": float64 (B, 4, 4), "subject"/"pet_image_id"/"mri_image_id"/"tracer"/...: list[str]}.
    `shuffle_seed` turns on a seeded local shuffle buffer (`shuffle_buffer` rows, default max(16, 4 * B)),
    so memory stays bounded; the same seed over the same input gives the same order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not hasattr(dataset_or_shard, "iter_batches"):
        raise ValueError(f"dataset_or_shard must be a Ray Dataset or DataIterator, got {type(dataset_or_shard).__name__}")
    kwargs: dict[str, Any] = {"batch_size": batch_size, "batch_format": "numpy", "drop_last": drop_last,
                              "prefetch_batches": 1}
    if shuffle_seed is not None:
        kwargs["local_shuffle_buffer_size"] = int(shuffle_buffer or max(16, 4 * batch_size))
        kwargs["local_shuffle_seed"] = int(shuffle_seed)
    for batch in dataset_or_shard.iter_batches(**kwargs):
        yield _to_torch(batch)


def read_rows(data_dir: Path | str, split: str, tracer: str | None = None,
              geometry: GeometryConfig | None = None) -> Iterator[dict[str, Any]]:
    """Plain pyarrow reader (no Ray): one dict per row, numpy values, one row group in memory at a time.

    "mri" uint8 (1, D, H, W), "pet" float32 (T, d, h, w), "mri_affine" float64 (4, 4), floats and strings.
    """
    manifest = _manifest(data_dir, geometry)
    for entry in shards.shards_for(manifest, split, tracer):
        pf = pq.ParquetFile(Path(data_dir) / entry["file"])
        for group in range(pf.num_row_groups):
            table = pf.read_row_group(group)
            cols = {name: table.column(name).combine_chunks() for name in table.column_names}
            arrays = {name: cols[name].to_numpy_ndarray() for name in cols
                      if isinstance(cols[name].type, pa.FixedShapeTensorType)}
            plain = {name: cols[name].to_pylist() for name in cols if name not in arrays}
            for i in range(table.num_rows):
                row: dict[str, Any] = {name: values[i] for name, values in plain.items()}
                row.update({name: arr[i] for name, arr in arrays.items()})
                yield row
