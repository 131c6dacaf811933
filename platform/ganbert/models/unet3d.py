"""3D U-Net generator: MRI (B, 1, D, H, W) -> PET (B, T, d, h, w), bottleneck fused with the MRI summary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ganbert.sequence import summarise

Shape3 = tuple[int, int, int]
HEADS = {"tanh": torch.tanh, "tanhshrink": F.tanhshrink}


def resize(x: Tensor, size: Shape3) -> Tensor:
    """Resize `(B, C, D, H, W)` to `size`: area averaging when shrinking every axis, else trilinear."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if all(t <= s for t, s in zip(size, x.shape[2:])):
        return F.adaptive_avg_pool3d(x, size)
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


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
    Decoder: stages at sizes min(encoder size, PET grid), skips resized to them, ending on the PET grid
    with T channels and the `head` activation (tanhshrink or tanh).
    """

    def __init__(self, mri_size: int, pet_size: Shape3, frames: int, length: int = 512, base_channels: int = 16,
                 max_channels: int = 256, head: str = "tanhshrink", checkpointing: bool = False) -> None:
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
        self.length, self.grid, self.head = length, (n, n, n), head
        self.pet_size, self.frames, self.checkpointing = tuple(pet_size), frames, checkpointing
        ch = [min(base_channels * 2**i, max_channels) for i in range(depth + 1)]
        self.stem = _conv(1, ch[0])
        self.downs = nn.ModuleList(Down(ch[i], ch[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(Up(ch[i + 1], ch[i], ch[i]) for i in reversed(range(depth)))
        sizes = [mri_size // 2**i for i in range(depth + 1)]
        self.targets = [self.pet_size] + [tuple(min(s, p) for p in self.pet_size) for s in sizes[1:]]
        self.out = nn.Conv3d(ch[0], frames, 1)
        self.register_buffer("out_scale", torch.ones(()))  # fixed gain on the pre-activation (init_output)

    @torch.no_grad()
    def init_output(self, mean: float, std: float = 1.0) -> None:
        """Start at the data's level and spread: pre-activation gain `std`, bias mapping 0 to `mean`.

        Normalised PET spans tens of units while the decoder's features are O(1) and Adam moves weights
        by about lr per step; the fixed gain `out_scale` = max(std, 1) lets the output move in data units.
        The head's inverse is solved numerically (tanhshrink) or with atanh (tanh, clipped to (-1, 1)),
        so training starts at the mean instead of at 0, where tanhshrink is flat.
        """
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        target = torch.tensor(float(mean), dtype=torch.float64)
        if self.head == "tanh":
            x = torch.atanh(target.clamp(-0.99, 0.99))
        else:
            x = target.clone()
            for _ in range(50):  # Newton on x - tanh(x) = target; derivative tanh(x)^2
                x = x - (x - torch.tanh(x) - target) / torch.tanh(x).square().clamp_min(1e-3)
        self.out_scale.fill_(max(float(std), 1.0))
        self.out.bias.fill_(float(x) / float(self.out_scale))

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
        for level, up in zip(reversed(range(len(skips))), self.ups):
            skip = resize(skips[level], self.targets[level])
            x = self._run(up, x, skip)
        return HEADS[self.head](self.out(x) * self.out_scale)
