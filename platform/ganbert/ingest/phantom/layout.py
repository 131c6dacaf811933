"""Phantom download layout: ADNI folders, file names and collection CSV, standard-space PET, DICOM series."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from ganbert.common.atomic import write_csv, write_text
from ganbert.config import TRACERS
from ganbert.ingest.adni import ADNI_COLUMNS as COLUMNS
from ganbert.ingest.phantom.anatomy import (
    BRAIN_CENTRE,
    REGIONS,
    SIZES,
    Subject,
    grid_affine,
    make_subject,
    rotation_matrix,
    synth_t1,
    t1_anatomy,
)
from ganbert.ingest.phantom.site import SITES
from ganbert.ingest.phantom.uptake import BRAAK_REGIONS, REFERENCE, pet_anatomy, synth_frames, synth_suvr

PET_DESCRIPTIONS = {"AV45": "AV45 Co-registered Dynamic", "AV1451": "AV1451 Co-registered Dynamic",
                    "FDG": "FDG Co-registered Dynamic"}
FLAIR_DESCRIPTION = "Sagittal 3D FLAIR"
DOWNLOADED = dt.date(2024, 1, 15)
HEADER_TEXT = "free text: phantom header"  # must never reach shards, logs or reports


def _atomic_save(img: nib.Nifti1Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name[: -len(suffix)]}{suffix}")
    nib.save(img, str(tmp))
    os.replace(tmp, path)


def _nifti(data: np.ndarray, affine: np.ndarray, dtype: type, descrip: str,
           frame_s: float | None = None) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    if frame_s is not None and data.ndim == 4:
        img.header.set_zooms((*img.header.get_zooms()[:3], frame_s))
    img.header["descrip"] = descrip.encode()[:79]
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def _acq_date(d: dt.date) -> str:
    """ADNI's M/D/YYYY (no leading zeros)."""
    return f"{d.month}/{d.day}/{d.year}"


@dataclass(frozen=True)
class Scan:
    """One scan as written: its CSV row values and where its files went."""

    image_id: str
    modality: str
    description: str
    kind: str
    visit: str
    date: dt.date
    files: tuple[str, ...]


def _scan_dir(root: Path, subj: Subject, description: str, when: dt.datetime, image_id: str) -> Path:
    folder = description.replace(" ", "_").replace("/", "_")
    stamp = f"{when:%Y-%m-%d_%H_%M_%S}.0"
    return root / "ADNI" / subj.subject / folder / stamp / image_id


def _file_name(subj: Subject, modality: str, description: str, when: dt.datetime, series: int, image_id: str,
               suffix: str) -> str:
    folder = description.replace(" ", "_").replace("/", "_")
    mod = "MR" if modality == "MRI" else "PT"
    stamp = f"{when:%Y%m%d%H%M%S}{when.microsecond // 1000:03d}"
    return f"ADNI_{subj.subject}_{mod}_{folder}_br_raw_{stamp}_1_S{series}_{image_id}{suffix}"


PET_SPACES = ("t1", "adni-standard")
# ADNI's "Coreg, Avg, Std Img and Vox Siz" grid (160 x 160 x 96, 1.5 mm) at paper size; smaller phantom sizes keep
# its field of view (240 x 240 x 144 mm) with coarser voxels.
STANDARD_GRIDS = {"tiny": ((48, 48, 29), (5.0, 5.0, 5.0)), "demo": ((80, 80, 48), (3.0, 3.0, 3.0)),
                  "paper": ((160, 160, 96), (1.5, 1.5, 1.5))}
MAX_MOTION_DEG, MAX_MOTION_MM = 10.0, 15.0


def standard_motion(subj: Subject, seed: int, tracer_index: int, brain_world: np.ndarray) -> np.ndarray:
    """(4, 4) true pose of a standard-grid PET: header world (AC-PC-like, brain centre at BRAIN_CENTRE) -> subject
    world.

    The subject's head pose is undone, then a random rigid motion (rotations up to MAX_MOTION_DEG about each
    axis, translation up to MAX_MOTION_MM along each) is applied about the brain centre.
    """
    rng = np.random.default_rng([seed, subj.index, 40 + tracer_index])
    rot = rotation_matrix(np.deg2rad(rng.uniform(-MAX_MOTION_DEG, MAX_MOTION_DEG, 3)))
    shift = rng.uniform(-MAX_MOTION_MM, MAX_MOTION_MM, 3)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = brain_world + shift - rot @ BRAIN_CENTRE
    return out


