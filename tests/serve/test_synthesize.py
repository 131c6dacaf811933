"""PET synthesis: PET grid, finite PET units, the input's world space in any orientation, no header free text,
atomic writes, clear rejections, folder mode on Ray Data, and models from an MLflow URI."""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.testing import data_path
from scipy import ndimage

from ganbert import cli, config
from ganbert.config import Config
from ganbert.models import build_generator
from ganbert.models.saved import load_generator, save_model_dir
from ganbert.prep.grid import conform_mri, fov_centre, pet_affine
from ganbert.serve import synthesize as syn

SECRET = "PATIENT NAME 123"


def _t1(seed: int = 0, shape: tuple[int, int, int] = (48, 48, 40), voxel: float = 4.5) -> nib.Nifti1Image:
    """A smooth random T1-like volume (RAS, off-centre origin) whose header carries identifying free text."""
    rng = np.random.default_rng(seed)
    data = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), 2.5) * 1000.0
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = [-100.0, -120.0, -60.0]
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = SECRET.encode()
    img.header["aux_file"] = b"AUX " + SECRET.encode()
    img.header["intent_name"] = b"PAT123"
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", f"subject {SECRET}".encode()))
    return img


def _flip(img: nib.Nifti1Image, axes: tuple[int, ...]) -> nib.Nifti1Image:
    """The same image with voxel axes `axes` reversed and the affine adjusted: same world content."""
    data, affine = np.asarray(img.dataobj), img.affine.copy()
    for ax in axes:
        data = np.flip(data, ax)
        flip = np.eye(4)
        flip[ax, ax], flip[ax, 3] = -1.0, data.shape[ax] - 1
        affine = affine @ flip
    return nib.Nifti1Image(np.ascontiguousarray(data), affine)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = config.tiny()
    return save_model_dir(tmp_path_factory.mktemp("model") / "tiny", cfg, build_generator(cfg))


@pytest.fixture(scope="module")
def model(model_dir: Path) -> tuple[torch.nn.Module, Config]:
    return load_generator(model_dir)


@pytest.fixture(scope="module")
def t1_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mri") / "sub-01_T1w.nii.gz"
    nib.save(_t1(), str(path))
    return path


