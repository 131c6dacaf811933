"""Preprocessing on a local Ray: every pair once, values round-trip, no subject leaks, checksums, idempotent reruns."""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ganbert.config import demo
from ganbert.ingest import adni, phantom
from ganbert.ingest.nifti import read_volume, stack_frames
from ganbert.models import intensity
from ganbert.prep import grid, preprocess
from ganbert.store import loader, shards, splits


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _all_rows(out: Path) -> list[dict]:
    return [row for split in shards.SPLITS for row in loader.read_rows(out, split)]


def test_every_pair_present_once(tiny_run) -> None:
    pairs = list(adni.ingest(tiny_run.raw, 365, min_frames=2).pairs)
    rows = _all_rows(tiny_run.out)
    assert tiny_run.summary["pairs"] == len(pairs) == 18
    assert tiny_run.summary["written"] == 18 and tiny_run.summary["rejected"] == 0
    assert sorted(r["pet_image_id"] for r in rows) == sorted(p.pet.image_id for p in pairs)
    assert {(r["subject"], r["tracer"]) for r in rows} == {(p.subject, p.tracer) for p in pairs}
    assert {r["tracer"] for r in rows} == {"AV45", "AV1451", "FDG"}
    assert {r["group"] for r in rows} == {"CN", "MCI", "AD"}
    by_pet = {p.pet.image_id: p.mri.image_id for p in pairs}
    assert all(by_pet[r["pet_image_id"]] == r["mri_image_id"] for r in rows)


def test_values_round_trip(tiny_run) -> None:
    geometry = tiny_run.cfg.geometry
    manifest = shards.read_manifest(tiny_run.out)
    records = {r["pet_image_id"]: r for r in manifest["rows"]}
    for row in _all_rows(tiny_run.out):
        rec = records[row["pet_image_id"]]
        mri_src = tiny_run.raw / rec["sources"]["mri"][0]["path"]
        mri, affine = grid.conform_mri(nib.load(str(mri_src)), geometry)
        assert row["mri"].dtype == np.uint8 and row["mri"].shape == (1, *geometry.mri_size)
        np.testing.assert_array_equal(row["mri"][0], mri)
        np.testing.assert_array_equal(row["mri_affine"], affine)
        assert (row["mri_mean"], row["mri_std"]) == intensity.uint8_mri_stats(mri)
        pet_vol = stack_frames([read_volume(tiny_run.raw / s["path"]) for s in rec["sources"]["pet"]])
        # the PET as registered to its T1 (the transform the manifest records, rounded to 1e-6)
        moved = np.linalg.inv(np.asarray(rec["registration"]["fixed_to_moving"]).reshape(4, 4)) @ pet_vol.affine
        pet = grid.resample_pet(pet_vol.data, moved, affine, geometry)
        assert row["pet"].dtype == np.float32 and row["pet"].shape == (geometry.pet_frames, *geometry.pet_size)
        np.testing.assert_allclose(row["pet"], pet, rtol=0, atol=1e-3 * float(np.abs(pet).max()))
        assert rec["stats"]["mri_mean"] == row["mri_mean"]
        assert rec["stats"]["pet_max"] == pytest.approx(float(pet.max()))


def test_pet_keeps_scanner_units_and_anatomy(tiny_run) -> None:
    """Stored PET is in raw units (not rescaled); FDG is brighter where the T1 shows grey matter than in background."""
    for row in _all_rows(tiny_run.out):
        pet, mri = row["pet"], row["mri"][0]
        assert pet.min() < 0 < 300 < pet.max() < 1200
        if row["tracer"] == "FDG":
            # MRI voxels on the PET grid: nearest MRI voxel of each PET voxel centre
            pet_aff = grid.pet_affine(row["mri_affine"], tiny_run.cfg.geometry)
            idx = np.indices(pet.shape[1:]).reshape(3, -1)
            world = pet_aff[:3, :3] @ idx + pet_aff[:3, 3:4]
            vox = np.rint(np.linalg.solve(row["mri_affine"][:3, :3], world - row["mri_affine"][:3, 3:4])).astype(int)
            ok = np.all((vox >= 0) & (vox < mri.shape[0]), axis=0)
            mri_on_pet = np.zeros(idx.shape[1])
            mri_on_pet[ok] = mri[tuple(vox[:, ok])]
            frame = pet[0].reshape(-1)
            assert frame[mri_on_pet > 60].mean() > 4 * abs(frame[mri_on_pet < 5].mean())


def test_split_has_no_subject_leakage(tiny_run) -> None:
    seen: dict[str, set[str]] = {}
    for row in _all_rows(tiny_run.out):
        seen.setdefault(row["subject"], set()).add(row["split"])
    assert all(len(v) == 1 for v in seen.values()), seen
    assert {next(iter(v)) for v in seen.values()} == {"train", "val", "test"}
    splits = shards.read_manifest(tiny_run.out)["splits"]
    assert {s: next(iter(v)) for s, v in seen.items()} == {s: splits[s] for s in seen}


