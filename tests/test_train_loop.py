"""Ray Train on a real local Ray: a 2-worker tiny run killed mid-epoch resumes to the uninterrupted result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ganbert import config
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
