"""The QC picture of one synthesis: three planes of the conformed T1 with the registered template's brain outline,
the synthetic PET over the T1, and (with an ensemble) the voxel-wise SD: what a user opens first."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ganbert.common.figures import save_png

PLANES = ("axial", "coronal", "sagittal")  # fixed RAS axis: z, y, x


def plane_index(shape: Sequence[int], brain: np.ndarray | None) -> tuple[int, int, int]:
    """(x, y, z) voxel of the planes: the brain's centre of mass when there is a brain mask, else the grid centre."""
    if brain is not None and brain.any():
        return tuple(int(round(c)) for c in ndimage.center_of_mass(brain))  # type: ignore[return-value]
    return tuple(int(n) // 2 for n in shape)  # type: ignore[return-value]


def _plane_voxels(shape: Sequence[int], axis: int, index: int) -> np.ndarray:
    """Voxel coordinates (3, a, b) of the plane `axis` = `index` of a grid."""
    axes = [np.arange(n, dtype=np.float64) for n in shape]
    axes[axis] = np.array([float(index)])
    grid = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    keep = [n for i, n in enumerate(shape) if i != axis]
    return grid.reshape(3, *keep)


def on_plane(volume: np.ndarray, affine: np.ndarray, grid_affine: np.ndarray, grid_shape: Sequence[int],
             axis: int, index: int) -> np.ndarray:
    """A volume (X, Y, Z) with its affine sampled (linear) on one plane of another grid -> (a, b); NaN outside it."""
    vox = _plane_voxels(grid_shape, axis, index)
    mapping = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(grid_affine, np.float64)
    flat = vox.reshape(3, -1)
    src = mapping[:3, :3] @ flat + mapping[:3, 3:4]
    out = ndimage.map_coordinates(np.asarray(volume, np.float32), src, order=1, mode="constant", cval=np.nan)
    return out.reshape(vox.shape[1:])


def _cut(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(volume, index, axis=axis)


def _show(image: np.ndarray) -> np.ndarray:
    """(first axis, second axis) of a RAS plane -> rows top-down, columns left-right (neurological: R on the right)."""
    return np.rot90(image)


def qc_png(path: Path, mri: np.ndarray, mri_affine: np.ndarray, pet: np.ndarray, pet_affine: np.ndarray, *,
           brain: np.ndarray | None = None, sd: np.ndarray | None = None, title: str = "") -> Path:
    """Write the QC picture: rows axial / coronal / sagittal through the brain's centre; columns the T1 with the
    template brain outline, the synthetic PET (frame mean) over the T1, and the SD (frame mean) when given.

    mri: conformed T1 (D, H, W) with its RAS affine; pet, sd: (T, d, h, w) with the PET grid's affine; brain: the
    registered template brain mask on the MRI grid (D, H, W) or None (QC skipped or registration failed).
    """
    from matplotlib.figure import Figure

    mri = np.asarray(mri, dtype=np.float32)
    if mri.ndim != 3:
        raise ValueError(f"mri must be (D, H, W), got shape {mri.shape}")
    if np.ndim(pet) != 4 or (sd is not None and np.shape(sd) != np.shape(pet)):
        raise ValueError(f"pet (and sd) must be (T, d, h, w) alike, got {np.shape(pet)} and {np.shape(sd)}")
    centre = plane_index(mri.shape, brain)
    pet_mean = np.asarray(pet, np.float32).mean(axis=0)
    columns: list[tuple[str, Any]] = [("T1 + template brain", None), ("synthetic PET", pet_mean)]
    if sd is not None:
        columns.append(("ensemble SD", np.asarray(sd, np.float32).mean(axis=0)))
    fig = Figure(figsize=(3.4 * len(columns), 9.6), layout="constrained")
    fig.suptitle(title, fontsize=9)
    axes = np.atleast_2d(fig.subplots(3, len(columns)))
    ranges = {name: (float(np.nanpercentile(v, 1)), float(np.nanpercentile(v, 99.5))) for name, v in columns
              if v is not None}
    for row, (plane, axis) in enumerate(zip(PLANES, (2, 1, 0))):
        t1 = _show(_cut(mri, axis, centre[axis]))
        for col, (name, volume) in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(t1, cmap="gray", interpolation="nearest")
            if volume is None and brain is not None:
                ax.contour(_show(_cut(brain.astype(np.float32), axis, centre[axis])), levels=[0.5], colors="lime",
                           linewidths=0.8)
            elif volume is not None:
                over = _show(on_plane(volume, pet_affine, mri_affine, mri.shape, axis, centre[axis]))
                lo, hi = ranges[name]
                shown = ax.imshow(np.ma.masked_invalid(over), cmap="magma" if col == 1 else "viridis", alpha=0.6,
                                  vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
                if row == 0:
                    fig.colorbar(shown, ax=axes[:, col].tolist(), shrink=0.5, label="PET units")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name + ("" if volume is not None or brain is not None else " (no registration)"),
                             fontsize=9)
            if col == 0:
                ax.set_ylabel(plane)
            if plane != "sagittal":
                ax.text(0.98, 0.02, "R", transform=ax.transAxes, color="white", ha="right", va="bottom", fontsize=8)
    return save_png(fig, path)
