"""Checkpoints: state dict keys without wrapper prefixes; a resumed optimiser's state on its parameters' device."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ganbert import config
from ganbert.models import build_networks
from ganbert.models.saved import GENERATOR_FILE, load_generator, save_model_dir
from ganbert.train.checkpoint import save_state
from ganbert.train.loop import training_state
from ganbert.train.step import Batch, gan_step, make_optimisers

RANGES = {"sequence.mri_range": (-3.0, 3.0), "sequence.pet_range": (-1.0, 12.0)}


def test_compiled_and_wrapped_generators_save_plain_keys(tmp_path: Path) -> None:
    cfg = config.apply(config.tiny(), RANGES)
    plain = build_networks(cfg).generator
    wrapped = torch.nn.DataParallel(torch.compile(plain))   # like DDP(compile(generator)) in the loop
    assert any(k.startswith("module._orig_mod.") for k in wrapped.state_dict())
    save_model_dir(tmp_path / "model", cfg, wrapped)
    assert set(load_file(str(tmp_path / "model" / GENERATOR_FILE))) == set(plain.state_dict())
    loaded, _ = load_generator(tmp_path / "model")
    for k, v in plain.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_resumed_optimiser_state_follows_its_parameters_device(tmp_path: Path) -> None:
    """Networks are placed before their optimisers are built and loaded (meta stands in for a GPU here;
    the CNN method, since safetensors cannot find BERT's tied weights on meta tensors)."""
    cfg = config.apply(config.tiny(), RANGES | {"model.method": "pix2pix-tanhshrink"})
    nets = build_networks(cfg)
    opt = make_optimisers(nets, cfg, 10)
    mri = torch.randn(2, 1, 32, 32, 32)
    gan_step([Batch(mri, torch.rand(2, 2, 14, 12, 12) * 10)], nets, opt, cfg)
    save_state(tmp_path / "ckpt", cfg, nets, opt, {"epoch": 0, "step": 1, "mlflow_run_id": None})
    device = torch.device("meta")
    placed, resumed, meta = training_state(cfg, device, 10, tmp_path / "ckpt", (0.0, 1.0))
    assert meta["step"] == 1
    for name, adam in resumed.adam.items():
        states = [s for s in adam.state.values() if s]
        assert states, f"{name}: no optimiser state was loaded"
        for group in adam.param_groups:
            for p in group["params"]:
                assert p.device == device
                for key, value in adam.state[p].items():
                    if torch.is_tensor(value) and key != "step":
                        assert value.device == p.device, (name, key, value.device)
