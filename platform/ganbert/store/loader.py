"""Shard loader: Ray Data datasets of one split/tracer, torch batches (streaming), and a plain pyarrow reader."""

from __future__ import annotations

import bisect
import itertools
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ganbert.common import home
from ganbert.config import GeometryConfig
from ganbert.store import shards
from ganbert.store.datacontext import quiet_data_context
from ganbert.store.part import Part, as_part

STRING_KEYS = ("subject", "tracer", "split", "group", "mri_image_id", "pet_image_id")


def _manifest(data_dir: Path | str, geometry: GeometryConfig | None = None) -> dict[str, Any]:
    manifest = shards.read_manifest(data_dir)
    if geometry is not None:
        shards.check_geometry(manifest, geometry, data_dir)
    return manifest


# Read tasks reserve no CPU: their consumer (a Train worker, a Tune trial driver, the CLI) already holds the CPU
# they feed, and any positive reservation deadlocks a node whose whole CPUs all went to Train workers (2 workers on
# 2 CPUs) or to one worker plus a trial driver's fraction. Ray Data still bounds them by object-store budget.
READ_CPUS = 0.0


def _entries(manifest: dict[str, Any], data_dir: Path | str, split: str, tracer: str | None) -> list[dict[str, Any]]:
    """Shard entries of a split (and tracer) in manifest order; ValueError when there are none."""
    entries = shards.shards_for(manifest, split, tracer)
    if not entries:
        have = sorted({(s["split"], s["tracer"]) for s in manifest["shards"]})
        raise ValueError(f"split {split!r}" + (f" tracer {tracer!r}" if tracer else "") +
                         f": no rows in {data_dir} (present: {have})")
    return entries


def shard_paths(data_dir: Path | str, split: str, tracer: str | None = None,
                geometry: GeometryConfig | None = None) -> list[str]:
    """Shard files (paths, or URIs under a URI `data_dir`) of a split (and tracer) in manifest order; ValueError
    when there are none."""
    entries = _entries(_manifest(data_dir, geometry), data_dir, split, tracer)
    return [home.join(str(data_dir), s["file"]) for s in entries]


def part_records(manifest: dict[str, Any], data_dir: Path | str, split: str | Part,
                 tracer: str | None = None) -> list[dict[str, Any]]:
    """Manifest row records (subject, split, tracer, shard, row, ...) of a split or Part (and tracer), in manifest
    order (shard by shard, row by row); ValueError naming the part when there are none."""
    part = as_part(split)
    found = [r for r in manifest["rows"] if part.holds(r, tracer)]
    if not found:
        have = sorted({(s["split"], s["tracer"]) for s in manifest["shards"]})
        raise ValueError(f"{part.describe()}" + (f" tracer {tracer!r}" if tracer else "") +
                         f": no rows in {data_dir} (present: {have})")
    return found


def checked_manifest(data_dir: Path | str, splits: tuple[str | Part, ...], tracer: str | None = None,
                     geometry: GeometryConfig | None = None) -> dict[str, Any]:
    """The manifest of `data_dir`, read once; ValueError when the shards were made for another `geometry` or
    one of `splits` (names or Parts) has no rows (of `tracer`)."""
    manifest = _manifest(data_dir, geometry)
    for split in splits:
        part_records(manifest, data_dir, split, tracer)
    return manifest


def rows_in(manifest: dict[str, Any], split: str | Part, tracer: str | None = None) -> int:
    """Rows of a split or Part (and tracer) as the manifest lists them."""
    part = as_part(split)
    return sum(1 for r in manifest["rows"] if part.holds(r, tracer))


def count_rows(data_dir: Path | str, split: str | Part, tracer: str | None = None) -> int:
    """Rows of a split or Part (and tracer), from the manifest."""
    return rows_in(shards.read_manifest(data_dir), split, tracer)


def _open(path: str) -> Any:
    """A pyarrow input file for a local path or a URI pyarrow understands (s3://, gs://, file://, hdfs://)."""
    fs, inner = home.filesystem(str(path))
    return fs.open_input_file(inner)  # type: ignore[attr-defined]


def _take_rows(path: str, rows: list[int]) -> dict[int, Any]:
    """{row: 1-row pyarrow table} for the given rows of one shard, reading only the row groups that hold them."""
    pf = pq.ParquetFile(_open(path))
    starts = list(itertools.accumulate((pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)),
                                       initial=0))
    group_of = {r: bisect.bisect_right(starts, r) - 1 for r in rows}
    groups = sorted(set(group_of.values()))
    table = pf.read_row_groups(groups)
    offset, seen = {}, 0
    for g in groups:
        offset[g] = seen
        seen += starts[g + 1] - starts[g]
    return {r: table.slice(offset[group_of[r]] + r - starts[group_of[r]], 1) for r in rows}


