"""Ray Train on a real local Ray: a 2-worker tiny run stopped after 2 of 4 epochs and rerun trains only the last 2,
and killed mid-epoch in the rerun resumes to the uninterrupted result; the training rows held in memory are Ray
Data's; the local Ray listens on loopback only."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ganbert import config
from ganbert.store import loader, shards, stats
from ganbert.store.loader import count_rows
from ganbert.track.tracking import find_run
from ganbert.train import loop

from ray_nodes import descendants, is_loopback, listening
from uninterrupted import Uninterrupted


def _cfg(tmp: Path, name: str, workers: int = 2) -> config.Config:
    return config.apply(config.tiny(), {"run.name": name, "run.storage": str(tmp / "ray"), "run.workers": workers,
                                        "optim.epochs": 3, "run.max_failures": 2})


def _generator(checkpoint_or_model: str | None) -> dict[str, torch.Tensor]:
    assert checkpoint_or_model is not None
    return load_file(str(Path(checkpoint_or_model) / "generator.safetensors"))


def _same_generators(a: str | None, b: str | None) -> None:
    mine, theirs = _generator(a), _generator(b)
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.allclose(mine[k], theirs[k], atol=1e-5), k


@pytest.mark.slow
def test_a_stopped_run_rerun_and_killed_mid_epoch_ends_where_the_uninterrupted_run_ends(
        uninterrupted: Uninterrupted, tiny_shards: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A 4-epoch run (validated and checkpointed every 2nd epoch) stopped cleanly after epoch 1 ends KILLED; rerun
    under the same run.name it trains epochs 2-3 only, into the same MLflow run. In the rerun rank 1 is killed in
    epoch 2 (after epoch 1's checkpoint): Ray Train restarts the group from that checkpoint, and the run ends where
    the uninterrupted one ends. Rows are read through Ray Data every epoch: the same training as from memory.
    (A restart from a checkpoint reported in the same `fit` is the two-node test's killed raylet.)"""
    from mlflow import MlflowClient

    uri, plain = uninterrupted.uri, uninterrupted.out
    split = config.apply(uninterrupted.cfg, {"run.name": "split", "run.in_memory_mb": 0})
    monkeypatch.setenv(loop.STOP_ENV, "1")
    first = loop.fit(split, tiny_shards, uri)
    assert first.metrics["epoch"] == 1
    client = MlflowClient(uri)
    assert client.get_run(first.run_id).info.status == "KILLED"  # stopped before its last epoch
    monkeypatch.delenv(loop.STOP_ENV)
    marker = tmp_path / "killed.txt"
    monkeypatch.setenv(loop.FAULT_ENV, f"2:1:1:{marker}")   # epoch 2, step 1, rank 1
    rerun_at = time.time() * 1000
    resumed = loop.fit(split, tiny_shards, uri)
    assert marker.exists(), "the fault was never injected"
    run_id = find_run(uri, "ganbert", "split")
    history = client.get_metric_history(run_id, "train_l1")  # logged every epoch
    assert sorted(m.step for m in history if m.timestamp >= rerun_at) == [2, 3]  # the rerun trained epochs 2-3
    assert sorted(m.step for m in history) == [0, 1, 2, 3]  # each epoch once, all in one MLflow run
    assert resumed.run_id == first.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.method"] == "ganbert"
    per_epoch = loop.steps_per_epoch(uninterrupted.cfg, count_rows(tiny_shards, "train", "AV45"))
    assert resumed.metrics["step"] == plain.metrics["step"] == 4 * per_epoch
    assert resumed.metrics["epoch"] == 3
    val = {m.step: m.value for m in client.get_metric_history(run_id, "val_psnr")}
    whole_val = {m.step: m.value for m in client.get_metric_history(plain.run_id, "val_psnr")}
    assert sorted(val) == sorted(whole_val) == [1, 3]  # validated every 2nd epoch
    assert val == pytest.approx(whole_val, rel=1e-5)
    for key in ("val_psnr", "val_ssim", "val_rmse"):
        assert resumed.metrics[key] == pytest.approx(plain.metrics[key], rel=1e-4)
    # the last checkpoints hold the same generator; they hold every network and optimiser as safetensors
    _same_generators(plain.checkpoint, resumed.checkpoint)
    ckpt = Path(resumed.checkpoint)
    assert {p.name for p in ckpt.iterdir()} == {"generator.safetensors", "bert.safetensors", "optim.safetensors",
                                                 "state.json", "config.yaml"}  # no RNG state: none is needed
    assert not list(ckpt.rglob("*.pkl")) and not list(ckpt.rglob("*.pt"))
    # the published model is the generator of the best val epoch, not the last one, and the uninterrupted run's
    assert resumed.model_uri and resumed.model_uri.startswith("models:/")
    best_epoch = max(val, key=val.get)
    assert run.data.tags["best_epoch"] == str(best_epoch)
    best = json.loads((Path(resumed.best_checkpoint) / "state.json").read_text())["meta"]
    assert best["epoch"] == best_epoch
    chosen, published = _generator(resumed.best_checkpoint), _generator(resumed.model_dir)
    assert chosen.keys() == published.keys() and all(torch.equal(chosen[k], published[k]) for k in chosen)
    _same_generators(plain.model_dir, resumed.model_dir)


