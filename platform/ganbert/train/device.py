"""Device placement at the edges: move networks to a device with channels-last and compile as configured."""

from __future__ import annotations

import torch

from ganbert.config import Config
from ganbert.models import Networks


def pick_device(use_gpu: bool = True) -> torch.device:
    """CUDA when asked for and present, else CPU."""
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def place_networks(nets: Networks, cfg: Config, device: torch.device) -> Networks:
    """Move every network to `device`; 3D convnets in channels_last_3d and the generator compiled if enabled."""
    fmt = torch.channels_last_3d if cfg.optim.channels_last else torch.contiguous_format
    generator = nets.generator.to(device, memory_format=fmt)
    cnn = nets.cnn.to(device, memory_format=fmt) if nets.cnn is not None else None
    bert = nets.bert.to(device) if nets.bert is not None else None
    if cfg.optim.compile:
        generator = torch.compile(generator)
    return Networks(generator=generator, bert=bert, cnn=cnn)
