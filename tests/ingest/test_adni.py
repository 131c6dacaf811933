"""ADNI ingest: classification from Modality/Description, nearest-date pairing within a window, reports."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from ganbert.ingest import adni


@pytest.mark.parametrize("modality, description, expect", [
    ("MRI", "MPRAGE", ("T1", "")),
    ("MRI", "Accelerated Sagittal MPRAGE", ("T1", "")),
    ("MRI", "MPR; GradWarp; B1 Correction; N3; Scaled", ("T1", "")),
    ("MRI", "IR-FSPGR", ("T1", "")),
    ("PET", "AV45 Co-registered Dynamic", ("PET", "AV45")),
    ("PET", "ADNI3-AV-1451 (6x5min)", ("PET", "AV1451")),
    ("PET", "Flortaucipir Coreg, Avg, Standardized Image and Voxel Size", ("PET", "AV1451")),
    ("PET", "ADNI3 FDG (AC)", ("PET", "FDG")),
    ("PT", "Florbetapir 4x5min", ("PET", "AV45")),
])
def test_classify_recognises_t1_and_tracers(modality: str, description: str, expect: tuple[str, str]) -> None:
    assert adni.classify(modality, description) == expect


@pytest.mark.parametrize("modality, description, reason", [
    ("MRI", "Sagittal 3D FLAIR", "not T1-weighted"),
    ("MRI", "Axial DTI", "not T1-weighted"),
    ("MRI", "Field Mapping", "not T1-weighted"),
    ("MRI", "Some sequence", "not recognised as T1"),
    ("PET", "FBB Coreg, Avg", "not supported"),
    ("PET", "AV45 and FDG fused", "ambiguous PET tracer"),
    ("PET", "Brain dynamic", "not recognised"),
    ("CT", "Head CT", "neither MRI nor PET"),
])
def test_classify_explains_what_it_leaves_out(modality: str, description: str, reason: str) -> None:
    with pytest.raises(adni.Unpairable, match=reason):
        adni.classify(modality, description)


def test_parse_date_formats() -> None:
    assert adni.parse_date("4/18/2006") == dt.date(2006, 4, 18)
    assert adni.parse_date("2006-04-18") == dt.date(2006, 4, 18)
    with pytest.raises(ValueError, match="M/D/YYYY"):
        adni.parse_date("18.04.2006")


def _scan(image_id: str, kind: str, day: str, subject: str = "002_S_0001", tracer: str = "") -> adni.Scan:
    return adni.Scan(image_id=image_id, subject=subject, group="CN", sex="F", age=70.0, visit="bl",
                     modality="MRI" if kind == "T1" else "PET", description="", kind=kind, tracer=tracer,
                     acq_date=adni.parse_date(day), files=(f"ADNI/{image_id}.nii",), frames=1, source="x.csv:2")


def test_pairing_picks_nearest_t1_within_window() -> None:
    scans = [_scan("I1", "T1", "1/1/2019"), _scan("I2", "T1", "1/1/2020"),
             _scan("I3", "PET", "10/1/2019", tracer="AV45"),
             _scan("I4", "PET", "3/1/2019", tracer="FDG"), _scan("I5", "PET", "6/1/2022", tracer="AV1451"),
             _scan("I6", "PET", "1/1/2019", subject="003_S_0002", tracer="AV45")]
    pairs, unpaired = adni.pair_scans(scans, 365)
    assert {(p.pet.image_id, p.mri.image_id, p.days_apart) for p in pairs} == {("I3", "I2", -92), ("I4", "I1", 59)}
    reasons = {i.image_id: i.reason for i in unpaired}
    assert reasons["I5"].startswith("no T1 within 365 days (nearest I2 is 882 days away)")
    assert reasons["I6"] == "subject has no usable T1"


def test_pairing_tie_is_deterministic_and_noted() -> None:
    scans = [_scan("I20", "T1", "1/11/2019"), _scan("I10", "T1", "1/1/2019"),
             _scan("I3", "PET", "1/6/2019", tracer="AV45")]
    (pair,), _ = adni.pair_scans(scans, 30)
    assert pair.mri.image_id == "I10"  # the earlier T1 wins a tie
    assert pair.note == "ambiguous: 2 T1 scans 5 days away (I10, I20); chose I10"


def test_ingest_of_phantom_pairs_every_pet(tiny_cohort: Path) -> None:
    ing = adni.ingest(tiny_cohort, 365, min_frames=2)
    assert len(ing.pairs) == 18 and not ing.rejected
    assert {p.tracer for p in ing.pairs} == {"AV45", "AV1451", "FDG"}
    follow_up = [p for p in ing.pairs if p.subject == "011_S_6003" and p.tracer == "AV1451"]
    assert follow_up and follow_up[0].mri.image_id == "I1000301"  # the y1 T1 is nearer than baseline
    tau = next(p for p in ing.pairs if p.tracer == "AV1451")
    assert tau.pet.frames == 6 and len(tau.pet.files) == 6
    assert [i.reason for i in ing.unpaired if i.image_id == "I1000002"] == \
        ["MRI sequence is not T1-weighted ('Sagittal 3D FLAIR')"]


def test_ingest_needs_a_collection_csv(tmp_path: Path) -> None:
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no collection CSV"):
        adni.ingest(tmp_path)
    with pytest.raises(ValueError, match="is not a directory"):
        adni.ingest(tmp_path / "missing")