def standard_affine(size: str) -> np.ndarray:
    """Header affine of the phantom's ADNI standard PET grid (LAS voxel axes, centred on the brain centre)."""
    shape, zooms = STANDARD_GRIDS[size]
    return grid_affine(shape, zooms, (-1, 1, 1), BRAIN_CENTRE)


FORMATS = ("nifti", "dicom")
# Planted in every phantom DICOM header: a test checks that none of them reaches shards, outputs or logs.
DICOM_IDENTITY = {"PatientName": "Planted^Secret^Name", "PatientID": "PLANTED-PID-7731",
                  "PatientBirthDate": "19391231", "OtherPatientIDs": "PLANTED-OTHER-4410",
                  "InstitutionName": "Planted Institution Text"}


def _to_dicom(root: Path, scan: Scan) -> Scan:
    """Rewrite one written scan (its NIfTI files) as a DICOM series in the same folder, one file per slice."""
    paths = [root / f for f in scan.files]
    folder = paths[0].parent
    imgs = [nib.load(str(p)) for p in paths]
    stored, slopes, inters = [], [], []
    for img in imgs:
        raw = np.asarray(img.dataobj.get_unscaled())
        raw = raw[..., None] if raw.ndim == 3 else raw
        for k in range(raw.shape[3]):
            stored.append(raw[..., k])
            slope, inter = img.dataobj.slope, img.dataobj.inter
            slopes.append(1.0 if slope is None or not np.isfinite(slope) else float(slope))
            inters.append(0.0 if inter is None or not np.isfinite(inter) else float(inter))
    data = np.stack(stored, axis=3)
    modality = "MR" if scan.modality == "MRI" else "PT"
    frame_ms = [300_000.0 * k for k in range(data.shape[3])] if modality == "PT" else None
    from ganbert.ingest import dicom

    dicom.write_series(folder, paths[0].name.split(".")[0][:60], data if modality == "PT" else data[..., 0],
                       imgs[0].affine, modality, slopes if modality == "PT" else slopes[0],
                       inters if modality == "PT" else inters[0], frame_ms, DICOM_IDENTITY)
    for p in paths:
        p.unlink()
    return dataclasses.replace(scan, files=(folder.relative_to(root).as_posix(),))


