"""Tests for ganbert.scoring.metrics: MRI-statistics normalisation and PSNR / 3D SSIM / RMSE against skimage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from ganbert.models.intensity import mri_stats, normalise_mri, normalise_pet, restore_pet
from ganbert.scoring.metrics import PAPER_RANGE, clip_paper, evaluate, psnr, rmse, ssim3d, ssim_window

SHAPE = (2, 2, 16, 14, 13)
TOL = 1e-4


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], n_blobs: int = 4) -> np.ndarray:
    """Smooth positive volumes: a sum of random gaussian blobs per (sample, channel), values ~0..800."""
    *lead, d, h, w = shape
    zz, yy, xx = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    out = np.zeros(shape)
    for idx in np.ndindex(*lead):
        for _ in range(n_blobs):
            centre = rng.uniform(0, 1, 3) * (d, h, w)
            width = rng.uniform(2.0, 5.0)
            r2 = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2
            out[idx] += rng.uniform(100, 400) * np.exp(-r2 / (2 * width**2))
    return out


def _pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(pred, target) float32 volumes of shape SHAPE: random, structured (blobs + noise), identical."""
    rng = np.random.default_rng(0)
    target_r = rng.uniform(-10, 1000, SHAPE)
    pred_r = target_r + rng.normal(0, 80, SHAPE)
    target_s = _blobs(rng, SHAPE) + rng.normal(0, 5, SHAPE)
    pred_s = 0.9 * target_s + 20 + rng.normal(0, 15, SHAPE)
    pairs = {"random": (pred_r, target_r), "structured": (pred_s, target_s), "equal": (target_s, target_s)}
    return {k: (p.astype(np.float32), t.astype(np.float32)) for k, (p, t) in pairs.items()}


