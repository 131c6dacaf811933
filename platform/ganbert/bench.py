"""Benchmarks that print figures: `ganbert bench step --preset tiny [--write]`, `ganbert bench preprocess`."""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform as stdlib_platform
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ganbert import config as config_mod
from ganbert.common.atomic import write_text
from ganbert.config import METHODS, Config
from ganbert.models import build_networks
from ganbert.models.saved import pick_device, place_networks
from ganbert.train.step import Batch, gan_step, make_optimisers, seed_everything

BENCHMARKS = Path("BENCHMARKS.md")


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak memory in MiB: GPU memory allocated (CUDA), else the process's peak resident set size."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield out
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def isolated_step_figures(cfg: Config, steps: int, device: torch.device) -> dict[str, Any]:
    """`step_figures` on CUDA in-process; on CPU in a fresh process so its peak RSS is this config's alone."""
    if device.type == "cuda":
        return step_figures(cfg, steps, device)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(step_figures, (cfg, steps, device))


def random_data_config(cfg: Config) -> Config:
    """`cfg` with a token space for N(0, 1) random data (`random_micro_batches`) unless it has one."""
    if cfg.token_space_fixed:
        return cfg
    return config_mod.apply(cfg, {"sequence.mri_range": (-4.0, 4.0), "sequence.pet_range": (-4.0, 4.0)})


def random_micro_batches(cfg: Config, device: torch.device) -> list[Batch]:
    """`optim.accumulation` N(0, 1) micro-batches of the config's geometry: mri `(B, 1, D, H, W)`,
    pet `(B, T, d, h, w)`, channels-last if `optim.channels_last`."""
    g, o = cfg.geometry, cfg.optim
    fmt = torch.channels_last_3d if o.channels_last else torch.contiguous_format
    return [Batch(torch.randn(o.batch_size, 1, *g.mri_size, device=device).to(memory_format=fmt),
                  torch.randn(o.batch_size, g.pet_frames, *g.pet_size, device=device).to(memory_format=fmt))
            for _ in range(o.accumulation)]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_figures(cfg: Config, steps: int, device: torch.device) -> dict[str, Any]:
    """Samples/s and peak memory of `gan_step` for one config (random data of the config's geometry), the
    first (warm-up, compiling) step's seconds, whether every loss of every step was finite, and the first and
    last timed step's losses."""
    seed_everything(cfg.run.seed)
    o = cfg.optim
    nets = place_networks(build_networks(cfg), cfg, device)
    opt = make_optimisers(nets, cfg, steps + 1)
    micro = random_micro_batches(cfg, device)
    with peak_memory(device) as mem:
        start = time.perf_counter()
        history = [gan_step(micro, nets, opt, cfg)]  # warm-up (and compilation)
        synchronize(device)
        first = time.perf_counter() - start
        start = time.perf_counter()
        history += [gan_step(micro, nets, opt, cfg) for _ in range(steps)]
        synchronize(device)
        seconds = time.perf_counter() - start
    samples = steps * o.batch_size * o.accumulation
    return {"samples_per_s": samples / seconds, "s_per_step": seconds / steps, "peak_mib": mem["peak_mib"],
            "first_step_s": first, "finite": all(math.isfinite(v) for h in history for v in h.values()),
            "first_losses": history[1], "last_losses": history[-1]}


def bench_step(cfg: Config, steps: int) -> list[dict[str, object]]:
    """Per method: the preset's speed options (bf16 on GPU, channels-last, compile as set) vs all off."""
    device = pick_device()
    cfg = random_data_config(cfg)
    rows = []
    for method in METHODS:
        fast_cfg = config_mod.apply(cfg, {"model.method": method, "optim.amp": device.type == "cuda",
                                          "optim.channels_last": True})
        plain_cfg = config_mod.apply(cfg, {"model.method": method, "optim.amp": False, "optim.channels_last": False,
                                           "optim.compile": False})
        fast = isolated_step_figures(fast_cfg, steps, device)
        plain = isolated_step_figures(plain_cfg, steps, device)
        rows.append({"method": method, "fast": fast, "plain": plain,
                     "speedup": fast["samples_per_s"] / plain["samples_per_s"]})
        print(f"{method:20s} fast {fast['samples_per_s']:8.2f} samples/s peak {fast['peak_mib']:8.0f} MiB | "
              f"plain {plain['samples_per_s']:8.2f} samples/s peak {plain['peak_mib']:8.0f} MiB | "
              f"speed-up x{rows[-1]['speedup']:.2f}", flush=True)
    return rows


