"""PET synthesis from T1 MRI: one file, or a folder of them on Ray Data, written as 4D NIfTI in PET units.

What a synthesised file is:
- The T1 is conformed exactly as training did (`data.grid.conform_mri`: RAS cube of geometry.mri_size,
  centred on the input's field of view, percentiles to 0..255 uint8), normalised with its own mean and std,
  run through the generator, and restored to PET units with the same MRI statistics (`metrics.restore_pet`).
- The output array is float32 (d, h, w, T): geometry.pet_size voxels of geometry.pet_voxel_mm and
  geometry.pet_frames frames. Its affine is `grid.pet_affine` of the conformed MRI affine: RAS axes,
  centred on the same world point as the input's field of view, so it overlays the input T1 in any viewer.
- qform and sform both hold that affine with the input's coordinate-system code (its sform code if set,
  else its qform code, else 1 = scanner): the output lies in the same world space as the input.
- xyzt units are mm and s; the 4th axis is the T frame groups of training (its pixdim is nominal).
- Nothing of the input header is copied: descrip is a fixed "ganbert synthetic PET <tracer>", aux_file,
  intent_name and db_name stay empty.
Every file is written atomically (a temporary file in the target folder, then os.replace).
"""

from __future__ import annotations

import argparse
import csv
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np
import torch
from nibabel.spatialimages import SpatialImage
from torch import nn

from ganbert import reference
from ganbert.atomic import write_csv
from ganbert.config import Config
from ganbert.data import dicom
from ganbert.data.nifti import VolumeError, is_nifti_name
from ganbert.data.grid import conform_mri, pet_affine
from ganbert.metrics import mri_stats, normalise_mri, restore_pet
from ganbert.mlflow_model import load_model
from ganbert.progress import Progress

OUTPUT_SUFFIX = "_pet.nii.gz"
REPORT = "synthesis.csv"
REPORT_COLUMNS = ("input", "output", "status", "reason")
DESCRIP = "ganbert synthetic PET"
SCANNER_CODE = 1  # NIfTI xform code "scanner anatomical", used when the input declares none
LOCAL_RAY_CPUS = 2  # CPUs of a local Ray started here (one model replica per CPU)


@dataclass(frozen=True)
class Result:
    """One synthesised (or rejected) input: status "ok" or "rejected", reason empty when ok."""

    input: str
    output: str
    status: str
    reason: str = ""
    shape: tuple[int, ...] = ()
    vmin: float = float("nan")
    vmax: float = float("nan")


# --- one volume -----------------------------------------------------------------------------------

def generate_pet(generator: nn.Module, mri: np.ndarray, cfg: Config) -> np.ndarray:
    """Conformed uint8 MRI (D, H, W) -> float32 PET (T, d, h, w) in original PET units.

    The MRI is normalised by its own mean and population std (as in training) and the generator's
    normalised output is restored with those statistics. Raises ValueError for a wrong input shape or
    a non-finite generator output.
    """
    g = cfg.geometry
    if mri.shape != tuple(g.mri_size):
        raise ValueError(f"mri must have shape {tuple(g.mri_size)} (geometry.mri_size), got {mri.shape}")
    dev = next(generator.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(mri))[None, None].to(dev)
    mean, std = mri_stats(x)
    with torch.no_grad():
        pet = restore_pet(generator(normalise_mri(x, mean, std)).float(), mean, std)
    expect = (1, g.pet_frames, *g.pet_size)
    if tuple(pet.shape) != expect:
        raise ValueError(f"generator output shape {tuple(pet.shape)} differs from the config's {expect}")
    out = pet[0].cpu().numpy().astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        raise ValueError(f"generator produced {int(out.size - np.isfinite(out).sum())} non-finite voxels")
    return out


def world_code(img: SpatialImage) -> int:
    """NIfTI xform code of the input's world space: sform code if set, else qform code, else 1 (scanner)."""
    header = img.header
    if isinstance(header, (nib.Nifti1Header, nib.Nifti2Header)):
        for key in ("sform_code", "qform_code"):
            code = int(header[key])
            if code > 0:
                return code
    return SCANNER_CODE


def pet_image(pet: np.ndarray, affine: np.ndarray, tracer: str, code: int = SCANNER_CODE) -> nib.Nifti1Image:
    """PET (T, d, h, w) -> a fresh 4D Nifti1Image (d, h, w, T) float32 with `affine` as qform and sform.

    The header holds no input free text: descrip is "ganbert synthetic PET <tracer>", units mm and s.
    """
    if pet.ndim != 4:
        raise ValueError(f"pet must have shape (T, d, h, w), got {pet.shape}")
    data = np.ascontiguousarray(np.moveaxis(np.asarray(pet, dtype=np.float32), 0, -1))
    img = nib.Nifti1Image(data, affine)
    header = img.header
    header.set_data_dtype(np.float32)
    header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=int(code))
    img.set_sform(affine, code=int(code))
    header["descrip"] = f"{DESCRIP} {tracer}"[:79].encode("ascii")
    header["aux_file"] = b""
    header["intent_name"] = b""
    header["db_name"] = b""
    header["cal_min"], header["cal_max"] = float(data.min()), float(data.max())
    return img


