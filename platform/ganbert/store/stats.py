"""Statistics computed once at preprocessing: each row's MRI mean/std and the training split's (`train_stats`).

Per row: mean and std of the stored uint8 MRI (shard columns `mri_mean`, `mri_std`; the normalisation every stage
uses). Training split, in the manifest (`train_stats`): token calibration and the PET level.

Per tracer: quantiles of the normalised MRI and PET summary values at one sequence length (the token space is
calibrated from them, `tokens.summary_range`), the mean / std of the normalised PET voxels and the mean
PET volume (the generator's output init). `ganbert train` reads them from the manifest; only shards written before this
existed, or a run at another `sequence.length`, compute them at start (one pass over the training split).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import safetensors.numpy
import torch
from safetensors.torch import save_file

from ganbert.common import home
from ganbert.config import TRACERS
from ganbert.models.intensity import normalise_mri, normalise_pet
from ganbert.models.sequence import summarise
from ganbert.store import loader, shards
from ganbert.store.part import Part

QUANTILES = (0.0, 0.001, 0.01, 0.5, 0.99, 0.999, 1.0)
KEY = "train_stats"
VOLUMES = "train_mean_pet.safetensors"


def row_summaries(row: dict[str, Any], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One shard row -> (MRI summary (L,), PET summary (L,), normalised PET voxels (T*d*h*w,)), float64."""
    mean, std = torch.tensor([row["mri_mean"]]), torch.tensor([row["mri_std"]])
    mri = normalise_mri(torch.from_numpy(np.array(row["mri"]))[None], mean, std)
    pet = normalise_pet(torch.from_numpy(np.array(row["pet"], dtype=np.float64))[None], mean, std)
    return (summarise(mri.double(), length)[0].numpy(), summarise(pet, length)[0].numpy(), pet.flatten().numpy())


def tracer_stats(data_dir: Path | str, tracer: str, length: int, part: str | Part = "train") -> dict[str, Any] | None:
    """Statistics of one tracer's training split, or of another Part (a fold's training subjects); None when it
    has no rows.

    "pet_mean_volume" (float32 `(T, d, h, w)`, normalised units) is the voxelwise mean training PET; the
    rest is JSON-able.
    """
    mri_parts, pet_parts, total, total_sq, count, volume, shape = [], [], 0.0, 0.0, 0, None, ()
    for row in loader.read_rows(data_dir, part, tracer):
        mri, pet, voxels = row_summaries(row, length)
        shape = np.asarray(row["pet"]).shape
        mri_parts.append(mri)
        pet_parts.append(pet)
        total, total_sq = total + float(voxels.sum()), total_sq + float(np.square(voxels).sum())
        count += voxels.size
        volume = voxels if volume is None else volume + voxels
    if not mri_parts or volume is None:
        return None
    mean = total / count

    def quantiles(parts: list[np.ndarray]) -> dict[str, float]:
        values = np.concatenate(parts)
        return {f"q{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))}

    return {"length": length, "rows": len(mri_parts), "mri": quantiles(mri_parts), "pet": quantiles(pet_parts),
            "pet_mean": mean, "pet_std": max(total_sq / count - mean**2, 0.0) ** 0.5,
            "pet_mean_volume": (volume / len(mri_parts)).reshape(shape).astype(np.float32)}


def compute(data_dir: Path | str, length: int) -> dict[str, dict[str, Any]]:
    """`{tracer: statistics}` over every tracer with training rows."""
    out = {}
    for tracer in TRACERS:
        found = tracer_stats(data_dir, tracer, length)
        if found is not None:
            out[tracer] = found
    return out


def record(data_dir: Path | str, manifest: dict[str, Any], length: int) -> None:
    """Compute the statistics of `data_dir` and save them (at the end of preprocessing).

    Numbers go into the manifest; the mean PET volumes into `VOLUMES` beside it (safetensors, one tensor per
    tracer), named and hashed in the manifest.
    """
    found = compute(data_dir, length)
    volumes = {tracer: torch.from_numpy(st.pop("pet_mean_volume")) for tracer, st in found.items()}
    path = Path(data_dir) / VOLUMES
    tmp = path.with_name(path.name + ".tmp")
    save_file(volumes, str(tmp))
    os.replace(tmp, path)
    manifest[KEY] = found
    manifest[KEY + "_volumes"] = {"file": VOLUMES, "sha256": shards.sha256_file(path)}
    shards.save_manifest(Path(data_dir), manifest)


def for_run(data_dir: Path | str, tracer: str, length: int, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """A tracer's statistics (with its mean PET volume): from the manifest (`manifest`, else read from
    `data_dir`) when recorded at this length, else computed now in one pass over the training rows (logged)."""
    manifest = shards.read_manifest(data_dir) if manifest is None else manifest
    recorded = manifest.get(KEY, {}).get(tracer)
    if recorded is not None and recorded["length"] == length:
        volume = recorded_mean_volume(data_dir, tracer)
        if volume is not None:
            return recorded | {"pet_mean_volume": volume}
    found = tracer_stats(data_dir, tracer, length)
    if found is None:
        raise ValueError(f"no training rows for tracer {tracer} in {data_dir}")
    print(f"[stats] {data_dir}: no {KEY} for {tracer} at sequence.length={length} in the manifest; "
          f"computed from {found['rows']} training rows", flush=True)
    return found


def recorded_mean_volume(data_dir: Path | str, tracer: str) -> np.ndarray | None:
    """The mean normalised training PET `(T, d, h, w)` of a tracer saved at preprocessing, or None if absent."""
    path = home.join(str(data_dir), VOLUMES)
    if not home.exists(path):
        return None
    fs, inner = home.filesystem(path)
    with fs.open_input_stream(inner) as f:  # type: ignore[attr-defined]
        volumes = safetensors.numpy.load(f.read())
    return volumes.get(tracer)


def normalised_train_pet(data_dir: str, tracer: str, rows: int | None = None,
                         part: str | Part = "train") -> Iterator[torch.Tensor]:
    """The training PET volumes `(T, d, h, w)` of a tracer (first `rows`; of the training split or another Part),
    float64, normalised by MRI stats."""
    count = 0
    for row in itertools.islice(loader.read_rows(data_dir, part, tracer), rows):
        pet = torch.from_numpy(np.array(row["pet"], dtype=np.float64))[None]
        yield normalise_pet(pet, torch.tensor([row["mri_mean"]]), torch.tensor([row["mri_std"]]))[0]
        count += 1
    if count == 0:
        raise ValueError(f"no training rows for tracer {tracer} in {data_dir}")


def split_summaries(data_dir: str, split: str | Part, tracer: str, length: int) -> dict[str, list[np.ndarray]]:
    """`{"mri": [...], "pet": [...]}`: the real summaries (L,) of every row of a tracer's split, in row order."""
    parts: dict[str, list[np.ndarray]] = {"mri": [], "pet": []}
    for row in loader.read_rows(data_dir, split, tracer):
        mri, pet, _ = row_summaries(row, length)
        parts["mri"].append(mri)
        parts["pet"].append(pet)
    return parts
