"""The model folder: its file names, saving and loading the generator, unwrapping, and the device networks run on.

Training, evaluation and inference all read and write model folders through this module, so inference imports no
training code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from ganbert import config as config_mod
from ganbert.config import Config
from ganbert.models import Networks, build_generator

# A model directory (what `ganbert synthesize` and the MLflow model load); a checkpoint holds them too.
GENERATOR_FILE = "generator.safetensors"
CONFIG_FILE = "config.yaml"
# The model card beside them (model_card.py): human-readable Markdown and the same facts as JSON.
CARD_FILE = "model_card.md"
METADATA_FILE = "metadata.json"
# Written beside a run's model directory: the URI of its MLflow model (`models:/<id>`).
MODEL_URI_FILE = "MODEL_URI"
# The artifact of the MLflow pyfunc model that holds the model directory.
MODEL_ARTIFACT = "model_dir"

# A checkpoint: every network's weights, the optimisers' tensors, and the JSON rest (no RNG state: see
# train/checkpoint.py `save_state`).
STATE_FILE = "state.json"
OPTIM_FILE = "optim.safetensors"


def network_file(name: str) -> str:
    """The weights file of network `name` in a checkpoint (`generator` -> GENERATOR_FILE)."""
    return f"{name}.safetensors"


def staging_dir(path: Path) -> Path:
    """An empty `<path>.tmp` beside `path`, to fill and then rename onto `path` (an atomic folder write)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside DDP and `torch.compile` wrappers (in any nesting): forwards that must not sync
    gradients, and state dicts whose keys carry no `module.` / `_orig_mod.` prefix."""
    while True:
        inner = getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def save_model_dir(path: Path, cfg: Config, generator: nn.Module) -> Path:
    """`generator.safetensors` + `config.yaml`: what `ganbert synthesize` and the MLflow model load."""
    path = Path(path)
    tmp = staging_dir(path)
    save_model(unwrap(generator), str(tmp / GENERATOR_FILE))
    config_mod.save(cfg, tmp / CONFIG_FILE)
    shutil.rmtree(path, ignore_errors=True)
    tmp.replace(path)
    return path


def load_generator(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, Config]:
    """Generator (eval mode) and config from a model directory or a checkpoint directory."""
    path = Path(path)
    for name in (GENERATOR_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise ValueError(f"model directory {path}: missing {name}")
    cfg = config_mod.load_file(path / CONFIG_FILE)
    generator = build_generator(cfg)
    load_model(generator, str(path / GENERATOR_FILE), device=str(device))
    return generator.to(device).eval(), cfg


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
