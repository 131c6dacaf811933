"""PET synthesis from T1 MRI: one file, or a folder of them on Ray Data, written as 4D NIfTI in PET units.

What a synthesised file is:
- The T1 first passes input quality control (`qc`: header checks, then the MNI152 head template registered to it
  and scored); a failing T1 is rejected naming the failed check unless `--skip-qc`, which records the scores and
  goes on.
- The T1 is conformed exactly as training did (`data.grid.conform_mri`: RAS cube of geometry.mri_size,
  centred on the input's field of view, percentiles to 0..255 uint8), normalised with its own mean and std,
  run through every member (each `--model`, and its left-right mirrored input with `--tta`) and restored to PET
  units with the same MRI statistics (`intensity.restore_pet`); the output is the members' mean (`ensemble`).
- The output array is float32 (d, h, w, T): geometry.pet_size voxels of geometry.pet_voxel_mm and
  geometry.pet_frames frames. Its affine is `grid.pet_affine` of the conformed MRI affine: RAS axes,
  centred on the same world point as the input's field of view, so it overlays the input T1 in any viewer.
- qform and sform both hold that affine with the input's coordinate-system code (its sform code if set,
  else its qform code, else 1 = scanner): the output lies in the same world space as the input.
- xyzt units are mm and s; the 4th axis is the T frame groups of training (its pixdim is nominal).
- Nothing of the input header is copied: descrip is a fixed "ganbert synthetic PET <tracer>", aux_file,
  intent_name and db_name stay empty.
Beside `<out>.nii.gz` go `<out>_qc.json` (QC scores, models and their cards, members, regional SUVR with its 90 %
interval over members), `<out>_qc.png` (the QC picture) and, with two or more members, `<out>_sd.nii.gz` (the
voxel-wise SD over members, same grid and affine). Every file is written to a temporary file in the target folder
and moved into place; without `--overwrite` the PET is created only if absent (`atomic.publish`), so two runs on
one folder never replace each other's outputs: whichever run creates an input's PET writes its other files.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage
from torch import nn

from ganbert.common.atomic import create_file, write_csv
from ganbert.common.progress import Progress
from ganbert.config import Config, GeometryConfig
from ganbert.ingest import dicom
from ganbert.ingest.nifti import VolumeError, image_data, is_nifti_name
from ganbert.prep import brainmask, qc
from ganbert.prep.grid import conform_array, conform_mri, pet_affine
from ganbert.serve import atlas, ensemble, reference
from ganbert.serve.qc_picture import qc_png
from ganbert.track.mlflow_model import load_model_and_card
from ganbert.track.model_card import summary as card_summary

OUTPUT_SUFFIX = "_pet.nii.gz"
REPORT = "synthesis.csv"
REPORT_COLUMNS = ("input", "output", "status", "reason")
DESCRIP = "ganbert synthetic PET"
SCANNER_CODE = 1  # NIfTI xform code "scanner anatomical", used when the input declares none
LOCAL_RAY_CPUS = 2  # CPUs of a local Ray started here
KEPT = "kept: written meanwhile by another run"
ALREADY = "kept: already there"


@dataclass(frozen=True)
class Result:
    """One synthesised (or rejected) input: status "ok" or "rejected", reason empty when ok (or says it was kept)."""

    input: str
    output: str
    status: str
    reason: str = ""
    shape: tuple[int, ...] = ()
    vmin: float = float("nan")
    vmax: float = float("nan")
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class Members:
    """The ensemble: generators (one per --model), their names and model-card summaries, the shared config."""

    generators: tuple[nn.Module, ...]
    names: tuple[str, ...]
    cards: tuple[str, ...]
    cfg: Config
    tta: bool = False

    @property
    def size(self) -> int:
        """Members averaged: models x (2 with mirroring)."""
        return len(self.generators) * (2 if self.tta else 1)

    def info(self) -> dict[str, Any]:
        """The models and members as recorded in `_qc.json`."""
        return {"models": [{"model": n, "card": c} for n, c in zip(self.names, self.cards)],
                "tta": self.tta, "members": self.size, "tracer": self.cfg.geometry.tracer}


def load_members(models: Sequence[str], tracking_uri: str | None = None, tta: bool = False) -> Members:
    """Load every model (folder, pyarrow URI or MLflow URI); ValueError when they differ in geometry or tracer."""
    if not models:
        raise ValueError("--model: at least one model is needed")
    loaded = [load_model_and_card(m, tracking_uri) for m in models]
    cfg = ensemble.check_members([c for _, c, _ in loaded], list(models))
    cards = tuple(card_summary(meta) if meta else "no model card (a model published before model cards)"
                  for _, _, meta in loaded)
    return Members(tuple(generator for generator, _, _ in loaded), tuple(models), cards, cfg, tta)


# --- one volume -----------------------------------------------------------------------------------

def world_code(img: SpatialImage) -> int:
    """NIfTI xform code of the input's world space: sform code if set, else qform code, else 1 (scanner)."""
    header = img.header
    if isinstance(header, (nib.Nifti1Header, nib.Nifti2Header)):
        for key in ("sform_code", "qform_code"):
            code = int(header[key])
            if code > 0:
                return code
    return SCANNER_CODE


