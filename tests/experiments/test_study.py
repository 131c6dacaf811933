"""`ganbert study`: rows from a study YAML or a Tune grid, the paired table, and a real 2-fold tiny study (local Ray,
SQLite MLflow) whose numbers are recomputed from study.json alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient
from scipy import stats

from ganbert import config as config_mod
from ganbert.cli import main as cli_main
from ganbert.experiments import paired
from ganbert.experiments import study as study_mod
from ganbert.store import folds, shards

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


def test_shipped_study_has_the_six_rows_on_three_tracers() -> None:
    s = study_mod.load_study(SPACES / "study.yaml", config_mod.tiny())
    assert [r.name for r in s.rows] == ["mean-PET", "L1-only U-Net", "pix2pix-tanh", "pix2pix-tanhshrink", "ganbert",
                                        "ganbert-cnnd"]
    assert s.tracers == ("AV45", "AV1451", "FDG")
    l1 = config_mod.apply(config_mod.tiny(), s.rows[1].overrides)
    assert (l1.model.method, l1.optim.lambda_nsp, l1.optim.lambda_mlm) == ("ganbert", 0.0, 0.0)
    cfg = study_mod.trial_config(config_mod.tiny(), s.rows[1], "FDG", 4, "st")
    assert (cfg.geometry.tracer, cfg.run.seed, cfg.run.name) == ("FDG", 4, "st-l1-only-u-net-FDG-s4")
    assert study_mod.default_reference(s, config_mod.tiny()) == "L1-only U-Net"


def test_trial_storage_stays_a_uri_and_fold_runs_have_their_own_names() -> None:
    base = config_mod.apply(config_mod.tiny(), {"run.storage": "s3://bucket/ganbert"})
    row = study_mod.StudyRow("g", None, {})
    fold = folds.Fold(2, 5, 0, frozenset({"a"}), frozenset({"b"}), frozenset({"c"}))
    cfg = study_mod.trial_config(base, row, "AV45", 0, "st", fold)
    assert cfg.run.storage == "s3://bucket/ganbert/st" and cfg.run.name == "st-g-AV45-s0-f2"


@pytest.mark.parametrize("text, match", [
    ("study: 1", "study"),
    ("study: {rows: []}", "at least one row"),
    ("study: {tracers: [PIB], rows: [{name: a, baseline: mean-pet}]}", "tracers"),
    ("study: {rows: [{name: a, baseline: median}]}", "baseline"),
    ("study: {rows: [{name: a, overrides: {optim.nope: 1}}]}", "nope"),
    ("study: {rows: [{name: a b, baseline: mean-pet}, {name: A-B, baseline: mean-pet}]}", "differ"),
    ("optim.lr: {uniform: [0.001, 0.01]}", "sampled"),
])
def test_bad_study_files_are_named(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        study_mod.load_study(path, config_mod.tiny())


def test_a_tune_grid_becomes_study_rows() -> None:
    s = study_mod.load_study(SPACES / "masking.yaml", config_mod.tiny())
    assert len(s.rows) == 9 and s.tracers == ("AV45",)
    row = next(r for r in s.rows if r.name == "mri_mask_ratio=0.05, pet_mask_ratio=0.25")
    assert row.overrides == {"model.method": "ganbert", "sequence.mri_mask_ratio": 0.05,
                             "sequence.pet_mask_ratio": 0.25}
    assert study_mod.default_reference(s, config_mod.tiny()) == row.name  # the preset's own values
    ablation = study_mod.load_study(SPACES / "ablation.yaml", config_mod.tiny())
    assert ablation.tracers == ("AV45", "AV1451", "FDG") and [r.name for r in ablation.rows] == [
        f"method={m}" for m in ("pix2pix-tanh", "pix2pix-tanhshrink", "ganbert", "ganbert-cnnd")]
    lambdas = study_mod.load_study(SPACES / "lambdas.yaml", config_mod.tiny())
    assert lambdas.rows[3].name == "lambda_nsp=0.0, lambda_mlm=0.0, lambda_l1=20.0"


def test_paired_table_holm_adjusts_over_the_rows_of_one_metric() -> None:
    rng = np.random.default_rng(0)
    records = []
    for i in range(12):
        for row, shift in (("ref", 0.0), ("up", 1.0), ("same", 0.0)):
            for seed in (0, 1):
                v = 20.0 + shift + rng.normal(0, 0.1) + 0.5 * i
                records.append({"set": "cv", "tracer": "AV45", "row": row, "subject": f"s{i:02d}", "seed": seed,
                                "psnr": v, "rmse": None})
    table = study_mod.paired_table(records, ["ref", "up", "same"], "ref", 2000, 0)
    psnr = {e["row"]: e for e in table if e["metric"] == "psnr"}
    assert psnr["up"]["verdict"] == paired.BETTER and psnr["up"]["n"] == 12
    assert psnr["same"]["verdict"] == paired.NO_DIFFERENCE
    assert [psnr["up"]["p_holm"], psnr["same"]["p_holm"]] == paired.holm([psnr["up"]["p_wilcoxon"],
                                                                         psnr["same"]["p_wilcoxon"]])
    assert not [e for e in table if e["metric"] == "rmse"]  # no values: no comparison, never a zero


def _spy_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record, in order, every shard read of the driver by part name, and every finished training run."""
    from ganbert.store import loader
    from ganbert.store.part import as_part
    from ganbert.train import loop

    events: list[tuple[str, str]] = []
    read_rows, fit = loader.read_rows, loop.fit

    def spy_read(data_dir: str, split: Any, *args: Any, **kwargs: Any) -> Any:
        events.append(("read", as_part(split).name))
        return read_rows(data_dir, split, *args, **kwargs)

    def spy_fit(*args: Any, **kwargs: Any) -> Any:
        out = fit(*args, **kwargs)
        events.append(("fit", str(kwargs.get("fold"))))
        return out

    monkeypatch.setattr(loader, "read_rows", spy_read)
    monkeypatch.setattr(loop, "fit", spy_fit)
    return events