def synthesize_volume(generator: nn.Module, cfg: Config, img: SpatialImage) -> nib.Nifti1Image:
    """T1 image (X, Y, Z) in any orientation -> synthetic PET Nifti1Image (d, h, w, T) on the PET grid.

    The affine is `pet_affine(conformed MRI affine, cfg.geometry)` (RAS, centred on the input's field of
    view); values are in original PET units. Raises ValueError (VolumeError) naming the image's file and
    the reason for a bad input: 4D, absurd header, NaN/Inf or constant voxels, no signal.
    """
    mri, mri_affine = conform_mri(img, cfg.geometry)
    pet = generate_pet(generator, mri, cfg)
    return pet_image(pet, pet_affine(mri_affine, cfg.geometry), cfg.geometry.tracer, world_code(img))


# --- files ----------------------------------------------------------------------------------------

def stem(path: Path | str) -> str:
    """File name without .nii / .nii.gz: `sub-01_T1w.nii.gz` -> `sub-01_T1w`."""
    name = Path(path).name
    low = name.lower()
    for suffix in (".nii.gz", ".nii"):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def save_atomic(img: nib.Nifti1Image, path: Path | str) -> Path:
    """Write `img` to `path` (.nii or .nii.gz) via a temporary file in the same folder and os.replace."""
    path = Path(path)
    if not is_nifti_name(path.name):
        raise ValueError(f"output {path}: file name must end in .nii or .nii.gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def synthesize_file(generator: nn.Module, cfg: Config, mri_path: Path | str, out_path: Path | str,
                    overwrite: bool = False) -> Result:
    """Read and validate one T1 file, synthesise, write `out_path` atomically; returns its Result.

    Raises ValueError (VolumeError) naming the file and the reason for a bad input, and ValueError when
    `out_path` exists and `overwrite` is false.
    """
    mri_path, out_path = Path(mri_path), Path(out_path)
    if mri_path.resolve() == out_path.resolve():
        raise ValueError(f"output {out_path}: would overwrite the input")
    if out_path.exists() and not overwrite:
        raise ValueError(f"output {out_path}: exists; pass --overwrite to replace it")
    img = dicom.open_image(mri_path)
    pet = synthesize_volume(generator, cfg, img)
    save_atomic(pet, out_path)
    data = np.asarray(pet.dataobj)
    return Result(str(mri_path), str(out_path), "ok", "", tuple(int(v) for v in data.shape),
                  float(data.min()), float(data.max()))


def output_for(mri_path: Path, out: Path) -> Path:
    """Single-file output: `out` itself (.nii / .nii.gz), or `<out>/<stem>_pet.nii.gz` if `out` is a folder."""
    if out.is_dir():
        return out / f"{stem(mri_path)}{OUTPUT_SUFFIX}"
    if not is_nifti_name(out.name):
        raise ValueError(f"--out {out}: must end in .nii or .nii.gz (or be an existing folder)")
    return out


# --- a folder on Ray Data -------------------------------------------------------------------------

