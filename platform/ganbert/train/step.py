"""One pure GAN step (no Ray): BERT/CNN-D update then generator update; returns float losses."""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from typing import Iterator
from typing import Sequence as Seq

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ganbert.config import Config
from ganbert.models import Networks
from ganbert.models.intensity import normalise_mri, normalise_pet
from ganbert.models.saved import unwrap
from ganbert.models.sequence import Sequence, Vocabulary, build_sequence, mask_positions, mask_sequence, summarise

LOSS_KEYS = ("l1", "nsp_d", "nsp_g", "mlm_d", "mlm_g", "cnn_d", "cnn_g", "nsp_acc")


@dataclass
class Batch:
    """Normalised tensors the networks see: mri `(B, 1, D, H, W)`, pet `(B, T, d, h, w)`."""

    mri: Tensor
    pet: Tensor


def to_batch(raw: dict, device: torch.device | str = "cpu") -> Batch:
    """Loader dict (uint8 mri, PET in original units, mri_mean, mri_std) -> normalised `Batch` on device."""
    mean = raw["mri_mean"].to(device, torch.float32)
    std = raw["mri_std"].to(device, torch.float32)
    mri = normalise_mri(raw["mri"].to(device), mean, std)
    pet = normalise_pet(raw["pet"].to(device, torch.float32), mean, std)
    return Batch(mri=mri, pet=pet)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch with `seed + rank` (the one place runs are seeded)."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


# --- optimisers --------------------------------------------------------------------------------

def gan_factor(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Weight of the adversarial terms: linear from 0 to 1 over the first `warmup_fraction` of the steps."""
    if warmup_fraction <= 0:
        return 1.0
    return min(1.0, step / (warmup_fraction * total_steps))


def lr_factor(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Linear warm-up over `warmup_fraction` of the steps, then linear decay to 0 at `total_steps`."""
    warm = max(1, math.ceil(warmup_fraction * total_steps))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total_steps - step) / max(1, total_steps - warm))


