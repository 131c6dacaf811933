"""Loader: Ray Data splits and tracer filters, seeded epoch permutations, pyarrow rows, a Ray Train worker's part."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ganbert.config import TRACERS, tiny
from ganbert.store import loader, shards


def _ids(data_dir: Path, split: str, seed: int | None, epoch: int = 0, batch: int = 2) -> list[str]:
    """Row ids in the order training reads them: the split as stored (no seed) or an epoch's permutation."""
    ds = (loader.read_split(data_dir, split) if seed is None
          else loader.epoch_dataset(data_dir, split, None, seed, epoch))
    return [pid for b in loader.torch_batches(ds, batch) for pid in b["pet_image_id"]]


def test_batches_follow_the_contract(tiny_run) -> None:
    g = tiny_run.cfg.geometry
    ds = loader.read_split(tiny_run.out, "train", geometry=g)
    batches = list(loader.torch_batches(ds, 3))
    assert sum(len(b["subject"]) for b in batches) == loader.count_rows(tiny_run.out, "train") == 12
    b = batches[0]
    assert b["mri"].dtype == torch.uint8 and tuple(b["mri"].shape) == (3, 1, *g.mri_size)
    assert b["pet"].dtype == torch.float32 and tuple(b["pet"].shape) == (3, g.pet_frames, *g.pet_size)
    assert b["mri_mean"].dtype == torch.float32 and tuple(b["mri_mean"].shape) == (3,)
    assert b["mri_std"].dtype == torch.float32 and bool((b["mri_std"] > 0).all())
    assert b["mri_affine"].dtype == torch.float64 and tuple(b["mri_affine"].shape) == (3, 4, 4)
    for key in ("subject", "pet_image_id", "mri_image_id"):
        assert isinstance(b[key], list) and all(isinstance(v, str) for v in b[key])
    b["pet"] += 1.0  # batches are writable tensors that own their memory


def test_tracer_filter_and_counts(tiny_run) -> None:
    for tracer in TRACERS:
        ds = loader.read_split(tiny_run.out, "train", tracer)
        tracers = [t for b in loader.torch_batches(ds, 4) for t in b["tracer"]]
        assert set(tracers) == {tracer} and len(tracers) == loader.count_rows(tiny_run.out, "train", tracer) == 4
    for split in shards.SPLITS:
        per_tracer = {t: [r["tracer"] for r in loader.read_rows(tiny_run.out, split, t)] for t in TRACERS}
        assert all(set(v) == {t} for t, v in per_tracer.items())
        assert sum(map(len, per_tracer.values())) == loader.count_rows(tiny_run.out, split) > 0


def test_order_is_fixed_by_the_seed_and_epoch(tiny_run) -> None:
    manifest_order = [r["pet_image_id"] for r in shards.read_manifest(tiny_run.out)["rows"] if r["split"] == "train"]
    assert _ids(tiny_run.out, "train", None) == manifest_order
    first = _ids(tiny_run.out, "train", 3)
    assert first == _ids(tiny_run.out, "train", 3)
    assert sorted(first) == sorted(manifest_order) and first != manifest_order
    assert _ids(tiny_run.out, "train", 4) != first
    assert _ids(tiny_run.out, "train", 3, epoch=1) != first and _ids(tiny_run.out, "train", 3, epoch=0) == first


