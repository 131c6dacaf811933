"""ADNI ingest: collection CSV(s) and the ADNI/ folder tree -> classified scans, PET-T1 pairs, and reports."""

from __future__ import annotations

import csv
import datetime as dt
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ganbert.common.atomic import write_csv
from ganbert.ingest import dicom
from ganbert.ingest.nifti import VolumeError, inside, is_nifti_name, load_header

ADNI_COLUMNS = ("Image Data ID", "Subject", "Group", "Sex", "Age", "Visit", "Modality", "Description", "Type",
                "Acq Date", "Format", "Downloaded")
REQUIRED = ("Image Data ID", "Subject", "Modality", "Description", "Acq Date")
PATH_COLUMN = "Path"  # optional, not ADNI's: a file or folder relative to the download root
MIN_DATE = dt.date(1990, 1, 1)
MIN_AGE, MAX_AGE = 18.0, 120.0
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

_T1 = re.compile(r"MP-?RAGE|\bMPR\b|IR-?F?SPGR|\bT1\b|T1W|T1-WEIGHTED|\bBRAVO\b|\bTFE\b", re.I)
_NOT_T1 = re.compile(r"FLAIR|\bT2\b|T2\*|\bPD\b|DTI|DWI|DIFFUSION|FMRI|BOLD|RESTING|\bASL\b|PERFUSION|LOCALI[SZ]ER|"
                     r"SCOUT|CALIBRATION|FIELD.?MAP|\bB0\b|SWI|\bGRE\b|HIPPOCAMP|\bHHP\b|SURVEY", re.I)
_TRACERS = {
    "AV45": re.compile(r"AV-?45|FLORBETAPIR|AMYVID", re.I),
    "AV1451": re.compile(r"AV-?1451|FLORTAUCIPIR|TAUVID|\bT807\b", re.I),
    "FDG": re.compile(r"\bFDG\b|FLUORODEOXYGLUCOSE", re.I),
}
_OTHER_TRACERS = re.compile(r"\bFBB\b|FLORBETABEN|\bPIB\b|PITTSBURGH|\bNAV\b|MK-?6240|\bPI-?2620|\bFMM\b|"
                            r"FLUTEMETAMOL", re.I)


class Unpairable(ValueError):
    """A scan that is not a T1 or a supported PET (not an error of the input)."""


@dataclass(frozen=True)
class Issue:
    """A scan or CSV row left out: `file` is relative to the download root (or `csv:line`)."""

    file: str
    image_id: str
    subject: str
    stage: str
    reason: str


@dataclass(frozen=True)
class Scan:
    """A classified scan: kind "T1" or "PET" (tracer set), its files relative to the download root."""

    image_id: str
    subject: str
    group: str
    sex: str
    age: float | None
    visit: str
    modality: str
    description: str
    kind: str
    tracer: str
    acq_date: dt.date
    files: tuple[str, ...]
    frames: int
    source: str


@dataclass(frozen=True)
class Pair:
    """A PET with the same subject's T1 nearest in acquisition date; `note` explains a tie-break."""

    pet: Scan
    mri: Scan
    days_apart: int
    note: str = ""

    @property
    def subject(self) -> str:
        return self.pet.subject

    @property
    def tracer(self) -> str:
        return self.pet.tracer

    @property
    def group(self) -> str:
        return self.pet.group or self.mri.group


@dataclass
class Ingest:
    """Everything ingest found: usable scans, pairs, rejected inputs (bad) and unpaired scans (not bad)."""

    root: Path
    scans: list[Scan] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    rejected: list[Issue] = field(default_factory=list)
    unpaired: list[Issue] = field(default_factory=list)


