"""The evidence behind the QC thresholds: `ganbert bench qc` scores T1s that must pass and non-T1 inputs that must fail.

Must pass: every phantom T1 at `tiny` and `demo` size (`ganbert phantom`, all subjects' baseline and follow-up T1s)
and the MNI152 head at 2 mm and 1 mm (the nilearn template with the skull and scalp the phantom gives it). Must fail,
generated from a phantom subject at each size: uniform noise, its PETs (frame mean, and one as written, 4D), a
CT-like volume (bright bone, HU), T2-like and FLAIR-like tissue contrasts, the phantom's own FLAIR, the inverted T1,
the skull-stripped T1, the T1 with its top or left half cropped away, a 5-slice slab, a single slice, and voxel sizes
10x and 1/100x. Also tried: files that ship in installed wheels (nibabel's and nilearn's test and template data,
pydicom's test DICOMs). Every input is written to or read from a file and goes through the reader synthesis uses.
"""

from __future__ import annotations

import glob
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import nibabel as nib
import numpy as np

from ganbert.ingest import dicom
from ganbert.ingest.nifti import image_data, stack_frames
from ganbert.prep import qc

PASS, FAIL, WHEEL = "must pass", "must fail", "wheel file"


@dataclass(frozen=True)
class Case:
    """One input: its name, what QC must say (PASS / FAIL / WHEEL: not a whole-head T1, expected to fail) and file."""

    name: str
    expect: str
    path: Path


@dataclass(frozen=True)
class Outcome:
    """QC's verdict on one case: passed, the failed checks (or why it could not be read), scores, wall and CPU
    seconds (QC is single-threaded, so CPU seconds are what a quiet core takes even on a shared machine)."""

    case: Case
    passed: bool
    why: str
    scores: dict[str, object]
    seconds: float
    cpu_seconds: float


def _save(folder: Path, name: str, data: np.ndarray, affine: np.ndarray) -> Path:
    path = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return path


def _variants(raw: Path, size: str, folder: Path, index: int = 0) -> Iterator[Case]:
    """The non-T1 inputs generated from phantom subject `index` of the cohort in `raw`."""
    from ganbert.ingest.adni import ingest
    from ganbert.ingest.phantom import anatomy

    subj = anatomy.make_subject(index, 0)
    scans = [s for s in ingest(raw, 365).scans if s.subject == subj.subject]
    t1 = dicom.read_any(raw / next(s for s in scans if s.kind == "T1").files[0])
    data, aff = t1.data, t1.affine
    tpl = anatomy.template(2)
    coords = anatomy.template_coords(subj, tpl, data.shape, aff)
    gm, wm, csf, skull, scalp = (anatomy.sample_at(m, coords) for m in (tpl.gm, tpl.wm, tpl.csf, tpl.skull, tpl.scalp))
    brain = gm + wm + csf
    rng = np.random.default_rng(index)

    def tissue(values: tuple[float, ...], noise: float) -> np.ndarray:
        img = sum(v * m for v, m in zip(values, (gm, wm, csf, scalp, skull)))
        return img + rng.normal(0.0, noise, img.shape).astype(np.float32)

    def shifted(k: int) -> np.ndarray:
        out = aff.copy()
        out[:3, 3] = aff[:3, :3] @ np.array([0.0, 0.0, float(k)]) + aff[:3, 3]
        return out

    scale = np.diag([10.0, 10.0, 10.0, 1.0])
    tiny = np.diag([0.01, 0.01, 0.01, 1.0])
    z, x = data.shape[2] // 2, data.shape[0] // 2
    made: dict[str, tuple[np.ndarray, np.ndarray]] = {
        "uniform noise": (rng.uniform(0, 1000, data.shape), aff),
        "CT-like (bone bright, HU)": (np.where(brain + scalp + skull > 0.05, 0.0, -1000.0)
                                      + tissue((40, 30, 8, 20, 1400), 5.0), aff),
        "T2-like (CSF bright)": (tissue((0.65, 0.45, 1.0, 0.55, 0.05), 0.02), aff),
        "FLAIR-like (GM > WM, CSF dark)": (tissue((0.75, 0.55, 0.1, 0.6, 0.05), 0.02), aff),
        "inverted T1": (data.max() - data, aff),
        "skull-stripped T1": (data * (brain > 0.5), aff),
        "T1, top half cropped away": (data[:, :, :z], aff),
        "T1, one side (half) cropped away": (data[:x], aff),
        "T1, 5-slice slab": (data[:, :, z - 2: z + 3], shifted(z - 2)),
        "T1, single slice": (data[:, :, z: z + 1], shifted(z)),
        "T1, voxel size x10": (data, aff @ scale),
        "T1, voxel size /100": (data, aff @ tiny),
    }
    for scan in scans:
        if scan.kind == "PET":
            pet = stack_frames([dicom.read_any(raw / f) for f in scan.files])
            made[f"{scan.tracer} PET (frame mean)"] = (pet.data.mean(axis=3), pet.affine)
            if scan.tracer == "AV45":
                made["AV45 PET as written (4D)"] = (pet.data, pet.affine)
    for name, (vol, affine) in made.items():
        yield Case(f"{size}: {name}", FAIL, _save(folder, re.sub(r"[^a-z0-9]+", "-", f"{size} {name}".lower()), vol,
                                                   affine))
    for flair in sorted(glob.glob(str(raw / "ADNI" / subj.subject / "*FLAIR*" / "*" / "*" / "*.nii"))):
        yield Case(f"{size}: phantom FLAIR ({subj.subject})", FAIL, Path(flair))