def _read_positions(batch: Any) -> Any:
    """Ray Data UDF: the rows named by (`file`, `row`) of a pyarrow batch, in the batch's order."""
    import pyarrow as pa

    files, rows = batch.column("file").to_pylist(), batch.column("row").to_pylist()
    taken = {f: _take_rows(f, sorted({r for g, r in zip(files, rows) if g == f})) for f in dict.fromkeys(files)}
    return pa.concat_tables([taken[f][r] for f, r in zip(files, rows)]).combine_chunks()


def split_positions(data_dir: Path | str, split: str | Part, tracer: str | None = None,
                    geometry: GeometryConfig | None = None) -> list[tuple[str, int]]:
    """(shard path, row) of every row of a split or Part (and tracer), in manifest order."""
    records = part_records(_manifest(data_dir, geometry), data_dir, split, tracer)
    return [(home.join(str(data_dir), r["shard"]), int(r["row"])) for r in records]


def epoch_positions(positions: list[tuple[str, int]], seed: int, epoch: int, rank: int = 0,
                    world: int = 1) -> list[tuple[str, int]]:
    """This rank's part of a seeded permutation of all `positions` for one epoch (equal parts, rank::world).

    Depends only on (seed, epoch, rank, world): a resumed run sees the order an uninterrupted one would.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world) with world >= 1, got rank={rank} world={world}")
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(len(positions))
    per_rank = len(positions) // world
    return [positions[i] for i in order[rank::world][:per_rank]]


def positions_dataset(positions: list[tuple[str, int]], rows_per_read: int = 4) -> Any:
    """A lazy `ray.data.Dataset` of the given rows in the given order (read tasks of READ_CPUS each)."""
    import ray

    from ganbert.common.raysession import ensure_ray

    if not positions:
        raise ValueError("positions: no rows to read")
    ensure_ray()
    quiet_data_context()
    items = [{"file": f, "row": r} for f, r in positions]
    blocks = max(1, (len(items) + rows_per_read - 1) // rows_per_read)
    # from_items + map_batches: no ListFiles task (Ray Data's file listing asks a whole CPU, which a 2-CPU node
    # whose CPUs are held by a Train worker and a Tune trial driver never has free).
    return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        _read_positions, batch_size=rows_per_read, batch_format="pyarrow", num_cpus=READ_CPUS)


def read_split(data_dir: Path | str, split: str | Part, tracer: str | None = None,
               geometry: GeometryConfig | None = None) -> Any:
    """A lazy `ray.data.Dataset` over the rows of one split or Part (and tracer), in manifest order.

    With `geometry`, raises ValueError when the shards were made for another geometry. Starts a local
    Ray if none is running and sets DataContext.execution_options.preserve_order. Read tasks ask
    READ_CPUS each (no whole-CPU listing task). Nothing is read until the dataset is iterated.
    """
    return positions_dataset(split_positions(data_dir, split, tracer, geometry))


def epoch_dataset(data_dir: Path | str, split: str | Part, tracer: str | None, seed: int, epoch: int,
                  rank: int = 0, world: int = 1) -> Any:
    """This rank's rows of a seeded per-epoch permutation of the whole split (or Part), as a lazy Ray Dataset."""
    return positions_dataset(epoch_positions(split_positions(data_dir, split, tracer), seed, epoch, rank, world))


def row_bytes(geometry: GeometryConfig) -> int:
    """Bytes of one decoded shard row: uint8 MRI, float32 PET frames, uint8 brain mask and labels, the affine."""
    pet_grid = int(np.prod(geometry.pet_size))
    return int(np.prod(geometry.mri_size)) + 4 * geometry.pet_frames * pet_grid + 2 * pet_grid + 16 * 8


def fits_in_memory(manifest: dict[str, Any], split: str | Part, tracer: str | None, geometry: GeometryConfig,
                   budget_mb: int) -> bool:
    """Whether the decoded rows of a split or Part (and tracer) take at most `budget_mb` MiB (`SplitRows` holds
    them; for a Part, the whole shards its rows lie in are read)."""
    return rows_in(manifest, split, tracer) * row_bytes(geometry) <= budget_mb * 2**20


def _numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """A pyarrow table -> {column: numpy array}, as Ray Data's numpy batch format gives it to `_to_torch`."""
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if isinstance(column.type, pa.FixedShapeTensorType):
            out[name] = column.to_numpy_ndarray()
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