def bench_tokens(cfg: Config, data_dir: str) -> list[str]:
    """Token health of every tracer's val split: the paper's literal scheme (s = 1000) vs the calibrated default.

    Rows: share of real MRI / PET summary values that collide (paper wrap ids) or clip (monotonic), and the
    distinct value ids they use (of `sequence.vocab_values`).
    """
    from ganbert.models.tokens import calibrate_token_space, token_health
    from ganbert.store import shards
    from ganbert.store.stats import for_run, split_summaries

    lines = ["| tracer | scheme | MRI collide/clip | PET collide/clip | MRI distinct ids | PET distinct ids |",
             "| --- | --- | --- | --- | --- | --- |"]
    tracers = sorted({s["tracer"] for s in shards.read_manifest(data_dir)["shards"]})
    for tracer in tracers:
        base = config_mod.apply(cfg, {"geometry.tracer": tracer})
        calibrated = calibrate_token_space(base, for_run(data_dir, tracer, base.sequence.length))
        summaries = split_summaries(data_dir, "val", tracer, base.sequence.length)
        for name, run_cfg in (("paper, s=1000", config_mod.apply(base, {"sequence.scheme": "paper",
                                                                       "sequence.scale": 1000.0})),
                              ("monotonic, calibrated (default)", calibrated)):
            h = token_health(run_cfg, summaries)
            lines.append(f"| {tracer} | {name} | {h['token_mri_collide_or_clip']:.1%} | "
                         f"{h['token_pet_collide_or_clip']:.1%} | {h['token_mri_distinct']:.0f} | "
                         f"{h['token_pet_distinct']:.0f} |")
    return lines


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {stdlib_platform.machine()}, torch {torch.__version__})"


def write_section(title: str, lines: list[str], path: Path = BENCHMARKS) -> None:
    """Replace (or append) the `## title` section of BENCHMARKS.md, atomically."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\nFigures printed by `ganbert bench ...`.\n"
    head = f"## {title}\n"
    section = head + "\n".join(lines) + "\n"
    if head in text:
        start = text.index(head)
        end = text.find("\n## ", start + len(head))
        text = text[:start] + section + (text[end + 1:] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_text(path, text)


def loader_figures(cfg: Config, data_dir: str, epochs: int = 2) -> dict[str, float]:
    """Train-split rows/s of the loader training uses (the seeded per-epoch permutation of the whole split,
    `loader.epoch_dataset`), and how far it moves rows between epochs."""
    import numpy as np

    from ganbert.store import loader

    tracer, b = cfg.geometry.tracer, cfg.optim.batch_size
    orders, seconds = [], 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        batches = loader.torch_batches(loader.epoch_dataset(data_dir, "train", tracer, cfg.run.seed, epoch), b)
        orders.append([i for batch in batches for i in batch["pet_image_id"]])
        seconds += time.perf_counter() - start
    rank = {i: k for k, i in enumerate(orders[0])}
    moved = np.abs(np.array([rank[i] - k for k, i in enumerate(orders[1])], dtype=float))
    return {"rows_per_s": sum(len(o) for o in orders) / seconds, "mean_displacement_rows": float(moved.mean()),
            "rows": float(len(orders[0]))}


def phantom_t1(size: str) -> str:
    """The phantom's raw T1 and standard PET grids of a size, in words."""
    from ganbert.ingest import phantom
    spec = phantom.SIZES[size]
    shape, zooms = phantom.STANDARD_GRIDS[size]
    return f"{spec.t1_shape} at {spec.t1_zooms} mm, PET {shape} at {zooms} mm"