def test_assign_splits_deterministic_and_sticky() -> None:
    subjects = [f"{i:03d}_S_{i:04d}" for i in range(40)]
    a = splits.assign_splits(subjects)
    assert a == splits.assign_splits(list(reversed(subjects)))
    assert sorted(a.values()).count("test") == 4 and sorted(a.values()).count("val") == 4
    grown = splits.assign_splits(subjects + ["999_S_9999"], existing=a)
    assert {s: grown[s] for s in a} == a  # old subjects never move


def test_manifest_checksums_verify(tiny_run, tmp_path: Path) -> None:
    manifest = shards.read_manifest(tiny_run.out)
    assert shards.verify(tiny_run.out) == []
    for rec in manifest["rows"]:
        for src in rec["sources"]["mri"] + rec["sources"]["pet"]:
            assert shards.sha256_file(tiny_run.raw / src["path"]) == src["sha256"]
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run.out, copy)
    victim = copy / manifest["shards"][0]["file"]
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    problems = shards.verify(copy)
    assert problems and manifest["shards"][0]["file"] in problems[0] and "sha256" in problems[0]


def test_manifest_records_geometry_shapes_and_stats(tiny_run) -> None:
    manifest = shards.read_manifest(tiny_run.out)
    g = tiny_run.cfg.geometry
    assert manifest["geometry"]["mri_size"] == list(g.mri_size) and manifest["geometry"]["pet_size"] == list(g.pet_size)
    assert manifest["geometry"]["pet_frames"] == g.pet_frames
    for rec in manifest["rows"]:
        assert rec["shapes"] == {"mri": [1, *g.mri_size], "pet": [g.pet_frames, *g.pet_size]}
        assert {"mri_mean", "mri_std", "pet_min", "pet_max", "pet_mean"} <= set(rec["stats"])
        assert rec["split"] in shards.SPLITS and rec["shard"].startswith(f"{rec['split']}-{rec['tracer']}-")


