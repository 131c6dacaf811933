"""DDP gradient accumulation in `gan_step`: 2 gloo processes x 2 micro-batches equal one process on 4 samples."""


import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from ganbert import config
from ganbert.models import Networks, build_networks
from ganbert.models.saved import unwrap
from ganbert.models.sequence import mask_positions
from ganbert.train import step
from ganbert.train.step import Batch, gan_step, make_optimisers, seed_everything

RANGES = {"sequence.mri_range": (-3.0, 3.0), "sequence.pet_range": (-1.0, 12.0)}
WORLD = 2


def four_samples() -> Batch:
    """Four fixed, distinct tiny-preset samples: mri `(4, 1, 32, 32, 32)`, pet `(4, 2, 14, 12, 12)`."""
    g = torch.Generator().manual_seed(3)
    mri = F.avg_pool3d(torch.randn(4, 1, 32, 32, 32, generator=g), 5, 1, 2) * 4
    pet = F.adaptive_avg_pool3d(mri.repeat(1, 2, 1, 1, 1), (14, 12, 12)).abs() * 5
    return Batch(mri, pet)


def fixed_mask_positions(batch: int, length: int, mri_ratio: float, pet_ratio: float,
                         generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """`mask_positions` drawn once from a fixed seed and shared by every sample: bool `(batch, 2L+3)`."""
    one = mask_positions(1, length, mri_ratio, pet_ratio, generator=torch.Generator().manual_seed(0), device=device)
    return one.expand(batch, -1).clone()


def deterministic_networks(cfg: config.Config) -> Networks:
    """Networks from seed 0 with BERT in eval mode (no dropout; BERT has no other train-mode behaviour)."""
    seed_everything(0)
    nets = build_networks(cfg)
    assert nets.bert is not None and nets.cnn is not None
    nets.bert.eval()
    return nets


def record_gradients(nets: Networks, opt: step.Optimisers) -> dict[str, torch.Tensor]:
    """`{network.param: grad}` filled by each Adam's step pre-hook: the gradients the optimiser steps on."""
    names = {id(p): f"{net}.{n}" for net, m in nets.named().items() for n, p in unwrap(m).named_parameters()}
    seen: dict[str, torch.Tensor] = {}

    def hook(adam: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        for group in adam.param_groups:
            for p in group["params"]:
                seen[names[id(p)]] = p.grad.detach().clone()

    for adam in opt.adam.values():
        adam.register_step_pre_hook(hook)
    return seen


def counting_allreduce(state: dict[str, int], bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's default all-reduce, counting calls and gradient elements reduced (annotations evaluated: DDP checks
    that `bucket`'s is `dist.GradBucket`, so this module has no `from __future__ import annotations`)."""
    state["calls"] += 1
    state["elements"] += bucket.buffer().numel()
    return allreduce_hook(None, bucket)  # type: ignore[arg-type]


def _worker(rank: int, port: int, cfg_dict: dict, out: str) -> None:
    """One DDP rank: samples 2*rank and 2*rank + 1 as two micro-batches of one; rank 0 writes what it saw."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        step.mask_positions = fixed_mask_positions  # this spawned process only
        cfg = config.from_dict(cfg_dict)
        nets = deterministic_networks(cfg)
        counts: dict[str, dict[str, int]] = {}
        for name, module in nets.named().items():
            counts[name] = {"calls": 0, "elements": 0, "parameters": sum(p.numel() for p in module.parameters())}
            ddp = DistributedDataParallel(module)
            ddp.register_comm_hook(counts[name], counting_allreduce)
            setattr(nets, name, ddp)
        opt = make_optimisers(nets, cfg, 10)
        grads = record_gradients(nets, opt)
        data = four_samples()
        micro = [Batch(data.mri[i:i + 1], data.pet[i:i + 1]) for i in (2 * rank, 2 * rank + 1)]
        gan_step(micro, nets, opt, cfg)
        if rank == 0:
            save_file(grads, str(Path(out) / "grads.safetensors"))
            (Path(out) / "counts.json").write_text(json.dumps(counts))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_accumulation_equals_one_process_and_all_reduces_once_per_step(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """ganbert-cnnd, `optim.accumulation=2`, 2 gloo ranks: the generator's, BERT's and CNN-D's gradients before the
    optimiser step equal those of one process on the same 4 samples, and DDP all-reduces every network's
    gradients exactly once (a communication hook counts the elements it reduces).

    Randomness is made identical in both setups instead of merely seeded: BERT runs in eval mode (dropout off)
    and the MLM mask is one fixed draw shared by every sample (`fixed_mask_positions`), because one batch of
    4 and 2 ranks x 2 micro-batches of 1 consume the RNG differently, so seeded draws would differ. Every loss
    is a per-sample mean over equally many terms (voxels, patches, masked positions), and instance norm is
    per sample, so the mean over 4 samples is the same sum either way. Gradients are compared before the
    step: Adam's first step is lr * sign(g) and would blow float-sum differences up to lr.
    A `gan_step` without `no_sync` gives the same gradients (all-reducing a partial sum twice is linear)
    but reduces each network twice per step, which the count catches.
    """
    cfg = config.apply(config.tiny(), RANGES | {"model.method": "ganbert-cnnd", "optim.batch_size": 1,
                                                "optim.accumulation": 2})
    mp.spawn(_worker, args=(_free_port(), cfg.to_dict(), str(tmp_path)), nprocs=WORLD, join=True)
    ddp_grads = load_file(str(tmp_path / "grads.safetensors"))
    counts = json.loads((tmp_path / "counts.json").read_text())

    monkeypatch.setattr(step, "mask_positions", fixed_mask_positions)
    one_cfg = config.apply(cfg, {"optim.batch_size": 4, "optim.accumulation": 1})
    nets = deterministic_networks(one_cfg)
    opt = make_optimisers(nets, one_cfg, 10)
    ref = record_gradients(nets, opt)
    gan_step([four_samples()], nets, opt, one_cfg)

    assert set(ddp_grads) == set(ref)
    for net in ("generator", "bert", "cnn"):
        names = [k for k in ref if k.startswith(f"{net}.")]
        # float sums differ by rounding relative to the network's gradient scale (some gradients, e.g. BERT's
        # key biases, are zero in exact arithmetic and rounding noise in both setups)
        scale = max(float(ref[k].abs().max()) for k in names)
        assert scale > 0, f"{net} got no gradient"
        for k in names:
            assert torch.allclose(ddp_grads[k], ref[k], rtol=1e-4, atol=1e-5 * scale), \
                (k, float((ddp_grads[k] - ref[k]).abs().max()), scale)
    assert set(counts) == {"generator", "bert", "cnn"}
    for name, c in counts.items():
        assert c["elements"] == c["parameters"], f"{name}: {c['elements']} gradient elements all-reduced per step " \
                                                 f"for {c['parameters']} parameters ({c['calls']} bucket calls)"