def write_subject(root: Path, subj: Subject, tracers: Sequence[str], size: str, seed: int,
                  pet_space: str = "t1", fmt: str = "nifti") -> tuple[list[Scan], dict[str, Any]]:
    """Write every scan of one subject under root/ADNI and its region map under root/truth; return rows and truth.

    pet_space "t1": each PET shares the T1's world coordinates. "adni-standard": each PET is written on the
    standard grid (STANDARD_GRIDS) under its own random rigid motion; its true pose goes to the truth record.
    """
    if pet_space not in PET_SPACES:
        raise ValueError(f"pet_space must be one of {PET_SPACES}, got {pet_space!r}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    spec = SIZES[size]
    scans: list[Scan] = []
    base_rng = np.random.default_rng([seed, subj.index, 100])
    t1_centre = subj.rotation @ (subj.scale * BRAIN_CENTRE) + subj.centre + base_rng.uniform(-5, 5, 3)
    t1_aff = grid_affine(spec.t1_shape, spec.t1_zooms, (-1, -1, 1), t1_centre)  # LPS voxel axes
    pet_centre = t1_centre + base_rng.uniform(-4, 4, 3)
    pet_aff = grid_affine(spec.pet_shape, spec.pet_zooms, (-1, 1, 1), pet_centre)  # LAS voxel axes
    image_base = 1_000_000 + 100 * subj.index
    series_base = 500_000 + 100 * subj.index

    def when(day: dt.date, rng: np.random.Generator) -> dt.datetime:
        return dt.datetime.combine(day, dt.time(int(rng.integers(8, 17)), int(rng.integers(0, 60)),
                                                int(rng.integers(0, 60)), int(rng.integers(0, 1000)) * 1000))

    mri_list = [("T1", subj.t1_description, "bl", subj.baseline, 0)]
    if subj.follow_up:
        mri_list.append(("T1", subj.t1_description, "y1", subj.baseline + dt.timedelta(days=365), 1))
    if subj.flair:
        mri_list.append(("FLAIR", FLAIR_DESCRIPTION, "bl", subj.baseline, 2))
    t1_anat = t1_anatomy(subj, spec, t1_aff, flair=subj.flair)
    for kind, desc, visit, day, k in mri_list:
        rng = np.random.default_rng([seed, subj.index, 10 + k])
        stamp = when(day, rng)
        image_id = f"I{image_base + k}"
        data = synth_t1(subj, t1_anat, rng, flair=kind == "FLAIR")
        name = _file_name(subj, "MRI", desc, stamp, series_base + k, image_id, ".nii")
        path = _scan_dir(root, subj, desc, stamp, image_id) / name
        _atomic_save(_nifti(data, t1_aff, np.int16, f"{HEADER_TEXT} {subj.subject}"), path)
        scans.append(Scan(image_id, "MRI", desc, kind, visit, day, (path.relative_to(root).as_posix(),)))
    del t1_anat
    brain_world = subj.rotation @ (subj.scale * BRAIN_CENTRE) + subj.centre
    pet_spec, header_aff = spec, pet_aff
    if pet_space == "adni-standard":
        shape, zooms = STANDARD_GRIDS[size]
        pet_spec = dataclasses.replace(spec, pet_shape=shape, pet_zooms=zooms)
        header_aff = standard_affine(size)
    else:
        pet_anat = pet_anatomy(subj, spec, pet_aff)
    truth_rows: dict[str, Any] = {}
    labels_written = False
    for tracer in tracers:
        t_index = TRACERS.index(tracer)
        rng = np.random.default_rng([seed, subj.index, 20 + t_index])
        offset = {"AV45": (-45, 45), "AV1451": (0, 90), "FDG": (-30, 60)}[tracer]
        days = int(rng.integers(offset[0], offset[1] + 1))
        if subj.follow_up and tracer == "AV1451":
            days = int(rng.integers(300, 360))  # nearer the follow-up T1
        day = subj.baseline + dt.timedelta(days=days)
        stamp = when(day, rng)
        image_id = f"I{image_base + 10 + t_index}"
        desc = PET_DESCRIPTIONS[tracer]
        motion = None
        if pet_space == "adni-standard":
            motion = standard_motion(subj, seed, t_index, brain_world)
            pet_aff = motion @ header_aff  # where the voxels really are (subject world)
            pet_anat = pet_anatomy(subj, pet_spec, pet_aff)
        truth = synth_suvr(subj, tracer, pet_anat, rng)
        frames = synth_frames(truth, tracer, pet_spec, rng, subj.site)
        folder = _scan_dir(root, subj, desc, stamp, image_id)
        descrip = f"{HEADER_TEXT} {subj.subject}"
        files: list[str] = []
        if tracer == "AV1451":  # one 3D file per frame, as some converters write dynamic series
            for k in range(frames.shape[3]):
                name = _file_name(subj, "PET", desc, stamp, series_base + 10 + t_index, image_id,
                                  f"_{k + 1:02d}.nii.gz")
                _atomic_save(_nifti(frames[..., k], header_aff, np.int16, descrip), folder / name)
                files.append((folder / name).relative_to(root).as_posix())
        else:
            name = _file_name(subj, "PET", desc, stamp, series_base + 10 + t_index, image_id, ".nii.gz")
            _atomic_save(_nifti(frames, header_aff, np.int16, descrip, frame_s=300.0), folder / name)
            files.append((folder / name).relative_to(root).as_posix())
        scans.append(Scan(image_id, "PET", desc, tracer, "init", day, tuple(files)))
        if not labels_written:
            _atomic_save(_nifti(truth.labels, pet_aff, np.uint8, "regions"),
                         root / "truth" / f"{subj.subject}_regions.nii.gz")
            labels_written = True
        truth_rows[tracer] = {"image_id": image_id, "reference": list(REFERENCE[tracer]), "suvr": truth.regional,
                              "frames": int(frames.shape[3]), "raw_min": round(float(frames.min()), 2),
                              "raw_max": round(float(frames.max()), 2), "pet_space": pet_space}
        if motion is not None:  # T1 world -> PET header world, what PET-to-T1 registration must recover
            truth_rows[tracer]["t1_to_pet_header"] = np.linalg.inv(motion).reshape(-1).round(9).tolist()
    record = {"group": subj.group, "sex": subj.sex, "age": round(subj.age, 1),
              "amyloid_positive": subj.amyloid_positive, "braak_stage": subj.braak_stage,
              "braak_regions": sorted({BRAAK_REGIONS[s] for s in range(1, subj.braak_stage + 1)}),
              "atrophy": round(subj.atrophy, 4),
              "regions_file": f"truth/{subj.subject}_regions.nii.gz" if labels_written else None,
              "tracers": truth_rows,
              "scans": [s.image_id for s in scans]}
    if fmt == "dicom":
        scans = [_to_dicom(root, scan) for scan in scans]
    return scans, record


def _subject_job(args: tuple[str, int, tuple[str, ...], str, int, str, str, str]) -> tuple[list[Scan], dict[str, Any]]:
    """Process-pool entry: write subject `index` of cohort `seed` at a site under `out`."""
    out, index, tracers, size, seed, pet_space, fmt, site = args
    return write_subject(Path(out), make_subject(index, seed, SITES[site]), tracers, size, seed, pet_space, fmt)


def write_cohort(out: Path, subjects: int, tracers: Sequence[str], size: str, seed: int,
                 workers: int | None = None, pet_space: str = "t1", fmt: str = "nifti", site: str = "A") -> Path:
    """Write `subjects` phantom subjects (groups CN/MCI/AD in turn) as an ADNI download under `out`; return `out`.

    Layout: out/ADNI/<subject>/<description>/<YYYY-MM-DD_HH_MM_SS.0>/<image id>/*.nii(.gz), the collection
    CSV out/PHANTOM_<size>_<seed>_<download date>.csv with ADNI's columns, out/ground_truth.json and
    out/truth/<subject>_regions.nii.gz. The same (seed, subject index) always gives the same subject, whichever
    tracers are written and however many `workers` processes write (default: one for tiny, else one per CPU).
    `site` (phantom.SITES) sets the acquisition and population ranges; site B is a cohort shift from the default A.
    """
    if subjects < 1:
        raise ValueError(f"subjects must be >= 1, got {subjects}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    tracers = list(dict.fromkeys(tracers))
    bad = [t for t in tracers if t not in TRACERS]
    if bad or not tracers:
        raise ValueError(f"tracers must be a non-empty subset of {TRACERS}, got {list(tracers)}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if pet_space not in PET_SPACES:
        raise ValueError(f"pet_space must be one of {PET_SPACES}, got {pet_space!r}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if site not in SITES:
        raise ValueError(f"site must be one of {sorted(SITES)}, got {site!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if workers is None:
        workers = 1 if size == "tiny" else min(subjects, os.cpu_count() or 1)
    jobs = [(str(out), index, tuple(tracers), size, seed, pet_space, fmt, site) for index in range(subjects)]
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: safe even when this process already runs Ray or other threads
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_subject_job, jobs))
    else:
        results = [_subject_job(job) for job in jobs]
    rows: list[list[str]] = []
    truth: dict[str, Any] = {}
    for index, (scans, record) in enumerate(results):
        subj = make_subject(index, seed, SITES[site])
        truth[subj.subject] = record
        for scan in scans:
            age = subj.age + (scan.date - subj.baseline).days / 365.25
            rows.append([scan.image_id, subj.subject, subj.group, subj.sex, f"{age:.0f}", scan.visit, scan.modality,
                         scan.description, "Original" if scan.modality == "MRI" else "Pre-processed",
                         _acq_date(scan.date), "DCM" if fmt == "dicom" else "NiFTI", _acq_date(DOWNLOADED)])
    tag = f"{size}_{seed}" if site == "A" else f"{size}_{seed}_site{site}"
    csv_path = out / f"PHANTOM_{tag}_{DOWNLOADED.month}_{DOWNLOADED.day:02d}_{DOWNLOADED.year}.csv"
    write_csv(csv_path, COLUMNS, rows, quoting=csv.QUOTE_ALL)
    meta = {"generator": "ganbert.ingest.phantom", "size": size, "seed": seed, "subjects": subjects,
            "pet_space": pet_space, "format": fmt,
            **({} if site == "A" else {"site": dataclasses.asdict(SITES[site])}),
            "tracers": tracers, "regions": {str(k): v for k, v in REGIONS.items()},
            "reference_regions": {t: list(REFERENCE[t]) for t in tracers},
            "units": "regional SUVR: mean of the noise-free, unblurred SUVR image in each region of the PET grid",
            "subjects_truth": truth}
    write_text(out / "ground_truth.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return out


def main(args: argparse.Namespace) -> int:
    """CLI: `ganbert phantom --out DIR --subjects N --tracers AV45,AV1451,FDG --size tiny --seed S`."""
    tracers = [t.strip() for t in str(args.tracers).split(",") if t.strip()]
    site = str(getattr(args, "site", "A"))
    out = write_cohort(Path(args.out), int(args.subjects), tracers, str(args.size), int(args.seed),
                       pet_space=str(getattr(args, "pet_space", "t1")), fmt=str(getattr(args, "format", "nifti")),
                       site=site)
    print(f"phantom cohort: {args.subjects} subjects, tracers {','.join(tracers)}, size {args.size}, "
          f"seed {args.seed}, site {site} -> {out}")
    return 0
