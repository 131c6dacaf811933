"""Ray Train on a real local Ray: a 2-worker tiny run killed mid-epoch resumes to the uninterrupted result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ganbert import config
from ganbert.data import loader, shards, stats
from ganbert.data.loader import count_rows
from ganbert.tracking import find_run
from ganbert.train import loop


def _cfg(tmp: Path, name: str, workers: int = 2) -> config.Config:
    return config.apply(config.tiny(), {"run.name": name, "run.storage": str(tmp / "ray"), "run.workers": workers,
                                        "optim.epochs": 3, "run.max_failures": 2})


def _weights(out: loop.TrainResult) -> dict[str, torch.Tensor]:
    assert out.model_dir is not None
    return load_file(str(Path(out.model_dir) / "generator.safetensors"))


@pytest.mark.slow
def test_killed_worker_resumes_to_the_uninterrupted_result(tmp_path: Path, tiny_shards: str, local_ray: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    plain = loop.fit(_cfg(tmp_path, "plain"), tiny_shards, uri)
    marker = tmp_path / "killed.txt"
    monkeypatch.setenv(loop.FAULT_ENV, f"1:1:1:{marker}")   # epoch 1, step 1, rank 1
    resumed = loop.fit(_cfg(tmp_path, "faulty"), tiny_shards, uri)
    assert marker.exists(), "the fault was never injected"
    per_epoch = loop.steps_per_epoch(_cfg(tmp_path, "x"), count_rows(tiny_shards, "train", "AV45"))
    assert resumed.metrics["step"] == plain.metrics["step"] == 3 * per_epoch
    assert resumed.metrics["epoch"] == 2
    a, b = _weights(plain), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    for key in ("val_psnr", "val_ssim", "val_rmse"):
        assert resumed.metrics[key] == pytest.approx(plain.metrics[key], rel=1e-4)
    # checkpoints: best by val PSNR kept, and they hold every network and optimiser as safetensors
    ckpt = Path(resumed.checkpoint)
    assert {"generator.safetensors", "bert.safetensors", "optim.safetensors", "rng.safetensors",
            "state.json", "config.yaml"} <= {p.name for p in ckpt.iterdir()}
    assert not list(ckpt.rglob("*.pkl")) and not list(ckpt.rglob("*.pt"))
    # one MLflow run per training run, resumed into after the crash, holding the model
    from mlflow import MlflowClient
    run_id = find_run(uri, "ganbert", "faulty")
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params["model.method"] == "ganbert"
    history = MlflowClient(uri).get_metric_history(run_id, "val_psnr")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert resumed.model_uri and resumed.model_uri.startswith("models:/")
    # the published model is the generator of the best val epoch, not the last one
    val = {m.step: m.value for m in history}
    best_epoch = max(val, key=val.get)
    assert run.data.tags["best_epoch"] == str(best_epoch)
    best = json.loads((Path(resumed.best_checkpoint) / "state.json").read_text())["meta"]
    assert best["epoch"] == best_epoch
    chosen = load_file(str(Path(resumed.best_checkpoint) / "generator.safetensors"))
    for k, v in b.items():
        assert torch.equal(v, chosen[k]), k


@pytest.mark.slow
def test_rerunning_a_finished_run_resumes_instead_of_starting_over(tmp_path: Path, tiny_shards: str,
                                                                   local_ray: None) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = config.apply(_cfg(tmp_path, "again", workers=1), {"optim.epochs": 1})
    first = loop.fit(cfg, tiny_shards, uri)
    longer = config.apply(cfg, {"optim.epochs": 2})
    second = loop.fit(longer, tiny_shards, uri)
    assert first.metrics["epoch"] == 0 and second.metrics["epoch"] == 1
    assert second.metrics["step"] == 2 * first.metrics["step"]


@pytest.mark.slow
def test_a_run_that_fails_for_good_ends_failed_in_mlflow(tmp_path: Path, tiny_shards: str, local_ray: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker that logged the run is SIGKILLed and no retry is left: the driver marks the run FAILED."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = config.apply(_cfg(tmp_path, "doomed", workers=1), {"run.max_failures": 0, "optim.epochs": 1})
    monkeypatch.setenv(loop.FAULT_ENV, f"0:1:0:{tmp_path / 'killed.txt'}")
    with pytest.raises(Exception):
        loop.fit(cfg, tiny_shards, uri)
    from mlflow import MlflowClient
    run_id = find_run(uri, "ganbert", "doomed")
    assert run_id is not None
    assert MlflowClient(uri).get_run(run_id).info.status == "FAILED"


def _spy_read_rows(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the split of every `loader.read_rows` call (the plain shard reader), then read as usual."""
    splits: list[str] = []
    real = loader.read_rows

    def spy(data_dir: str, split: str, *args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        splits.append(split)
        return real(data_dir, split, *args, **kwargs)

    monkeypatch.setattr(loader, "read_rows", spy)
    return splits


def test_run_inputs_come_from_the_manifest_without_reading_training_rows(tiny_shards: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _spy_read_rows(monkeypatch)
    cfg, loop_cfg = loop.loop_config(config.tiny(), tiny_shards, "sqlite:///unused.db")
    assert reads == ["val"]  # the val split's token health; the training statistics are the manifest's
    recorded = shards.read_manifest(tiny_shards)[stats.KEY]["AV45"]
    assert cfg.calibrated and loop_cfg["pet_stats"][1] == recorded["pet_std"]
    assert loop_cfg["pet_stats"][0].shape == (2, 14, 12, 12)
    assert loop_cfg["steps_per_epoch"] == loop.steps_per_epoch(cfg, count_rows(tiny_shards, "train", "AV45"))
    assert set(loop_cfg["token_health"]) == {f"token_{s}_{k}" for s in ("mri", "pet")
                                             for k in ("collide_or_clip", "distinct")}
    # the same run inputs when --data is a URI (file:// here; s3:// and gs:// go through the same pyarrow.fs call)
    uri_cfg, uri_loop = loop.loop_config(config.tiny(), "file://" + tiny_shards, "sqlite:///unused.db")
    assert uri_cfg == cfg and uri_loop["data_dir"] == "file://" + tiny_shards
    assert uri_loop["steps_per_epoch"] == loop_cfg["steps_per_epoch"]
    np.testing.assert_array_equal(uri_loop["pet_stats"][0], loop_cfg["pet_stats"][0])


def test_shards_without_statistics_compute_them_once_and_say_so(tiny_shards: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old"
    shutil.copytree(tiny_shards, old)
    manifest = shards.read_manifest(old)
    manifest.pop(stats.KEY)
    shards.save_manifest(old, manifest)
    expected, _ = loop.loop_config(config.tiny(), tiny_shards, "sqlite:///unused.db")
    reads = _spy_read_rows(monkeypatch)
    cfg, _ = loop.loop_config(config.tiny(), str(old), "sqlite:///unused.db")
    assert reads == ["train", "val"]  # one pass over the training rows
    assert f"no {stats.KEY} for AV45" in capsys.readouterr().out
    assert cfg.sequence == expected.sequence


def test_epoch_order_is_a_seeded_permutation_of_the_whole_split(tiny_shards: str) -> None:
    """Every epoch visits every training row once, in an order that changes with the epoch and not with a rerun."""
    from ganbert.data import loader

    rows = loader.split_positions(tiny_shards, "train", "AV45")
    epochs = [loader.epoch_positions(rows, 0, e) for e in range(3)]
    assert all(sorted(e) == sorted(rows) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert loader.epoch_positions(rows, 0, 1) == epochs[1]  # a resumed run replays epoch 1 exactly
    parts = [loader.epoch_positions(rows, 0, 1, rank, 2) for rank in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(rows) // 2 and not set(parts[0]) & set(parts[1])
    # over a split of 1000 rows stored subject by subject, an epoch's first 100 rows come from all over it
    # (a 16-row local shuffle buffer would keep them within the first ~116)
    big = [("shard.parquet", i) for i in range(1000)]
    first = [r for _, r in loader.epoch_positions(big, 0, 0)[:100]]
    assert max(first) - min(first) > 800


@pytest.mark.slow
def test_cli_train_prints_its_own_lines_not_ray_report_dumps(tmp_path: Path, tiny_shards: str) -> None:
    """`ganbert train` shows the per-epoch [val] line and its summary, not Train V2's TrainingReport(...) dumps."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(GANBERT_NUM_CPUS="2", GANBERT_HOME=str(tmp_path / "home"))
    out = subprocess.run([str(Path(sys.executable).parent / "ganbert"), "train", "--preset", "tiny", "--data",
                          tiny_shards, "optim.epochs=1", "run.log_every=0"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    printed = out.stdout + out.stderr
    assert out.returncode == 0, printed[-4000:]
    assert "[val] epoch 0: val_psnr=" in printed
    assert "TrainingReport(" not in printed and "Reporting training result" not in printed, printed[-4000:]
    assert (tmp_path / "home" / "ray" / "tiny" / "model" / "MODEL_URI").is_file()  # defaults in GANBERT_HOME
