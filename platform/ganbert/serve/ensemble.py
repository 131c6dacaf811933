"""Ensembles as nnU-Net does them: several generators (e.g. fold models) and optional left-right test-time
mirroring, run as batched forwards; their mean, voxel-wise SD and the spread of regional SUVRs over members.

Mirroring: the conformed MRI is RAS (`data.grid`), so array axis 0 of (D, H, W), axis 2 of a (B, 1, D, H, W)
batch, runs left -> right. The mirrored member flips that axis of the normalised input, runs the generator and
flips the PET's first spatial axis (axis 2 of (B, T, d, h, w)) back. Both grids are centred on the same world
point, so the flip is a mirror about the same sagittal plane for MRI and PET.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ganbert.config import Config, GeometryConfig
from ganbert.ingest.phantom import LABEL, REFERENCE, REGIONS
from ganbert.models.intensity import mri_stats, normalise_mri, restore_pet
from ganbert.scoring.evaluate import POSITIVITY, positivity
from ganbert.scoring.metrics import composite_suvr, regional_suvr
from ganbert.serve.atlas import DESCRIPTION as ATLAS

LR_AXIS_MRI = 2  # (B, 1, D, H, W): D is RAS x (left -> right)
LR_AXIS_PET = 2  # (B, T, d, h, w): d is RAS x
INTERVAL = (5.0, 95.0)  # percentiles of the 90 % interval over members


def check_members(configs: Sequence[Config], names: Sequence[str]) -> Config:
    """The first config, after checking every member shares its geometry and tracer (ValueError naming both)."""
    if not configs:
        raise ValueError("--model: at least one model is needed")
    first = configs[0].geometry
    for cfg, name in zip(configs[1:], names[1:]):
        g = cfg.geometry
        fields = ("tracer", "mri_size", "mri_fov_mm", "pet_frames", "pet_size", "pet_fov_mm")
        diff = [f for f in fields if tuple(np.atleast_1d(getattr(g, f))) != tuple(np.atleast_1d(getattr(first, f)))]
        if diff:
            desc = ", ".join(f"{f} {getattr(g, f)} vs {getattr(first, f)}" for f in diff)
            raise ValueError(f"--model {name}: differs from --model {names[0]} in {desc}; ensemble members must share "
                             "geometry and tracer")
    return configs[0]


def member_outputs(generators: Sequence[nn.Module], mri: np.ndarray, geometry: GeometryConfig,
                   tta: bool = False) -> np.ndarray:
    """Conformed uint8 MRIs (B, D, H, W) -> every member's PET (M, B, T, d, h, w) float32 in PET units.

    M = len(generators) x (2 with `tta`, else 1), ordered generator by generator (plain, then mirrored). Each
    generator runs one forward per view over the whole batch; each MRI is normalised by its own statistics and the
    output restored with them. Raises ValueError for a wrong shape or a non-finite output.
    """
    mri = np.asarray(mri)
    if mri.ndim != 4 or mri.shape[1:] != tuple(geometry.mri_size):
        raise ValueError(f"mri must have shape (B, {', '.join(map(str, geometry.mri_size))}), got {mri.shape}")
    x = torch.from_numpy(np.ascontiguousarray(mri))[:, None]
    expect = (mri.shape[0], geometry.pet_frames, *geometry.pet_size)
    outs: list[np.ndarray] = []
    for generator in generators:
        dev = next(generator.parameters()).device
        xb = x.to(dev)
        mean, std = mri_stats(xb)
        norm = normalise_mri(xb, mean, std)
        with torch.no_grad():
            for mirrored in (False, True) if tta else (False,):
                out = generator(norm.flip(LR_AXIS_MRI) if mirrored else norm).float()
                if tuple(out.shape) != expect:
                    raise ValueError(f"generator output shape {tuple(out.shape)} differs from the config's {expect}")
                pet = restore_pet(out, mean, std)
                outs.append((pet.flip(LR_AXIS_PET) if mirrored else pet).cpu().numpy().astype(np.float32, copy=False))
    members = np.stack(outs)
    bad = int(members.size - np.count_nonzero(np.isfinite(members)))
    if bad:
        raise ValueError(f"generator produced {bad} non-finite voxels")
    return members


def mean_and_sd(members: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Members (M, T, d, h, w) -> (mean, voxel-wise sample SD (ddof 1), None for one member), float32."""
    if members.ndim != 5:
        raise ValueError(f"members must have shape (M, T, d, h, w), got {members.shape}")
    mean = members.mean(axis=0, dtype=np.float64).astype(np.float32)
    if members.shape[0] < 2:
        return mean, None
    return mean, members.std(axis=0, ddof=1, dtype=np.float64).astype(np.float32)


def _spread(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    interval = [float(v) for v in np.percentile(arr, INTERVAL)] if arr.size >= 2 else None
    return {"mean": float(arr.mean()), "interval_90": interval}


def regional(members: np.ndarray, labels: np.ndarray, tracer: str) -> dict[str, Any]:
    """Regional SUVR over the members: mean and 90 % interval (5th-95th percentile) per atlas region.

    members: (M, T, d, h, w) in PET units; labels: (d, h, w) atlas ids (`atlas.labels_on_grid`); SUVR = region mean
    over the tracer's reference region (phantom.REFERENCE). With a positivity cut-off (evaluate.POSITIVITY: AV45,
    AV1451; FDG's "positive" reads hypometabolic) also the composite's spread and the fraction of members reading
    positive. Returns {"error": reason} when the reference region is not on the grid.
    """
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    ref = tuple(LABEL[n] for n in REFERENCE[tracer])
    per_region: dict[int, list[float]] = {}
    composites: list[float] = []
    try:
        for member in members:
            vol = torch.from_numpy(np.asarray(member))
            for key, value in regional_suvr(vol, lab, ref).items():
                per_region.setdefault(key, []).append(value)
            if tracer in POSITIVITY:
                composites.append(composite_suvr(vol, lab, tuple(LABEL[n] for n in POSITIVITY[tracer][0]), ref))
    except ValueError as err:
        return {"atlas": ATLAS, "error": str(err)}
    out: dict[str, Any] = {"atlas": ATLAS, "members": int(members.shape[0]), "reference": list(REFERENCE[tracer]),
                           "interval": "5th-95th percentile over members (linear)",
                           "suvr": {REGIONS[k]: _spread(v) for k, v in sorted(per_region.items())}}
    if tracer in POSITIVITY:
        names, cut, sense = POSITIVITY[tracer]
        reads = [positivity(c, tracer) for c in composites]
        out["composite"] = {"regions": list(names), "positive_if": f"SUVR {sense} {cut:g}", **_spread(composites),
                            "positive_fraction": float(np.mean(reads))}
    return out