def pet_image(pet: np.ndarray, affine: np.ndarray, tracer: str, code: int = SCANNER_CODE,
              what: str = "") -> nib.Nifti1Image:
    """PET (T, d, h, w) -> a fresh 4D Nifti1Image (d, h, w, T) float32 with `affine` as qform and sform.

    The header holds no input free text: descrip is "ganbert synthetic PET <tracer>[ <what>]", units mm and s.
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
    header["descrip"] = " ".join(p for p in (DESCRIP, tracer, what) if p)[:79].encode("ascii")
    header["aux_file"] = b""
    header["intent_name"] = b""
    header["db_name"] = b""
    header["cal_min"], header["cal_max"] = float(data.min()), float(data.max())
    return img


def synthesize_volume(generator: nn.Module, cfg: Config, img: SpatialImage) -> nib.Nifti1Image:
    """T1 image (X, Y, Z) in any orientation -> synthetic PET Nifti1Image (d, h, w, T) on the PET grid (no QC).

    The affine is `pet_affine(conformed MRI affine, cfg.geometry)` (RAS, centred on the input's field of
    view); values are in original PET units. Raises ValueError (VolumeError) naming the image's file and
    the reason for a bad input: 4D, absurd header, NaN/Inf or constant voxels, no signal.
    """
    mri, mri_affine = conform_mri(img, cfg.geometry)
    pet = ensemble.member_outputs([generator], mri[None], cfg.geometry)[0, 0]
    return pet_image(pet, pet_affine(mri_affine, cfg.geometry), cfg.geometry.tracer, world_code(img))


# --- an input: checked, then prepared ---------------------------------------------------------------

@dataclass
class Checked:
    """A readable 3D T1 and its QC report (`enforced` false: --skip-qc, a failure did not reject it)."""

    input: str
    data: np.ndarray
    affine: np.ndarray
    code: int
    report: qc.Report
    enforced: bool


def check_input(path: Path | str, skip_qc: bool = False) -> Checked:
    """Read a T1 (NIfTI, DICOM file or series folder) and run QC on it.

    Raises ValueError (VolumeError) naming the file and the reason for an unreadable or 4D input, and naming the
    file and every failed check for an input that fails QC (unless `skip_qc`).
    """
    path = Path(path)
    img = dicom.open_image(path)
    data, affine = image_data(img, str(path))
    if data.ndim == 4:
        raise VolumeError(path, f"T1 is 4D with {data.shape[3]} frames (expected one 3D volume)")
    report = qc.assess(data, affine)
    if not report.passed and not skip_qc:
        raise VolumeError(path, report.reason() + " (--skip-qc overrides)")
    return Checked(str(path), data, affine, world_code(img), report, not skip_qc)


@dataclass
class Prepared:
    """What synthesis needs of one input: the conformed MRI (D, H, W) uint8 with its affine, the world code, the QC
    record, the template registration (T1 world -> template world, None without one) and the atlas on the PET grid."""

    input: str
    mri: np.ndarray
    mri_affine: np.ndarray
    code: int
    qc: dict[str, Any]
    matrix: np.ndarray | None = None
    labels: np.ndarray | None = None


def prepare(checked: Checked, geometry: GeometryConfig) -> Prepared:
    """Conform the checked T1 to the run geometry and carry the atlas onto its PET grid."""
    mri, mri_affine, _, _ = conform_array(checked.data, checked.affine, geometry, checked.input)
    fit = checked.report.registration
    labels = None
    if fit is not None:
        labels = atlas.labels_on_grid(fit.matrix, pet_affine(mri_affine, geometry), geometry.pet_size)
    return Prepared(checked.input, mri, mri_affine, checked.code, checked.report.record(checked.enforced),
                    None if fit is None else fit.matrix, labels)


@dataclass
class Synthesis:
    """The ensemble's output of one input: mean PET and SD (T, d, h, w) (SD None for one member), regional SUVR."""

    pet: np.ndarray
    sd: np.ndarray | None
    regions: dict[str, Any] = field(default_factory=dict)


