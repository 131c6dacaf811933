"""Batched PSNR / 3D SSIM / RMSE matching skimage.metrics, masked and regional scores (PAPER_RANGE clipping)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ganbert.models.intensity import per_sample

PAPER_RANGE: tuple[float, float] = (-10.0, 1000.0)
PAPER_DATA_RANGE: float = PAPER_RANGE[1] - PAPER_RANGE[0]

# skimage.metrics.structural_similarity constants (gaussian_weights=True, use_sample_covariance=False).
SSIM_K1: float = 0.01
SSIM_K2: float = 0.03
SSIM_TRUNCATE: float = 3.5


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
    return ssim_map(pred, target, data_range, sigma).flatten(1).mean(dim=1)


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
    lo, rng = per_sample(t_min, target), per_sample(t_rng, target)
    pred01, target01 = (pred - lo) / rng, (target - lo) / rng
    return {
        "psnr": psnr(pred, target, PAPER_DATA_RANGE),
        "ssim": ssim3d(pred, target, PAPER_DATA_RANGE),
        "rmse": rmse(pred, target),
        "psnr01": psnr(pred01, target01, 1.0),
        "ssim01": ssim3d(pred01, target01, 1.0),
    }


# --------------------------------------------------------------------------------------------------
# Per-volume evaluation metrics (SPEC section 9): inside a brain mask, scale-free, distributions, SUVR
# --------------------------------------------------------------------------------------------------


def _check_volume_mask(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """pred, target: (T, d, h, w) of one shape; mask: (d, h, w), non-empty. Returns the mask as bool."""
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, Tensor) or t.ndim != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must have shape (T, d, h, w), got {shape}")
    if pred.shape != target.shape:
        raise ValueError(f"target shape {tuple(target.shape)} differs from pred shape {tuple(pred.shape)}")
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(pred.shape[1:]):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must have shape {tuple(pred.shape[1:])} (d, h, w), got {shape}")
    m = mask.to(device=pred.device, dtype=torch.bool)
    if not bool(m.any()):
        raise ValueError("mask must select at least one voxel")
    return m


def masked_psnr(pred: Tensor, target: Tensor, mask: Tensor, data_range: float) -> float:
    """PSNR over the voxels of every frame inside `mask`: 10 log10(data_range^2 / mean squared error there).

    pred, target: (T, d, h, w); mask: (d, h, w), nonzero = inside. Computed in float64; +inf if equal there.
    """
    m = _check_volume_mask(pred, target, mask)
    dr = _check_data_range(data_range)
    diff = (pred.to(torch.float64) - target.to(torch.float64))[:, m]
    return float(10.0 * torch.log10(torch.tensor(dr * dr, dtype=torch.float64) / diff.square().mean()))


def ssim_map(pred: Tensor, target: Tensor, data_range: float, sigma: float = 1.5) -> Tensor:
    """Local 3D SSIM map (skimage's gaussian statistics) on the valid region, averaged over channels.

    pred, target: (B, C, D, H, W). Returns float64 (B, D-2r, H-2r, W-2r), r = window radius (5 for
    sigma 1.5): the voxels at least r from the border, whose mean is `ssim3d`.
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
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=0)
    filtered = _gaussian_valid(maps, _gaussian_kernel1d(float(sigma), maps.device))
    ux, uy, uxx, uyy, uxy = filtered.split(n, dim=0)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (SSIM_K1 * dr) ** 2, (SSIM_K2 * dr) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.reshape(b, c, *s.shape[2:]).mean(dim=1)


def masked_ssim(pred: Tensor, target: Tensor, mask: Tensor, data_range: float, sigma: float = 1.5) -> float:
    """Mean of the local SSIM map (`ssim_map`, frames averaged) over the mask voxels of its valid region.

    pred, target: (T, d, h, w); mask: (d, h, w). With an all-ones mask this equals `ssim3d`. Raises
    ValueError naming `mask` when no mask voxel lies at least one window radius from the border.
    """
    m = _check_volume_mask(pred, target, mask)
    s = ssim_map(pred[None], target[None], data_range, sigma)[0]
    r = (ssim_window(sigma) - 1) // 2
    inner = m[r: m.shape[0] - r, r: m.shape[1] - r, r: m.shape[2] - r]
    if not bool(inner.any()):
        raise ValueError(f"mask has no voxel at least {r} voxels from the border (the SSIM window radius)")
    return float(s[inner].mean())


def in_mask_mean(volume: Tensor, mask: Tensor) -> float:
    """Mean of a (T, d, h, w) volume over every frame's voxels inside the (d, h, w) mask, in float64."""
    m = _check_volume_mask(volume, volume, mask)
    return float(volume.to(torch.float64)[:, m].mean())