def find_inputs(folder: Path) -> list[Path]:
    """The `*.nii` / `*.nii.gz` files directly in `folder` (not hidden), sorted by name."""
    if not folder.is_dir():
        raise ValueError(f"--mri {folder}: not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti_name(p.name) and not p.name.startswith("."))


def plan_outputs(inputs: list[Path], out: Path) -> tuple[list[tuple[Path, Path]], list[Result]]:
    """Input -> `<out>/<stem>_pet.nii.gz`; a second input with the same stem is rejected, not overwritten."""
    jobs: list[tuple[Path, Path]] = []
    rejected: list[Result] = []
    taken: dict[str, Path] = {}
    for path in inputs:
        name = f"{stem(path)}{OUTPUT_SUFFIX}"
        if name in taken:
            rejected.append(Result(str(path), "", "rejected", f"output name {name} already used by {taken[name].name}"))
            continue
        taken[name] = path
        jobs.append((path, out / name))
    return jobs, rejected


def _reason(err: BaseException) -> str:
    """A one-line rejection reason: a VolumeError's reason, else `Type: message`."""
    if isinstance(err, VolumeError):
        text = err.reason
    else:
        text = f"{type(err).__name__}: {err}"
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


class Synthesizer:
    """Ray Data callable class: loads the model once per actor, synthesises a batch of (input, output) rows."""

    def __init__(self, model: str, tracking_uri: str | None, threads: int = 1) -> None:
        torch.set_num_threads(max(1, int(threads)))  # on a GPU actor, load_model places the generator on CUDA
        self.generator, self.cfg = load_model(model, tracking_uri)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """batch {"index", "input", "output"} (B,) -> {"index", "status", "reason", "vmin", "vmax"} (B,)."""
        rows = []
        for index, src, dst in zip(batch["index"], batch["input"], batch["output"]):
            try:
                res = synthesize_file(self.generator, self.cfg, str(src), str(dst), overwrite=True)
                rows.append((int(index), "ok", "", res.vmin, res.vmax))
            except Exception as err:  # noqa: BLE001 - a bad input is reported and skipped, the rest goes on
                rows.append((int(index), "rejected", _reason(err), float("nan"), float("nan")))
        cols = list(zip(*rows))
        return {"index": np.asarray(cols[0], dtype=np.int64), "status": np.asarray(cols[1], dtype=object),
                "reason": np.asarray(cols[2], dtype=object), "vmin": np.asarray(cols[3], dtype=np.float64),
                "vmax": np.asarray(cols[4], dtype=np.float64)}


def actor_plan(resources: dict[str, float], jobs: int, batch_size: int | None = None) -> dict[str, Any]:
    """Ray Data actor settings: one GPU actor per GPU with batches of `batch_size` (default 4) when the cluster
    has GPUs, else one single-threaded CPU actor per CPU with batch 1."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus >= 1:
        return {"num_gpus": 1, "num_cpus": 1, "size": max(1, min(jobs, gpus)), "batch_size": batch_size or 4}
    return {"num_gpus": 0, "num_cpus": 1, "size": max(1, min(jobs, cpus)), "batch_size": batch_size or 1}


def _run_on_ray(jobs: list[tuple[Path, Path]], model: str, tracking_uri: str | None, num_cpus: int | None,
                batch_size: int | None = None) -> Iterator[Result]:
    """Synthesise every (input, output) job on Ray Data actors; yields Results as they finish (any order)."""
    import ray
    from ray.data import DataContext

    from ganbert.raysession import ensure_ray

    ensure_ray(num_cpus or LOCAL_RAY_CPUS)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    plan = actor_plan(ray.cluster_resources(), len(jobs), batch_size)
    items = [{"index": i, "input": str(src), "output": str(dst)} for i, (src, dst) in enumerate(jobs)]
    blocks = max(1, -(-len(items) // plan["batch_size"]))
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        Synthesizer, fn_constructor_kwargs={"model": model, "tracking_uri": tracking_uri, "threads": 1},
        batch_size=plan["batch_size"], batch_format="numpy", num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"],
        compute=ray.data.ActorPoolStrategy(size=plan["size"]))
    seen = 0
    for r in ds.iter_rows():
        src, dst = jobs[int(r["index"])]
        ok = r["status"] == "ok"
        seen += 1
        yield Result(str(src), str(dst) if ok else "", str(r["status"]), str(r["reason"]),
                     vmin=float(r["vmin"]), vmax=float(r["vmax"]))
    if seen != len(jobs):
        raise RuntimeError(f"Ray Data returned {seen} of {len(jobs)} results")


def write_report(path: Path, results: list[Result]) -> Path:
    """`synthesis.csv` (input, output, status, reason), one row per input in input order; atomic."""
    return write_csv(path, REPORT_COLUMNS, ([r.input, r.output, r.status, r.reason] for r in results))


def append_report(path: Path, result: Result) -> None:
    """Append one row to `synthesis.csv` as soon as its input is done (header first when the file is new)."""
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(REPORT_COLUMNS)
        writer.writerow([result.input, result.output, result.status, result.reason])
        fh.flush()


def split_finished(jobs: list[tuple[Path, Path]], overwrite: bool) -> tuple[list[tuple[Path, Path]], list[Result]]:
    """(jobs still to run, Results of outputs already there): a rerun resumes; `overwrite` redoes everything."""
    if overwrite:
        return jobs, []
    todo = [(src, dst) for src, dst in jobs if not dst.exists()]
    done = [Result(str(src), str(dst), "ok", "") for src, dst in jobs if dst.exists()]
    return todo, done


def synthesize_folder(model: str, mri_dir: Path | str, out_dir: Path | str, tracking_uri: str | None = None,
                      num_cpus: int | None = None, overwrite: bool = False,
                      batch_size: int | None = None) -> list[Result]:
    """Synthesise every `*.nii(.gz)` in `mri_dir` to `<out_dir>/<stem>_pet.nii.gz` on Ray Data; write synthesis.csv.

    Outputs already in `out_dir` are kept and not recomputed (a rerun resumes) unless `overwrite`. Each
    result is appended to synthesis.csv as it finishes; at the end the file is rewritten in input order.
    The model is checked first (a bad model raises ValueError before Ray starts). A bad input is rejected
    with its reason and the rest are written. Outputs must be on storage every Ray node sees.
    Returns one Result per input, in sorted input order.
    """
    mri_dir, out_dir = Path(mri_dir).resolve(), Path(out_dir).resolve()
    inputs = find_inputs(mri_dir)
    if not inputs:
        raise ValueError(f"--mri {mri_dir}: no .nii / .nii.gz files in the folder")
    if out_dir == mri_dir:
        raise ValueError(f"--out {out_dir}: must differ from the input folder (outputs would be read as inputs)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: exists and is not a folder (folder mode writes one file per input)")
    local = Path(model).expanduser()
    model_ref = str(local.resolve()) if local.is_dir() else model
    load_model(model_ref, tracking_uri)  # fail fast on a bad model, before any actor starts
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs, rejected = plan_outputs(inputs, out_dir)
    jobs, results = split_finished(jobs, overwrite)
    results += rejected
    report = out_dir / REPORT
    report.unlink(missing_ok=True)
    for r in results:
        append_report(report, r)
    if results and jobs:
        print(f"[synthesize] {len(results) - len(rejected)} outputs already there are kept "
              f"({len(jobs)} to do; --overwrite redoes them)", flush=True)
    progress = Progress("synthesize", len(jobs))
    for r in _run_on_ray(jobs, model_ref, tracking_uri, num_cpus, batch_size) if jobs else ():
        append_report(report, r)
        results.append(r)
        progress.step()
    order = {str(p): i for i, p in enumerate(inputs)}
    results.sort(key=lambda r: order[r.input])
    write_report(report, results)
    return results


# --- CLI ------------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> int:
    """`ganbert synthesize --model URI --mri T1.nii.gz|DIR --out PET.nii.gz|DIR [--tracking-uri URI]
    [--reference-pet REAL_PET [--reference-registration rigid|none]]`.

    Single file: exit 0, or a ValueError naming the file and reason (the CLI exits 2). Folder: exit 1
    when any input was rejected (see <out>/synthesis.csv), else 0.
    """
    mri, out = Path(args.mri), Path(args.out)
    tracking_uri = getattr(args, "tracking_uri", None)
    if mri.is_dir() and not dicom.is_series(mri):
        if getattr(args, "reference_pet", None):
            raise ValueError("--reference-pet: single-file mode only (--mri must be one T1, not a folder)")
        results = synthesize_folder(args.model, mri, out, tracking_uri, overwrite=getattr(args, "overwrite", False),
                                    batch_size=getattr(args, "batch_size", None))
        bad = [r for r in results if r.status != "ok"]
        for r in bad:
            print(f"rejected {r.input}: {r.reason}")
        print(f"synthesize: {len(results) - len(bad)} written, {len(bad)} rejected of {len(results)} inputs "
              f"in {Path(out).resolve()} (see {Path(out).resolve() / REPORT})")
        return 1 if bad else 0
    target = output_for(mri, out)
    overwrite, ref = getattr(args, "overwrite", False), getattr(args, "reference_pet", None)
    for path in (target, reference.report_path(target)) if ref else (target,):
        if path.exists() and not overwrite:
            raise ValueError(f"output {path}: exists; pass --overwrite to replace it")
    dicom.open_image(mri)  # a bad input (NIfTI or DICOM series) is reported before the model is loaded
    if ref:
        dicom.read_any(ref)
    generator, cfg = load_model(args.model, tracking_uri)
    res = synthesize_file(generator, cfg, mri, target, overwrite=overwrite)
    print(f"synthesize: wrote {res.output} shape {res.shape} float32, values {res.vmin:.4g} .. {res.vmax:.4g} "
          f"({cfg.geometry.tracer}, PET units)")
    if ref:
        fake = np.asarray(nib.load(str(target)).dataobj, dtype=np.float32)
        scored = reference.score(fake, ref, mri, cfg.geometry, cfg.geometry.tracer,
                                 getattr(args, "reference_registration", "rigid"))
        path = reference.write_report(reference.report_path(target), scored)
        m, reg = scored["metrics"], scored["registration"]
        print(f"reference: PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}, in-brain PSNR {m['psnr_brain']:.2f}, "
              f"W1 {m['wasserstein']:.2f} (registration {reg['mode']}"
              + (f", MI {reg['mutual_information']:.3f}, rotation {reg['rotation_deg']:.1f} deg" if reg["mode"] == "rigid"
                 else "") + f") -> {path}")
    return 0
