"""A coarse region atlas for synthesised PET: the phantom's template regions warped onto a T1's PET grid.

The regions are `data.phantom.REGIONS` as the phantom defines them on the 2 mm MNI152 template (ellipsoids in MNI mm
intersected with the template's grey/white/CSF classes: cerebellum, pons, medial and inferior temporal,
temporoparietal, neocortex, cerebral WM, CSF, subcortical GM). They are carried to a T1 by the same affine template
registration as the brain mask and QC (nearest neighbour). It is a coarse atlas: affine only, ellipsoidal regions;
good for a regional summary and its spread over ensemble members, not for a clinical read.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from ganbert.ingest.phantom.anatomy import template
from ganbert.prep import brainmask

DESCRIPTION = ("phantom template regions (ellipsoids in MNI mm x MNI152 tissue classes, data.phantom.REGIONS) warped "
               "by the affine template registration, nearest neighbour: a coarse atlas")


def labels_on_grid(t1_to_template: np.ndarray, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Region ids (uint8 `shape`, 0 = none) on a grid (affine, shape) in the T1's world.

    t1_to_template: the (4, 4) T1-world -> template-world transform of `brainmask.fit`.
    """
    if len(shape) != 3:
        raise ValueError(f"shape must have 3 entries, got {tuple(shape)}")
    tpl = template(brainmask.TEMPLATE_RES_MM)
    mapping = np.linalg.inv(tpl.affine) @ np.asarray(t1_to_template, dtype=np.float64) @ np.asarray(affine)
    return ndimage.affine_transform(tpl.labels, mapping[:3, :3], offset=mapping[:3, 3], output_shape=tuple(shape),
                                    output=np.uint8, order=0, mode="constant", cval=0)

