"""PET synthesis: PET grid, finite PET units, the input's world space in any orientation, no header free text,
atomic writes, clear rejections, folder mode on Ray Data, and models from an MLflow URI."""

from __future__ import annotations

import csv
import gzip
import os
import re
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.testing import data_path
from scipy import ndimage

from ganbert import cli, config
from ganbert import synthesize as syn
from ganbert.config import Config
from ganbert.data.grid import conform_mri, fov_centre, pet_affine
from ganbert.models import build_generator
from ganbert.train.checkpoint import load_generator, save_model_dir

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
    res = syn.synthesize_file(generator, cfg, t1_file, out)
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pet.nii.gz"]  # no temporary file left


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
    assert cli.main(["synthesize", "--model", str(model_dir), "--mri", str(t1_file), "--out", str(out)]) == 0
    cfg = config.tiny()
    img = nib.load(str(out))
    assert img.shape == (*cfg.geometry.pet_size, cfg.geometry.pet_frames)
    assert np.isfinite(img.get_fdata()).all()
    printed = capsys.readouterr().out
    assert str(out) in printed and str(img.shape) in printed and "values" in printed
    # An existing folder as --out receives <stem>_pet.nii.gz.
    assert cli.main(["synthesize", "--model", str(model_dir), "--mri", str(t1_file), "--out", str(out.parent)]) == 0
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
                     "--out", str(tmp_path / "pet.nii.gz")]) == 2
    assert "neither generator.safetensors" in capsys.readouterr().err
    (tmp_path / "taken").write_text("a file")
    assert cli.main(["synthesize", "--model", str(model_dir), "--mri", str(t1_file.parent),
                     "--out", str(tmp_path / "taken")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray with 2 CPUs (reused when the session already started one)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.mark.slow
def test_folder_mode_on_ray_data(ray_local: None, model_dir: Path, model: tuple[torch.nn.Module, Config],
                                 tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "t1"
    src.mkdir()
    nib.save(_t1(1), str(src / "a.nii.gz"))
    nib.save(_flip(_t1(2), (0,)), str(src / "b.nii"))
    raw = (src / "a.nii.gz").read_bytes()
    (src / "c.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated gzip stream
    (src / "README.txt").write_text("not an input")
    out = tmp_path / "pet"

    code = cli.main(["synthesize", "--model", str(model_dir), "--mri", str(src), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["a_pet.nii.gz", "b_pet.nii.gz", "synthesis.csv"]
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
    from ganbert.tracking import MLflowTracker

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracker = MLflowTracker(tracking_uri=uri, experiment="t", run_name="r")
    model_uri = tracker.log_model(model_dir)
    tracker.finish()
    assert model_uri and model_uri.startswith("models:/")
    out = tmp_path / "pet.nii.gz"
    assert cli.main(["synthesize", "--model", model_uri, "--mri", str(t1_file), "--out", str(out),
                     "--tracking-uri", uri]) == 0
    generator, cfg = load_generator(model_dir)
    expect = syn.synthesize_volume(generator, cfg, nib.load(str(t1_file)))
    np.testing.assert_allclose(nib.load(str(out)).get_fdata(), np.asarray(expect.dataobj), rtol=1e-6, atol=1e-6)


def test_single_file_refuses_to_overwrite_without_the_flag(model_dir: Path, t1_file: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pet.nii.gz"
    out.write_bytes(b"the user's file")
    assert cli.main(["synthesize", "--model", str(model_dir), "--mri", str(t1_file), "--out", str(out)]) == 2
    assert f"output {out}: exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"the user's file"
    assert cli.main(["synthesize", "--model", str(model_dir), "--mri", str(t1_file), "--out", str(out),
                     "--overwrite"]) == 0
    assert nib.load(str(out)).shape[-1] == config.tiny().geometry.pet_frames


def test_actor_plan_uses_gpu_actors_with_a_batch_when_the_cluster_has_gpus() -> None:
    assert syn.actor_plan({"CPU": 16, "GPU": 2}, jobs=10) == {"num_gpus": 1, "num_cpus": 1, "size": 2,
                                                              "batch_size": 4}
    assert syn.actor_plan({"CPU": 2}, jobs=10) == {"num_gpus": 0, "num_cpus": 1, "size": 2, "batch_size": 1}
    assert syn.actor_plan({"CPU": 8, "GPU": 4}, jobs=3, batch_size=8)["size"] == 3


@pytest.mark.slow
def test_folder_mode_rerun_resumes_and_keeps_existing_outputs(ray_local: None, model_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "t1", tmp_path / "pet"
    src.mkdir()
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        nib.save(_t1(seed), str(src / f"{name}.nii.gz"))
    out.mkdir()
    (out / "a_pet.nii.gz").write_bytes(b"finished earlier")  # a previous run's output: kept, not recomputed
    args = ["synthesize", "--model", str(model_dir), "--mri", str(src), "--out", str(out)]
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