def parse_date(text: str) -> dt.date:
    """ADNI's M/D/YYYY (also YYYY-MM-DD) -> date; ValueError otherwise."""
    text = text.strip()
    for fmt in ("%m/%d/%Y", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise ValueError(f"date {text!r} is not M/D/YYYY")


def classify(modality: str, description: str) -> tuple[str, str]:
    """(Modality, Description) -> ("T1", "") or ("PET", tracer); raises Unpairable with the reason otherwise."""
    mod = modality.strip().upper()
    if mod in ("MRI", "MR"):
        if _NOT_T1.search(description):
            raise Unpairable(f"MRI sequence is not T1-weighted ({description!r})")
        if _T1.search(description):
            return "T1", ""
        raise Unpairable(f"MRI sequence not recognised as T1-weighted ({description!r})")
    if mod in ("PET", "PT"):
        found = [name for name, rx in _TRACERS.items() if rx.search(description)]
        if len(found) > 1:
            raise Unpairable(f"ambiguous PET tracer: Description {description!r} names {', '.join(found)}")
        if found:
            return "PET", found[0]
        if _OTHER_TRACERS.search(description):
            raise Unpairable(f"PET tracer not supported (only AV45, AV1451, FDG): {description!r}")
        raise Unpairable(f"PET tracer not recognised from Description {description!r}")
    raise Unpairable(f"modality {modality!r} is neither MRI nor PET")


def collection_csvs(root: Path) -> list[Path]:
    """The CSV files directly under the download root (sorted); ingest reads those with ADNI's columns."""
    return sorted(p for p in Path(root).iterdir() if p.is_file() and p.suffix.lower() == ".csv"
                  and not p.name.startswith("."))


def natural(name: str) -> list[object]:
    """Sort key that orders digit runs by value: I2 before I10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def index_tree(root: Path) -> dict[str, list[Path]]:
    """Image id -> image folders found as root/ADNI/<subject>/<description>/<date>/<image id>/ (symlinks kept)."""
    base = Path(root) / "ADNI"
    found: dict[str, list[Path]] = defaultdict(list)
    if not base.is_dir():
        return found
    def dirs(p: Path) -> list[Path]:
        try:
            return sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
        except OSError:
            return []
    for subject in dirs(base):
        for desc in dirs(subject):
            for date in dirs(desc):
                for image in dirs(date):
                    found[image.name].append(image)
    return found


@dataclass
class _Row:
    values: dict[str, str]
    source: str


def _read_rows(csv_path: Path, rejected: list[Issue]) -> list[_Row]:
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fobj:
            reader = csv.DictReader(fobj)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED if c not in header]
            if missing:
                rejected.append(Issue(csv_path.name, "", "", "csv", f"not an ADNI collection CSV: missing columns "
                                      f"{', '.join(missing)}"))
                return []
            rows = []
            for line, raw in enumerate(reader, start=2):
                values = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in raw.items()}
                rows.append(_Row(values, f"{csv_path.name}:{line}"))
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        rejected.append(Issue(csv_path.name, "", "", "csv", f"unreadable CSV ({type(err).__name__}: {err})"))
        return []


def _check_row(row: _Row, today: dt.date) -> str:
    """Reason the row is unusable, or "" when its fields are plausible."""
    v = row.values
    for col in REQUIRED:
        if not v.get(col):
            return f"empty {col!r}"
    if not _SAFE.match(v["Image Data ID"]) or ".." in v["Image Data ID"]:
        return f"unsafe Image Data ID {v['Image Data ID']!r} (letters, digits, _ . - only)"
    if not _SAFE.match(v["Subject"]) or ".." in v["Subject"]:
        return f"unsafe Subject {v['Subject']!r} (letters, digits, _ . - only)"
    try:
        day = parse_date(v["Acq Date"])
    except ValueError as err:
        return f"Acq Date: {err}"
    if day < MIN_DATE:
        return f"implausible Acq Date {v['Acq Date']!r} (before {MIN_DATE.isoformat()})"
    if day > today:
        return f"implausible Acq Date {v['Acq Date']!r} (in the future)"
    if v.get("Age"):
        try:
            age = float(v["Age"])
        except ValueError:
            return f"Age {v['Age']!r} is not a number"
        if not MIN_AGE <= age <= MAX_AGE:
            return f"implausible Age {v['Age']!r} (outside {MIN_AGE:g}..{MAX_AGE:g})"
    return ""


def _content(row: _Row) -> tuple[str, ...]:
    return tuple(row.values.get(c, "") for c in ADNI_COLUMNS if c != "Downloaded") + (row.values.get(PATH_COLUMN, ""),)


def _rel(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _resolve_files(root: Path, row: _Row, tree: dict[str, list[Path]]) -> tuple[list[Path], Issue | None]:
    """The NIfTI files of one row, or the Issue that rejects it (missing, outside root, duplicate, not NIfTI)."""
    v = row.values
    image_id, subject = v["Image Data ID"], v["Subject"]
    def issue(file: str, reason: str, stage: str = "tree") -> tuple[list[Path], Issue]:
        return [], Issue(file, image_id, subject, stage, reason)
    given = v.get(PATH_COLUMN, "")
    if given:
        target = Path(given) if os.path.isabs(given) else root / given
        if not inside(root, target):
            return issue(row.source, f"Path {given!r} points outside the download root", "csv")
        if not target.exists():
            return issue(given, f"missing file: Path {given!r} does not exist")
        folder = target if target.is_dir() else None
        candidates = [target] if folder is None else sorted(folder.iterdir(), key=lambda p: natural(p.name))
    else:
        folders = tree.get(image_id, [])
        if not folders:
            return issue(row.source, f"missing file: no folder ADNI/{subject}/*/*/{image_id}/ under the download root")
        if len(folders) > 1:
            return issue(_rel(root, folders[0]), f"duplicate image id {image_id}: {len(folders)} folders "
                                                 f"({', '.join(_rel(root, f) for f in folders)})")
        folder = folders[0]
        owner = folder.parent.parent.parent.name
        if owner != subject:
            return issue(_rel(root, folder), f"image folder is under subject {owner}, the CSV says {subject}")
        if not inside(root, folder):
            return issue(_rel(root, folder), "image folder resolves outside the download root (symlink)")
        candidates = sorted(folder.iterdir(), key=lambda p: natural(p.name))
    files = [p for p in candidates if p.is_file() and not p.name.startswith(".") and is_nifti_name(p.name)]
    where = _rel(root, folder) if folder is not None else given
    if not files:  # a DICOM series: the folder (or the one enhanced multi-frame file named by Path) is the image
        series = [p for p in candidates if p.is_file() and not p.name.startswith(".") and dicom.is_dicom_file(p)]
        if series:
            files = [folder] if folder is not None else series[:1]
    if not files:
        others = [p.name for p in candidates if not p.name.startswith(".")]
        if not others:
            return issue(where, "missing file: image folder is empty")
        return issue(where, f"no NIfTI file (.nii/.nii.gz) or DICOM series for the image: found {', '.join(others[:3])}"
                            f"{' ...' if len(others) > 3 else ''}")
    for f in files:
        if not inside(root, f):
            return issue(_rel(root, f), "file resolves outside the download root (symlink)")
    return files, None


def ingest(root: Path, window_days: int = 365, min_frames: int = 1, check_headers: bool = True,
           today: dt.date | None = None) -> Ingest:
    """Read every collection CSV under `root`, find each scan's files, classify, validate headers and pair.

    A PET is paired with the same subject's T1 nearest in acquisition date with |days| <= window_days
    (ties: the earlier T1, then the lower image id; noted on the pair). Bad rows/files go to `rejected`,
    scans that are fine but cannot be used (other sequences, tracers, no T1 in the window) to `unpaired`.
    `min_frames`: a PET with fewer frames is rejected (preprocessing groups frames into that many).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"raw: download root {root} is not a directory")
    if window_days < 0:
        raise ValueError(f"window_days must be >= 0, got {window_days}")
    if min_frames < 1:
        raise ValueError(f"min_frames must be >= 1, got {min_frames}")
    today = today or dt.date.today()
    out = Ingest(root=root)
    csvs = collection_csvs(root)
    rows: list[_Row] = []
    for path in csvs:
        rows.extend(_read_rows(path, out.rejected))
    if not rows:
        raise ValueError(f"raw: no collection CSV with columns {', '.join(REQUIRED)} and rows in {root}")
    by_id: dict[str, list[_Row]] = defaultdict(list)
    for row in rows:
        reason = _check_row(row, today)
        if reason:
            out.rejected.append(Issue(row.source, row.values.get("Image Data ID", ""), row.values.get("Subject", ""),
                                      "csv", reason))
        else:
            by_id[row.values["Image Data ID"]].append(row)
    tree = index_tree(root)
    scans: list[Scan] = []
    for image_id in sorted(by_id, key=natural):
        group_rows = by_id[image_id]
        if len({_content(r) for r in group_rows}) > 1:
            where = ", ".join(r.source for r in group_rows)
            for r in group_rows:
                out.rejected.append(Issue(r.source, image_id, r.values["Subject"], "csv",
                                          f"duplicate image id {image_id} with different content in rows {where}"))
            continue
        row = group_rows[0]
        v = row.values
        try:
            kind, tracer = classify(v["Modality"], v["Description"])
        except Unpairable as why:
            out.unpaired.append(Issue(row.source, image_id, v["Subject"], "classify", str(why)))
            continue
        files, problem = _resolve_files(root, row, tree)
        if problem is not None:
            out.rejected.append(problem)
            continue
        if kind == "T1" and len(files) > 1:
            out.rejected.append(Issue(_rel(root, files[0].parent), image_id, v["Subject"], "tree",
                                      f"{len(files)} NIfTI files for one T1 image "
                                      f"({', '.join(f.name for f in files[:3])})"))
            continue
        frames = 0
        if check_headers:
            try:
                for f in files:
                    if f.is_dir() or dicom.is_dicom_file(f):
                        shape = dicom.series_frames(dicom.dicom_files(f) if f.is_dir() else [f])
                    else:
                        _, shape = load_header(f)
                    extra = shape[3] if len(shape) == 4 else 1
                    if kind == "T1" and extra > 1:
                        raise VolumeError(f, f"T1 is 4D with {extra} frames (expected one 3D volume)")
                    if kind == "PET" and len(files) > 1 and extra > 1:
                        raise VolumeError(f, "PET frame files must each be 3D when a scan has several files")
                    frames += extra
            except VolumeError as err:
                out.rejected.append(Issue(_rel(root, Path(err.path)), image_id, v["Subject"], "header", err.reason))
                continue
            if kind == "PET" and frames < min_frames:
                out.rejected.append(Issue(_rel(root, files[0]), image_id, v["Subject"], "header",
                                          f"PET has {frames} frame(s); "
                                          f"geometry.pet_frames needs at least {min_frames}"))
                continue
        age = float(v["Age"]) if v.get("Age") else None
        scans.append(Scan(image_id=image_id, subject=v["Subject"], group=v.get("Group", ""), sex=v.get("Sex", ""),
                          age=age, visit=v.get("Visit", ""), modality=v["Modality"], description=v["Description"],
                          kind=kind, tracer=tracer, acq_date=parse_date(v["Acq Date"]),
                          files=tuple(_rel(root, f) for f in files), frames=frames, source=row.source))
    out.scans = scans
    out.pairs, unpaired = pair_scans(scans, window_days)
    out.unpaired.extend(unpaired)
    out.rejected.sort(key=lambda i: (i.file, i.image_id, i.reason))
    out.unpaired.sort(key=lambda i: (i.subject, i.image_id))
    return out


