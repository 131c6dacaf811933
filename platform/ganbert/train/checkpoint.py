"""Checkpoints without pickle: safetensors for networks and optimiser tensors, JSON/YAML for the rest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from ganbert import config as config_mod
from ganbert.config import Config
from ganbert.models import Networks
from ganbert.models.saved import CONFIG_FILE, OPTIM_FILE, STATE_FILE, network_file, staging_dir, unwrap
from ganbert.train.step import Optimisers


def _split_optimiser(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser/scheduler state_dict -> (flat tensors, JSON-able rest with tensor keys referenced)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(value, dict):
            return {"__dict__": [[k, walk(v, f"{key}.{k}")] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(value)]
        return value

    return tensors, walk(state, "s")


def _join_optimiser(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict) and "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if isinstance(tree, dict) and "__dict__" in tree:
        return {k: _join_optimiser(v, tensors) for k, v in tree["__dict__"]}
    if isinstance(tree, list):
        return [_join_optimiser(v, tensors) for v in tree]
    return tree


def save_state(path: Path, cfg: Config, nets: Networks, opt: Optimisers, meta: dict[str, Any]) -> Path:
    """A whole training state in `path` (atomic): every network, optimiser and scheduler, config, meta.

    No RNG state: the loop reseeds every epoch from (run.seed, epoch, rank) and checkpoints only at an epoch's
    end, so the state at a checkpoint fixes everything that follows (train/loop.py `train_loop_per_worker`).
    """
    path = Path(path)
    tmp = staging_dir(path)
    for name, module in nets.named().items():
        save_model(unwrap(module), str(tmp / network_file(name)))
    tensors, tree = _split_optimiser(opt.state_dict())
    save_file(tensors, str(tmp / OPTIM_FILE))
    (tmp / STATE_FILE).write_text(json.dumps({"meta": meta, "optim": tree}))
    config_mod.save(cfg, tmp / CONFIG_FILE)
    shutil.rmtree(path, ignore_errors=True)
    tmp.replace(path)
    return path


def load_state(path: Path, nets: Networks, opt: Optimisers) -> dict[str, Any]:
    """Load what `save_state` wrote into `nets` and `opt`; return its meta dict (an RNG state that checkpoints
    of earlier versions hold is not read).

    Tensors are read on the CPU and copied into the networks' parameters wherever they live; the optimisers
    cast their state to their parameters' device, so build `opt` over the networks already on their device.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"checkpoint {path}: missing {STATE_FILE}")
    for name, module in nets.named().items():
        load_model(unwrap(module), str(path / network_file(name)), device="cpu")  # copied onto the params' device
    state = json.loads((path / STATE_FILE).read_text())
    opt.load_state_dict(_join_optimiser(state["optim"], load_file(str(path / OPTIM_FILE))))
    return state["meta"]