def test_shards_are_zstd_tensors_of_bounded_size(tiny_run) -> None:
    geometry = tiny_run.cfg.geometry
    per_shard = int(0.12e6 // shards.row_bytes(geometry))  # the fixture's shard_mb = 0.12 (SHARD_MB)
    manifest = shards.read_manifest(tiny_run.out)
    assert per_shard == 2 and max(s["rows"] for s in manifest["shards"]) == per_shard
    for entry in manifest["shards"]:
        assert entry["bytes"] <= 0.12e6
        pf = pq.ParquetFile(tiny_run.out / entry["file"])
        mri_type, pet_type = pf.schema_arrow.field("mri").type, pf.schema_arrow.field("pet").type
        assert (mri_type.value_type, tuple(mri_type.shape)) == (pa.uint8(), (1, *geometry.mri_size))
        assert (pet_type.value_type, tuple(pet_type.shape)) == (pa.float32(), (geometry.pet_frames, *geometry.pet_size))
        meta = pf.metadata.row_group(0)
        assert {meta.column(i).compression for i in range(meta.num_columns)} == {"ZSTD"}
    groups: dict[tuple[str, str], list[int]] = {}
    for entry in manifest["shards"]:
        groups.setdefault((entry["split"], entry["tracer"]), []).append(entry["rows"])
    assert all(all(n == per_shard for n in rows[:-1]) for rows in groups.values())


def test_rerun_changes_nothing(tiny_run) -> None:
    before = _digests(tiny_run.out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tiny_run.out.glob("*.parquet")}
    summary = preprocess.run(tiny_run.raw, tiny_run.out, tiny_run.cfg, shard_mb=0.1)
    assert summary["written"] == 0 and summary["skipped_existing"] == summary["pairs"] == 18
    assert _digests(tiny_run.out) == before
    assert {p.name: p.stat().st_mtime_ns for p in tiny_run.out.glob("*.parquet")} == mtimes


def test_interrupted_run_resumes_to_identical_shards(tiny_run, tmp_path: Path) -> None:
    """Drop the last shards (as a crash would leave them) and rerun: the same files come back."""
    out = tmp_path / "out"
    shutil.copytree(tiny_run.out, out)
    manifest = shards.read_manifest(out)
    lost = manifest["shards"][-5:]
    for entry in lost:
        (out / entry["file"]).unlink()
    names = {e["file"] for e in lost}
    manifest["shards"] = manifest["shards"][:-5]
    manifest["rows"] = [r for r in manifest["rows"] if r["shard"] not in names]
    shards.save_manifest(out, manifest)
    (out / ".tmp-123-test-AV45-00009.parquet").write_bytes(b"half-written")
    summary = preprocess.run(tiny_run.raw, out, tiny_run.cfg, shard_mb=0.1)
    assert summary["written"] == sum(e["rows"] for e in lost) > 0
    assert _digests(out) == _digests(tiny_run.out)


def test_other_geometry_is_refused(tiny_run) -> None:
    with pytest.raises(ValueError, match=r"geometry: .*mri_size"):
        loader.read_split(tiny_run.out, "train", geometry=demo().geometry)
    with pytest.raises(ValueError, match=r"geometry: .*preprocessed for another geometry"):
        preprocess.run(tiny_run.raw, tiny_run.out, demo())


def test_no_header_free_text_in_outputs(tiny_run) -> None:
    for path in tiny_run.out.iterdir():
        if path.suffix in (".json", ".csv"):
            assert "phantom header" not in path.read_text()
    for entry in shards.read_manifest(tiny_run.out)["shards"]:
        table = pq.read_table(tiny_run.out / entry["file"], columns=list(shards.STRING_COLUMNS))
        assert not any("phantom header" in str(v) for col in table.columns for v in col.to_pylist())
    sample = next(tiny_run.raw.glob("ADNI/*/MPRAGE/*/*/*.nii"))
    assert phantom.HEADER_TEXT.encode() in nib.load(str(sample)).header["descrip"].tobytes()


def test_cli_rerun_exit_zero_and_prints_summary(tiny_run) -> None:
    from ganbert import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(["preprocess", "--raw", str(tiny_run.raw), "--out", str(tiny_run.out), "--preset", "tiny",
                         "--window-days", "365"])
    assert code == 0
    assert "18 pairs, 0 written, 18 already done, 0 rejected" in buf.getvalue()


def test_pairing_table_written(tiny_run) -> None:
    text = (tiny_run.out / "pairs.csv").read_text().splitlines()
    assert text[0].split(",")[:5] == ["subject", "group", "tracer", "pet_image_id", "mri_image_id"]
    assert len(text) == 1 + 18
    unpaired = adni.read_issues(tiny_run.out / "unpaired.csv")
    assert any("not T1-weighted" in i.reason for i in unpaired)


def test_window_excludes_far_t1(tiny_run) -> None:
    near = adni.ingest(tiny_run.raw, 20, min_frames=2)
    assert 0 < len(near.pairs) < 18 and all(abs(p.days_apart) <= 20 for p in near.pairs)
    far = [i for i in near.unpaired if i.reason.startswith("no T1 within 20 days (nearest I")]
    assert len(far) == 18 - len(near.pairs)


def test_real_nibabel_files_through_the_pipeline(tiny_cfg, tmp_path: Path, local_ray: None) -> None:
    """nibabel's own example files as an ADNI download: a 3D T1 (int16, LAS) and 4D PETs (20 and 2 frames)."""
    from nibabel.testing import data_path

    raw = tmp_path / "raw"
    files = {"I1": ("MRI", "MPRAGE", "anatomical.nii"), "I2": ("PET", "FDG Co-registered Dynamic", "functional.nii"),
             "I3": ("PET", "AV45 Co-registered Dynamic", "example4d.nii.gz")}
    lines = ['"Image Data ID","Subject","Group","Sex","Age","Visit","Modality","Description","Type","Acq Date",'
             '"Format","Downloaded"']
    for image_id, (modality, desc, name) in files.items():
        folder = raw / "ADNI" / "100_S_0001" / desc.replace(" ", "_") / "2020-01-02_10_00_00.0" / image_id
        folder.mkdir(parents=True)
        shutil.copy(Path(data_path) / name, folder / f"ADNI_100_S_0001_{image_id}_{name}")
        lines.append(f'"{image_id}","100_S_0001","CN","F","70","bl","{modality}","{desc}","Original","1/2/2020",'
                     f'"NiFTI","1/15/2024"')
    (raw / "REAL_1_15_2024.csv").write_text("\n".join(lines) + "\n")
    summary = preprocess.run(raw, tmp_path / "out", tiny_cfg, val_fraction=0.0, test_fraction=0.0,
                             registration="none", t1_qc=False)  # example images, not a head: headers are trusted
    assert (summary["pairs"], summary["written"], summary["rejected"]) == (2, 2, 0)
    mri, affine = grid.conform_mri(nib.load(str(Path(data_path) / "anatomical.nii")), tiny_cfg.geometry)
    func = nib.load(str(Path(data_path) / "functional.nii"))
    pet = grid.resample_pet(func.get_fdata(dtype=np.float32), func.affine, affine, tiny_cfg.geometry)
    rows = {r["tracer"]: r for r in loader.read_rows(tmp_path / "out", "train")}
    np.testing.assert_array_equal(rows["FDG"]["mri"][0], mri)
    np.testing.assert_array_equal(rows["FDG"]["pet"], pet)
    assert rows["AV45"]["pet"].shape == (2, *tiny_cfg.geometry.pet_size) and np.abs(rows["AV45"]["pet"]).max() > 0
