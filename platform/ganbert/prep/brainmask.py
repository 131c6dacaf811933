"""Brain mask of a T1: the nilearn MNI152 template registered (affine, mutual information) and its brain mask warped."""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from scipy import ndimage

from ganbert.common import cache
from ganbert.prep import registration

TEMPLATE_RES_MM = 2


@functools.lru_cache(maxsize=1)
def template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1 float32 (X, Y, Z), brain mask float32, affine (4, 4)) of nilearn's MNI152 2009 template at 2 mm (offline).

    Made once (about 3 s with nilearn's import) and kept in the cache (`common.cache`): a new process reads it back.
    """
    kept = cache.arrays("templates", _make_template, [__file__], what="brainmask", res=TEMPLATE_RES_MM)
    return kept["head"], kept["mask"], kept["affine"]


def _make_template() -> dict[str, np.ndarray]:
    from nilearn import datasets

    img = datasets.load_mni152_template(resolution=TEMPLATE_RES_MM)
    pad = int(round(16 / TEMPLATE_RES_MM))
    t1 = np.pad(np.asarray(img.get_fdata(), dtype=np.float32), pad)
    mask = np.pad(np.asarray(datasets.load_mni152_brain_mask(resolution=TEMPLATE_RES_MM).get_fdata()) > 0.5, pad)
    affine = np.array(img.affine, dtype=np.float64)
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, pad)
    # nilearn's template is skull-stripped while a T1 is not: give it a dark skull (2-7 mm) and bright scalp
    # (7-13 mm) so that mutual information aligns brain with brain rather than brain with head.
    dist = ndimage.distance_transform_edt(~mask).astype(np.float32) * TEMPLATE_RES_MM
    def band(lo: float, hi: float) -> np.ndarray:
        return np.clip((dist - lo) / 1.5 + 0.5, 0, 1) * np.clip((hi - dist) / 1.5 + 0.5, 0, 1)
    head = np.maximum(t1, (0.06 * band(2.0, 7.0) + 0.62 * band(7.0, 13.0)) * float(np.percentile(t1[mask], 99)))
    return {"head": head.astype(np.float32), "mask": mask.astype(np.float32), "affine": affine}


def fit(t1: np.ndarray, t1_affine: np.ndarray, threads: int = 1) -> registration.Registration:
    """Affine registration of the template onto a T1 (X, Y, Z) (fixed): the T1-world -> template-world transform.

    Made once per T1 content and then reused (`registration`'s cache): the tracers of one subject, a rerun, another
    preset's preprocessing and synthesis of the same T1 all read the one result.
    """
    tpl, _, tpl_affine = template()
    return registration.affine(t1, t1_affine, tpl, tpl_affine, threads=threads)


def on_grid(t1_to_template: np.ndarray, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The template's brain mask on a grid (affine, shape) of the T1's world: uint8 (1 inside the brain)."""
    if len(shape) != 3:
        raise ValueError(f"shape must have 3 entries, got {tuple(shape)}")
    _, mask, tpl_affine = template()
    mapping = np.linalg.inv(tpl_affine) @ np.asarray(t1_to_template, dtype=np.float64) @ np.asarray(affine)
    ratio = np.abs(mapping[:3, :3]).max(axis=1)
    sigma = np.maximum(0.0, (ratio - 1.0) / 2.0)
    src = ndimage.gaussian_filter(mask, sigma) if np.any(sigma > 0.25) else mask
    frac = ndimage.affine_transform(src, mapping[:3, :3], offset=mapping[:3, 3], output_shape=tuple(shape),
                                    output=np.float32, order=1, mode="constant", cval=0.0, prefilter=False)
    return (frac >= 0.5).astype(np.uint8)
