"""The phantom cohort looks like an ADNI download and carries a ground truth that matches its PET."""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from ganbert.ingest import adni, phantom


def _rows(raw: Path) -> list[dict[str, str]]:
    (csv_path,) = raw.glob("*.csv")
    with csv_path.open(newline="") as fobj:
        reader = csv.DictReader(fobj)
        assert tuple(reader.fieldnames or ()) == adni.ADNI_COLUMNS
        return list(reader)


def test_collection_csv_has_adni_columns_and_plausible_values(tiny_cohort: Path) -> None:
    rows = _rows(tiny_cohort)
    assert {r["Group"] for r in rows} == {"CN", "MCI", "AD"}
    assert {r["Modality"] for r in rows} == {"MRI", "PET"}
    for r in rows:
        assert re.fullmatch(r"I\d{7}", r["Image Data ID"]) and re.fullmatch(r"\d{3}_S_\d{4}", r["Subject"])
        assert re.fullmatch(r"\d{1,2}/\d{1,2}/\d{4}", r["Acq Date"]) and not r["Acq Date"].startswith("0")
        acq, downloaded = adni.parse_date(r["Acq Date"]), adni.parse_date(r["Downloaded"])
        assert 2015 <= acq.year and acq < downloaded
        assert 55 <= int(r["Age"]) <= 95 and r["Sex"] in ("M", "F") and r["Format"] == "NiFTI"
    assert len({r["Image Data ID"] for r in rows}) == len(rows)


def test_folder_layout_is_adni(tiny_cohort: Path) -> None:
    for r in _rows(tiny_cohort):
        folders = list((tiny_cohort / "ADNI" / r["Subject"]).glob(f"*/*/{r['Image Data ID']}"))
        assert len(folders) == 1, r
        folder = folders[0]
        assert folder.parent.parent.name == r["Description"].replace(" ", "_")
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}_\d{2}_\d{2}_\d{2}\.0", folder.parent.name)
        assert folder.parent.name[:10] == adni.parse_date(r["Acq Date"]).isoformat()
        files = sorted(folder.iterdir())
        assert files and all(f.name.startswith(f"ADNI_{r['Subject']}_") and r["Image Data ID"] in f.name for f in files)


def test_volumes_are_t1_0_255_and_multiframe_pet(tiny_cohort: Path) -> None:
    t1 = nib.load(str(next(tiny_cohort.glob("ADNI/*/MPRAGE/*/*/*.nii"))))
    data = np.asarray(t1.dataobj)
    assert t1.shape == phantom.SIZES["tiny"].t1_shape and data.min() >= 0 and data.max() == 255
    assert nib.aff2axcodes(t1.affine) == ("L", "P", "S")
    av45 = nib.load(str(next(tiny_cohort.glob("ADNI/*/AV45_*/*/*/*.nii.gz"))))
    assert av45.shape == (*phantom.SIZES["tiny"].pet_shape, 4) and nib.aff2axcodes(av45.affine) == ("L", "A", "S")
    fdg = nib.load(str(next(tiny_cohort.glob("ADNI/*/FDG_*/*/*/*.nii.gz"))))
    assert fdg.shape[3] == 6
    tau_frames = sorted(next(tiny_cohort.glob("ADNI/*/AV1451_*/*/*")).glob("*.nii.gz"))
    assert len(tau_frames) == 6 and all(nib.load(str(f)).ndim == 3 for f in tau_frames)


def test_pet_raw_values_span_and_crowd_near_zero(tiny_cohort: Path) -> None:
    for path in tiny_cohort.glob("ADNI/*/*_Co-registered_Dynamic/*/*/*.nii.gz"):
        data = nib.load(str(path)).get_fdata()
        assert -150 < data.min() < -10 and 450 < data.max() < 1100, path.name
        assert np.mean(np.abs(data) < 100) > 0.4  # the background dominates, as in the paper's Fig. 2