def _sk_psnr(pred: np.ndarray, target: np.ndarray, data_range: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.array([peak_signal_noise_ratio(t, p, data_range=data_range) for p, t in zip(pred, target)])


def _sk_rmse(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.array([math.sqrt(mean_squared_error(t, p)) for p, t in zip(pred, target)])


def _sk_ssim(pred: np.ndarray, target: np.ndarray, data_range: float, sigma: float = 1.5) -> np.ndarray:
    return np.array([
        np.mean([
            structural_similarity(tc, pc, data_range=data_range, gaussian_weights=True, sigma=sigma,
                                  use_sample_covariance=False)
            for pc, tc in zip(p, t)
        ])
        for p, t in zip(pred, target)
    ])


def _max_diff(ours: torch.Tensor, ref: np.ndarray) -> float:
    """Max absolute difference, treating equal infinities as agreement."""
    a = ours.numpy()
    assert a.shape == ref.shape
    both_inf = np.isinf(a) & np.isinf(ref) & (np.sign(a) == np.sign(ref))
    assert np.array_equal(np.isinf(a), np.isinf(ref)), (a, ref)
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - ref)
    return float(np.max(np.where(both_inf, 0.0, diff), initial=0.0))


@pytest.mark.parametrize("name", ["random", "structured", "equal"])
@pytest.mark.parametrize("scaled", [False, True], ids=["paper_range", "unit_range"])
def test_metrics_match_skimage(name: str, scaled: bool) -> None:
    pred, target = _pairs()[name]
    data_range = 1010.0
    if scaled:  # [0, 1] by the target's per-sample min/max, data range 1
        lo = target.min(axis=(1, 2, 3, 4), keepdims=True)
        hi = target.max(axis=(1, 2, 3, 4), keepdims=True)
        pred, target = (pred - lo) / (hi - lo), (target - lo) / (hi - lo)
        data_range = 1.0
    # skimage sees the float64 values of the very same arrays our float32 tensors hold.
    p64, t64 = pred.astype(np.float64), target.astype(np.float64)
    p, t = torch.from_numpy(pred), torch.from_numpy(target)

    ours = {"psnr": psnr(p, t, data_range), "ssim": ssim3d(p, t, data_range), "rmse": rmse(p, t)}
    ref = {"psnr": _sk_psnr(p64, t64, data_range), "ssim": _sk_ssim(p64, t64, data_range),
           "rmse": _sk_rmse(p64, t64)}
    for key in ours:
        assert ours[key].shape == (2,)
        assert _max_diff(ours[key], ref[key]) < TOL, (key, ours[key], ref[key])
    if name == "equal":
        assert torch.isinf(ours["psnr"]).all() and (ours["psnr"] > 0).all()
        assert torch.allclose(ours["ssim"], torch.ones(2, dtype=torch.float64))
        assert (ours["rmse"] == 0).all()
    else:
        assert torch.isfinite(ours["psnr"]).all()
        assert (ours["ssim"] < 1).all()


def test_ssim_other_sigma_and_float64_input_match_skimage() -> None:
    pred, target = (a.astype(np.float64) for a in _pairs()["structured"])
    assert ssim_window(1.5) == 11 and ssim_window(1.0) == 9
    ours = ssim3d(torch.from_numpy(pred), torch.from_numpy(target), 1010.0, sigma=1.0)
    assert _max_diff(ours, _sk_ssim(pred, target, 1010.0, sigma=1.0)) < TOL


def test_ssim_accepts_window_sized_volume() -> None:
    rng = np.random.default_rng(1)
    target = rng.uniform(0, 1, (1, 1, 11, 11, 12))
    pred = target + rng.normal(0, 0.1, target.shape)
    ours = ssim3d(torch.from_numpy(pred), torch.from_numpy(target), 1.0)
    assert _max_diff(ours, _sk_ssim(pred, target, 1.0)) < TOL


def test_mri_stats_and_normalise_mri() -> None:
    rng = np.random.default_rng(2)
    mri = torch.from_numpy(rng.integers(0, 256, (2, 1, 9, 8, 7)).astype(np.uint8))
    mean, std = mri_stats(mri)
    assert mean.dtype == std.dtype == torch.float32 and mean.shape == std.shape == (2,)
    ref = mri.numpy().astype(np.float64).reshape(2, -1)
    np.testing.assert_allclose(mean.numpy(), ref.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(std.numpy(), ref.std(axis=1), rtol=1e-6)  # population std (ddof 0)
    norm = normalise_mri(mri, mean, std)
    assert norm.dtype == torch.float32 and norm.shape == mri.shape
    flat = norm.double().flatten(1)
    np.testing.assert_allclose(flat.mean(dim=1).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(flat.std(dim=1, correction=0).numpy(), 1.0, rtol=1e-5)


def test_pet_normalise_restore_round_trip() -> None:
    rng = np.random.default_rng(3)
    mri = torch.from_numpy(rng.uniform(0, 255, (2, 1, 10, 10, 10)).astype(np.float32))
    mean, std = mri_stats(mri)
    pet64 = torch.from_numpy(rng.uniform(-100, 1000, (2, 2, 6, 5, 5)))
    pet_norm = normalise_pet(pet64, mean, std)
    # definition: (pet - mu/10) / (sigma/10) with the MRI's per-sample mu and sigma
    expected = (pet64 - mean.double().view(2, 1, 1, 1, 1) / 10) / (std.double().view(2, 1, 1, 1, 1) / 10)
    torch.testing.assert_close(pet_norm, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(restore_pet(pet_norm, mean, std), pet64, rtol=1e-5, atol=0.0)
    # float32 PET (what the generator emits): float32 rounding of values up to 1000 allows ~1e-4 absolute
    pet32 = pet64.float()
    back32 = restore_pet(normalise_pet(pet32, mean, std), mean, std)
    assert back32.dtype == torch.float32
    torch.testing.assert_close(back32, pet32, rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_std_guard(bad: float) -> None:
    x = torch.ones(2, 1, 4, 4, 4)
    mean = torch.tensor([1.0, 2.0])
    std = torch.tensor([1.0, bad])
    for fn in (normalise_mri, normalise_pet, restore_pet):
        with pytest.raises(ValueError, match="std"):
            fn(x, mean, std)


def test_constant_mri_is_rejected_by_normalise() -> None:
    mri = torch.full((2, 1, 4, 4, 4), 7.0)
    mean, std = mri_stats(mri)
    assert (std == 0).all()
    with pytest.raises(ValueError, match="std"):
        normalise_mri(mri, mean, std)


def test_stat_shape_guards() -> None:
    x = torch.ones(2, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="mean"):
        normalise_pet(x, torch.zeros(3), torch.ones(2))
    with pytest.raises(ValueError, match="mri"):
        mri_stats(torch.ones(2, 4, 4, 4))


def test_metric_argument_errors() -> None:
    a = torch.rand(2, 2, 16, 14, 13)
    with pytest.raises(ValueError, match="window"):
        ssim3d(torch.rand(2, 1, 16, 10, 13), torch.rand(2, 1, 16, 10, 13), 1.0)
    for fn in (lambda p, t: psnr(p, t, 1.0), lambda p, t: ssim3d(p, t, 1.0), rmse):
        with pytest.raises(ValueError, match="shape"):
            fn(a, torch.rand(2, 2, 16, 14, 12))
        with pytest.raises(ValueError, match="pred"):
            fn(a[0], a[0])
    with pytest.raises(ValueError, match="data_range"):
        psnr(a, a, 0.0)
    with pytest.raises(ValueError, match="data_range"):
        ssim3d(a, a, -1.0)


def test_clip_paper() -> None:
    x = torch.tensor([-50.0, -10.0, 3.0, 1000.0, 2000.0])
    assert PAPER_RANGE == (-10.0, 1000.0)
    assert clip_paper(x).tolist() == [-10.0, -10.0, 3.0, 1000.0, 1000.0]


def test_evaluate_matches_definition_and_orders_predictions() -> None:
    rng = np.random.default_rng(4)
    shape = (2, 2, 14, 12, 12)
    target = _blobs(rng, shape) * 2.5 - 30 + rng.normal(0, 5, shape)  # spans beyond [-10, 1000]
    close = target + rng.normal(0, 10, shape)
    far = target + rng.normal(0, 60, shape)
    t = torch.from_numpy(target).float()
    res_close = evaluate(torch.from_numpy(close).float(), t)
    res_far = evaluate(torch.from_numpy(far).float(), t)
    assert set(res_close) == {"psnr", "ssim", "rmse", "psnr01", "ssim01"}
    for res in (res_close, res_far):
        for v in res.values():
            assert v.shape == (2,) and torch.isfinite(v).all()
    for key in ("psnr", "ssim", "psnr01", "ssim01"):
        assert (res_close[key] > res_far[key]).all(), key
    assert (res_close["rmse"] < res_far["rmse"]).all()

    # the same numbers from skimage on clipped / target-min-max-scaled arrays
    tc = np.clip(t.double().numpy(), *PAPER_RANGE)
    pc = np.clip(torch.from_numpy(close).float().double().numpy(), *PAPER_RANGE)
    lo = tc.min(axis=(1, 2, 3, 4), keepdims=True)
    rng01 = tc.max(axis=(1, 2, 3, 4), keepdims=True) - lo
    assert _max_diff(res_close["psnr"], _sk_psnr(pc, tc, 1010.0)) < TOL
    assert _max_diff(res_close["ssim"], _sk_ssim(pc, tc, 1010.0)) < TOL
    assert _max_diff(res_close["rmse"], _sk_rmse(pc, tc)) < TOL
    assert _max_diff(res_close["psnr01"], _sk_psnr((pc - lo) / rng01, (tc - lo) / rng01, 1.0)) < TOL
    assert _max_diff(res_close["ssim01"], _sk_ssim((pc - lo) / rng01, (tc - lo) / rng01, 1.0)) < TOL


def test_evaluate_constant_target_uses_unit_range() -> None:
    target = torch.full((2, 2, 12, 12, 12), 50.0)
    pred = target + torch.linspace(-1, 1, 12).view(1, 1, 1, 1, 12)
    res = evaluate(pred, target)
    for v in res.values():
        assert v.shape == (2,) and torch.isfinite(v).all()
    # range 1: the [0,1] volumes are the clipped volumes shifted by the target minimum
    torch.testing.assert_close(res["psnr01"], psnr(pred.double() - 50, target.double() - 50, 1.0))