class SplitRows:
    """Every row of a split (and tracer), read once with pyarrow and held in memory; served in any order.

    For training splits that fit in memory (`fits_in_memory`): an epoch then costs no Ray Data planning or
    reads, and `batches(epoch_positions(...))` yields exactly what `torch_batches(epoch_dataset(...))` does.
    """

    def __init__(self, data_dir: Path | str, split: str | Part, tracer: str | None = None) -> None:
        self.positions = split_positions(data_dir, split, tracer)
        paths = list(dict.fromkeys(path for path, _ in self.positions))
        tables = [pq.read_table(_open(path)) for path in paths]  # whole shards; a Part keeps only its rows' index
        offset = dict(zip(paths, itertools.accumulate((t.num_rows for t in tables), initial=0)))
        rows = dict(zip(paths, (t.num_rows for t in tables)))
        bad = [(path, row) for path, row in self.positions if row >= rows[path]]
        if bad:
            raise ValueError(f"{as_part(split).describe()} of {data_dir}: the manifest lists row {bad[0][1]} of "
                             f"{bad[0][0]}, which holds {rows[bad[0][0]]} rows")
        self.table = pa.concat_tables(tables).combine_chunks()
        self.index = {(path, row): offset[path] + row for path, row in self.positions}

    def batches(self, positions: list[tuple[str, int]], batch_size: int,
                drop_last: bool = False) -> Iterator[dict[str, Any]]:
        """Torch batches (as `torch_batches` yields them) of the rows at `positions`, in that order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        unknown = [p for p in positions if p not in self.index]
        if unknown:
            raise ValueError(f"positions: {unknown[0]} is not a row of this split")
        end = len(positions) - len(positions) % batch_size if drop_last else len(positions)
        for start in range(0, end, batch_size):
            rows = [self.index[p] for p in positions[start:start + batch_size]]
            yield _to_torch(_numpy_batch(self.table.take(rows)))


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


def torch_batches(dataset_or_shard: Any, batch_size: int, drop_last: bool = False) -> Iterator[dict[str, Any]]:
    """Stream torch batches from a Ray Dataset or a Ray Train `get_dataset_shard` DataIterator.

    Yields {"mri": uint8 (B, 1, D, H, W), "pet": float32 (B, T, d, h, w), "mri_mean"/"mri_std": float32 (B,),
    "mri_affine": float64 (B, 4, 4), "subject"/"pet_image_id"/"mri_image_id"/"tracer"/...: list[str]}.
    Rows come in the dataset's order: `epoch_dataset` is the seeded per-epoch permutation training reads.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not hasattr(dataset_or_shard, "iter_batches"):
        raise ValueError("dataset_or_shard must be a Ray Dataset or DataIterator, "
                         f"got {type(dataset_or_shard).__name__}")
    kwargs: dict[str, Any] = {"batch_size": batch_size, "batch_format": "numpy", "drop_last": drop_last,
                              "prefetch_batches": 1}
    for batch in dataset_or_shard.iter_batches(**kwargs):
        yield _to_torch(batch)


def read_rows(data_dir: Path | str, split: str | Part, tracer: str | None = None,
              geometry: GeometryConfig | None = None) -> Iterator[dict[str, Any]]:
    """Plain pyarrow reader (no Ray): one dict per row of a split or Part, numpy values, one row group in memory
    at a time; row groups without a wanted row are skipped. An empty split or Part yields nothing.

    "mri" uint8 (1, D, H, W), "pet" float32 (T, d, h, w), "mri_affine" float64 (4, 4), floats and strings.
    """
    manifest = _manifest(data_dir, geometry)
    part = as_part(split)
    wanted: dict[str, set[int]] = {}
    for r in manifest["rows"]:
        if part.holds(r, tracer):
            wanted.setdefault(r["shard"], set()).add(int(r["row"]))
    for entry in manifest["shards"]:
        rows = wanted.get(entry["file"])
        if not rows:
            continue
        pf = pq.ParquetFile(_open(home.join(str(data_dir), entry["file"])))
        start = 0
        for group in range(pf.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            take = [i - start for i in range(start, start + n) if i in rows]
            start += n
            if not take:
                continue
            table = pf.read_row_group(group)
            cols = {name: table.column(name).combine_chunks() for name in table.column_names}
            arrays = {name: cols[name].to_numpy_ndarray() for name in cols
                      if isinstance(cols[name].type, pa.FixedShapeTensorType)}
            plain = {name: cols[name].to_pylist() for name in cols if name not in arrays}
            for i in take:
                row: dict[str, Any] = {name: values[i] for name, values in plain.items()}
                row.update({name: arr[i] for name, arr in arrays.items()})
                yield row
