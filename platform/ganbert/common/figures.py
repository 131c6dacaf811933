"""Matplotlib figures written as PNG files: central-slice montages and intensity histograms."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def save_png(fig: Any, path: Path) -> Path:
    """Render a matplotlib Figure with the Agg canvas and write it atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _central_slices(vol: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal, sagittal central slices of a (X, Y, Z) RAS volume, rotated for display."""
    x, y, z = (s // 2 for s in vol.shape)
    return [np.rot90(vol[:, :, z]), np.rot90(vol[:, y, :]), np.rot90(vol[x, :, :])]


def montage_png(mri: np.ndarray, real: np.ndarray, fake: np.ndarray, path: Path) -> Path:
    """Central-slice montage: rows axial/coronal/sagittal, columns MRI / real / generated / generated - real.

    mri: (D, H, W); real, fake: (T, d, h, w), frame 0 shown; the MRI is shown at its own size.
    """
    from matplotlib.figure import Figure

    mri, real, fake = np.asarray(mri, np.float32), np.asarray(real, np.float32), np.asarray(fake, np.float32)
    if mri.ndim != 3:
        raise ValueError(f"mri must be (D, H, W), got shape {mri.shape}")
    if real.ndim != 4:
        raise ValueError(f"real must be (T, d, h, w), got shape {real.shape}")
    if fake.shape != real.shape:
        raise ValueError(f"fake must have the shape of real {real.shape}, got {fake.shape}")
    pet_real, pet_fake = real[0], fake[0]
    diff = pet_fake - pet_real
    lo, hi = float(min(pet_real.min(), pet_fake.min())), float(max(pet_real.max(), pet_fake.max()))
    dmax = float(np.abs(diff).max()) or 1.0
    columns = [("MRI", _central_slices(mri), dict(cmap="gray")),
               ("real PET", _central_slices(pet_real), dict(cmap="magma", vmin=lo, vmax=hi)),
               ("generated PET", _central_slices(pet_fake), dict(cmap="magma", vmin=lo, vmax=hi)),
               ("generated - real", _central_slices(diff), dict(cmap="RdBu_r", vmin=-dmax, vmax=dmax))]
    fig = Figure(figsize=(10, 7.5))
    fig.suptitle(f"central slices, PET frame 1 of {real.shape[0]}")
    axes = fig.subplots(3, 4)
    for col, (title, slices, style) in enumerate(columns):
        for row, (name, image) in enumerate(zip(("axial", "coronal", "sagittal"), slices)):
            ax = axes[row, col]
            shown = ax.imshow(image, interpolation="nearest", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title)
            if col == 0:
                ax.set_ylabel(name)
            if row == 0 and col == 3:
                fig.colorbar(shown, ax=axes[:, 3].tolist(), shrink=0.6)
    return save_png(fig, path)


def histogram_png(real: np.ndarray, fake: np.ndarray, path: Path, bins: int = 100) -> Path:
    """Intensity histograms of real vs generated PET (any shapes) on shared bins, log count axis (paper Fig. 7)."""
    from matplotlib.figure import Figure

    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    r = np.asarray(real, np.float64).ravel()
    f = np.asarray(fake, np.float64).ravel()
    r, f = r[np.isfinite(r)], f[np.isfinite(f)]
    if r.size == 0 or f.size == 0:
        raise ValueError("real and fake must each contain finite values")
    lo, hi = float(min(r.min(), f.min())), float(max(r.max(), f.max()))
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    count_r, _ = np.histogram(r, edges)
    count_f, _ = np.histogram(f, edges)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.stairs(count_r, edges, label="real PET", color="tab:blue", linewidth=1.5)
    ax.stairs(count_f, edges, label="generated PET", color="tab:orange", linewidth=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("intensity")
    ax.set_ylabel("voxel count (log)")
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path)