def main(args: argparse.Namespace, cfg: Config) -> int:
    if args.what in ("qc", "preprocess", "registration"):
        from ganbert.common import cache

        os.environ[cache.CACHE_ENV] = "off"  # they time registrations and templates: made, never read back
    if args.what == "uncertainty":
        from ganbert.experiments import uncertainty

        if not args.study or not args.row:
            raise ValueError("bench uncertainty needs --study DIR (a finished `ganbert study --folds K`) "
                             "and --row NAME")
        found = uncertainty.measure(Path(args.study), args.row)
        text = uncertainty.render(found)
        write_text(Path(args.study) / f"uncertainty-{args.row.replace(' ', '-')}.json", json.dumps(found, indent=1))
        if args.write:
            write_section(f"Fold-ensemble uncertainty, {found['row']}",
                          [f"Command: `ganbert bench uncertainty --study {args.study} --row '{args.row}'`", "",
                           *text.splitlines()])
        print(text)
        return 0
    if args.what == "registration":
        from ganbert.prep.bench import bench_registration
        size = {"tiny": "tiny", "demo": "demo"}.get(cfg.preset, "paper")
        figures = bench_registration(size)
        lines = [f"Command: `ganbert bench registration --preset {cfg.preset}` on {_machine(torch.device('cpu'))}: "
                 f"rigid PET-to-T1 registration (SimpleITK, Mattes MI, one thread) of phantom PET written with "
                 f"`--pet-space adni-standard` at `{size}` size (T1 {phantom_t1(size)}; PET on the standard grid), "
                 "displacement = mean distance over the brain between the found and the true pose.", ""]
        lines += [f"- {k}: {v:g}" for k, v in figures.items()]
        if args.write:
            write_section(f"PET-to-T1 registration, {size} phantom", lines)
        print("\n".join(lines))
        return 0
    if args.what == "qc":
        from ganbert.prep.qc_bench import bench_qc
        lines = [f"Command: `ganbert bench qc --subjects {args.subjects}` on {_machine(torch.device('cpu'))}: input QC "
                 "(`ganbert.prep.qc`) of phantom T1s and the MNI152 head (must pass), "
                 "generated non-T1 inputs (must fail) "
                 "and image files shipped in installed wheels; seconds include reading the file.", ""]
        lines += bench_qc(args.subjects, say=lambda line: print(f"[qc] {line}", flush=True))
        if args.write:
            write_section("Input QC thresholds", lines)
        print("\n".join(lines))
        return 0
    if args.what == "tokens":
        from ganbert.prep.phantom_cache import data_dir_for
        data_dir = data_dir_for(cfg, args.data)
        lines = [f"Command: `ganbert bench tokens --preset {cfg.preset}" + (" --data DIR`" if args.data else
                                                                             "` (the cached phantom cohort)")
                 + f": real summaries of each tracer's val split, L = {cfg.sequence.length}, "
                 f"{cfg.sequence.vocab_values} value ids.", ""] + bench_tokens(cfg, data_dir)
        if args.write:
            write_section(f"Token health, {cfg.preset} preset", lines)
        print("\n".join(lines))
        return 0
    if args.what == "loader":
        from ganbert.common.raysession import ensure_ray
        from ganbert.prep.phantom_cache import data_dir_for

        ensure_ray()
        figures = loader_figures(cfg, data_dir_for(cfg, getattr(args, "data", None)))
        print(f"bench loader: preset {cfg.preset}, tracer {cfg.geometry.tracer}, 2 epochs of the train split "
              "(the seeded per-epoch permutation)")
        print("\n".join(f"- {k}: {v:.2f}" for k, v in figures.items()))
        return 0
    if args.what == "preprocess":
        from ganbert.prep.bench import bench_preprocess
        figures = bench_preprocess(cfg)
        g = cfg.geometry
        lines = [f"Command: `ganbert bench preprocess --preset {cfg.preset}` on {_machine(torch.device('cpu'))}: "
                 f"a phantom cohort (3 tracers) preprocessed to MRI {g.mri_size}, PET {g.pet_frames}x{g.pet_size} on "
                 "a local Ray; then one split read through the Ray Data loader and with plain pyarrow in the same "
                 "run.", ""]
        lines += [f"- {k}: {v:g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in figures.items()]
    else:
        device = pick_device()
        o = cfg.optim
        print(f"bench step: preset {cfg.preset}, batch {o.batch_size} x accumulation {o.accumulation}, "
              f"{args.steps} steps, checkpointing {o.checkpointing}, compile {o.compile}, on {_machine(device)}")
        rows = bench_step(cfg, args.steps)
        lines = [f"Command: `ganbert bench step --preset {cfg.preset} --steps {args.steps}` on {_machine(device)}; "
                 f"batch {o.batch_size} x accumulation {o.accumulation}, checkpointing {o.checkpointing}. "
                 "fast = bf16 autocast (GPU only) + channels-last"
                 + (" + torch.compile" if o.compile else "") + "; plain = fp32, no channels-last, no compile.", "",
                 "| method | fast samples/s | fast peak MiB | plain samples/s | plain peak MiB | speed-up |",
                 "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['method']} | {r['fast']['samples_per_s']:.2f} | {r['fast']['peak_mib']:.0f} | "
                  f"{r['plain']['samples_per_s']:.2f} | {r['plain']['peak_mib']:.0f} | x{r['speedup']:.2f} |"
                  for r in rows]
        title = f"Train step, {cfg.preset} preset, {'GPU' if device.type == 'cuda' else 'CPU'}"
        if args.write:
            write_section(title, lines)
        return 0
    if args.write:
        write_section("Preprocessing and loader", lines)
    print("\n".join(lines))
    return 0
