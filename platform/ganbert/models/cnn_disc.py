"""3D PatchGAN discriminator on the PET, conditioned on the MRI resampled to the PET grid."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ganbert.models.unet3d import Ratio3, fov_sample


class PatchGAN3D(nn.Module):
    """`(mri (B, 1, D, H, W), pet (B, T, d, h, w))` -> patch logits `(B, 1, p, q, r)`.

    The MRI is sampled over the PET field of view (`pet_fov_ratio` = PET FOV / MRI FOV per axis) onto the
    PET grid, so each PET voxel is judged against the anatomy at its own position.
    """

    def __init__(self, *, frames: int, channels: int = 32, layers: int = 3,
                 pet_fov_ratio: Ratio3 = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        if frames < 1 or channels < 1 or layers < 1:
            raise ValueError("frames, channels and layers must be >= 1")
        self.pet_fov_ratio: Ratio3 = tuple(float(r) for r in pet_fov_ratio)  # type: ignore[assignment]
        blocks: list[nn.Module] = [nn.Conv3d(frames + 1, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers):
            nxt = min(channels * 2**i, channels * 8)
            blocks += [nn.Conv3d(c, nxt, 4, 2 if i < layers - 1 else 1, 1, bias=False),
                       nn.InstanceNorm3d(nxt, affine=True), nn.LeakyReLU(0.2)]
            c = nxt
        blocks.append(nn.Conv3d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, mri: Tensor, pet: Tensor) -> Tensor:
        mri_on_pet = fov_sample(mri, tuple(pet.shape[2:]), self.pet_fov_ratio)  # type: ignore[arg-type]
        return self.net(torch.cat([mri_on_pet.to(pet.dtype), pet], 1))