def test_output_on_pet_grid_in_pet_units(model: tuple[torch.nn.Module, Config]) -> None:
    generator, cfg = model
    g = cfg.geometry
    img = _t1()
    out = syn.synthesize_volume(generator, cfg, img)
    data = np.asarray(out.dataobj)
    assert data.shape == (*g.pet_size, g.pet_frames) and data.dtype == np.float32
    assert np.isfinite(data).all() and data.std() > 0

    mri, mri_affine = conform_mri(img, g)
    np.testing.assert_allclose(out.affine, pet_affine(mri_affine, g), atol=1e-4)
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    np.testing.assert_allclose(out.header.get_zooms()[:3], g.pet_voxel_mm, rtol=1e-6)
    # The PET grid is centred on the input's field of view: it overlays the T1 in world space.
    np.testing.assert_allclose(fov_centre(out.affine, data.shape), fov_centre(img.affine, img.shape), atol=1e-3)
    # Original PET units: the generator's normalised output times std/10 plus mean/10 of the conformed MRI.
    mean, std = float(mri.mean(dtype=np.float64)), float(mri.std(dtype=np.float64))
    with torch.no_grad():
        norm = generator(torch.from_numpy((mri.astype(np.float32) - mean) / std)[None, None])[0].numpy()
    np.testing.assert_allclose(data, np.moveaxis(norm * std / 10 + mean / 10, 0, -1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("axes", [(0,), (0, 1), (2,)], ids=["LAS", "LPS", "RAI"])
def test_flipped_input_gives_same_world_output(model: tuple[torch.nn.Module, Config], axes: tuple[int, ...]) -> None:
    generator, cfg = model
    img = _t1()
    flipped = _flip(img, axes)
    assert nib.aff2axcodes(flipped.affine) != ("R", "A", "S")
    base, other = syn.synthesize_volume(generator, cfg, img), syn.synthesize_volume(generator, cfg, flipped)
    assert nib.aff2axcodes(other.affine) == ("R", "A", "S")
    np.testing.assert_allclose(other.affine, base.affine, atol=1e-6)
    np.testing.assert_allclose(np.asarray(other.dataobj), np.asarray(base.dataobj), rtol=1e-5, atol=1e-5)


def test_real_las_file_matches_its_ras_copy(model: tuple[torch.nn.Module, Config]) -> None:
    """nibabel's example anatomical.nii is stored LAS; its canonical (RAS) copy synthesises the same PET."""
    generator, cfg = model
    anat = nib.load(os.path.join(data_path, "anatomical.nii"))
    ras = nib.as_closest_canonical(anat)
    assert nib.aff2axcodes(anat.affine) == ("L", "A", "S") and nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    a, b = syn.synthesize_volume(generator, cfg, anat), syn.synthesize_volume(generator, cfg, ras)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)
    np.testing.assert_allclose(np.asarray(a.dataobj), np.asarray(b.dataobj), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fov_centre(a.affine, a.shape), fov_centre(anat.affine, anat.shape), atol=1e-3)


def test_written_header_has_no_input_free_text(model: tuple[torch.nn.Module, Config], t1_file: Path,
                                               tmp_path: Path) -> None:
    generator, cfg = model
    out = tmp_path / "pet.nii.gz"
    res = syn.synthesize_file(generator, cfg, t1_file, out, skip_qc=True)  # a random volume: not a head T1
    assert res.status == "ok" and res.shape == (*cfg.geometry.pet_size, cfg.geometry.pet_frames)
    img = nib.load(str(out))
    hdr = img.header
    assert hdr["descrip"].tobytes().rstrip(b"\0") == f"ganbert synthetic PET {cfg.geometry.tracer}".encode()
    assert hdr["aux_file"].tobytes().strip(b"\0") == b"" and hdr["intent_name"].tobytes().strip(b"\0") == b""
    assert len(hdr.extensions) == 0
    with gzip.open(out, "rb") as fh:
        raw = fh.read()
    assert b"PATIENT" not in raw and b"PAT123" not in raw
    assert hdr.get_xyzt_units() == ("mm", "sec")
    # qform and sform both hold the PET affine with the input's world code (scanner = 1 here).
    assert int(hdr["qform_code"]) == 1 and int(hdr["sform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pet.nii.gz", "pet_qc.json", "pet_qc.png"]  # no temp file
    record = (tmp_path / "pet_qc.json").read_text()
    assert "PATIENT" not in record and "PAT123" not in record


def test_failed_write_keeps_previous_file(model: tuple[torch.nn.Module, Config], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    generator, cfg = model
    out = tmp_path / "pet.nii.gz"
    out.write_bytes(b"previous")
    img = syn.synthesize_volume(generator, cfg, _t1())

    def broken_save(image: nib.Nifti1Image, path: str) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(syn.nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        syn.save_atomic(img, out)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pet.nii.gz"]


def test_cli_single_file(model_dir: Path, t1_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new" / "folder" / "pet.nii.gz"
    assert cli.main(["synthesize", "--model", str(model_dir), "--mri", str(t1_file), "--out", str(out),
                     "--skip-qc"]) == 0
    cfg = config.tiny()
    img = nib.load(str(out))
    assert img.shape == (*cfg.geometry.pet_size, cfg.geometry.pet_frames)
    assert np.isfinite(img.get_fdata()).all()
    printed = capsys.readouterr().out
    assert str(out) in printed and str(img.shape) in printed and "values" in printed
    # An existing folder as --out receives <stem>_pet.nii.gz.
    assert cli.main(["synthesize", "--model", str(model_dir), "--mri", str(t1_file), "--out", str(out.parent),
                     "--skip-qc"]) == 0
    np.testing.assert_array_equal(nib.load(str(out.parent / "sub-01_T1w_pet.nii.gz")).get_fdata(), img.get_fdata())


def test_cli_rejects_bad_inputs_naming_the_file(model_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    four_d = tmp_path / "dyn.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((12, 12, 12, 3), dtype=np.float32), np.eye(4)),
             str(four_d))
    text = tmp_path / "notes.nii.gz"
    text.write_text("this is not an image")
    dicom = tmp_path / "scan.dcm"
    dicom.write_bytes(b"DICM")
    cases = [(four_d, r"T1 is 4D with 3 frames"), (text, r"not a readable NIfTI"),
             (tmp_path / "missing.nii", r"missing file"), (dicom, r"not a readable DICOM file")]
    for path, reason in cases:
        out = tmp_path / f"{path.name}.pet.nii.gz"
        code = cli.main(["synthesize", "--model", str(model_dir), "--mri", str(path), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2, path
        assert str(path) in err and re.search(reason, err), err
        assert not out.exists()


def test_nibabel_4d_example_is_rejected(model: tuple[torch.nn.Module, Config], tmp_path: Path) -> None:
    generator, cfg = model
    path = Path(data_path) / "example4d.nii.gz"
    with pytest.raises(ValueError, match=r"example4d\.nii\.gz: T1 is 4D with 2 frames"):
        syn.synthesize_file(generator, cfg, path, tmp_path / "x.nii.gz")


def test_cli_rejects_bad_out_and_model(model_dir: Path, t1_file: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["synthesize", "--model", str(model_dir), "--mri", str(t1_file),
                     "--out", str(tmp_path / "pet.img")]) == 2
    assert "must end in .nii or .nii.gz" in capsys.readouterr().err
    assert cli.main(["synthesize", "--model", str(tmp_path), "--mri", str(t1_file),
                     "--out", str(tmp_path / "pet.nii.gz"), "--skip-qc"]) == 2
    assert "neither generator.safetensors" in capsys.readouterr().err
    (tmp_path / "taken").write_text("a file")
    assert cli.main(["synthesize", "--model", str(model_dir), "--mri", str(t1_file.parent),
                     "--out", str(tmp_path / "taken")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_folder_mode_on_ray_data(local_ray: None, model_dir: Path, model: tuple[torch.nn.Module, Config],
                                 tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "t1"
    src.mkdir()
    nib.save(_t1(1), str(src / "a.nii.gz"))
    nib.save(_flip(_t1(2), (0,)), str(src / "b.nii"))
    raw = (src / "a.nii.gz").read_bytes()
    (src / "c.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated gzip stream
    (src / "README.txt").write_text("not an input")
    out = tmp_path / "pet"

    code = cli.main(["synthesize", "--model", str(model_dir), "--mri", str(src), "--out", str(out), "--skip-qc"])
    printed = capsys.readouterr().out
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["a_pet.nii.gz", "a_pet_qc.json", "a_pet_qc.png", "b_pet.nii.gz",
                                                     "b_pet_qc.json", "b_pet_qc.png", "synthesis.csv"]
    with (out / "synthesis.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [Path(r["input"]).name for r in rows] == ["a.nii.gz", "b.nii", "c.nii.gz"]
    assert [r["status"] for r in rows] == ["ok", "ok", "rejected"]
    assert rows[0]["output"] == str(out.resolve() / "a_pet.nii.gz") and rows[2]["output"] == ""
    assert "truncated or corrupt voxel data" in rows[2]["reason"]
    assert "rejected" in printed and "c.nii.gz" in printed and "2 written, 1 rejected" in printed
    # The Ray actors compute exactly what single-file synthesis computes.
    generator, cfg = model
    for name, img in (("a", _t1(1)), ("b", _t1(2))):
        expect = syn.synthesize_volume(generator, cfg, img)
        got = nib.load(str(out / f"{name}_pet.nii.gz"))
        np.testing.assert_allclose(got.affine, expect.affine, atol=1e-4)
        np.testing.assert_allclose(got.get_fdata(), np.asarray(expect.dataobj), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_model_from_mlflow_uri(model_dir: Path, t1_file: Path, tmp_path: Path) -> None:
    from ganbert.track.tracking import MLflowTracker

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracker = MLflowTracker(tracking_uri=uri, experiment="t", run_name="r")
    model_uri = tracker.log_model(model_dir)
    tracker.finish()
    assert model_uri and model_uri.startswith("models:/")
    out = tmp_path / "pet.nii.gz"
    assert cli.main(["synthesize", "--model", model_uri, "--mri", str(t1_file), "--out", str(out),
                     "--tracking-uri", uri, "--skip-qc"]) == 0
    generator, cfg = load_generator(model_dir)
    expect = syn.synthesize_volume(generator, cfg, nib.load(str(t1_file)))
    np.testing.assert_allclose(nib.load(str(out)).get_fdata(), np.asarray(expect.dataobj), rtol=1e-6, atol=1e-6)


def test_single_file_refuses_to_overwrite_without_the_flag(model_dir: Path, t1_file: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pet.nii.gz"
    out.write_bytes(b"the user's file")
    assert cli.main(["synthesize", "--model", str(model_dir), "--mri", str(t1_file), "--out", str(out),
                     "--skip-qc"]) == 2
    assert f"output {out}: exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"the user's file"
    assert cli.main(["synthesize", "--model", str(model_dir), "--mri", str(t1_file), "--out", str(out),
                     "--overwrite", "--skip-qc"]) == 0
    assert nib.load(str(out)).shape[-1] == config.tiny().geometry.pet_frames


def test_actor_plan_uses_gpu_actors_with_a_batch_when_the_cluster_has_gpus() -> None:
    assert syn.actor_plan({"CPU": 16, "GPU": 2}, jobs=10) == {"num_gpus": 1, "num_cpus": 1, "size": 2,
                                                              "batch_size": 4}
    # CPU actors on half the CPUs: the other half runs QC/conforming and writing tasks
    assert syn.actor_plan({"CPU": 2}, jobs=10) == {"num_gpus": 0, "num_cpus": 1, "size": 1, "batch_size": 1}
    assert syn.actor_plan({"CPU": 8}, jobs=10, batch_size=3) == {"num_gpus": 0, "num_cpus": 1, "size": 4,
                                                                  "batch_size": 3}
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        syn.actor_plan({"CPU": 8}, jobs=10, batch_size=0)
    assert syn.actor_plan({"CPU": 8, "GPU": 4}, jobs=3, batch_size=8)["size"] == 3


@pytest.mark.slow
def test_folder_mode_rerun_resumes_and_keeps_existing_outputs(local_ray: None, model_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "t1", tmp_path / "pet"
    src.mkdir()
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        nib.save(_t1(seed), str(src / f"{name}.nii.gz"))
    out.mkdir()
    (out / "a_pet.nii.gz").write_bytes(b"finished earlier")  # a previous run's output: kept, not recomputed
    args = ["synthesize", "--model", str(model_dir), "--mri", str(src), "--out", str(out), "--skip-qc"]
    assert cli.main(args) == 0
    assert (out / "a_pet.nii.gz").read_bytes() == b"finished earlier"
    printed = capsys.readouterr().out
    assert "1 outputs already there are kept (2 to do" in printed and "[synthesize] 2/2 done" in printed
    with (out / "synthesis.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [Path(r["input"]).name for r in rows] == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]
    stamp = (out / "b_pet.nii.gz").stat().st_mtime_ns
    assert cli.main(args) == 0  # nothing left to do
    assert (out / "b_pet.nii.gz").stat().st_mtime_ns == stamp
    assert cli.main([*args, "--overwrite"]) == 0
    assert nib.load(str(out / "a_pet.nii.gz")).shape[-1] == config.tiny().geometry.pet_frames


def test_report_rows_are_appended_as_inputs_finish(tmp_path: Path) -> None:
    report = tmp_path / "synthesis.csv"
    syn.append_report(report, syn.Result("a.nii", "a_pet.nii.gz", "ok"))
    syn.append_report(report, syn.Result("b.nii", "", "rejected", "bad header"))
    with report.open() as fh:
        assert list(csv.reader(fh)) == [list(syn.REPORT_COLUMNS), ["a.nii", "a_pet.nii.gz", "ok", ""],
                                        ["b.nii", "", "rejected", "bad header"]]


# --- input QC, ensembles and mirroring, model cards, safe and batched folder mode -----------------------------

def _tiny_model(path: Path, seed: int, **overrides: object) -> Path:
    torch.manual_seed(seed)
    cfg = config.apply(config.tiny(), dict(overrides)) if overrides else config.tiny()
    return save_model_dir(path, cfg, build_generator(cfg))


@pytest.mark.slow
def test_qc_rejects_a_pet_naming_file_and_check_and_skip_qc_records_it(model_dir: Path, static_pet: Path,
                                                                      tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.nii.gz"
    argv = ["synthesize", "--model", str(model_dir), "--mri", str(static_pet), "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{static_pet}: T1 quality control failed: scalp: scalp/WM" in err and "--skip-qc overrides" in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written for a rejected input
    assert cli.main(argv + ["--skip-qc"]) == 0
    record = json.loads((tmp_path / "x_qc.json").read_text())
    assert record["qc"]["passed"] is False and record["qc"]["enforced"] is False
    assert "scalp" in record["qc"]["failed_checks"] and record["input"] == "static_pet.nii.gz"
    assert "qc: FAILED, not enforced (--skip-qc): scalp" in capsys.readouterr().out


@pytest.mark.slow
def test_phantom_t1_gets_pet_qc_json_picture_and_the_model_card_line(phantom_t1: dict[str, Path], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from ganbert.track.model_card import write_model_card

    model = _tiny_model(tmp_path / "model", 0)
    write_model_card(model, config.tiny(), run={"best_epoch": 3, "best_val_psnr": 21.5})
    out = tmp_path / "syn" / "sub_pet.nii.gz"
    assert cli.main(["synthesize", "--model", str(model), "--mri", str(phantom_t1["t1"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"model {model}: ganbert AV45 generator" in printed and "not for diagnosis" in printed
    assert "qc: passed (similarity" in printed and f"qc picture: {tmp_path / 'syn' / 'sub_pet_qc.png'}" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["sub_pet.nii.gz", "sub_pet_qc.json", "sub_pet_qc.png"]
    record = json.loads((out.parent / "sub_pet_qc.json").read_text())
    assert record["qc"]["passed"] and record["members"] == 1 and record["sd"] is None
    regions = record["regions"]
    assert regions["reference"] == ["cerebellum_gm", "cerebellum_wm"] and "coarse atlas" in regions["atlas"]
    assert {"neocortex", "temporoparietal", "pons"} <= set(regions["suvr"])
    assert regions["suvr"]["neocortex"]["interval_90"] is None and regions["composite"]["positive_if"] == "SUVR > 1.11"
    from matplotlib.image import imread

    picture = imread(str(out.parent / "sub_pet_qc.png"))
    assert picture.ndim == 3 and picture.shape[0] > 500 and picture[..., :3].std() > 0.05


def _members_by_hand(generators: list[torch.nn.Module], mri: np.ndarray) -> np.ndarray:
    """Each generator on the MRI and on its left-right mirror (array axis 0 of the RAS cube), mirrored back."""
    from ganbert.models.intensity import mri_stats, normalise_mri, restore_pet

    x = torch.from_numpy(mri)[None, None]
    mean, std = mri_stats(x)
    out = []
    with torch.no_grad():
        for g in generators:
            out.append(restore_pet(g(normalise_mri(x, mean, std)), mean, std)[0].numpy())
            flipped = torch.from_numpy(np.ascontiguousarray(mri[::-1]))[None, None]
            out.append(restore_pet(g(normalise_mri(flipped, mean, std)), mean, std)[0].numpy()[:, ::-1])
    return np.stack(out)


@pytest.mark.slow
def test_ensemble_of_two_models_with_mirroring_writes_mean_sd_and_regional_intervals(
        phantom_t1: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _tiny_model(tmp_path / "a", 0), _tiny_model(tmp_path / "b", 1)
    out = tmp_path / "ens.nii.gz"
    assert cli.main(["synthesize", "--model", str(a), "--model", str(b), "--tta", "--mri", str(phantom_t1["t1"]),
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"ensemble: voxel-wise SD over 4 members -> {tmp_path / 'ens_sd.nii.gz'}" in printed
    pet, sd = nib.load(str(out)), nib.load(str(tmp_path / "ens_sd.nii.gz"))
    assert sd.shape == pet.shape and np.allclose(sd.affine, pet.affine)
    assert sd.header.get_zooms() == pet.header.get_zooms()
    mri, _ = conform_mri(nib.load(str(phantom_t1["t1"])), config.tiny().geometry)
    members = _members_by_hand([load_generator(a)[0], load_generator(b)[0]], mri)
    np.testing.assert_allclose(pet.get_fdata(), np.moveaxis(members.mean(axis=0), 0, -1), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(sd.get_fdata(), np.moveaxis(members.std(axis=0, ddof=1), 0, -1), rtol=1e-3, atol=1e-3)
    record = json.loads((tmp_path / "ens_qc.json").read_text())
    assert record["members"] == 4 and record["tta"] is True
    assert [m["model"] for m in record["models"]] == [str(a), str(b)]
    region = record["regions"]["suvr"]["temporoparietal"]
    assert region["interval_90"][0] <= region["mean"] <= region["interval_90"][1]
    assert record["regions"]["composite"]["positive_fraction"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_ensemble_members_must_share_geometry_and_tracer(model_dir: Path, t1_file: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    fdg = _tiny_model(tmp_path / "fdg", 0, **{"geometry.tracer": "FDG"})
    assert cli.main(["synthesize", "--model", str(model_dir), "--model", str(fdg), "--mri", str(t1_file),
                     "--out", str(tmp_path / "x.nii.gz"), "--skip-qc"]) == 2
    err = capsys.readouterr().err
    assert f"--model {fdg}: differs from --model {model_dir} in tracer FDG vs AV45" in err
    assert not (tmp_path / "x.nii.gz").exists()


def test_axis_0_of_the_conformed_mri_runs_left_to_right() -> None:
    """Mirroring flips axis 0 because conforming puts world x (left -> right) there, whatever the input's order."""
    img = _t1()
    data = np.asarray(img.dataobj).copy()
    world_x = (img.affine @ np.vstack([np.indices(data.shape).reshape(3, -1), np.ones(data[None].size)]))[0]
    data[(world_x > world_x.mean() + 30).reshape(data.shape)] += 3000.0  # a bright block on the right
    for stored in (nib.Nifti1Image(data, img.affine), _flip(nib.Nifti1Image(data, img.affine), (0,))):
        mri, affine = conform_mri(stored, config.tiny().geometry)
        profile = mri.astype(float).mean(axis=(1, 2))
        assert affine[0, 0] > 0 and profile[-8:].mean() > profile[:8].mean() + 50


class _Symmetric(torch.nn.Module):
    """g(x) + mirror(g(mirror(x))): exactly left-right symmetric, so mirroring its input must change nothing."""

    def __init__(self, g: torch.nn.Module) -> None:
        super().__init__()
        self.g = g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g(x) + self.g(x.flip(2)).flip(2)


def test_mirroring_a_symmetric_generator_is_a_no_op_and_tta_is_mirror_equivariant(
        model: tuple[torch.nn.Module, Config]) -> None:
    from ganbert.serve.ensemble import member_outputs

    generator, cfg = model
    mri = np.random.default_rng(3).integers(0, 256, (2, *cfg.geometry.mri_size), dtype=np.uint8)
    sym = member_outputs([_Symmetric(generator)], mri, cfg.geometry, tta=True)
    np.testing.assert_array_equal(sym[0], sym[1])  # the mirrored member, mirrored back, is the plain one
    plain = member_outputs([generator], mri, cfg.geometry, tta=True).mean(axis=0)
    mirrored = member_outputs([generator], np.ascontiguousarray(mri[:, ::-1]), cfg.geometry, tta=True).mean(axis=0)
    np.testing.assert_allclose(mirrored, plain[:, :, ::-1], rtol=1e-5, atol=1e-5)  # PET axis 2 = (B, T, d, h, w) d


def test_a_batch_is_one_forward_per_member_and_equals_single_forwards(model: tuple[torch.nn.Module, Config]) -> None:
    from ganbert.serve.ensemble import member_outputs

    generator, cfg = model
    mri = np.stack([conform_mri(_t1(seed), cfg.geometry)[0] for seed in range(3)])
    calls: list[int] = []
    hook = generator.register_forward_hook(lambda _m, inp, _o: calls.append(int(inp[0].shape[0])))
    try:
        batched = member_outputs([generator], mri, cfg.geometry, tta=True)
        assert calls == [3, 3]  # one forward per view over the whole batch
        singles = np.concatenate([member_outputs([generator], m[None], cfg.geometry, tta=True) for m in mri], axis=1)
    finally:
        hook.remove()
    np.testing.assert_allclose(batched, singles, rtol=1e-5, atol=1e-4)


def _prepared(seed: int, cfg: Config) -> "syn.Prepared":
    mri, affine = conform_mri(_t1(seed), cfg.geometry)
    return syn.Prepared(f"in{seed}.nii.gz", mri, affine, 1, {"passed": True, "failed_checks": []})


def test_ray_data_actor_runs_its_batch_as_one_forward(model_dir: Path, model: tuple[torch.nn.Module, Config]) -> None:
    """The Synthesizer (the Ray Data actor class, called in-process): B prepared rows -> one forward per member."""
    generator, cfg = model
    preps = [_prepared(seed, cfg) for seed in range(3)]
    rows = [syn.prepared_row(i, p) for i, p in enumerate(preps)]
    rows[1] = {**rows[1], "status": "rejected", "reason": "bad input"}  # passed through, not run
    batch = {k: np.asarray([r[k] for r in rows], dtype=object) for k in rows[0]}
    actor = syn.Synthesizer([str(model_dir)], None, tta=False)
    calls: list[int] = []
    actor.members.generators[0].register_forward_hook(lambda _m, inp, _o: calls.append(int(inp[0].shape[0])))
    out = actor(batch)
    assert calls == [2] and list(out["status"]) == ["ok", "rejected", "ok"] and out["pet"][1] == b""
    shape = (cfg.geometry.pet_frames, *cfg.geometry.pet_size)
    for i in (0, 2):
        single = syn.synthesize_batch(syn.load_members([str(model_dir)]), [preps[i]])[0].pet
        np.testing.assert_allclose(np.frombuffer(out["pet"][i], np.float32).reshape(shape), single, rtol=1e-5,
                                   atol=1e-4)


def test_racing_writers_create_each_output_once_and_never_replace(model: tuple[torch.nn.Module, Config],
                                                                  tmp_path: Path) -> None:
    import threading

    _, cfg = model
    g = cfg.geometry
    preps = [_prepared(seed, cfg) for seed in range(2)]
    barrier = threading.Barrier(2)
    results: dict[str, list[syn.Result]] = {"A": [], "B": []}

    def writer(name: str, value: float) -> None:
        barrier.wait()
        for i, prep in enumerate(preps):
            synth = syn.Synthesis(np.full((g.pet_frames, *g.pet_size), value, np.float32), None, {"writer": name})
            results[name].append(syn.write_outputs(prep, synth, tmp_path / f"o{i}_pet.nii.gz", g, {"members": 1}))

    threads = [threading.Thread(target=writer, args=(n, v)) for n, v in (("A", 1.0), ("B", 2.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        owners = [n for n in "AB" if results[n][i].reason == ""]
        assert len(owners) == 1, results  # exactly one writer created the output, the other kept it
        other = "B" if owners == ["A"] else "A"
        assert results[other][i].reason == syn.KEPT
        assert np.all(nib.load(str(tmp_path / f"o{i}_pet.nii.gz")).get_fdata() == (1.0 if owners == ["A"] else 2.0))
        assert json.loads((tmp_path / f"o{i}_pet_qc.json").read_text())["regions"] == {"writer": owners[0]}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    # an output the user already has is never replaced without --overwrite, and nothing is written beside it
    (tmp_path / "mine_pet.nii.gz").write_bytes(b"the user's file")
    synth = syn.Synthesis(np.zeros((g.pet_frames, *g.pet_size), np.float32), None, {})
    assert syn.write_outputs(preps[0], synth, tmp_path / "mine_pet.nii.gz", g, {}).reason == syn.KEPT
    assert (tmp_path / "mine_pet.nii.gz").read_bytes() == b"the user's file"
    assert not (tmp_path / "mine_pet_qc.json").exists()


def test_model_folder_given_as_a_file_uri(model_dir: Path, model: tuple[torch.nn.Module, Config], t1_file: Path,
                                          tmp_path: Path) -> None:
    out = tmp_path / "pet.nii.gz"
    assert cli.main(["synthesize", "--model", model_dir.resolve().as_uri(), "--mri", str(t1_file), "--out", str(out),
                     "--skip-qc"]) == 0
    generator, cfg = model
    expect = syn.synthesize_volume(generator, cfg, nib.load(str(t1_file)))
    np.testing.assert_allclose(nib.load(str(out)).get_fdata(), np.asarray(expect.dataobj), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no folder there"):
        syn.load_members([(tmp_path / "nowhere").as_uri()])


@pytest.mark.slow
def test_two_concurrent_folder_runs_never_overwrite_each_other(model_dir: Path, tmp_path: Path) -> None:
    """Two `ganbert synthesize` processes (own local Ray each) on one folder, models that differ: every output is
    written once, by one run, and all of an input's files come from that run."""
    import subprocess
    import sys

    src, out = tmp_path / "t1", tmp_path / "pet"
    src.mkdir()
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        nib.save(_t1(seed), str(src / f"{name}.nii.gz"))
    other = _tiny_model(tmp_path / "other", 7)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    exe = str(Path(sys.executable).parent / "ganbert")
    runs = [subprocess.Popen([exe, "synthesize", "--model", model, "--mri", str(src), "--out", str(out), "--skip-qc"],
                             env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for model in (str(model_dir), other.resolve().as_uri())]
    printed = [r.communicate(timeout=900)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], printed
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".nii.gz")) == ["a_pet.nii.gz", "b_pet.nii.gz",
                                                                                  "c_pet.nii.gz"]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    generators = {str(model_dir): load_generator(model_dir)[0], other.resolve().as_uri(): load_generator(other)[0]}
    cfg = config.tiny()
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        owner = json.loads((out / f"{name}_pet_qc.json").read_text())["models"][0]["model"]
        expect = syn.synthesize_volume(generators[owner], cfg, _t1(seed))
        np.testing.assert_allclose(nib.load(str(out / f"{name}_pet.nii.gz")).get_fdata(), np.asarray(expect.dataobj),
                                   rtol=1e-5, atol=1e-5)


def test_a_study_as_model_stands_for_a_rows_fold_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from ganbert.serve.synthesize import study_members

    study = tmp_path / "home" / "study" / "st"
    study.mkdir(parents=True)
    cells = [{"row": "mean-PET", "tracer": "AV45", "seed": None, "checkpoints": [None, None]},
             {"row": "ganbert", "tracer": "AV45", "seed": 0, "checkpoints": ["/ck/f0", "/ck/f1"]}]
    (study / "study.json").write_text(json.dumps({"cells": cells}))
    monkeypatch.setenv("GANBERT_HOME", str(tmp_path / "home"))
    assert study_members([str(study), "models:/m-1"]) == ["/ck/f0", "/ck/f1", "models:/m-1"]
    assert study_members(["st"], "ganbert") == ["/ck/f0", "/ck/f1"]  # by the study's name in $GANBERT_HOME
    with pytest.raises(ValueError, match="--study-row"):
        study_members([str(study)], "mean-PET")