def synthesize_batch(members: Members, batch: Sequence[Prepared]) -> list[Synthesis]:
    """Every member on a batch of prepared inputs (one forward per generator and view), then mean, SD, regions."""
    g = members.cfg.geometry
    outs = ensemble.member_outputs(members.generators, np.stack([p.mri for p in batch]), g, members.tta)
    results = []
    for b, prep in enumerate(batch):
        mean, sd = ensemble.mean_and_sd(outs[:, b])
        regions = (ensemble.regional(outs[:, b], prep.labels, g.tracer) if prep.labels is not None else
                   {"atlas": atlas.DESCRIPTION,
                    "error": "no template registration (QC stopped before or at it), so no atlas"})
        results.append(Synthesis(mean, sd, regions))
    return results


# --- files ----------------------------------------------------------------------------------------

def stem(path: Path | str) -> str:
    """File name without .nii / .nii.gz: `sub-01_T1w.nii.gz` -> `sub-01_T1w`."""
    name = Path(path).name
    low = name.lower()
    for suffix in (".nii.gz", ".nii"):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def sidecars(out_path: Path | str) -> dict[str, Path]:
    """Every file of one output: pet (`out_path`), sd, qc_json, qc_png (`<out stem>_sd.nii.gz`, `_qc.json`,
    `_qc.png`)."""
    out_path = Path(out_path)
    base = stem(out_path)
    return {"pet": out_path, "sd": out_path.with_name(f"{base}_sd.nii.gz"),
            "qc_json": out_path.with_name(f"{base}_qc.json"), "qc_png": out_path.with_name(f"{base}_qc.png")}


def save_atomic(img: nib.Nifti1Image, path: Path | str, overwrite: bool = True) -> bool:
    """Write `img` to `path` (.nii or .nii.gz) via a temporary file in the same folder: os.replace, or (not
    `overwrite`) only if `path` is absent. Returns False when `path` existed and was kept."""
    path = Path(path)
    if not is_nifti_name(path.name):
        raise ValueError(f"output {path}: file name must end in .nii or .nii.gz")
    return create_file(path, lambda tmp: nib.save(img, str(tmp)), overwrite)


def _qc_record(prep: Prepared, synth: Synthesis, paths: dict[str, Path], info: dict[str, Any]) -> dict[str, Any]:
    return {"input": Path(prep.input).name, "output": paths["pet"].name,
            "sd": paths["sd"].name if synth.sd is not None else None, "qc_picture": paths["qc_png"].name,
            "qc": prep.qc, **info, "regions": synth.regions}


