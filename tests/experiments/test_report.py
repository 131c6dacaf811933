"""`ganbert report`: best run per method x tracer from a real SQLite MLflow store, Markdown + PNG + report run."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib.image
import pytest
from mlflow import MlflowClient

from ganbert.experiments import report

T0 = 1_700_000_000_000


def _run(client: MlflowClient, exp_id: str, name: str, method: str | None, tracer: str | None,
         psnr: list[float], status: str = "FINISHED", parent: str | None = None) -> str:
    """A run whose val_ssim/val_rmse at epoch e are e/10 and 1 + e (so the best epoch is visible in them)."""
    tags = {"mlflow.parentRunId": parent} if parent else {}
    run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    if method:
        client.log_param(run_id, "model.method", method)
    if tracer:
        client.log_param(run_id, "geometry.tracer", tracer)
    for epoch, value in enumerate(psnr):
        t = T0 + 1000 * epoch
        client.log_metric(run_id, "val_psnr", value, timestamp=t, step=epoch)
        client.log_metric(run_id, "val_ssim", epoch / 10, timestamp=t, step=epoch)
        client.log_metric(run_id, "val_rmse", 1.0 + epoch, timestamp=t, step=epoch)
        client.log_metric(run_id, "val_psnr01", value / 2, timestamp=t, step=epoch)
        client.log_metric(run_id, "train_l1", 1.0 / (epoch + 1), timestamp=t, step=epoch)
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("report_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("ablation", artifact_location=(root / "artifacts").as_uri())
    parent = _run(client, exp_id, "sweep", None, None, [])
    ids = {
        "g_av45_best": _run(client, exp_id, "g-a", "ganbert", "AV45", [25.0, 28.0, 30.0, 29.0], parent=parent),
        "g_av45_other": _run(client, exp_id, "g-b", "ganbert", "AV45", [26.0, 27.0], parent=parent),
        "g_av45_failed": _run(client, exp_id, "g-c", "ganbert", "AV45", [40.0], status="FAILED"),
        "p_av45": _run(client, exp_id, "p-a", "pix2pix-tanh", "AV45", [22.0, 21.0, 20.5]),
        "c_fdg_tie": _run(client, exp_id, "c-f", "ganbert-cnnd", "FDG", [20.0, 24.0, 24.0]),
        "g_fdg_nan": _run(client, exp_id, "g-f", "ganbert", "FDG", [float("nan"), 18.0]),
        "no_tracer": _run(client, exp_id, "x", "ganbert", None, [50.0]),
    }
    # a resumed run re-logged epoch 1: the later value counts
    client.log_metric(ids["p_av45"], "val_psnr", 23.0, timestamp=T0 + 10_000, step=1)
    return uri, ids


def test_build_table_synthetic_dicts() -> None:
    def run(rid: str, method: str, tracer: str, psnr: dict[int, float]) -> dict:
        return {"run_id": rid, "run_name": rid, "params": {"model.method": method, "geometry.tracer": tracer},
                "history": {"val_psnr": psnr, "val_rmse": {e: float(e) for e in psnr}}}

    rows = report.build_table([
        run("a", "ganbert-cnnd", "AV1451", {0: 10.0, 1: 12.0}),
        run("b", "ganbert", "FDG", {0: 5.0}),
        run("c", "ganbert", "AV45", {0: 9.0, 3: 11.0, 5: 10.0}),
        run("d", "ganbert", "AV45", {0: 10.5}),
        run("e", "pix2pix-tanh", "AV45", {0: math.nan}),
        {"run_id": "f", "params": {"geometry.tracer": "AV45"}, "history": {"val_psnr": {0: 99.0}}},
    ])
    assert [(r["method"], r["tracer"], r["run_id"]) for r in rows] == [
        ("ganbert", "AV45", "c"), ("ganbert", "FDG", "b"), ("ganbert-cnnd", "AV1451", "a")]
    best = rows[0]
    assert (best["best_epoch"], best["psnr"], best["rmse"], best["ssim"], best["runs"]) == (3, 11.0, 3.0, None, 2)
    with pytest.raises(ValueError, match=r"runs\[0\]"):
        report.build_table([{"params": {}}])


def test_collect_and_build_table_from_store(store: tuple[str, dict[str, str]]) -> None:
    uri, ids = store
    runs = report.collect_runs(uri, "ablation")
    assert {r["run_id"] for r in runs} == set(ids.values()) - {ids["g_av45_failed"]}
    rows = {(r["method"], r["tracer"]): r for r in report.build_table(runs)}
    assert sorted(rows) == [("ganbert", "AV45"), ("ganbert", "FDG"), ("ganbert-cnnd", "FDG"),
                            ("pix2pix-tanh", "AV45")]
    g = rows[("ganbert", "AV45")]
    assert (g["run_id"], g["best_epoch"], g["runs"]) == (ids["g_av45_best"], 2, 2)
    assert (g["psnr"], g["ssim"], g["rmse"], g["psnr01"], g["ssim01"]) == (30.0, 0.2, 3.0, 15.0, None)
    p = rows[("pix2pix-tanh", "AV45")]
    assert (p["best_epoch"], p["psnr"], p["rmse"]) == (1, 23.0, 2.0)  # the re-logged epoch 1 won
    c = rows[("ganbert-cnnd", "FDG")]
    assert (c["best_epoch"], c["psnr"]) == (1, 24.0)  # the earliest of two equal epochs
    assert rows[("ganbert", "FDG")]["best_epoch"] == 1  # NaN epoch ignored
    with pytest.raises(ValueError, match="nope"):
        report.collect_runs(uri, "nope")


def test_main_writes_files_and_logs_report_run(store: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    uri, ids = store
    args = argparse.Namespace(experiment="ablation", tracking_uri=uri, out=str(tmp_path / "out"))
    assert report.main(args) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| method | AV45 PSNR"))
    assert header.count("PSNR") == 3 and "AV45 best epoch" in header and header.index("AV1451") < header.index("FDG")
    ours = md.split("## The paper's numbers")[0]
    paper = md.split("## The paper's numbers")[1]
    assert "| ganbert | 30.00 | 0.200 | 3.000 | 2 | – | – | – | – | 18.00 | 0.100 | 2.000 | 1 |" in ours
    assert "| pix2pix-tanh | 23.00 | 0.100 | 2.000 | 1 |" in ours
    assert "| pix2pix-tanhshrink | – | – | – | – |" in ours
    assert ids["g_av45_best"] in ours and ids["g_av45_other"] not in ours
    assert "| ganbert | 57.58 | 0.27 | 0.80 | 51.05 | 0.25 | 0.82 | 56.53 | 0.11 | 0.82 |" in paper
    assert "| pix2pix-tanh | 50.41 | 0.00 | 1.85 | – | – | – | – | – | – |" in paper
    assert "not from this experiment" in md
    png = (tmp_path / "out" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert matplotlib.image.imread(tmp_path / "out" / "report.png").shape[2] in (3, 4)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ablation")
    report_runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'report'")
    assert len(report_runs) == 1 and report_runs[0].info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(report_runs[0].info.run_id)}
    assert names == {"report.md", "report.png"}
    # a second report ignores the first report run and gives the same table
    args.out = str(tmp_path / "again")
    assert report.main(args) == 0
    assert (tmp_path / "again" / "report.md").read_text().split("Tracking store")[1] == md.split("Tracking store")[1]


def test_report_shows_test_metrics_of_study_runs(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("study", artifact_location=(tmp_path / "artifacts").as_uri())
    for seed, (val, test) in enumerate([(20.0, 19.0), (22.0, 21.0)]):
        rid = _run(client, exp_id, f"l1-s{seed}", "ganbert", "AV45", [val])
        client.set_tag(rid, "ganbert.row", "L1-only U-Net")
        client.log_metric(rid, "test_psnr", test, step=0)
        client.log_metric(rid, "test_ssim_rel", 0.5 + seed / 10, step=0)
    base = client.create_run(exp_id, run_name="mean").info.run_id  # a baseline: test metrics, no val history
    client.log_param(base, "model.method", "mean-pet")
    client.log_param(base, "geometry.tracer", "AV45")
    client.set_tag(base, "ganbert.row", "mean-PET")
    client.log_metric(base, "test_psnr", 18.5, step=0)
    client.set_terminated(base, "FINISHED")
    plain = _run(client, exp_id, "no-test", "pix2pix-tanh", "FDG", [15.0])  # no test metrics: not in that table
    args = argparse.Namespace(experiment="study", tracking_uri=uri, out=str(tmp_path / "out"))
    assert report.main(args) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    test_part = md.split("## Test split")[1].split("## The paper's numbers")[0]
    assert "| L1-only U-Net | AV45 | 2 | 20.00 ± 1.41 | – | – | – | – | 0.550 ± 0.071 |" in test_part
    assert "| mean-PET | AV45 | 1 | 18.50 | – |" in test_part
    assert "FDG" not in test_part and plain not in test_part
    assert "| pix2pix-tanh | – | – | – | – | – | – | – | – | 15.00 |" in md  # the val table is unchanged


def test_report_prints_a_studys_paired_intervals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("st", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp_id, run_name="tiny-study", tags={"ganbert.kind": "study"}).info.run_id
    for stat, value in (("delta", 1.25), ("ci_lo", 0.5), ("ci_hi", 2.0), ("p", 0.004)):
        client.log_metric(run_id, f"AV45/ganbert.cv_psnr.{stat}", value)
    client.log_metric(run_id, "study_seconds", 60.0)
    client.set_terminated(run_id, "FINISHED")
    args = argparse.Namespace(experiment="st", tracking_uri=uri, out=str(tmp_path / "report"))
    assert report.main(args) == 0
    assert "| AV45 | ganbert | cv_psnr | +1.25 [+0.5, +2] | 0.004 |" in capsys.readouterr().out
