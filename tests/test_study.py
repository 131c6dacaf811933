"""`ganbert study`: YAML validation, the mean ± sd table, and a real tiny study (local Ray, SQLite MLflow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ganbert import config as config_mod
from ganbert import study as study_mod
from ganbert.cli import main as cli_main

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


def test_shipped_study_has_the_six_rows_on_three_tracers() -> None:
    s = study_mod.load_study(SPACES / "study.yaml", config_mod.tiny())
    assert [r.name for r in s.rows] == ["mean-PET", "L1-only U-Net", "pix2pix-tanh", "pix2pix-tanhshrink", "ganbert",
                                        "ganbert-cnnd"]
    assert s.tracers == ("AV45", "AV1451", "FDG")
    l1 = config_mod.apply(config_mod.tiny(), s.rows[1].overrides)
    assert (l1.model.method, l1.optim.lambda_nsp, l1.optim.lambda_mlm) == ("ganbert", 0.0, 0.0)
    cfg = study_mod.trial_config(config_mod.tiny(), s.rows[1], "FDG", 4, "st")
    assert (cfg.geometry.tracer, cfg.run.seed, cfg.run.name) == ("FDG", 4, "st-l1-only-u-net-FDG-s4")


@pytest.mark.parametrize("text, match", [
    ("rows: []", "study"),
    ("study: {rows: []}", "at least one row"),
    ("study: {tracers: [PIB], rows: [{name: a, baseline: mean-pet}]}", "tracers"),
    ("study: {rows: [{name: a, baseline: median}]}", "baseline"),
    ("study: {rows: [{name: a, overrides: {optim.nope: 1}}]}", "nope"),
    ("study: {rows: [{name: a b, baseline: mean-pet}, {name: A-B, baseline: mean-pet}]}", "differ"),
])
def test_bad_study_files_are_named(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        study_mod.load_study(path, config_mod.tiny())


def test_aggregate_is_mean_and_sample_sd() -> None:
    results = [{"row": "g", "tracer": "AV45", "test": {"psnr": v, "ssim": None}} for v in (10.0, 12.0, 14.0)]
    agg = study_mod.aggregate(results)
    assert agg[("g", "AV45")]["psnr"] == (12.0, 2.0, 3) and "ssim" not in agg[("g", "AV45")]
    s = study_mod.Study((study_mod.StudyRow("g"), study_mod.StudyRow("b", baseline="mean-pet")), ("AV45", "FDG"))
    md = study_mod.render_markdown(s, "st", results + [{"row": "b", "tracer": "AV45", "test": {"psnr": 9.0}}], 3, 60.0)
    assert "| g | 12.00 ± 2.00 | – | – | – | – | – |" in md and "| b | 9.00 | – |" in md


def test_tiny_study_end_to_end(tiny_shards: str, tmp_path: Path, local_ray: None) -> None:
    space = tmp_path / "small.yaml"
    space.write_text("study:\n  tracers: [AV45]\n  rows:\n    - {name: mean-PET, baseline: mean-pet}\n"
                     "    - {name: L1-only U-Net, overrides: {optim.lambda_nsp: 0.0, optim.lambda_mlm: 0.0}}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    assert cli_main(["study", "--space", str(space), "--seeds", "1", "--data", tiny_shards, "--tracking-uri", uri,
                     "--out", str(out), "--preset", "tiny", "optim.epochs=1", "run.experiment=st",
                     f"run.storage={tmp_path / 'ray'}"]) == 0
    md = (out / "study.md").read_text()
    assert "| method | AV45 PSNR | AV45 SSIM | AV45 RMSE |" in md
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "study.json").read_text())["results"]
    assert [(r["row"], r["seed"]) for r in results] == [("mean-PET", None), ("L1-only U-Net", 0)]
    assert all(r["test"]["n"] >= 1 and r["test"]["psnr"] for r in results)
    assert all("checkpoint_" in Path(r["checkpoint"]).name for r in results[1:])  # a val-selected checkpoint
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("st").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "tiny-small")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children + [parent])
    by_row = {(r.data.tags["ganbert.row"], r.data.params.get("run.seed")): r for r in children}
    l1 = by_row[("L1-only U-Net", "0")]
    assert l1.data.metrics["test_psnr"] == pytest.approx(results[1]["test"]["psnr"]) and "val_psnr" in l1.data.metrics
    assert by_row[("mean-PET", None)].data.metrics["test_psnr"] == pytest.approx(results[0]["test"]["psnr"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"study.md", "study.png", "study.json"}
    # results are not overwritten unasked
    assert cli_main(["study", "--space", str(space), "--seeds", "1", "--data", tiny_shards, "--tracking-uri", uri,
                     "--out", str(out), "--preset", "tiny"]) == 2