def _phantom_cases(root: Path, subjects: int) -> Iterator[Case]:
    from ganbert.ingest.adni import ingest
    from ganbert.ingest.phantom import write_cohort

    for size in ("tiny", "demo"):
        raw = write_cohort(root / size, subjects, ("AV45", "AV1451", "FDG"), size, 0, workers=1)
        for scan in sorted((s for s in ingest(raw, 365).scans if s.kind == "T1"), key=lambda s: s.image_id):
            yield Case(f"{size}: phantom T1 {scan.subject} {scan.visit}", PASS, raw / scan.files[0])
        yield from _variants(raw, size, root)


def _template_cases(folder: Path) -> Iterator[Case]:
    from ganbert.ingest.phantom import anatomy
    from ganbert.prep import brainmask

    head, _, affine = brainmask.template()
    yield Case("MNI152 head, 2 mm (the registered template)", PASS, _save(folder, "mni-2mm", head, affine))
    one = anatomy.template(1)
    yield Case("MNI152 head, 1 mm (phantom anatomy)", PASS, _save(folder, "mni-1mm", one.t1, one.affine))


def wheel_files() -> list[tuple[str, Path]]:
    """(label, path) of image files that ship in installed wheels: nibabel's test data, nilearn's templates and test
    images, pydicom's test DICOMs."""
    found: list[tuple[str, Path]] = []
    for module, pattern in (("nibabel", "tests/data/*.nii*"), ("nibabel", "tests/data/*.mgz"),
                            ("nilearn", "datasets/data/*.nii*"), ("pydicom", "data/test_files/*.dcm")):
        try:
            base = Path(__import__(module).__file__).parent
        except ImportError:
            continue
        found += [(f"{module}: {Path(p).name}", Path(p)) for p in sorted(glob.glob(str(base / pattern)))]
    return found


def run_case(case: Case) -> Outcome:
    """Read the case's file as synthesis does (NIfTI or DICOM) and assess it; an unreadable file fails."""
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        data, affine = image_data(dicom.open_image(case.path), str(case.path))
    except Exception as err:  # noqa: BLE001 - what synthesis would reject before QC, reported as such
        text = " ".join(str(getattr(err, "reason", err)).split())
        return Outcome(case, False, f"unreadable: {text[:90]}", {}, time.perf_counter() - t0, time.process_time() - c0)
    report = qc.assess(data, affine)
    return Outcome(case, report.passed, ", ".join(report.failed_checks), report.scores, time.perf_counter() - t0,
                   time.process_time() - c0)