@pytest.mark.slow
def test_two_fold_tiny_study_end_to_end(tiny_shards: str, tmp_path: Path, local_ray: None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    space = tmp_path / "small.yaml"
    space.write_text("study:\n  tracers: [AV45]\n  rows:\n    - {name: mean-PET, baseline: mean-pet}\n"
                     "    - {name: L1-only U-Net, overrides: {optim.lambda_nsp: 0.0, optim.lambda_mlm: 0.0}}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("GANBERT_HOME", str(tmp_path / "home"))
    events = _spy_reads(monkeypatch)
    args = ["study", "--space", str(space), "--folds", "2", "--data", tiny_shards, "--tracking-uri", uri,
            "--external", f"again={tiny_shards}", "--bootstrap", "2000", "--preset", "tiny", "optim.epochs=1",
            "run.experiment=st", f"run.storage={(tmp_path / 'ray').as_uri()}"]  # storage as a URI, read back as one
    assert cli_main(args) == 0
    out = tmp_path / "home" / "study" / "tiny-small"  # the default --out lives in $GANBERT_HOME
    result = json.loads((out / "study.json").read_text())
    assert (out / "forest-cv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| mean-PET | PSNR | " in (out / "study.md").read_text()

    # every non-test subject predicted exactly once per row and seed, by the fold that held it out
    manifest = shards.read_manifest(tiny_shards)
    pool = {r["subject"] for r in manifest["rows"] if r["split"] != "test" and r["tracer"] == "AV45"}
    test = {r["subject"] for r in manifest["rows"] if r["split"] == "test" and r["tracer"] == "AV45"}
    made = [folds.Fold.from_dict(f) for f in result["fold_subjects"]]
    assert made == folds.ensure(tiny_shards, 2, 0, 64)
    for row, seed in (("mean-PET", None), ("L1-only U-Net", 0)):
        cv = [r for r in result["subjects"] if r["set"] == "cv" and r["row"] == row and r["seed"] == seed]
        assert sorted(r["subject"] for r in cv) == sorted(pool)
        assert all(r["subject"] in made[r["fold"]].held_out for r in cv)
        locked = [r for r in result["subjects"] if r["set"] == "test" and r["row"] == row]
        assert {r["subject"] for r in locked} == test and all(r["fold"] is None for r in locked)
    # the locked test split is read only after the last fold of the last row is trained
    fits = [i for i, e in enumerate(events) if e[0] == "fit"]
    tests = [i for i, e in enumerate(events) if e == ("read", "test")]
    assert len(fits) == 2 and tests and min(tests) > max(fits)
    assert {e[1] for e in events[: max(fits)] if e[0] == "read"} <= {"train", "val", "held_out"}

    # the paired numbers recomputed from study.json's per-subject values alone
    checked = 0
    for e in result["paired"]:
        vals: dict[str, dict[str, list[float]]] = {}
        for r in result["subjects"]:
            if (r["set"], r["tracer"]) == (e["set"], e["tracer"]) and r.get(e["metric"]) is not None:
                vals.setdefault(r["row"], {}).setdefault(r["subject"], []).append(r[e["metric"]])
        a = {s: float(np.mean(v)) for s, v in vals[e["row"]].items()}
        b = {s: float(np.mean(v)) for s, v in vals[e["reference"]].items()}
        subjects = sorted(a.keys() & b.keys())
        d = np.array([a[s] - b[s] for s in subjects])
        rng = np.random.default_rng(result["bootstrap"]["seed"])
        means = d[rng.integers(0, d.size, size=(result["bootstrap"]["resamples"], d.size))].mean(axis=1)
        assert e["n"] == d.size and e["mean_diff"] == pytest.approx(d.mean(), rel=1e-12)
        assert [e["ci_low"], e["ci_high"]] == pytest.approx(np.quantile(means, [0.025, 0.975]), rel=1e-12)
        if np.any(d != 0):
            assert e["p_wilcoxon"] == pytest.approx(stats.wilcoxon(d).pvalue, rel=1e-12)
        checked += 1
    assert checked and {e["set"] for e in result["paired"]} == {"cv", "test", "external:again"}

    # MLflow: one parent with the forest plot and the paired metrics; a child per fold x row x seed and per ensemble
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("st").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "tiny-small")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert all(r.info.status == "FINISHED" for r in children + [parent])
    cells = {(r.data.tags["ganbert.row"], r.data.tags["fold"], r.data.tags["seed"]) for r in children}
    assert cells == {(row, f, seed) for row, seed in (("mean-PET", "none"), ("L1-only U-Net", "0"))
                     for f in ("0", "1", "ensemble")}
    l1_fold = next(r for r in children if r.data.tags["fold"] == "1" and r.data.tags["ganbert.row"] != "mean-PET")
    assert "oof_psnr" in l1_fold.data.metrics and "val_psnr" in l1_fold.data.metrics
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"study.md", "study.json", "forest-cv.png"}
    key = "AV45/mean-pet.cv_psnr"
    cv_psnr = next(e for e in result["paired"] if (e["set"], e["metric"], e["row"]) == ("cv", "psnr", "mean-PET"))
    assert parent.data.metrics[f"{key}.delta"] == pytest.approx(cv_psnr["mean_diff"])
    assert {f"{key}.ci_lo", f"{key}.ci_hi"} <= set(parent.data.metrics)
    # every fold model's card carries its row's locked-test figures (the ensemble's mean and interval)
    l1 = next(c for c in result["cells"] if c["row"] == "L1-only U-Net")
    test_psnr = result["summaries"]["test"]["AV45"]["L1-only U-Net"]["psnr"]
    assert len(l1["models"]) == 2
    for model in l1["models"]:
        card = json.loads((Path(model.removeprefix("file://")) / "metadata.json").read_text())
        assert card["metrics"]["split"] == "test" and card["metrics"]["n"] == len(test)
        assert card["metrics"]["values"]["psnr"] == {"mean": test_psnr["mean"],
                                                     "ci95": [test_psnr["ci_low"], test_psnr["ci_high"]]}
    # results are not overwritten unasked
    assert cli_main(args) == 2


def test_bad_study_arguments_fail_before_anything_trains(tiny_shards: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    space = tmp_path / "s.yaml"
    space.write_text("study:\n  tracers: [AV45]\n  rows:\n    - {name: mean-PET, baseline: mean-pet}\n")
    common = ["study", "--space", str(space), "--data", tiny_shards, "--out", str(tmp_path / "out"), "--preset", "tiny"]
    assert cli_main(common + ["--folds", "40"]) == 2
    assert "40 folds need at least 40 non-test subjects" in capsys.readouterr().err
    assert cli_main(common + ["--reference", "nope"]) == 2
    assert "--reference 'nope': no such row (rows: mean-PET)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