def test_ground_truth_matches_groups_and_pathology(tiny_cohort: Path) -> None:
    truth = json.loads((tiny_cohort / "ground_truth.json").read_text())
    subjects = truth["subjects_truth"]
    rows = _rows(tiny_cohort)
    assert {s: t["group"] for s, t in subjects.items()} == {r["Subject"]: r["Group"] for r in rows}
    for subject, t in subjects.items():
        suvr = {tr: v["suvr"] for tr, v in t["tracers"].items()}
        ref = {tr: np.mean([suvr[tr][r] for r in v["reference"]]) for tr, v in t["tracers"].items()}
        assert abs(suvr["AV1451"]["cerebellum_gm"] - 1.0) < 1e-3 and abs(suvr["FDG"]["pons"] - 1.0) < 1e-3
        assert 0.85 < ref["AV45"] < 1.15
        amyloid_ratio = suvr["AV45"]["temporoparietal"] / suvr["AV45"]["cerebellum_gm"]
        assert (amyloid_ratio > 1.4) == t["amyloid_positive"], (subject, amyloid_ratio)
        assert suvr["AV45"]["cerebral_wm"] > 1.4  # white-matter binding of the amyloid tracer
        if t["braak_stage"] >= 1:
            assert suvr["AV1451"]["medial_temporal"] > suvr["AV1451"]["neocortex"] + 0.1
        if t["braak_stage"] >= 5:
            assert suvr["AV1451"]["neocortex"] > 1.1  # stages V-VI reach the neocortex
        fdg_ratio = suvr["FDG"]["temporoparietal"] / suvr["FDG"]["neocortex"]  # temporoparietal hypometabolism
        assert (fdg_ratio < 0.9) == (t["group"] == "AD"), (subject, fdg_ratio)
        regions = nib.load(str(tiny_cohort / t["regions_file"]))
        assert set(np.unique(np.asarray(regions.dataobj))) >= {0, 1, 3, 4, 7, 8}


def test_same_seed_same_files_whatever_the_tracers(tiny_cohort: Path, tmp_path: Path) -> None:
    args = argparse.Namespace(out=str(tmp_path / "one"), subjects=1, tracers="FDG", size="tiny", seed=0)
    assert phantom.main(args) == 0
    for mine in (tmp_path / "one" / "ADNI").rglob("*.nii*"):
        theirs = tiny_cohort / mine.relative_to(tmp_path / "one")
        assert theirs.read_bytes() == mine.read_bytes(), mine.name
    other = phantom.write_cohort(tmp_path / "seed1", 1, ["FDG"], "tiny", 1)
    assert next(other.glob("*.csv")).read_text() != next((tmp_path / "one").glob("*.csv")).read_text()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    import pytest

    for kwargs, field in (({"subjects": 0}, "subjects"), ({"tracers": ["PIB"]}, "tracers"),
                          ({"size": "huge"}, "size"), ({"seed": -1}, "seed")):
        call = {"out": tmp_path, "subjects": 1, "tracers": ["FDG"], "size": "tiny", "seed": 0} | kwargs
        with pytest.raises(ValueError, match=field):
            phantom.write_cohort(**call)


def test_parallel_writers_give_the_same_cohort(tiny_cohort: Path, tmp_path: Path) -> None:
    out = phantom.write_cohort(tmp_path / "par", 2, ["FDG"], "tiny", 0, workers=2)
    files = sorted((out / "ADNI").rglob("*.nii*"))
    assert len(files) == 2 * 2 + 1  # two subjects: T1 + FDG each, and subject 0's FLAIR
    for mine in files:
        assert (tiny_cohort / mine.relative_to(out)).read_bytes() == mine.read_bytes(), mine.name


def test_site_b_is_a_documented_shift_with_its_own_subjects(tiny_cohort: Path, tmp_path: Path) -> None:
    """`ganbert phantom --site B`: other subject ids, the site's ranges in the ground truth, another PET."""
    args = argparse.Namespace(out=str(tmp_path / "b"), subjects=2, tracers="AV45", size="tiny", seed=0, site="B")
    assert phantom.main(args) == 0
    rows = _rows(tmp_path / "b")
    assert {r["Subject"] for r in rows} == {"002_S_7000", "003_S_7001"}
    truth = json.loads((tmp_path / "b" / "ground_truth.json").read_text())
    assert truth["site"] == json.loads(json.dumps(phantom.SITES["B"].__dict__))
    assert "site" not in json.loads((tiny_cohort / "ground_truth.json").read_text())  # site A writes as before
    a, b = phantom.SITES["A"], phantom.SITES["B"]
    assert b.pet_fwhm_mm[0] >= a.pet_fwhm_mm[1] and b.t1_noise[1] > a.t1_noise[1] and b.warp_mm > a.warp_mm
    # the same subject draw (seed 0, index 0) acquired at B: not the PET written at A
    pet_a = nib.load(next((tiny_cohort / "ADNI" / "002_S_6000").rglob("*AV45*.nii.gz"))).get_fdata()[..., 0]
    pet_b = nib.load(next((tmp_path / "b" / "ADNI" / "002_S_7000").rglob("*AV45*.nii.gz"))).get_fdata()[..., 0]
    assert pet_a.shape == pet_b.shape and not np.allclose(pet_a, pet_b)