def _score(s: dict[str, object], key: str) -> str:
    v = s.get(key)
    return f"{v:.2f}" if isinstance(v, float) and np.isfinite(v) else "–"


def _grouped(outcomes: list[Outcome]) -> list[Outcome]:
    """Wheel files that could not even be read: one row per package and reason (names joined); other rows as is."""
    out: list[Outcome | tuple[str, str]] = []
    groups: dict[tuple[str, str], list[Outcome]] = {}
    for o in outcomes:
        if o.case.expect == WHEEL and o.why.startswith("unreadable"):
            key = (o.case.name.split(": ", 1)[0], o.why)
            if key not in groups:
                groups[key] = []
                out.append(key)
            groups[key].append(o)
        else:
            out.append(o)

    def merged(key: tuple[str, str]) -> Outcome:
        members = groups[key]
        names = ", ".join(m.case.name.split(": ", 1)[-1] for m in members)
        return Outcome(Case(f"{key[0]}: {names}", WHEEL, members[0].case.path), False, key[1], {},
                       sum(m.seconds for m in members), sum(m.cpu_seconds for m in members))

    return [merged(o) if isinstance(o, tuple) else o for o in out]


def table(outcomes: list[Outcome]) -> list[str]:
    """Markdown rows: input, expected, verdict, failed checks, the image scores, seconds (unreadable wheel files
    grouped by reason)."""
    outcomes = _grouped(outcomes)
    lines = ["| input | expected | QC | failed checks | similarity | coverage | GM/WM | CSF/GM | scalp/WM | s "
             "| CPU s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for o in outcomes:
        ok = o.passed == (o.case.expect == PASS)
        verdict = ("pass" if o.passed else "fail") + ("" if ok else " (WRONG)")
        lines.append(f"| {o.case.name} | {o.case.expect} | {verdict} | {o.why or '–'} | "
                     + " | ".join(_score(o.scores, k) for k in ("similarity", "brain_coverage", "gm_wm", "csf_gm",
                                                               "scalp_wm"))
                     + f" | {o.seconds:.1f} | {o.cpu_seconds:.1f} |")
    return lines


def bench_qc(subjects: int = 6, say: Callable[[str], None] = print) -> list[str]:
    """Run every case; returns the Markdown lines (summary, thresholds, table) for BENCHMARKS.md."""
    if subjects < 1:
        raise ValueError(f"--subjects must be >= 1, got {subjects}")
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="ganbert-qc-") as tmp:
        root = Path(tmp)
        qc.template_regions()  # loaded once, not timed with the first case
        cases = [*_phantom_cases(root, subjects), *_template_cases(root)]
        cases += [Case(label, WHEEL, path) for label, path in wheel_files()]
        for case in cases:
            outcomes.append(run_case(case))
            say(table(outcomes[-1:])[-1])
    must_pass = [o for o in outcomes if o.case.expect == PASS]
    must_fail = [o for o in outcomes if o.case.expect == FAIL]
    wheel = [o for o in outcomes if o.case.expect == WHEEL]
    by_size = {size: [o for o in must_pass if o.case.name.startswith(size)] for size in ("tiny", "demo")}
    by_size["MNI152 head 1 mm"] = [o for o in must_pass if "1 mm" in o.case.name]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"- must pass: {sum(o.passed for o in must_pass)}/{len(must_pass)} passed; must fail: "
             f"{sum(not o.passed for o in must_fail)}/{len(must_fail)} failed; wheel files: "
             f"{sum(not o.passed for o in wheel)}/{len(wheel)} failed ({sum(o.passed for o in wheel)} passed)",
             "- QC time per T1 (read, template registration, scores; one thread), median CPU s (wall s): "
             + ", ".join(f"{k} {statistics.median(o.cpu_seconds for o in v):.1f} "
                         f"({statistics.median(o.seconds for o in v):.1f})" for k, v in by_size.items() if v)
             + f"; 1-min load average at the end {load:.1f}",
             "- thresholds: " + ", ".join(f"{k} {v}" for k, v in vars(qc.THRESHOLDS).items()), ""]
    return lines + table(outcomes)
