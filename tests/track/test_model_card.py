"""Model cards: built from the shards' manifest, carried by the published model folder and the MLflow model, and
the hook a study calls to add test-split metrics with intervals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ganbert import config
from ganbert.models import build_generator
from ganbert.models.saved import CARD_FILE, METADATA_FILE, STATE_FILE, save_model_dir
from ganbert.store import shards
from ganbert.track import model_card

METRICS = {"split": "test", "n": 8, "source": "ganbert study s, ensemble of 5 folds",
           "values": {"psnr": {"mean": 21.25, "ci95": [20.5, 22.0]}, "ssim": {"mean": 0.71, "ci95": None}}}


def test_card_describes_the_training_cohort_and_takes_test_metrics(tiny_shards: str, tmp_path: Path) -> None:
    cfg = config.tiny()
    folder = save_model_dir(tmp_path / "model", cfg, build_generator(cfg))
    card, meta_path = model_card.write_model_card(folder, cfg, data_dir=tiny_shards,
                                                  run={"best_epoch": 2, "best_val_psnr": 18.25})
    meta = json.loads(meta_path.read_text())
    rows = [r for r in shards.read_manifest(tiny_shards)["rows"] if r["tracer"] == "AV45"]
    train = [r for r in rows if r["split"] == "train"]
    assert meta["training"]["splits"]["train"] == {
        "rows": len(train), "subjects": len({r["subject"] for r in train}),
        "groups": {g: sum(r["group"] == g for r in train) for g in sorted({r["group"] for r in train})}}
    assert meta["training"]["source"].startswith("phantom cohort")
    assert meta["training"]["registration"] == "none"  # the cached phantom skips PET-to-T1 registration
    assert meta["training"]["t1_qc"] == {"rows_scored": len(rows), "rows_failing": 0}
    assert re.fullmatch(r"[0-9a-f]{40}", meta["code"]["commit"])  # this checkout's HEAD
    assert meta["tracer"] == "AV45" and meta["config"]["preset"] == "tiny" and meta["metrics"] is None
    text = card.read_text()
    assert meta["summary"] in text and "Not for diagnosis" in text and "Baron et al. (2026)" in text
    assert "phantom cohort" in text and "No test-split metrics" in text
    assert not any(r["subject"] in text or r["subject"] in meta_path.read_text() for r in rows)  # counts, no ids
    assert "no test-split metrics recorded" in meta["summary"] and "research use only" in meta["summary"]

    model_card.add_metrics(folder, METRICS)
    meta = model_card.read_metadata(folder)
    assert meta is not None and meta["metrics"] == METRICS and "test PSNR 21.25 dB (n=8)" in meta["summary"]
    assert "| psnr | 21.25 | 20.5 .. 22 |" in (folder / CARD_FILE).read_text()
    with pytest.raises(ValueError, match="metrics must be"):
        model_card.add_metrics(folder, {"values": {"psnr": 21.0}})
    with pytest.raises(ValueError, match="no metadata.json"):
        model_card.add_metrics(tmp_path, METRICS)


@pytest.mark.slow
def test_publish_best_puts_the_card_in_the_model_folder_and_the_mlflow_model(tiny_shards: str, tmp_path: Path) -> None:
    import ray.train

    from ganbert.track import mlflow_model
    from ganbert.track.tracking import MLflowTracker
    from ganbert.train.loop import publish_best

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config.apply(config.tiny(), {"run.name": "carded", "run.storage": str(tmp_path / "ray"),
                                       "run.experiment": "cards"})
    tracker = MLflowTracker(uri, "cards", "carded")
    run_id = str(tracker.run_id)
    tracker.finish()
    torch.manual_seed(0)
    ckpt = save_model_dir(tmp_path / "checkpoint", cfg, build_generator(cfg))
    (ckpt / STATE_FILE).write_text(json.dumps({"meta": {"mlflow_run_id": run_id, "epoch": 4, "val_psnr": 19.5}}))
    dest, model_uri, got_run = publish_best(cfg, ray.train.Checkpoint.from_directory(str(ckpt)), uri, tiny_shards)
    assert got_run == run_id and model_uri
    for folder in (Path(dest), mlflow_model.resolve_model_dir(model_uri, uri, dst=tmp_path / "dl")):
        meta = model_card.read_metadata(folder)
        assert meta is not None and (folder / CARD_FILE).is_file() and (folder / METADATA_FILE).is_file()
        assert meta["run"] == {"mlflow_run_id": run_id, "best_epoch": 4, "best_val_psnr": 19.5}
        assert meta["training"]["data"] == tiny_shards and meta["name"] == "carded"
