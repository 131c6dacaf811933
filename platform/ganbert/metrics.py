"""Intensity normalisation (MRI statistics) and batched PSNR / 3D SSIM / RMSE matching skimage.metrics."""

from __future__ import annotations

import math

import torch
from torch import Tensor

PAPER_RANGE: tuple[float, float] = (-10.0, 1000.0)
PAPER_DATA_RANGE: float = PAPER_RANGE[1] - PAPER_RANGE[0]

# skimage.metrics.structural_similarity constants (gaussian_weights=True, use_sample_covariance=False).
SSIM_K1: float = 0.01
SSIM_K2: float = 0.03
SSIM_TRUNCATE: float = 3.5


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------


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


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
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
    return (x - _per_sample(mean, x)) / _per_sample(std, x)


def normalise_pet(pet: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(pet - mean/10) / (std/10) with the MRI's per-sample statistics.

    pet: (B, T, d, h, w) (any number of trailing dims); mean, std: (B,) from `mri_stats`.
    Returns the same shape, in pet's floating dtype (float32 for integer input).
    """
    _check_batch_stats(pet, mean, std, "pet")
    x = pet.to(_float_dtype(pet))
    return (x - _per_sample(mean, x) / 10.0) / (_per_sample(std, x) / 10.0)


def restore_pet(pet_norm: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Inverse of `normalise_pet`: pet_norm * std/10 + mean/10 (original PET units from the MRI alone).

    pet_norm: (B, T, d, h, w); mean, std: (B,). Returns the same shape, in pet_norm's floating dtype.
    """
    _check_batch_stats(pet_norm, mean, std, "pet_norm")
    x = pet_norm.to(_float_dtype(pet_norm))
    return x * (_per_sample(std, x) / 10.0) + _per_sample(mean, x) / 10.0


def clip_paper(x: Tensor) -> Tensor:
    """Clip restored PET to the paper's metric range [-10, 1000]; any shape, e.g. (B, T, d, h, w)."""
    return x.clamp(PAPER_RANGE[0], PAPER_RANGE[1])


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def _check_pair(pred: Tensor, target: Tensor) -> None:
    """Both (B, C, D, H, W) tensors of the same shape."""
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.ndim != 5:
            raise ValueError(f"{name} must have shape (B, C, D, H, W), got {tuple(t.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"target shape {tuple(target.shape)} differs from pred shape {tuple(pred.shape)}")
    if pred.numel() == 0:
        raise ValueError(f"pred must be non-empty, got shape {tuple(pred.shape)}")


def _check_data_range(data_range: float) -> float:
    """A finite, positive data range as a Python float."""
    value = float(data_range)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"data_range must be finite and > 0, got {data_range}")
    return value


def _mse(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean squared error in float64: (B, C, D, H, W) x2 -> (B,)."""
    diff = pred.to(torch.float64) - target.to(torch.float64)
    return diff.square().flatten(1).mean(dim=1)


def rmse(pred: Tensor, target: Tensor) -> Tensor:
    """Root mean squared error per sample over all C, D, H, W voxels.

    pred, target: (B, C, D, H, W). Returns float64 (B,) = sqrt(skimage.metrics.mean_squared_error).
    """
    _check_pair(pred, target)
    return _mse(pred, target).sqrt()


def psnr(pred: Tensor, target: Tensor, data_range: float) -> Tensor:
    """Peak signal-to-noise ratio per sample: 10 log10(data_range^2 / mse).

    pred, target: (B, C, D, H, W). Returns float64 (B,) equal to
    skimage.metrics.peak_signal_noise_ratio(target, pred, data_range=data_range); +inf where pred == target.
    """
    _check_pair(pred, target)
    dr = _check_data_range(data_range)
    return 10.0 * torch.log10(dr * dr / _mse(pred, target))


def ssim_window(sigma: float = 1.5) -> int:
    """Side of skimage's gaussian SSIM window: 2 * int(3.5 * sigma + 0.5) + 1 (11 for sigma 1.5)."""
    return 2 * int(SSIM_TRUNCATE * sigma + 0.5) + 1


def _gaussian_kernel1d(sigma: float, device: torch.device) -> Tensor:
    """scipy.ndimage's normalised 1D gaussian of radius int(3.5 * sigma + 0.5): float64 (2r + 1,)."""
    radius = (ssim_window(sigma) - 1) // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    phi = torch.exp(-0.5 / (sigma * sigma) * x * x)
    return phi / phi.sum()


def _gaussian_valid(x: Tensor, kernel: Tensor) -> Tensor:
    """Separable 3D filter with a symmetric 1D kernel, valid region only.

    x: (N, 1, D, H, W); kernel: (k,). Returns (N, 1, D-k+1, H-k+1, W-k+1). Shifted-slice sums (no
    unfold copy), about 2x faster than float64 conv3d on CPU and equally usable on GPU.
    """
    k = kernel.numel()
    r = (k - 1) // 2
    weights = kernel.tolist()
    for dim in (2, 3, 4):
        n_out = x.shape[dim] - k + 1
        acc = x.narrow(dim, r, n_out) * weights[r]
        for i in range(r):
            acc.add_(x.narrow(dim, i, n_out) + x.narrow(dim, k - 1 - i, n_out), alpha=weights[i])
        x = acc
    return x


def ssim3d(pred: Tensor, target: Tensor, data_range: float, sigma: float = 1.5) -> Tensor:
    """Mean 3D structural similarity per sample, averaged over channels.

    pred, target: (B, C, D, H, W) with D, H, W >= the gaussian window (11 for sigma 1.5).
    Returns float64 (B,) equal to the mean over c of skimage.metrics.structural_similarity(target[b, c],
    pred[b, c], data_range=data_range, gaussian_weights=True, sigma=sigma, use_sample_covariance=False):
    gaussian-weighted local statistics (truncate 3.5), K1 = 0.01, K2 = 0.03, averaged over the voxels
    at least one window radius from the border (skimage's crop). Computed in float64.
    """
    _check_pair(pred, target)
    dr = _check_data_range(data_range)
    if not (math.isfinite(float(sigma)) and sigma > 0):
        raise ValueError(f"sigma must be finite and > 0, got {sigma}")
    win = ssim_window(sigma)
    spatial = tuple(pred.shape[2:])
    if min(spatial) < win:
        raise ValueError(f"pred spatial shape {spatial} is smaller than the SSIM window {win} (sigma {sigma})")

    b, c = pred.shape[:2]
    x = pred.to(torch.float64).reshape(b * c, 1, *spatial)
    y = target.to(torch.float64).reshape(b * c, 1, *spatial)
    n = b * c
    # One filtering pass over the five maps of all (sample, channel) pairs at once.
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=0)
    filtered = _gaussian_valid(maps, _gaussian_kernel1d(float(sigma), maps.device))
    ux, uy, uxx, uyy, uxy = filtered.split(n, dim=0)
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    c1 = (SSIM_K1 * dr) ** 2
    c2 = (SSIM_K2 * dr) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.reshape(b, c, -1).mean(dim=2).mean(dim=1)


def evaluate(pred_restored: Tensor, target_restored: Tensor) -> dict[str, Tensor]:
    """Paper metrics on restored PET (original units).

    pred_restored, target_restored: (B, T, d, h, w). Returns float64 (B,) tensors:
    - psnr, ssim, rmse: both volumes clipped to PAPER_RANGE [-10, 1000], data_range 1010;
    - psnr01, ssim01: both clipped volumes min-max scaled by the target's per-sample min and max
      (range 1 where the target is constant), data_range 1.
    """
    _check_pair(pred_restored, target_restored)
    pred = clip_paper(pred_restored.to(torch.float64))
    target = clip_paper(target_restored.to(torch.float64))
    flat = target.flatten(1)
    t_min = flat.amin(dim=1)
    t_rng = flat.amax(dim=1) - t_min
    t_rng = torch.where(t_rng > 0, t_rng, torch.ones_like(t_rng))
    lo, rng = _per_sample(t_min, target), _per_sample(t_rng, target)
    pred01, target01 = (pred - lo) / rng, (target - lo) / rng
    return {
        "psnr": psnr(pred, target, PAPER_DATA_RANGE),
        "ssim": ssim3d(pred, target, PAPER_DATA_RANGE),
        "rmse": rmse(pred, target),
        "psnr01": psnr(pred01, target01, 1.0),
        "ssim01": ssim3d(pred01, target01, 1.0),
    }