def pair_scans(scans: Sequence[Scan], window_days: int) -> tuple[list[Pair], list[Issue]]:
    """Pair each PET with the subject's nearest-dated T1 within the window; return (pairs, unpaired issues)."""
    t1s: dict[str, list[Scan]] = defaultdict(list)
    for s in scans:
        if s.kind == "T1":
            t1s[s.subject].append(s)
    pairs: list[Pair] = []
    unpaired: list[Issue] = []
    used: set[str] = set()
    for pet in sorted((s for s in scans if s.kind == "PET"), key=lambda s: (s.subject, s.tracer, natural(s.image_id))):
        options = sorted(t1s.get(pet.subject, []),
                         key=lambda m: (abs((pet.acq_date - m.acq_date).days), m.acq_date, natural(m.image_id)))
        if not options:
            unpaired.append(Issue(pet.files[0], pet.image_id, pet.subject, "pair", "subject has no usable T1"))
            continue
        best = options[0]
        gap = abs((pet.acq_date - best.acq_date).days)
        if gap > window_days:
            unpaired.append(Issue(pet.files[0], pet.image_id, pet.subject, "pair",
                                  f"no T1 within {window_days} days (nearest {best.image_id} is {gap} days away)"))
            continue
        ties = [m.image_id for m in options if abs((pet.acq_date - m.acq_date).days) == gap]
        note = f"ambiguous: {len(ties)} T1 scans {gap} days away ({', '.join(ties)}); chose {best.image_id}" \
            if len(ties) > 1 else ""
        pairs.append(Pair(pet=pet, mri=best, days_apart=(pet.acq_date - best.acq_date).days, note=note))
        used.add(best.image_id)
    for subject in sorted(t1s):
        for m in t1s[subject]:
            if m.image_id not in used:
                unpaired.append(Issue(m.files[0], m.image_id, subject, "pair", "T1 not the nearest T1 of any PET"))
    return pairs, unpaired


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    write_csv(path, header, rows)