def test_drop_last(tiny_run) -> None:
    ds = loader.read_split(tiny_run.out, "train", "AV45")
    n = loader.count_rows(tiny_run.out, "train", "AV45")
    sizes = [len(b["subject"]) for b in loader.torch_batches(ds, 3, drop_last=True)]
    assert sizes == [3] * (n // 3)


def test_loader_and_pyarrow_rows_agree(tiny_run) -> None:
    plain = {r["pet_image_id"]: r for r in loader.read_rows(tiny_run.out, "test")}
    assert len(plain) == loader.count_rows(tiny_run.out, "test")
    for b in loader.torch_batches(loader.read_split(tiny_run.out, "test"), 2):
        for i, pid in enumerate(b["pet_image_id"]):
            row = plain.pop(pid)
            np.testing.assert_array_equal(b["mri"][i].numpy(), row["mri"])
            np.testing.assert_array_equal(b["pet"][i].numpy(), row["pet"])
            np.testing.assert_array_equal(b["mri_affine"][i].numpy(), row["mri_affine"])
            assert float(b["mri_mean"][i]) == pytest.approx(row["mri_mean"], rel=1e-6)
            assert b["subject"][i] == row["subject"] and b["mri_image_id"][i] == row["mri_image_id"]
    assert not plain


def test_bad_requests_raise_clear_errors(tiny_run, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        loader.read_split(tiny_run.out, "training")
    with pytest.raises(ValueError, match=r"split 'val' tracer 'XYZ': no rows"):
        loader.read_split(tiny_run.out, "val", "XYZ")
    with pytest.raises(ValueError, match="no manifest.json"):
        loader.count_rows(tmp_path, "train")
    with pytest.raises(ValueError, match="batch_size"):
        next(loader.torch_batches(loader.read_split(tiny_run.out, "val"), 0))
    with pytest.raises(ValueError, match="dataset_or_shard"):
        next(loader.torch_batches([1, 2], 2))


def test_ensure_phantom_builds_once_then_reuses(tiny_shards: str) -> None:
    from ganbert.common import cache
    from ganbert.prep.phantom_cache import ensure_phantom

    data = Path(tiny_shards)
    assert data.parent.parent == cache.root()  # built by `data_dir_for` in $GANBERT_CACHE
    manifest = shards.read_manifest(data)
    shards.check_geometry(manifest, tiny().geometry, data)
    assert {r["tracer"] for r in manifest["rows"]} == set(TRACERS)
    assert {r["split"] for r in manifest["rows"]} == set(shards.SPLITS)
    assert len({r["subject"] for r in manifest["rows"]}) == 12
    stamp = (data / shards.MANIFEST).stat().st_mtime_ns
    assert ensure_phantom(tiny(), data.parent.parent) == data
    assert (data / shards.MANIFEST).stat().st_mtime_ns == stamp and (data.parent / "DONE").exists()


@pytest.mark.slow
def test_ray_train_worker_reads_its_shard(tiny_run, tmp_path: Path) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer

    def loop(config: dict) -> None:
        import json

        from ganbert.store.loader import epoch_dataset, torch_batches

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        epochs = [[pid for b in torch_batches(epoch_dataset(config["data"], "train", "FDG", 7, e, rank, world), 2)
                   for pid in b["pet_image_id"]] for e in (0, 1, 0)]
        Path(config["out"]).write_text(json.dumps(epochs))  # same machine; Train V2 keeps metrics with checkpoints

    out = tmp_path / "epochs.json"
    trainer = TorchTrainer(
        loop, train_loop_config={"out": str(out), "data": str(tiny_run.out)},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="loader-shard", storage_path=str(tmp_path)))
    trainer.fit()
    epochs = json.loads(out.read_text())
    expected = sorted(r["pet_image_id"] for r in loader.read_rows(tiny_run.out, "train", "FDG"))
    assert len(expected) == 4
    assert sorted(epochs[0]) == expected and sorted(epochs[1]) == expected
    assert epochs[0] == epochs[2] != epochs[1]  # seed and epoch fix the order on the worker too


def test_data_given_as_a_uri_reads_what_the_local_path_reads(tiny_run, tmp_path: Path) -> None:
    """`--data` as a URI (file:// here; s3:// and gs:// take the same pyarrow.fs.FileSystem.from_uri path): the
    manifest, recorded statistics, plain rows and a Ray Data epoch permutation equal the local path's."""
    from ganbert.store import stats

    local = str(tiny_run.out)
    uri = "file://" + local
    assert shards.read_manifest(uri) == shards.read_manifest(local)
    assert all(p.startswith(uri + "/") for p in loader.shard_paths(uri, "train"))
    assert [r["pet_image_id"] for r in loader.read_rows(uri, "val")] == \
        [r["pet_image_id"] for r in loader.read_rows(local, "val")]
    np.testing.assert_array_equal(stats.recorded_mean_volume(uri, "AV45"), stats.recorded_mean_volume(local, "AV45"))

    def order(data: str) -> list[str]:
        ds = loader.epoch_dataset(data, "train", None, seed=3, epoch=1)
        return [pid for b in loader.torch_batches(ds, 2) for pid in b["pet_image_id"]]

    assert order(uri) == order(local)
    with pytest.raises(ValueError, match="no manifest.json"):
        shards.read_manifest("file://" + str(tmp_path / "absent"))
