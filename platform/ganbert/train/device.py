"""Device placement at the edges: move networks to a device with channels-last and compile as configured."""

from __future__ import annotations

import torch
from torch import nn

from ganbert.config import Config
from ganbert.models import Networks


def pick_device(use_gpu: bool = True) -> torch.device:
    """CUDA when asked for and present, else CPU."""
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def channels_last_3d(module: nn.Module) -> nn.Module:
    """`module` with its 5-D parameters (3D conv weights) in `channels_last_3d`, in place.

    Not `module.to(memory_format=...)`: that converts every 4-D and 5-D tensor and fails on the 4-D buffers
    (the generator's output offset `(T, d, h, w)`).
    """
    for p in module.parameters():
        if p.dim() == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
    return module


def place_networks(nets: Networks, cfg: Config, device: torch.device) -> Networks:
    """Move every network to `device`; 3D convnets in channels_last_3d and the generator compiled if enabled."""
    generator = nets.generator.to(device)
    cnn = nets.cnn.to(device) if nets.cnn is not None else None
    if cfg.optim.channels_last:
        generator = channels_last_3d(generator)
        cnn = channels_last_3d(cnn) if cnn is not None else None
    bert = nets.bert.to(device) if nets.bert is not None else None
    if cfg.optim.compile:
        generator = torch.compile(generator)
    return Networks(generator=generator, bert=bert, cnn=cnn)