def _short(name: str, limit: int = 56) -> str:
    """A file name cut in the middle to fit a picture title."""
    return name if len(name) <= limit else name[: limit // 2 - 1] + "..." + name[-(limit // 2 - 2):]


def write_outputs(prep: Prepared, synth: Synthesis, out_path: Path | str, geometry: GeometryConfig,
                  info: dict[str, Any], overwrite: bool = False) -> Result:
    """Write the PET, then (as its owner) the SD, `_qc.json` and `_qc.png` of one input; returns its Result.

    Without `overwrite` the PET is created only if absent: when another run created it meanwhile, nothing is
    written and the Result says it was kept.
    """
    paths = sidecars(out_path)
    grid = pet_affine(prep.mri_affine, geometry)
    img = pet_image(synth.pet, grid, geometry.tracer, prep.code)
    if not save_atomic(img, paths["pet"], overwrite):
        return Result(prep.input, str(paths["pet"]), "ok", KEPT)
    written = [paths["pet"]]
    if synth.sd is not None:
        save_atomic(pet_image(synth.sd, grid, geometry.tracer, prep.code, "SD"), paths["sd"])
        written.append(paths["sd"])
    text = json.dumps(_qc_record(prep, synth, paths, info), indent=1, sort_keys=True, allow_nan=False) + "\n"
    create_file(paths["qc_json"], lambda tmp: tmp.write_text(text), overwrite=True)
    brain = None
    if prep.matrix is not None:
        brain = brainmask.on_grid(prep.matrix, prep.mri_affine, geometry.mri_size).astype(bool)
    verdict = "QC passed" if prep.qc["passed"] else "QC FAILED (" + ", ".join(prep.qc["failed_checks"]) + ")"
    title = (f"{_short(Path(prep.input).name)}\n-> {_short(paths['pet'].name)}\n{geometry.tracer}, "
             f"{info.get('members', 1)} member(s); {verdict}")
    create_file(paths["qc_png"], lambda tmp: qc_png(tmp, prep.mri, prep.mri_affine, synth.pet, grid, brain=brain,
                                                    sd=synth.sd, title=title), overwrite=True)
    written += [paths["qc_json"], paths["qc_png"]]
    data = np.asarray(img.dataobj)
    return Result(prep.input, str(paths["pet"]), "ok", "", tuple(int(v) for v in data.shape), float(data.min()),
                  float(data.max()), tuple(str(p) for p in written))


def _as_members(generator: nn.Module | Members, cfg: Config, tta: bool) -> Members:
    if isinstance(generator, Members):
        return generator
    return Members((generator,), ("generator",), ("no model card (a generator given in code)",), cfg, tta)


def synthesize_checked(checked: Checked, members: Members, out_path: Path | str, overwrite: bool = False) -> Result:
    """Prepare a checked T1, run the ensemble, write every output; ValueError when another run created the PET
    meanwhile (not `overwrite`)."""
    geometry = members.cfg.geometry
    prep = prepare(checked, geometry)
    res = write_outputs(prep, synthesize_batch(members, [prep])[0], out_path, geometry, members.info(), overwrite)
    if res.reason == KEPT:
        raise ValueError(f"output {out_path}: created meanwhile by another run; kept (pass --overwrite to replace it)")
    return res


def synthesize_file(generator: nn.Module | Members, cfg: Config, mri_path: Path | str, out_path: Path | str,
                    overwrite: bool = False, *, skip_qc: bool = False, tta: bool = False) -> Result:
    """Check (QC), read and conform one T1, synthesise with one generator or an ensemble, write every output.

    Raises ValueError (VolumeError) naming the file and the reason for a bad input or a failed QC check, and
    ValueError when an output exists and `overwrite` is false.
    """
    mri_path, out_path = Path(mri_path), Path(out_path)
    members = _as_members(generator, cfg, tta)
    if mri_path.resolve() == out_path.resolve():
        raise ValueError(f"output {out_path}: would overwrite the input")
    refuse_existing(planned_outputs(out_path, members.size), overwrite)
    return synthesize_checked(check_input(mri_path, skip_qc), members, out_path, overwrite)


def planned_outputs(out_path: Path, members: int) -> list[Path]:
    """The files one output will have: PET, _qc.json, _qc.png, and _sd.nii.gz with two or more members."""
    paths = sidecars(out_path)
    return [paths["pet"], paths["qc_json"], paths["qc_png"]] + ([paths["sd"]] if members >= 2 else [])


def refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    """ValueError naming the first existing path unless `overwrite`."""
    for path in paths:
        if path.exists() and not overwrite:
            raise ValueError(f"output {path}: exists; pass --overwrite to replace it")


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
    return text if len(text) <= 500 else text[:497] + "..."


_EMPTY = {"mri": b"", "mri_affine": b"", "code": 0, "qc": "", "matrix": b"", "labels": b""}


def prepared_row(index: int, prep: Prepared) -> dict[str, Any]:
    """A Prepared as a Ray Data row (arrays as bytes, the QC record as JSON)."""
    return {"index": index, "status": "ok", "reason": "", "mri": prep.mri.tobytes(),
            "mri_affine": prep.mri_affine.astype(np.float64).tobytes(), "code": int(prep.code),
            "qc": json.dumps(prep.qc), "labels": b"" if prep.labels is None else prep.labels.tobytes(),
            "matrix": b"" if prep.matrix is None else prep.matrix.astype(np.float64).tobytes()}


def _ray_prepare(item: dict[str, Any], geometry: GeometryConfig, skip_qc: bool) -> dict[str, Any]:
    """Ray Data map (CPU task): one input -> its prepared row (QC, conform, atlas) or its rejection."""
    try:
        return prepared_row(item["index"], prepare(check_input(item["input"], skip_qc), geometry))
    except Exception as err:  # noqa: BLE001 - a bad input is reported and skipped, the rest goes on
        return {"index": item["index"], "status": "rejected", "reason": _reason(err), **_EMPTY}


def _prepared(row: dict[str, Any], geometry: GeometryConfig, name: str) -> Prepared:
    """A prepared row back as a Prepared (arrays from bytes)."""
    return Prepared(name, np.frombuffer(row["mri"], np.uint8).reshape(geometry.mri_size),
                    np.frombuffer(row["mri_affine"], np.float64).reshape(4, 4), int(row["code"]), json.loads(row["qc"]),
                    np.frombuffer(row["matrix"], np.float64).reshape(4, 4) if len(row["matrix"]) else None,
                    np.frombuffer(row["labels"], np.uint8).reshape(geometry.pet_size) if len(row["labels"]) else None)


class Synthesizer:
    """Ray Data callable class: loads the members once per actor; one batched forward per member per batch."""

    def __init__(self, models: Sequence[str], tracking_uri: str | None, tta: bool = False, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(max(1, int(threads)))  # on a GPU actor, load_model places the generators on CUDA
        self.members = load_members(models, tracking_uri, tta)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Prepared rows (B,) -> the same rows with "pet", "sd" (float32 bytes) and "regions" (JSON) added.

        The rows that passed preparation run as one batch through every member (`synthesize_batch`).
        """
        geometry = self.members.cfg.geometry
        n = len(batch["index"])
        pets, sds, regions = [b""] * n, [b""] * n, [""] * n
        status, reason = list(batch["status"]), list(batch["reason"])
        ok = [i for i in range(n) if status[i] == "ok"]
        if ok:
            rows = [{k: batch[k][i] for k in _EMPTY} for i in ok]
            try:
                synths = synthesize_batch(self.members, [_prepared(r, geometry, "") for r in rows])
            except Exception as err:  # noqa: BLE001 - reported per input; the rest of the folder goes on
                for i in ok:
                    status[i], reason[i] = "rejected", _reason(err)
                synths = []
            for i, synth in zip(ok, synths):
                pets[i] = synth.pet.astype(np.float32).tobytes()
                sds[i] = b"" if synth.sd is None else synth.sd.astype(np.float32).tobytes()
                regions[i] = json.dumps(synth.regions)
        out = {k: batch[k] for k in ("index", *_EMPTY)}
        return out | {"status": np.asarray(status, dtype=object), "reason": np.asarray(reason, dtype=object),
                      "pet": np.asarray(pets, dtype=object), "sd": np.asarray(sds, dtype=object),
                      "regions": np.asarray(regions, dtype=object)}


def _ray_write(row: dict[str, Any], jobs: list[tuple[str, str]], geometry: GeometryConfig, info: dict[str, Any],
               overwrite: bool) -> dict[str, Any]:
    """Ray Data map (CPU task): write one synthesised row's files; -> index, status, reason, vmin, vmax."""
    index = int(row["index"])
    src, dst = jobs[index]
    base = {"index": index, "status": row["status"], "reason": row["reason"], "vmin": float("nan"),
            "vmax": float("nan")}
    if row["status"] != "ok":
        return base
    geo = geometry
    shape = (geo.pet_frames, *geo.pet_size)
    try:
        synth = Synthesis(np.frombuffer(row["pet"], np.float32).reshape(shape),
                          np.frombuffer(row["sd"], np.float32).reshape(shape) if len(row["sd"]) else None,
                          json.loads(row["regions"]))
        res = write_outputs(_prepared(row, geo, src), synth, dst, geo, info, overwrite)
    except Exception as err:  # noqa: BLE001 - a failed write is reported; the rest goes on
        return base | {"status": "rejected", "reason": _reason(err)}
    return base | {"reason": res.reason, "vmin": res.vmin, "vmax": res.vmax}


def actor_plan(resources: dict[str, float], jobs: int, batch_size: int | None = None) -> dict[str, Any]:
    """Ray Data actor settings: one GPU actor per GPU with batches of `batch_size` (default 4) when the cluster
    has GPUs, else single-threaded CPU actors on half the CPUs (the other half runs QC and writing) with batch 1."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if gpus >= 1:
        return {"num_gpus": 1, "num_cpus": 1, "size": max(1, min(jobs, gpus)), "batch_size": batch_size or 4}
    return {"num_gpus": 0, "num_cpus": 1, "size": max(1, min(jobs, cpus // 2)), "batch_size": batch_size or 1}


def _run_on_ray(jobs: list[tuple[Path, Path]], members: Members, models: Sequence[str], tracking_uri: str | None,
                num_cpus: int | None, batch_size: int | None = None, skip_qc: bool = False,
                overwrite: bool = False) -> Iterator[Result]:
    """QC + conform (CPU tasks) -> batched ensemble forwards (actors) -> writing (CPU tasks), streamed on Ray Data;
    yields Results as inputs finish (any order)."""
    import ray

    from ganbert.common.raysession import ensure_ray
    from ganbert.store.datacontext import quiet_data_context

    ensure_ray(num_cpus or LOCAL_RAY_CPUS)
    quiet_data_context()
    plan = actor_plan(ray.cluster_resources(), len(jobs), batch_size)
    geometry = members.cfg.geometry
    items = [{"index": i, "input": str(src)} for i, (src, _) in enumerate(jobs)]
    ds = (ray.data.from_items(items, override_num_blocks=len(items))
          .map(_ray_prepare, fn_kwargs={"geometry": geometry, "skip_qc": skip_qc}, num_cpus=1)
          .map_batches(Synthesizer, fn_constructor_kwargs={"models": list(models), "tracking_uri": tracking_uri,
                                                           "tta": members.tta, "threads": 1},
                       batch_size=plan["batch_size"], batch_format="numpy", num_cpus=plan["num_cpus"],
                       num_gpus=plan["num_gpus"], compute=ray.data.ActorPoolStrategy(size=plan["size"]))
          .map(_ray_write, fn_kwargs={"jobs": [(str(s), str(d)) for s, d in jobs], "geometry": geometry,
                                      "info": members.info(), "overwrite": overwrite}, num_cpus=1))
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
    done = [Result(str(src), str(dst), "ok", ALREADY) for src, dst in jobs if dst.exists()]
    return todo, done


def model_refs(models: Sequence[str]) -> list[str]:
    """Local model folders as absolute paths (Ray workers may run elsewhere); URIs as given."""
    out = []
    for model in models:
        local = Path(model).expanduser()
        out.append(str(local.resolve()) if local.is_dir() else model)
    return out


def synthesize_folder(model: str | Sequence[str], mri_dir: Path | str, out_dir: Path | str,
                      tracking_uri: str | None = None, num_cpus: int | None = None, overwrite: bool = False,
                      batch_size: int | None = None, *, skip_qc: bool = False, tta: bool = False) -> list[Result]:
    """Synthesise every `*.nii(.gz)` in `mri_dir` to `<out_dir>/<stem>_pet.nii.gz` on Ray Data; write synthesis.csv.

    `model`: one model or the ensemble's members. Outputs already in `out_dir` are kept and not recomputed (a rerun
    resumes) unless `overwrite`; an output another run creates meanwhile is kept too (row reason says so). Each result
    is appended to synthesis.csv as it finishes; at the end the file is rewritten in input order. The models are
    loaded and checked first (ValueError before Ray starts). A bad input, or one failing QC, is rejected with its
    reason and the rest are written. Outputs must be on storage every Ray node sees.
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
    refs = model_refs([model] if isinstance(model, str) else list(model))
    members = load_members(refs, tracking_uri, tta)  # fail fast on a bad model, before any actor starts
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
    for r in (_run_on_ray(jobs, members, refs, tracking_uri, num_cpus, batch_size, skip_qc, overwrite)
              if jobs else ()):
        append_report(report, r)
        results.append(r)
        progress.step()
    order = {str(p): i for i, p in enumerate(inputs)}
    results.sort(key=lambda r: order[r.input])
    write_report(report, results)
    return results


# --- CLI ------------------------------------------------------------------------------------------

def _print_single(res: Result, members: Members, out: Path) -> None:
    paths = sidecars(out)
    record = json.loads(paths["qc_json"].read_text())
    q, s = record["qc"], record["qc"]["scores"]
    if "similarity" in s:
        scores = (f"similarity {s['similarity']}, brain coverage {s['brain_coverage']}, GM/WM {s['gm_wm']}, "
                  f"CSF/GM {s['csf_gm']}, scalp/WM {s['scalp_wm']}")
    else:
        scores = "; ".join(q["failures"])
    verdict = "passed" if q["passed"] else "FAILED, not enforced (--skip-qc): " + ", ".join(q["failed_checks"])
    print(f"qc: {verdict} ({scores}) -> {paths['qc_json']}")
    print(f"synthesize: wrote {res.output} shape {res.shape} float32, values {res.vmin:.4g} .. {res.vmax:.4g} "
          f"({members.cfg.geometry.tracer}, PET units, mean of {members.size} member(s))")
    comp = record["regions"].get("composite")
    if members.size >= 2:
        line = f"ensemble: voxel-wise SD over {members.size} members -> {paths['sd']}"
        if comp and comp.get("interval_90"):
            lo, hi = comp["interval_90"]
            line += (f"; composite SUVR {comp['mean']:.3f} (90 % interval {lo:.3f} .. {hi:.3f}), "
                     f"{comp['positive_fraction']:.0%} of members read {comp['positive_if']}")
        print(line)
    print(f"qc picture: {paths['qc_png']}")


def study_members(models: list[str], row: str | None = None) -> list[str]:
    """Each --model as given, except a `ganbert study` (its output folder, or its name under
    `<GANBERT_HOME>/study/`), which stands for the fold checkpoints of one of its trained rows (`row`; may be left out
    when the study trained one row). Raises ValueError naming the study and its rows otherwise."""
    from ganbert.common import home

    out: list[str] = []
    for model in models:
        folder = Path(model).expanduser()
        if not (folder / "study.json").is_file() and "/" not in model and not home.is_uri(model):
            folder = home.home() / "study" / model
        if not (folder / "study.json").is_file():
            out.append(model)
            continue
        cells = [c for c in json.loads((folder / "study.json").read_text())["cells"]
                 if all(c["checkpoints"]) and c["checkpoints"]]
        rows = sorted({c["row"] for c in cells})
        chosen = row or (rows[0] if len(rows) == 1 else None)
        found = [c for c in cells if c["row"] == chosen]
        if not found:
            raise ValueError(f"--model {model}: a study; name one of its trained rows with --study-row ({rows})")
        out += [str(path) for c in found for path in c["checkpoints"]]
    return out


def main(args: argparse.Namespace) -> int:
    """`ganbert synthesize --model URI [--model URI ...] [--tta] [--skip-qc] --mri T1.nii.gz|DIR --out PET.nii.gz|DIR
    [--tracking-uri URI] [--reference-pet REAL_PET [--reference-registration rigid|none]]`.

    Single file: exit 0, or a ValueError naming the file and reason (the CLI exits 2), a failed QC check included.
    Folder: exit 1 when any input was rejected (see <out>/synthesis.csv), else 0.
    """
    mri, out = Path(args.mri), Path(args.out)
    tracking_uri = getattr(args, "tracking_uri", None)
    models = study_members([args.model] if isinstance(args.model, str) else list(args.model),
                           getattr(args, "study_row", None))
    skip_qc, tta = bool(getattr(args, "skip_qc", False)), bool(getattr(args, "tta", False))
    overwrite = bool(getattr(args, "overwrite", False))
    if mri.is_dir() and not dicom.is_series(mri):
        if getattr(args, "reference_pet", None):
            raise ValueError("--reference-pet: single-file mode only (--mri must be one T1, not a folder)")
        results = synthesize_folder(models, mri, out, tracking_uri, overwrite=overwrite,
                                    batch_size=getattr(args, "batch_size", None), skip_qc=skip_qc, tta=tta)
        bad = [r for r in results if r.status != "ok"]
        for r in bad:
            print(f"rejected {r.input}: {r.reason}")
        print(f"synthesize: {len(results) - len(bad)} written, {len(bad)} rejected of {len(results)} inputs "
              f"in {Path(out).resolve()} (see {Path(out).resolve() / REPORT})")
        return 1 if bad else 0
    target = output_for(mri, out)
    ref = getattr(args, "reference_pet", None)
    size = len(models) * (2 if tta else 1)
    refuse_existing(planned_outputs(target, size) + ([reference.report_path(target)] if ref else []), overwrite)
    checked = check_input(mri, skip_qc)  # a bad input or a failed QC check is reported before any model is loaded
    if ref:
        dicom.read_any(ref)
    members = load_members(models, tracking_uri, tta)
    for name, card in zip(members.names, members.cards):
        print(f"model {name}: {card}")
    res = synthesize_checked(checked, members, target, overwrite)
    _print_single(res, members, target)
    if ref:
        fake = np.asarray(nib.load(str(target)).dataobj, dtype=np.float32)
        scored = reference.score(fake, ref, mri, members.cfg.geometry, members.cfg.geometry.tracer,
                                 getattr(args, "reference_registration", "rigid"))
        path = reference.write_report(reference.report_path(target), scored)
        m, reg = scored["metrics"], scored["registration"]
        print(f"reference: PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}, in-brain PSNR {m['psnr_brain']:.2f}, "
              f"W1 {m['wasserstein']:.2f} (registration {reg['mode']}"
              + (f", MI {reg['mutual_information']:.3f}, rotation {reg['rotation_deg']:.1f} deg"
                 if reg["mode"] == "rigid" else "") + f") -> {path}")
    return 0