@dataclass
class Optimisers:
    """One Adam and one warm-up/decay scheduler per network, keyed like `Networks.named()`."""

    adam: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR]
    total_steps: int = 1

    @property
    def step(self) -> int:
        """Optimiser steps taken so far (restored with the schedulers on resume)."""
        return int(self.schedulers["generator"].last_epoch)

    def state_dict(self) -> dict[str, dict]:
        return {f"{kind}.{name}": obj.state_dict() for kind, objs in (("adam", self.adam), ("sched", self.schedulers))
                for name, obj in objs.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for kind, objs in (("adam", self.adam), ("sched", self.schedulers)):
            for name, obj in objs.items():
                obj.load_state_dict(state[f"{kind}.{name}"])


def make_optimisers(nets: Networks, cfg: Config, total_steps: int) -> Optimisers:
    """Separate Adam (lr, betas from cfg.optim) per network with warm-up then linear decay."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    o = cfg.optim
    adam = {name: torch.optim.Adam(m.parameters(), lr=o.lr * (1.0 if name == "generator" else o.d_lr_scale),
                                   betas=o.betas) for name, m in nets.named().items()}
    scheds = {name: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, o.warmup_fraction))
              for name, opt in adam.items()}
    return Optimisers(adam, scheds, total_steps)


# --- the step ----------------------------------------------------------------------------------

def _requires_grad(modules: Seq[nn.Module | None], flag: bool) -> None:
    for m in modules:
        if m is not None:
            for p in m.parameters():
                p.requires_grad_(flag)


@contextlib.contextmanager
def _no_sync(modules: Seq[nn.Module | None], skip: bool) -> Iterator[None]:
    """DDP `no_sync` on every wrapped module while accumulating (all micro-batches but the last)."""
    with contextlib.ExitStack() as stack:
        if skip:
            for m in modules:
                if m is not None and hasattr(m, "no_sync"):
                    stack.enter_context(m.no_sync())
        yield


def _mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over masked positions; 0 (graph kept) when nothing is masked."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels)


def _cat(a: Sequence, b: Sequence) -> Sequence:
    return Sequence(*(torch.cat([x, y]) for x, y in zip(
        (a.tokens, a.continuous, a.token_types, a.value_mask), (b.tokens, b.continuous, b.token_types, b.value_mask))))


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `optim.amp` is on: the same code path on CUDA and CPU (where the tests run it)."""
    if enabled and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def gan_step(micro_batches: Seq[Batch], nets: Networks, opt: Optimisers, cfg: Config) -> dict[str, float]:
    """One optimiser step of every network over `micro_batches` (gradient accumulation).

    Per micro-batch: G(mri) once; the discriminators (BERT NSP+MLM on real and generated sequences with the
    same masked positions, CNN-D on real/generated PET) take a gradient on the detached fake; then, with the
    discriminators frozen, the generator takes lambda_nsp*NSP + lambda_mlm*MLM + lambda_l1*L1 (+ lambda_cnn*CNN),
    the adversarial terms ramped in over `optim.gan_warmup_fraction` of the steps (`gan_factor`).
    NSP labels follow HF: 0 = real ("is next"), 1 = generated; the generator's NSP target is 0.
    Networks may be DDP-wrapped: all but the last micro-batch run under `no_sync`; the generator loss runs
    the unwrapped discriminators so it never syncs their (frozen) gradients.
    Returns the mean over micro-batches of the losses in LOSS_KEYS that the method has.
    """
    if not micro_batches:
        raise ValueError("micro_batches must not be empty")
    s, o = cfg.sequence, cfg.optim
    generator, bert, cnn = nets.generator, nets.bert, nets.cnn
    adv = gan_factor(opt.step, opt.total_steps, o.gan_warmup_fraction)
    vocab = Vocabulary(s) if bert is not None else None
    n = len(micro_batches)
    sums: dict[str, float] = {}
    for i, batch in enumerate(micro_batches):
        device = batch.mri.device
        with _no_sync([generator, bert, cnn], skip=i < n - 1), _autocast(device, o.amp):
            fake = generator(batch.mri)
            b = batch.mri.shape[0]
            out: dict[str, Tensor] = {}
            # --- discriminators ---
            _requires_grad([bert, cnn], True)
            loss_d = fake.new_zeros(())
            if bert is not None:
                mri_sum = summarise(batch.mri.float(), s.length)
                real_seq = build_sequence(vocab, mri_sum, summarise(batch.pet.float(), s.length))
                fake_sum = summarise(fake.float(), s.length)
                positions = mask_positions(b, s.length, s.mri_mask_ratio, s.pet_mask_ratio, device=device)
                real_m, labels = mask_sequence(vocab, real_seq, positions)
                fake_m, _ = mask_sequence(vocab, build_sequence(vocab, mri_sum, fake_sum.detach()), positions,
                                          labels_from=real_seq)
                both = torch.cat([positions, positions])
                nsp, mlm = bert(_cat(real_m, fake_m), both)
                target = torch.cat([torch.zeros(b), torch.ones(b)]).long().to(device)
                out["nsp_d"] = F.cross_entropy(nsp.float(), target)
                out["mlm_d"] = _mlm_loss(mlm, torch.cat([labels, labels])[both])
                out["nsp_acc"] = (nsp.argmax(1) == target).float().mean()
                loss_d = loss_d + out["nsp_d"] + out["mlm_d"]
            if cnn is not None:
                logits = cnn(torch.cat([batch.mri, batch.mri]), torch.cat([batch.pet, fake.detach()]))
                real_l, fake_l = logits.float().chunk(2)
                out["cnn_d"] = 0.5 * (F.binary_cross_entropy_with_logits(real_l, torch.ones_like(real_l))
                                      + F.binary_cross_entropy_with_logits(fake_l, torch.zeros_like(fake_l)))
                loss_d = loss_d + out["cnn_d"]
            if bert is not None or cnn is not None:
                (loss_d / n).backward()
            # --- generator ---
            _requires_grad([bert, cnn], False)
            out["l1"] = F.l1_loss(fake.float(), batch.pet.float())
            loss_g = o.lambda_l1 * out["l1"]
            if bert is not None:
                gen_m, gen_labels = mask_sequence(vocab, build_sequence(vocab, mri_sum, fake_sum), positions,
                                                  labels_from=real_seq)
                nsp_g, mlm_g = unwrap(bert)(gen_m, positions)
                out["nsp_g"] = F.cross_entropy(nsp_g.float(), torch.zeros(b, dtype=torch.long, device=device))
                out["mlm_g"] = _mlm_loss(mlm_g, gen_labels[positions])
                loss_g = loss_g + adv * (o.lambda_nsp * out["nsp_g"] + o.lambda_mlm * out["mlm_g"])
            if cnn is not None:
                fake_l = unwrap(cnn)(batch.mri, fake).float()
                out["cnn_g"] = F.binary_cross_entropy_with_logits(fake_l, torch.ones_like(fake_l))
                loss_g = loss_g + adv * o.lambda_cnn * out["cnn_g"]
            (loss_g / n).backward()
            _requires_grad([bert, cnn], True)
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach()) / n
    for name, adam in opt.adam.items():
        adam.step()
        adam.zero_grad(set_to_none=True)
        opt.schedulers[name].step()
    sums["lr"] = opt.schedulers["generator"].get_last_lr()[0]
    return sums