ISSUE_COLUMNS = ("file", "image_id", "subject", "stage", "reason")
PAIR_COLUMNS = ("subject", "group", "tracer", "pet_image_id", "mri_image_id", "pet_date", "mri_date", "days_apart",
                "pet_frames", "pet_files", "mri_file", "note")


def write_issues(path: Path, issues: Iterable[Issue]) -> None:
    """Write issues (rejected.csv or unpaired.csv) atomically, sorted, one row each."""
    rows = sorted({(i.file, i.image_id, i.subject, i.stage, i.reason) for i in issues})
    _write_csv(Path(path), ISSUE_COLUMNS, rows)


def read_issues(path: Path) -> list[Issue]:
    """Read a rejected.csv / unpaired.csv back."""
    with Path(path).open(newline="") as fobj:
        return [Issue(**{k: r[k] for k in ISSUE_COLUMNS}) for r in csv.DictReader(fobj)]


def write_pairs(path: Path, pairs: Iterable[Pair]) -> None:
    """Write the pairing table atomically (files relative to the download root, ';'-joined)."""
    rows = [(p.subject, p.group, p.tracer, p.pet.image_id, p.mri.image_id, p.pet.acq_date.isoformat(),
             p.mri.acq_date.isoformat(), p.days_apart, p.pet.frames, ";".join(p.pet.files), p.mri.files[0], p.note)
            for p in pairs]
    _write_csv(Path(path), PAIR_COLUMNS, rows)