def test_checkpoints_keep_the_best_validated_epoch() -> None:
    """Validated every 2nd epoch, checkpointed every 4th: every new best is checkpointed too, so the best validated
    epoch always has a checkpoint; the last epoch is validated and checkpointed."""
    cfg = config.apply(config.tiny(), {"optim.epochs": 9, "run.validate_every": 2, "run.checkpoint_every": 4})
    last = loop.last_epoch(cfg, None)
    psnr = {1: 10.0, 3: 12.0, 5: float("nan"), 7: 11.0, 8: 12.5}
    best, kept = None, []
    assert [e for e in range(9) if loop.validates(cfg, e, last)] == sorted(psnr)
    for epoch, value in sorted(psnr.items()):
        if loop.keeps(cfg, epoch, last, value, best):
            kept.append(epoch)
        best = loop.best_after(value, best)
    assert kept == [1, 3, 7, 8]  # 1, 3: new bests; 7: every 4th; 8: the last (and a new best)
    assert loop.last_epoch(cfg, 4) == 4 and loop.validates(cfg, 4, 4)  # a stopped session ends validated


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
    assert cfg.token_space_fixed and loop_cfg["pet_stats"][1] == recorded["pet_std"]
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
    from ganbert.store import loader

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


def test_local_ray_listens_on_loopback_only(local_ray: None) -> None:
    """Every process of the Ray that `ensure_ray` starts (GCS, raylet, agents, workers) listens on 127.0.0.1 only,
    on a machine that has an outward address too."""
    import ray

    assert ray.get(ray.remote(num_cpus=0)(config.tiny).remote()) == config.tiny()  # a worker process is up
    found = listening(descendants(os.getpid()))
    assert len(found) >= 3, found  # at least the GCS, the raylet and a worker
    assert all(is_loopback(address) for address, _, _ in found), [f for f in found if not is_loopback(f[0])]


def test_rows_held_in_memory_batch_like_ray_data(tiny_shards: str, local_ray: None) -> None:
    """SplitRows serves this rank's part of an epoch's permutation in the batches Ray Data streams (same rows,
    same order, same values), so a run reads its training rows once without changing what it trains on."""
    rows = loader.SplitRows(tiny_shards, "train", "AV45")
    manifest = shards.read_manifest(tiny_shards)
    assert loader.fits_in_memory(manifest, "train", "AV45", config.tiny().geometry, 1)
    assert not loader.fits_in_memory(manifest, "train", "AV45", config.tiny().geometry, 0)
    positions = loader.epoch_positions(rows.positions, 0, 3, rank=1, world=2)
    mine = list(rows.batches(positions, 2, drop_last=True))
    streamed = list(loader.torch_batches(loader.epoch_dataset(tiny_shards, "train", "AV45", 0, 3, 1, 2), 2,
                                         drop_last=True))
    assert len(mine) == len(streamed) == len(positions) // 2
    for a, b in zip(mine, streamed):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key
    with pytest.raises(ValueError, match="positions"):
        next(rows.batches([("elsewhere.parquet", 0)], 1))