def relative(volume: Tensor, mask: Tensor) -> Tensor:
    """A (T, d, h, w) volume divided by its own in-mask mean (scale-free: dose and calibration cancel).

    Returns float64 (T, d, h, w). Raises ValueError naming `volume` when that mean is not finite and > 0.
    """
    mean = in_mask_mean(volume, mask)
    if not (math.isfinite(mean) and mean > 0):
        raise ValueError(f"volume must have a finite, positive mean inside the mask, got {mean}")
    return volume.to(torch.float64) / mean


def wasserstein1d(a: Tensor, b: Tensor) -> float:
    """1-D Wasserstein (earth mover's) distance between two samples of values (any shapes, flattened).

    Integral of |F_a - F_b| over the pooled sorted values, as scipy.stats.wasserstein_distance(a, b).
    """
    x = a.detach().reshape(-1).to(torch.float64).cpu()
    y = b.detach().reshape(-1).to(torch.float64).cpu()
    if x.numel() == 0 or y.numel() == 0:
        raise ValueError(f"a and b must be non-empty, got {x.numel()} and {y.numel()} values")
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        raise ValueError("a and b must be finite")
    xs, ys = torch.sort(x).values, torch.sort(y).values
    pooled = torch.sort(torch.cat([xs, ys])).values
    deltas = pooled[1:] - pooled[:-1]
    cdf_x = torch.searchsorted(xs, pooled[:-1], right=True).to(torch.float64) / xs.numel()
    cdf_y = torch.searchsorted(ys, pooled[:-1], right=True).to(torch.float64) / ys.numel()
    return float(((cdf_x - cdf_y).abs() * deltas).sum())


def regional_suvr(volume: Tensor, labels: Tensor, reference: tuple[int, ...]) -> dict[int, float]:
    """Regional SUVR: mean of the frame-averaged volume in each label / its mean in the reference labels.

    volume: (T, d, h, w); labels: (d, h, w) integer region ids (0 = none); reference: the reference
    region ids (pooled). Returns {label id: SUVR} for every non-zero, non-reference label present.
    """
    if not isinstance(volume, Tensor) or volume.ndim != 4:
        raise ValueError(f"volume must have shape (T, d, h, w), got {getattr(volume, 'shape', type(volume))}")
    if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(volume.shape[1:]):
        raise ValueError(f"labels must have shape {tuple(volume.shape[1:])}, got {getattr(labels, 'shape', labels)}")
    if not reference:
        raise ValueError("reference must name at least one region id")
    img = volume.to(torch.float64).mean(dim=0)
    lab = labels.to(device=img.device, dtype=torch.int64)
    ref_mask = torch.isin(lab, torch.tensor(list(reference), device=img.device))
    if not bool(ref_mask.any()):
        raise ValueError(f"labels contain none of the reference region ids {reference}")
    ref = float(img[ref_mask].mean())
    if not (math.isfinite(ref) and ref > 0):
        raise ValueError(f"volume must have a finite, positive mean in the reference region, got {ref}")
    out: dict[int, float] = {}
    for key in torch.unique(lab).tolist():
        if key != 0 and key not in reference:
            out[int(key)] = float(img[lab == key].mean()) / ref
    return out


def suvr_mape(pred: Tensor, target: Tensor, labels: Tensor, reference: tuple[int, ...]) -> float:
    """Mean absolute % error of the regional SUVRs of `pred` against those of `target` (same regions).

    pred, target: (T, d, h, w); labels: (d, h, w); reference: reference region ids.
    """
    real = regional_suvr(target, labels, reference)
    fake = regional_suvr(pred, labels, reference)
    if not real:
        raise ValueError("labels contain no region besides the reference")
    return float(sum(abs(fake[k] - v) / abs(v) for k, v in real.items()) / len(real) * 100.0)


def composite_suvr(volume: Tensor, labels: Tensor, targets: tuple[int, ...], reference: tuple[int, ...]) -> float:
    """SUVR of the pooled `targets` regions (voxel-weighted) over the pooled reference regions.

    volume: (T, d, h, w); labels: (d, h, w). Raises ValueError naming `labels` if a pool is empty.
    """
    img = volume.to(torch.float64).mean(dim=0)
    lab = labels.to(device=img.device, dtype=torch.int64)
    pools = []
    for name, ids in (("targets", targets), ("reference", reference)):
        m = torch.isin(lab, torch.tensor(list(ids), device=img.device))
        if not bool(m.any()):
            raise ValueError(f"labels contain none of the {name} region ids {ids}")
        pools.append(float(img[m].mean()))
    return pools[0] / pools[1]
