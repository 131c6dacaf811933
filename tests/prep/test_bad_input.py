"""Bad inputs end in rejected.csv with a precise reason, and every good pair is still written."""

from __future__ import annotations

import re

import pytest

from ganbert.ingest import adni
from ganbert.store import shards


def _reasons(corpus, case: str) -> list[str]:
    image_id = corpus.cases[case]
    issues = adni.read_issues(corpus.out / "rejected.csv")
    return [f"{i.stage}: {i.reason} [{i.file}]" for i in issues if i.image_id == image_id]


def _assert_rejected(corpus, case: str, pattern: str) -> None:
    reasons = _reasons(corpus, case)
    assert reasons, f"{case}: image {corpus.cases[case]} not in rejected.csv"
    assert any(re.search(pattern, r) for r in reasons), f"{case}: {reasons} do not match {pattern!r}"
    written = {r["pet_image_id"] for r in shards.read_manifest(corpus.out)["rows"]} | \
              {r["mri_image_id"] for r in shards.read_manifest(corpus.out)["rows"]}
    assert corpus.cases[case] not in written


def test_good_pairs_all_written(bad_corpus) -> None:
    manifest = shards.read_manifest(bad_corpus.out)
    written = [r for r in manifest["rows"] if not r["subject"].startswith("9")]
    assert len(written) == bad_corpus.good_pairs
    assert len({r["pet_image_id"] for r in written}) == bad_corpus.good_pairs
    assert shards.verify(bad_corpus.out) == []


def test_exit_status_and_summary_count_rejections(bad_corpus) -> None:
    rejected = adni.read_issues(bad_corpus.out / "rejected.csv")
    n = len({(i.file, i.image_id, i.reason) for i in rejected})
    assert bad_corpus.exit_code == 1
    assert f"{n} rejected" in bad_corpus.stdout
    assert n >= len(bad_corpus.cases)
    assert {i.image_id for i in rejected} >= set(bad_corpus.cases.values())


def test_truncated_nii(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "t1_truncated_nii", r"^header: truncated: file has \d+ bytes, its header needs \d+")


def test_truncated_gz(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "pet_truncated_gz", r"truncated or corrupt|not a readable NIfTI")


def test_not_nifti(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "t1_not_nifti", r"^header: not a readable NIfTI file")


def test_folder_without_nifti(bad_corpus) -> None:
    # DICOM series are read now (data.dicom); this one is a bare preamble without pixel data
    _assert_rejected(bad_corpus, "pet_dicom_only", r"^header: missing pixel data")


def test_2d_image(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "t1_2d_image", r"wrong dimensionality: shape \(\d+, \d+\)")


def test_5d_image(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "pet_5d_image", r"wrong dimensionality: shape \(8, 8, 8, 2, 3\)")


def test_nan_voxels(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "t1_nan_voxels", r"^data: 8 non-finite voxels \(NaN/Inf\)")


def test_inf_voxels(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "pet_inf_voxels", r"^data: 1 non-finite voxels \(NaN/Inf\)")


def test_constant_image(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "t1_constant", r"^data: constant image \(every voxel = 100\)")


def test_zero_voxel_size(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "t1_zero_voxel_size", r"^header: absurd header: voxel size \(0\.0, ")


def test_negative_voxel_size(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "pet_negative_voxel_size", r"^header: absurd header: voxel size \([\d.]+, -3\.0, ")


def test_enormous_dims(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "t1_enormous_dims", r"^header: absurd header: dimension 0 has 30000 voxels")


def test_t1_with_several_frames(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "t1_4d_several_frames", r"^header: T1 is 4D with 3 frames")


def test_pet_with_too_few_frames(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "pet_single_frame", r"^header: PET has 1 frame\(s\); geometry.pet_frames needs")


def test_pet_outside_t1_space(bad_corpus) -> None:
    # rigid registration (the default) recovers any plausible offset; 2 m is not plausible
    _assert_rejected(bad_corpus, "pet_outside_t1_space",
                     r"^data: registration quality check failed: the PET lies \d+ mm")


def test_csv_row_missing_file(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "csv_row_missing_file", r"^tree: missing file: no folder ADNI/\d+_S_\d+/\*/\*/I\d+/")


def test_symlink_outside_root(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "symlink_outside_root", r"^tree: file resolves outside the download root")


def test_path_column_outside_root(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "path_column_outside_root",
                     r"^csv: Path '\.\./outside/elsewhere\.nii\.gz' points outside the download root")


def test_duplicate_image_id(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "duplicate_image_id", r"^csv: duplicate image id I\d+ with different content in rows")
    assert len(_reasons(bad_corpus, "duplicate_image_id")) == 2  # both rows


def test_implausible_age(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "implausible_age", r"^csv: implausible Age '250'")


def test_malformed_acq_date(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "malformed_acq_date", r"^csv: Acq Date: date '13/45/2019' is not M/D/YYYY")


def test_implausible_acq_date(bad_corpus) -> None:
    _assert_rejected(bad_corpus, "implausible_acq_date", r"^csv: implausible Acq Date '1/1/1890' \(before 1990-01-01\)")


def test_pet_of_rejected_t1_is_reported_unpaired(bad_corpus) -> None:
    unpaired = adni.read_issues(bad_corpus.out / "unpaired.csv")
    nan_subject = next(i.subject for i in adni.read_issues(bad_corpus.out / "rejected.csv")
                       if i.image_id == bad_corpus.cases["t1_nan_voxels"])
    reasons = [i.reason for i in unpaired if i.subject == nan_subject]
    assert any(re.match(r"its T1 I\d+ was rejected", r) for r in reasons), reasons


@pytest.mark.parametrize("name", ["rejected.csv", "unpaired.csv", "pairs.csv", "manifest.json"])
def test_reports_name_files_relative_to_the_root(bad_corpus, name: str) -> None:
    text = (bad_corpus.out / name).read_text()
    assert str(bad_corpus.raw) not in text  # no absolute user paths in reports
