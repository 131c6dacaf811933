"""MLflow tracking against a real tracking server and a plain SQLite store: runs, resume, figures, pyfunc model."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import save_file

from ganbert import config as config_mod
from ganbert.common import figures
from ganbert.common.home import default_tracking_uri
from ganbert.track import mlflow_model, tracking
from ganbert.track.tracking import MLflowTracker, NullTracker, Tracker

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metric_history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            out |= _artifact_paths(client, run_id, item.path)
        else:
            out.add(item.path)
    return out


def _small_model_dir(root: Path) -> Path:
    """generator.safetensors (a few small tensors) + config.yaml of the tiny preset."""
    model_dir = root / "model_dir"
    model_dir.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(4, 3, generator=gen), "b": torch.arange(5, dtype=torch.float32)},
              str(model_dir / "generator.safetensors"))
    config_mod.save(config_mod.tiny(), model_dir / "config.yaml")
    return model_dir


def _assert_same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_default_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert default_tracking_uri(tmp_path / "unused") == "http://example.invalid:5000"
    assert not (tmp_path / "unused").exists()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = default_tracking_uri(tmp_path / "runs")
    assert uri == f"sqlite:///{(tmp_path / 'runs').resolve() / 'mlflow.db'}"
    assert (tmp_path / "runs").is_dir()


def test_server_params_metrics_artifacts_tags(mlflow_server: str, tmp_path: Path) -> None:
    client = MlflowClient(mlflow_server)
    params = {f"p.{i:03d}": i for i in range(150)}
    params["optim.betas"] = (0.5, 0.999)
    params["long"] = "x" * 7000
    (tmp_path / "note.txt").write_text("hello")
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "a.txt").write_text("a")
    with MLflowTracker(mlflow_server, "server-exp", "run-a", tags={"kind": "unit"}) as tr:
        assert isinstance(tr, Tracker)
        with pytest.warns(UserWarning, match="param long"):
            tr.log_params(params)
        for step in range(3):
            tr.log_metrics({"val_psnr": 20.0 + step, "train_l1": torch.tensor(1.0 / (step + 1))}, step=step)
        tr.log_artifact(tmp_path / "note.txt")
        tr.log_artifact(tmp_path / "figs", artifact_path="figures")
        tr.set_tags({"tracer": "AV45"})
        with pytest.raises(ValueError, match="missing.txt"):
            tr.log_artifact(tmp_path / "missing.txt")
        with pytest.raises(ValueError, match="metric val_psnr"):
            tr.log_metrics({"val_psnr": "nan-ish"}, step=3)
        run_id = tr.run_id
    assert run_id is not None
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert len(run.data.params) == 152
    assert run.data.params["p.149"] == "149" and run.data.params["optim.betas"] == "0.5,0.999"
    long_value = run.data.params["long"]
    assert len(long_value) == tracking.MAX_PARAM_LENGTH and long_value.endswith("[truncated 7000 chars]")
    assert _metric_history(client, run_id, "val_psnr") == {0: 20.0, 1: 21.0, 2: 22.0}
    assert _metric_history(client, run_id, "train_l1") == pytest.approx({0: 1.0, 1: 0.5, 2: 1 / 3})
    assert _artifact_paths(client, run_id) == {"note.txt", "figures/a.txt"}
    assert run.data.tags["kind"] == "unit" and run.data.tags["tracer"] == "AV45"
    assert client.get_experiment(run.info.experiment_id).name == "server-exp"


def test_parent_child_runs_coexist(mlflow_server: str) -> None:
    client = MlflowClient(mlflow_server)
    parent = MLflowTracker(mlflow_server, "sweep-exp", "sweep")
    children = [MLflowTracker(mlflow_server, "sweep-exp", f"trial-{i}", parent_run_id=parent.run_id)
                for i in range(2)]
    for epoch in range(2):  # interleaved logging into three open runs of one process
        for i, child in enumerate(children):
            child.log_metrics({"val_psnr": 10.0 * i + epoch}, step=epoch)
    parent.log_metrics({"best_val_psnr": 11.0}, step=0)
    for child in children:
        child.finish()
    children[0].finish("FAILED")  # a second finish is a no-op
    parent.finish()
    for i, child in enumerate(children):
        assert child.run_id is not None
        run = client.get_run(child.run_id)
        assert run.data.tags[tracking.PARENT_TAG] == parent.run_id
        assert run.info.status == "FINISHED"
        assert _metric_history(client, child.run_id, "val_psnr") == {0: 10.0 * i, 1: 10.0 * i + 1}
    assert tracking.PARENT_TAG not in client.get_run(str(parent.run_id)).data.tags
    with pytest.raises(ValueError, match="status"):
        parent.finish("DONE")


def test_resume_into_same_run(mlflow_server: str) -> None:
    client = MlflowClient(mlflow_server)
    assert tracking.find_run(mlflow_server, "resume-exp", "train-x") is None
    first = MLflowTracker(mlflow_server, "resume-exp", "train-x")
    first.log_params({"optim.epochs": 4, "optim.lr": 1e-4})
    first.log_metrics({"val_psnr": 30.0}, step=0)
    first.finish("FAILED")  # the crash
    found = tracking.find_run(mlflow_server, "resume-exp", "train-x")
    assert found == first.run_id
    with pytest.warns(UserWarning, match="optim.epochs"):
        resumed = MLflowTracker(mlflow_server, "resume-exp", "train-x", run_id=found)
        assert client.get_run(str(found)).info.status == "RUNNING"
        resumed.log_params({"optim.epochs": 8, "optim.lr": 1e-4})
    resumed.log_metrics({"val_psnr": 31.0}, step=1)
    resumed.finish()
    assert resumed.run_id == first.run_id
    run = client.get_run(str(found))
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.epochs"] == "4"
    assert run.data.tags["param_changed.optim.epochs"] == "4 -> 8"
    assert _metric_history(client, str(found), "val_psnr") == {0: 30.0, 1: 31.0}
    assert len(client.search_runs([run.info.experiment_id])) == 1
    with pytest.raises(ValueError, match="run_id"):
        MLflowTracker(mlflow_server, "resume-exp", "train-x", run_id="0" * 32)


def test_null_tracker_and_make_tracker(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'null' / 'mlflow.db'}"
    (tmp_path / "null").mkdir()
    kwargs = dict(tracking_uri=uri, experiment="e", run_name="r")
    null = tracking.make_tracker(1, **kwargs)
    assert isinstance(null, NullTracker) and isinstance(null, Tracker)
    assert null.run_id is None
    null.log_params({"a": 1})
    null.log_metrics({"m": 1.0}, step=0)
    null.log_artifact(tmp_path / "does-not-exist")
    null.set_tags({"t": "v"})
    assert null.log_model(tmp_path / "no-model") is None
    null.finish()
    assert not (tmp_path / "null" / "mlflow.db").exists()  # rank != 0 never touches the store
    real = tracking.make_tracker(0, **kwargs)
    assert isinstance(real, MLflowTracker) and real.run_id is not None
    real.finish()
    assert (tmp_path / "null" / "mlflow.db").exists()
    with pytest.raises(ValueError, match="rank"):
        tracking.make_tracker(-1, **kwargs)


def test_sqlite_store_and_model_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = default_tracking_uri(tmp_path / "runs")
    model_dir = _small_model_dir(tmp_path)
    tr = MLflowTracker(uri, "sqlite-exp", "run-s")
    tr.log_params({"model.method": "ganbert"})
    tr.log_metrics({"val_psnr": 12.5}, step=0)
    model_uri = tr.log_model(model_dir)
    tr.finish()
    assert model_uri is not None and model_uri.startswith("models:/")
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the temporary global URI was undone
    client = MlflowClient(uri)
    run = client.get_run(str(tr.run_id))
    assert run.data.tags["model_uri"] == model_uri
    assert _metric_history(client, str(tr.run_id), "val_psnr") == {0: 12.5}
    # artifacts live next to the database, nothing lands in the working directory
    assert list(cwd.iterdir()) == []
    assert (tmp_path / "runs" / "mlartifacts" / "sqlite-exp").is_dir()
    for source in (model_uri, f"runs:/{tr.run_id}/model"):
        fetched = mlflow_model.resolve_model_dir(source, uri, dst=tmp_path / "dl" / source.split(":")[0])
        _assert_same_files(model_dir, fetched)
        # the downloaded MLflow model folder resolves locally too
        assert mlflow_model.resolve_model_dir(str(fetched.parent.parent)) == fetched
    assert mlflow_model.resolve_model_dir(str(model_dir)) == model_dir
    with pytest.raises(ValueError, match="model_dir"):
        tr2 = MLflowTracker(uri, "sqlite-exp", "run-bad")
        tr2.log_model(tmp_path / "runs")
    with pytest.raises(ValueError, match="not a folder"):
        mlflow_model.resolve_model_dir(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="cannot download"):
        mlflow_model.resolve_model_dir("models:/m-00000000000000000000000000000000", uri, dst=tmp_path / "x")


def test_model_on_server_downloads_identical(mlflow_server: str, tmp_path: Path) -> None:
    model_dir = _small_model_dir(tmp_path)
    with MLflowTracker(mlflow_server, "server-model", "run-m") as tr:
        model_uri = tr.log_model(model_dir)
    assert model_uri is not None
    _assert_same_files(model_dir, mlflow_model.resolve_model_dir(model_uri, mlflow_server, dst=tmp_path / "dl"))


def test_pyfunc_predict_matches_generator(tmp_path: Path) -> None:
    import mlflow.pyfunc

    from ganbert.models import build_generator
    from ganbert.models.intensity import mri_stats, normalise_mri, restore_pet

    cfg = config_mod.tiny()
    torch.manual_seed(0)
    generator = build_generator(cfg).eval()
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(model_dir / "generator.safetensors"))
    config_mod.save(cfg, model_dir / "config.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with MLflowTracker(uri, "pyfunc-exp", "run-p") as tr:
        model_uri = tr.log_model(model_dir)
    local = mlflow_model.resolve_model_dir(str(model_uri), uri, dst=tmp_path / "dl").parent.parent
    assert not any(p.suffix == ".pkl" for p in local.rglob("*"))  # models-from-code, no pickle
    # the whole package travels as code (not only the folder of the code file), so a fresh interpreter imports it
    assert (local / "code" / "ganbert" / "__init__.py").is_file()
    assert (local / "code" / "ganbert" / "models" / "intensity.py").is_file()
    loaded = mlflow.pyfunc.load_model(str(local))
    mri = np.random.default_rng(0).integers(0, 256, (2, 1, *cfg.geometry.mri_size)).astype(np.float32)
    out = loaded.predict(mri, params={"batch_size": 2})
    x = torch.from_numpy(mri)
    mean, std = mri_stats(x)
    with torch.no_grad():
        expected = restore_pet(generator(normalise_mri(x, mean, std)), mean, std).numpy()
    assert out.shape == (2, cfg.geometry.pet_frames, *cfg.geometry.pet_size) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    one_by_one = loaded.predict({"mri": mri})
    np.testing.assert_allclose(one_by_one, expected, rtol=1e-4, atol=1e-4)


def test_figures_are_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mri = rng.uniform(0, 255, (32, 28, 24)).astype(np.float32)
    real = rng.gamma(2.0, 1.0, (2, 14, 12, 10)).astype(np.float32)
    fake = real + rng.normal(0, 0.1, real.shape).astype(np.float32)
    paths = [figures.montage_png(mri, real, fake, tmp_path / "fig" / "montage.png"),
             figures.histogram_png(real, fake, tmp_path / "fig" / "hist.png")]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
        assert float(image[..., :3].std()) > 0.01  # something is drawn
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["hist.png", "montage.png"]  # no temp files
    with pytest.raises(ValueError, match="mri"):
        figures.montage_png(mri[0], real, fake, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="fake"):
        figures.montage_png(mri, real, fake[:1], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="finite"):
        figures.histogram_png(np.full(4, np.nan), fake, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
