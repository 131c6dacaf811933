"""The GPU check: `python -m ganbert.gpu_check --out DIR`: step speed, training, resume and synthesis on one device.

Needs only torch, transformers, numpy, pyyaml and safetensors (no Ray, MLflow or nibabel), so it runs on a bare
GPU machine: `PYTHONPATH=platform python -m ganbert.gpu_check --out DIR` (`make gpu-check`).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from ganbert import config as config_mod
from ganbert.bench import peak_memory, random_data_config, random_micro_batches, step_figures, synchronize
from ganbert.common.atomic import write_text
from ganbert.config import Config
from ganbert.models import Networks, build_generator, build_networks
from ganbert.models.saved import place_networks, unwrap
from ganbert.train.checkpoint import load_state, save_state
from ganbert.train.step import Optimisers, gan_step, make_optimisers, seed_everything

GOAL_SAMPLES_PER_S = 8.0  # per GPU, `paper` preset, fast settings
GOAL_SPEEDUP = 1.5  # fast over plain fp32
RESUME_UPDATE_TOLERANCE = 1e-2  # relative L2 difference of the resumed step's update (GPU kernels with atomics)
REPORT = "gpu_check.json"
EDGE_MODULES = ("ray", "mlflow", "nibabel", "pyarrow")

FAST = {"optim.amp": True, "optim.channels_last": True}
PLAIN = {"optim.amp": False, "optim.channels_last": False, "optim.compile": False}
# name -> overrides of the speed rows, in the order they run: fast (bf16 autocast + channels-last) and plain fp32
# with gradient checkpointing on and off, then fast + torch.compile (compiling takes the longest)
VARIANTS: dict[str, dict[str, Any]] = {
    "fast, checkpointing on": FAST | {"optim.compile": False, "optim.checkpointing": True},
    "plain fp32, checkpointing on": PLAIN | {"optim.checkpointing": True},
    "fast, checkpointing off": FAST | {"optim.compile": False, "optim.checkpointing": False},
    "plain fp32, checkpointing off": PLAIN | {"optim.checkpointing": False},
    "fast + compile, checkpointing on": FAST | {"optim.compile": True, "optim.checkpointing": True},
}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "torch._dynamo" in sys.modules:  # compiled graphs of the previous check
        torch._dynamo.reset()


def guarded(fn: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """`fn()`, or `{"error": ..., "oom": ...}` when it raises (traceback on stderr; the next check still runs)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - reported in the table and the JSON; the other checks still run
        traceback.print_exc()
        first = (str(err).splitlines() or [""])[0][:160]
        return {"error": f"{type(err).__name__}: {first}", "oom": isinstance(err, torch.OutOfMemoryError)}
    finally:
        _free(device)


def _passed(row: dict[str, Any]) -> bool:
    """A speed row passes with finite losses, when skipped, or when out of memory (a figure of that GPU)."""
    return bool(row.get("finite") or "skipped" in row or row.get("oom"))


def speed_rows(cfg: Config, steps: int, device: torch.device, skip_compile: bool, deadline: float
               ) -> dict[str, dict[str, Any]]:
    """`step_figures` of every VARIANTS setting of `cfg`; rows with compile on are skipped if `skip_compile`, and
    rows not started by `deadline` (`time.monotonic()`) are skipped."""
    rows: dict[str, dict[str, Any]] = {}
    for name, overrides in VARIANTS.items():
        if skip_compile and overrides["optim.compile"]:
            rows[name] = {"skipped": "--skip-compile"}
        elif time.monotonic() > deadline:
            rows[name] = {"skipped": "--budget-s spent"}
        else:
            rows[name] = guarded(lambda o=overrides: step_figures(config_mod.apply(cfg, o), steps, device), device)
    return rows


def _state(nets: Networks, opt: Optimisers) -> dict[str, torch.Tensor]:
    """Every network tensor and optimiser state tensor, flat and copied to the CPU, plus the scheduler step."""
    out = {f"{n}.{k}": v.detach().cpu().clone() for n, m in nets.named().items()
           for k, v in unwrap(m).state_dict().items()}
    for n, adam in opt.adam.items():
        for i, p in enumerate(p for g in adam.param_groups for p in g["params"]):
            out.update({f"adam.{n}.{i}.{k}": torch.as_tensor(v).detach().cpu().clone()
                        for k, v in adam.state[p].items()})
    out["scheduler.step"] = torch.tensor(opt.step)
    return out


def _params(nets: Networks) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": p.detach().clone() for n, m in nets.named().items() for k, p in unwrap(m).named_parameters()}


