"""The model's intensity space: per-sample MRI statistics, MRI/PET normalisation and its inverse."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _check_batch_stats(x: Tensor, mean: Tensor, std: Tensor, x_name: str) -> None:
    """Validate that `mean` and `std` are finite (B,) tensors for a batch `x` of shape (B, ...)."""
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise ValueError(f"{x_name} must be a tensor with a leading batch dimension, got {type(x).__name__}")
    b = x.shape[0]
    for name, t in (("mean", mean), ("std", std)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor of shape ({b},), got {type(t).__name__}")
        if tuple(t.shape) != (b,):
            raise ValueError(f"{name} must have shape ({b},) to match {x_name} batch, got {tuple(t.shape)}")
    if not bool(torch.isfinite(mean).all()):
        raise ValueError("mean must be finite")
    if not bool((torch.isfinite(std) & (std > 0)).all()):
        raise ValueError(f"std must be finite and > 0, got {std.tolist()}")


def per_sample(t: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B,) tensor to (B, 1, ..., 1) broadcastable against `like`, on its device and dtype."""
    return t.to(device=like.device, dtype=like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))


def _float_dtype(x: Tensor) -> torch.dtype:
    """Keep a floating dtype as it is; promote anything else (ints, bool) to float32."""
    return x.dtype if x.is_floating_point() else torch.float32


def mri_stats(mri: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample mean and population std of an MRI batch.

    mri: (B, 1, D, H, W), any real dtype. Returns (mean, std), each float32 of shape (B,), computed in
    float64 over all voxels of each sample (one sample at a time to bound memory).
    """
    if not isinstance(mri, Tensor) or mri.ndim != 5 or mri.shape[1] != 1:
        shape = tuple(mri.shape) if isinstance(mri, Tensor) else type(mri).__name__
        raise ValueError(f"mri must have shape (B, 1, D, H, W), got {shape}")
    if mri.numel() == 0:
        raise ValueError(f"mri must be non-empty, got shape {tuple(mri.shape)}")
    means, stds = [], []
    for sample in mri:
        var, mean = torch.var_mean(sample.reshape(-1).to(torch.float64), correction=0)
        means.append(mean)
        stds.append(var.sqrt())
    return torch.stack(means).to(torch.float32), torch.stack(stds).to(torch.float32)


def uint8_mri_stats(mri_uint8: np.ndarray) -> tuple[float, float]:
    """Mean and population std (float64) over all voxels of a stored uint8 MRI (any shape)."""
    arr = np.asarray(mri_uint8)
    if arr.dtype != np.uint8:
        raise ValueError(f"mri_uint8 must be uint8, got {arr.dtype}")
    if arr.size == 0:
        raise ValueError("mri_uint8 must not be empty")
    return float(arr.mean(dtype=np.float64)), float(arr.std(dtype=np.float64))


def normalise_mri(mri: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(mri - mean) / std per sample.

    mri: (B, 1, D, H, W), any real dtype; mean, std: (B,). Returns float32 (B, 1, D, H, W).
    Raises ValueError naming `std` if any std is <= 0 or non-finite.
    """
    if not isinstance(mri, Tensor) or mri.ndim != 5 or mri.shape[1] != 1:
        shape = tuple(mri.shape) if isinstance(mri, Tensor) else type(mri).__name__
        raise ValueError(f"mri must have shape (B, 1, D, H, W), got {shape}")
    _check_batch_stats(mri, mean, std, "mri")
    x = mri.to(torch.float32)
    return (x - per_sample(mean, x)) / per_sample(std, x)


def normalise_pet(pet: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(pet - mean/10) / (std/10) with the MRI's per-sample statistics.

    pet: (B, T, d, h, w) (any number of trailing dims); mean, std: (B,) from `mri_stats`.
    Returns the same shape, in pet's floating dtype (float32 for integer input).
    """
    _check_batch_stats(pet, mean, std, "pet")
    x = pet.to(_float_dtype(pet))
    return (x - per_sample(mean, x) / 10.0) / (per_sample(std, x) / 10.0)


def restore_pet(pet_norm: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Inverse of `normalise_pet`: pet_norm * std/10 + mean/10 (original PET units from the MRI alone).

    pet_norm: (B, T, d, h, w); mean, std: (B,). Returns the same shape, in pet_norm's floating dtype.
    """
    _check_batch_stats(pet_norm, mean, std, "pet_norm")
    x = pet_norm.to(_float_dtype(pet_norm))
    return x * (per_sample(std, x) / 10.0) + per_sample(mean, x) / 10.0
