"""3D U-Net generator: MRI (B, 1, D, H, W) -> PET (B, T, d, h, w), bottleneck fused with the MRI summary."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ganbert.models.sequence import summarise

Shape3 = tuple[int, int, int]
Ratio3 = tuple[float, float, float]
HEADS = {"tanh": torch.tanh, "tanhshrink": F.tanhshrink}


def resize(x: Tensor, size: Shape3) -> Tensor:
    """Resize `(B, C, D, H, W)` to `size`: area averaging when shrinking every axis, else trilinear."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if all(t <= s for t, s in zip(size, x.shape[2:])):
        return F.adaptive_avg_pool3d(x, size)
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on `device` (a no-op on devices without autocast, e.g. meta)."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext()


def fov_sample(x: Tensor, size: Shape3, ratio: Ratio3 = (1.0, 1.0, 1.0)) -> Tensor:
    """Resample the central field of view of `x` `(B, C, D, H, W)` onto a grid of `size`.

    `ratio` is the target's extent over x's extent per axis (PET FOV mm / MRI FOV mm): both grids share
    their centre and voxel centres sit at ((i + 0.5) / n - 0.5) * extent, as the preprocessing affines
    place them, so a target voxel samples x at its own world position. Feature maps finer than the target
    are area-averaged by the integer factor first (no aliasing); the sampling is trilinear.
    `ratio` (1, 1, 1) is a plain `resize`.
    """
    if any(r <= 0 for r in ratio):
        raise ValueError(f"ratio must be positive, got {ratio}")
    if tuple(ratio) == (1.0, 1.0, 1.0):
        return resize(x, size)
    factors = [max(1, int(r * n // t)) for r, n, t in zip(ratio, x.shape[2:], size)]
    if any(f > 1 for f in factors):
        x = F.adaptive_avg_pool3d(x, [n // f for n, f in zip(x.shape[2:], factors)])
    theta = torch.zeros(x.shape[0], 3, 4, dtype=torch.float32, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 2, 2] = ratio[2], ratio[1], ratio[0]  # grid (x, y, z) = (W, H, D)
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def fov_targets(mri_size: int, pet_size: Shape3, depth: int, ratio: Ratio3) -> list[Shape3]:
    """Decoder grid per level: the PET grid at level 0, else the PET FOV at that level's resolution (capped)."""
    sizes = [mri_size // 2**i for i in range(depth + 1)]
    return [tuple(pet_size)] + [tuple(min(p, max(1, round(r * s))) for p, r in zip(pet_size, ratio))
                                for s in sizes[1:]]


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1, act: nn.Module | None = None) -> nn.Sequential:
    pad = 1 if kernel in (3, 4) else kernel // 2
    return nn.Sequential(nn.Conv3d(cin, cout, kernel, stride, pad, bias=False),
                         nn.InstanceNorm3d(cout, affine=True), act if act is not None else nn.LeakyReLU(0.2))


class Down(nn.Module):
    """Stride-2 conv (k=4) then a 3x3x3 conv: `(B, cin, S, S, S)` -> `(B, cout, S/2, S/2, S/2)`."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.block = nn.Sequential(_conv(cin, cout, 4, 2), _conv(cout, cout))

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class Up(nn.Module):
    """Upsample to a target size, concatenate the (resized) skip, two 3x3x3 convs."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.block = nn.Sequential(_conv(cin + cskip, cout, act=nn.ReLU()), _conv(cout, cout, act=nn.ReLU()))

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        size = tuple(skip.shape[2:])
        return self.block(torch.cat([resize(x, size), skip], 1))


class UNet3D(nn.Module):
    """The GANBERT generator.

    Encoder: `depth` stride-2 stages from the MRI cube down to the summary grid n^3 (256 -> 8 for L=512).
    Bottleneck: (features + MRI summary reshaped (B, 1, n, n, n)) / 2, the summary broadcast over channels.
    Decoder: stages on the PET field of view at each level's resolution (`fov_targets`); the bottleneck and
    every skip are sampled over the PET FOV (`fov_sample` with `pet_fov_ratio` = PET FOV / MRI FOV per axis),
    so each PET voxel sees the anatomy at its own position. Ends on the PET grid with T channels, a 1x1x1
    conv and the `head` activation (tanhshrink or tanh), both in float32 even under autocast.
    """

    def __init__(self, *, mri_size: int, pet_size: Shape3, frames: int, length: int = 512, base_channels: int = 16,
                 max_channels: int = 256, head: str = "tanhshrink", checkpointing: bool = False,
                 pet_fov_ratio: Ratio3 = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        n = round(length ** (1 / 3))
        if n**3 != length:
            raise ValueError(f"length must be a cube (summary grid n^3), got {length}")
        depth = (mri_size // n).bit_length() - 1
        if mri_size != n * 2**depth or depth < 1:
            raise ValueError(f"mri_size must be {n} times a power of two >= 2, got {mri_size}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {sorted(HEADS)}, got {head!r}")
        if frames < 1 or base_channels < 1 or max_channels < 1:
            raise ValueError("frames, base_channels and max_channels must be >= 1")
        if len(pet_fov_ratio) != 3 or any(not 0 < r <= 1 for r in pet_fov_ratio):
            raise ValueError(f"pet_fov_ratio must be 3 values in (0, 1], got {pet_fov_ratio}")
        self.length, self.grid, self.head = length, (n, n, n), head
        self.pet_size, self.frames, self.checkpointing = tuple(pet_size), frames, checkpointing
        self.pet_fov_ratio: Ratio3 = tuple(float(r) for r in pet_fov_ratio)  # type: ignore[assignment]
        ch = [min(base_channels * 2**i, max_channels) for i in range(depth + 1)]
        self.stem = _conv(1, ch[0])
        self.downs = nn.ModuleList(Down(ch[i], ch[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(Up(ch[i + 1], ch[i], ch[i]) for i in reversed(range(depth)))
        self.targets = fov_targets(mri_size, self.pet_size, depth, self.pet_fov_ratio)
        self.out = nn.Conv3d(ch[0], frames, 1)
        self.register_buffer("out_scale", torch.ones(()))  # fixed gain on the pre-activation (init_output)
        self.register_buffer("out_offset", torch.zeros(frames, *self.pet_size))  # fixed offset (init_output)

    @torch.no_grad()
    def init_output(self, mean: float | Tensor, std: float = 1.0) -> None:
        """Start at the data's level and spread: pre-activation gain `std` and a fixed offset mapping 0 to `mean`.

        `mean` is a number or the mean training PET volume `(T, d, h, w)` (normalised units): the generator
        then starts as the population-mean PET and learns each subject's deviation from it. Normalised PET
        spans tens of units while the decoder's features are O(1) and Adam moves weights by about lr per
        step; the fixed gain `out_scale` = max(std, 1) lets the output move in data units. The head's inverse
        is solved numerically (tanhshrink) or with atanh (tanh, clipped to (-1, 1)); both are buffers saved
        with the weights.
        """
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        target = torch.as_tensor(mean, dtype=torch.float64)
        if target.ndim and tuple(target.shape) != tuple(self.out_offset.shape):
            raise ValueError(f"mean must be a number or {tuple(self.out_offset.shape)}, got {tuple(target.shape)}")
        if self.head == "tanh":
            x = torch.atanh(target.clamp(-0.99, 0.99))
        else:
            x = target.clone()
            for _ in range(50):  # Newton on x - tanh(x) = target; derivative tanh(x)^2
                x = x - (x - torch.tanh(x) - target) / torch.tanh(x).square().clamp_min(1e-3)
        self.out_scale.fill_(max(float(std), 1.0))
        self.out.bias.zero_()
        self.out_offset.copy_(x.to(self.out_offset.dtype).expand_as(self.out_offset))

    def _run(self, module: nn.Module, *args: Tensor) -> Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, mri: Tensor) -> Tensor:
        """Normalised MRI `(B, 1, S, S, S)` -> normalised PET `(B, T, d, h, w)`."""
        if mri.ndim != 5 or mri.shape[1] != 1:
            raise ValueError(f"mri must be (B, 1, D, H, W), got {tuple(mri.shape)}")
        summary = summarise(mri, self.length).view(mri.shape[0], 1, *self.grid)
        skips = [self._run(self.stem, mri)]
        for down in self.downs:
            skips.append(self._run(down, skips[-1]))
        x = (skips.pop() + summary.to(skips[0].dtype)) / 2
        x = fov_sample(x, self.targets[len(skips) - 1], self.pet_fov_ratio)  # the decoder lives on the PET FOV
        for level, up in zip(reversed(range(len(skips))), self.ups):
            skip = fov_sample(skips[level], self.targets[level], self.pet_fov_ratio)
            x = self._run(up, x, skip)
        # float32 head: a bf16 output would put generated values on a lattice real PET does not have (an NSP cue)
        with _no_autocast(x.device):
            return HEADS[self.head](self.out(x.float()) * self.out_scale + self.out_offset)