def _update(nets: Networks, before: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last step's parameter update, flattened: `(P,)`."""
    return torch.cat([(p - before[k]).flatten().float() for k, p in _params(nets).items()])


def _fresh(cfg: Config, device: torch.device, seed: int) -> tuple[Networks, Optimisers]:
    seed_everything(seed)
    nets = place_networks(build_networks(cfg), cfg, device)
    return nets, make_optimisers(nets, cfg, 10)


def resume_figures(cfg: Config, device: torch.device, folder: Path) -> dict[str, Any]:
    """Two steps, `save_state`, one more step; against: fresh networks (another seed), `load_state`, one step.
    Both steps after the checkpoint start from the same reseed, as the loop reseeds every epoch (a checkpoint holds
    no RNG state).

    Passes when the loaded state equals the saved one bit for bit, the resumed step's losses equal the
    uninterrupted step's (relative 1e-4) and its update is within RESUME_UPDATE_TOLERANCE (relative L2) of the
    uninterrupted one (on a CPU all three are exact; GPU kernels that add with atomics are not bitwise
    reproducible).
    """
    micro = random_micro_batches(cfg, device)
    nets, opt = _fresh(cfg, device, cfg.run.seed)
    for _ in range(2):
        gan_step(micro, nets, opt, cfg)
    start = time.perf_counter()
    save_state(folder, cfg, nets, opt, {"epoch": 0, "step": 2, "mlflow_run_id": None})
    save_s = time.perf_counter() - start
    saved, before = _state(nets, opt), _params(nets)
    seed_everything(cfg.run.seed + 1000)
    losses = gan_step(micro, nets, opt, cfg)
    update = _update(nets, before)
    del nets, opt, before
    _free(device)

    nets, opt = _fresh(cfg, device, cfg.run.seed + 1)
    start = time.perf_counter()
    load_state(folder, nets, opt)
    load_s = time.perf_counter() - start
    loaded = _state(nets, opt)
    exact = loaded.keys() == saved.keys() and all(torch.equal(loaded[k], v) for k, v in saved.items())
    before = _params(nets)
    seed_everything(cfg.run.seed + 1000)
    resumed = gan_step(micro, nets, opt, cfg)
    loss_diff = max(abs(resumed[k] - v) / max(abs(v), 1e-12) for k, v in losses.items())
    update_diff = float((_update(nets, before) - update).norm() / update.norm().clamp_min(1e-30))
    return {"save_s": save_s, "load_s": load_s, "state_exact": exact, "loss_rel_diff": loss_diff,
            "update_rel_diff": update_diff,
            "ok": exact and loss_diff <= 1e-4 and update_diff <= RESUME_UPDATE_TOLERANCE}


def synthesis_figures(cfg: Config, device: torch.device) -> dict[str, Any]:
    """One generator forward as `ganbert synthesize` runs it (batch 1, fp32, no grad): seconds and peak memory."""
    seed_everything(cfg.run.seed)
    generator = build_generator(cfg).to(device).eval()
    mri = torch.randn(1, 1, *cfg.geometry.mri_size, device=device)
    with peak_memory(device) as mem, torch.no_grad():
        times = []
        for _ in range(2):  # the first call also selects kernels
            start = time.perf_counter()
            pet = generator(mri)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return {"first_s": times[0], "s": times[1], "peak_mib": mem["peak_mib"], "shape": list(pet.shape),
            "finite": bool(torch.isfinite(pet).all())}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU, torch {torch.__version__}"


def run(cfg: Config, device: torch.device, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Every check on `device`; the report (also written to `out/gpu_check.json`)."""
    cfg = random_data_config(cfg)
    steps, train_steps = args.steps, args.train_steps
    report: dict[str, Any] = {"preset": cfg.preset, "method": cfg.model.method, "machine": machine(device),
                              "batch_size": cfg.optim.batch_size, "accumulation": cfg.optim.accumulation,
                              "steps": steps, "goals": {"samples_per_s": GOAL_SAMPLES_PER_S, "speedup": GOAL_SPEEDUP,
                                                        "apply": cfg.preset == "paper" and device.type == "cuda"}}
    deadline = time.monotonic() + args.budget_s
    report["train"] = guarded(lambda: step_figures(cfg, train_steps, device), device) | {"steps": train_steps}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        report["resume"] = guarded(lambda: resume_figures(cfg, device, Path(tmp) / "checkpoint"), device)
    report["synthesis"] = guarded(lambda: synthesis_figures(cfg, device), device)
    report["speed"] = speed_rows(cfg, steps, device, args.skip_compile, deadline)
    fast, plain = report["speed"]["fast, checkpointing on"], report["speed"]["plain fp32, checkpointing on"]
    report["speedup"] = (fast["samples_per_s"] / plain["samples_per_s"]
                         if "samples_per_s" in fast and "samples_per_s" in plain else None)
    report["imported"] = [m for m in EDGE_MODULES if sys.modules.get(m) is not None]
    report["ok"] = (all(_passed(row) for row in report["speed"].values())
                    and report["train"].get("finite", False) and report["resume"].get("ok", False)
                    and report["synthesis"].get("finite", False) and not report["imported"])
    write_text(out / REPORT, json.dumps(report, indent=2) + "\n")
    return report


def _finite(ok: bool) -> str:
    return "finite" if ok else "NOT FINITE"


def _cells(kind: str, f: dict[str, Any], steps: int) -> list[str]:
    """(result, samples/s, peak MiB, seconds) of one check's figures `f`."""
    if "error" in f or "skipped" in f:
        return [f.get("error") or f"skipped ({f['skipped']})", "", "", ""]
    if kind == "resume":
        return [f"{'EQUAL' if f['ok'] else 'DIFFERENT'}: state {'bitwise equal' if f['state_exact'] else 'DIFFERS'}, "
                f"loss rel. diff {f['loss_rel_diff']:.1e}, update rel. diff {f['update_rel_diff']:.1e}", "", "",
                f"save {f['save_s']:.2f}, load {f['load_s']:.2f}"]
    if kind == "synthesis":
        return [f"output {tuple(f['shape'])} {_finite(f['finite'])}", "", f"{f['peak_mib']:.0f}",
                f"{f['s']:.3f} (first {f['first_s']:.3f})"]
    result = f"{steps} steps, losses {_finite(f['finite'])}"
    if kind == "train":
        result += f", l1 {f['first_losses']['l1']:.3f} -> {f['last_losses']['l1']:.3f}"
    return [result, f"{f['samples_per_s']:.2f}", f"{f['peak_mib']:.0f}",
            f"{f['s_per_step']:.3f}/step, first {f['first_step_s']:.1f}"]


def table(r: dict[str, Any]) -> list[str]:
    """The report as one Markdown table and its goal lines."""
    rows = [("train", "preset settings, random data", _cells("train", r["train"], r["train"]["steps"])),
            ("resume", "save, load, one more step vs uninterrupted", _cells("resume", r["resume"], 1)),
            ("synthesis", "generator forward, batch 1, fp32, no grad", _cells("synthesis", r["synthesis"], 1))]
    rows += [("step speed", name, _cells("step", f, r["steps"])) for name, f in r["speed"].items()]
    lines = [f"gpu-check: preset {r['preset']} ({r['method']}), batch {r['batch_size']} x accumulation "
             f"{r['accumulation']}, on {r['machine']}", "",
             "| check | setting | result | samples/s | peak MiB | seconds |", "| --- | --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join([check, setting, *cells]) + " |" for check, setting, cells in rows]
    rate, speedup = r["speed"]["fast, checkpointing on"].get("samples_per_s"), r["speedup"]
    if r["goals"]["apply"]:
        lines += ["", f"goal >= {GOAL_SAMPLES_PER_S:g} samples/s per GPU (fast, checkpointing on): "
                  + (f"{rate:.2f}, {'met' if rate >= GOAL_SAMPLES_PER_S else 'NOT met'}" if rate else "no figure"),
                  f"goal fast >= {GOAL_SPEEDUP:g}x plain (checkpointing on): "
                  + (f"x{speedup:.2f}, {'met' if speedup >= GOAL_SPEEDUP else 'NOT met'}" if speedup else "no figure")]
    else:
        lines += ["", f"goals (>= {GOAL_SAMPLES_PER_S:g} samples/s per GPU, fast >= {GOAL_SPEEDUP:g}x plain): "
                  "for --preset paper on a GPU, not this run"]
    lines += [f"modules a bare GPU machine lacks, imported: {', '.join(r['imported']) or 'none'}",
              f"checks (finite losses, resume, synthesis, imports): {'PASS' if r['ok'] else 'FAIL'}"]
    return lines


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ganbert.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help=f"folder for {REPORT} (created; an existing report is kept)")
    p.add_argument("--preset", default="paper", choices=sorted(config_mod.PRESETS))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (default); cpu only with --preset tiny or demo (a smoke test of the check)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per speed row (after one warm-up step)")
    p.add_argument("--train-steps", type=int, default=30, help="steps of the training check")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="speed rows not started within this many seconds are skipped (the other checks always run)")
    p.add_argument("--skip-compile", action="store_true",
                   help="skip the torch.compile row (compiling takes minutes on a CPU)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every check passes (the goals are reported, not enforced; a speed row that runs out of
    memory is reported, not failed), 1 when one fails or raises or there is no GPU, 2 for bad arguments."""
    args = parse(argv)
    try:
        if args.steps < 1 or args.train_steps < 1:
            raise ValueError(f"--steps and --train-steps must be >= 1, got {args.steps} and {args.train_steps}")
        if args.device == "cpu" and args.preset == "paper":
            raise ValueError("--preset paper on --device cpu: the paper geometry takes hours on a CPU; "
                             "use --preset tiny or demo for a CPU smoke test")
        out = Path(args.out)
        if (out / REPORT).exists():
            raise ValueError(f"--out {out}: {REPORT} exists; choose another folder or remove it")
    except ValueError as err:
        print(f"gpu-check: {err}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
              "this check needs one. Nothing was run. For a CPU smoke test of the check itself: "
              "--device cpu --preset tiny --skip-compile", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    report = run(config_mod.load(args.preset), device, args, out)
    print("\n".join(table(report)))
    print(f"\nwritten: {out / REPORT}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
