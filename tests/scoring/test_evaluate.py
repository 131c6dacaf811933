"""Evaluation: per-volume metrics against hand computations / scipy / skimage, rows with and without
brain_mask / labels columns, and `ganbert evaluate` end to end (model folder and mean-PET baseline)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance
from skimage.metrics import structural_similarity

from ganbert import config as config_mod
from ganbert.cli import main as cli_main
from ganbert.ingest.phantom import LABEL
from ganbert.scoring import metrics
from ganbert.scoring.biomarkers import NOTES_KEY, note_for
from ganbert.scoring.evaluate import (
    BIOMARKER_KEYS,
    BIOMARKER_METRICS,
    POSITIVITY,
    REGIONAL_SUVR,
    SUBJECT_METRICS,
    aggregate_subjects,
    brain_mask,
    geometry_of,
    positivity,
    subject_metrics,
)

RNG = np.random.default_rng(7)


def _vol(shape: tuple[int, ...] = (2, 14, 13, 12), lo: float = 50.0, hi: float = 400.0) -> torch.Tensor:
    return torch.from_numpy(RNG.uniform(lo, hi, shape))


def test_masked_psnr_matches_hand_computation() -> None:
    pred, target = _vol(), _vol()
    mask = torch.zeros(14, 13, 12, dtype=torch.bool)
    mask[3:9, 2:10, 4:11] = True
    mse = float(((pred - target)[:, mask] ** 2).mean())
    assert metrics.masked_psnr(pred, target, mask, 1010.0) == pytest.approx(10 * math.log10(1010.0**2 / mse), rel=1e-12)
    with pytest.raises(ValueError, match="mask"):
        metrics.masked_psnr(pred, target, torch.zeros(14, 13, 12), 1010.0)
    with pytest.raises(ValueError, match="mask"):
        metrics.masked_psnr(pred, target, mask[:-1], 1010.0)


def test_masked_ssim_is_the_mean_of_skimages_ssim_map_over_the_mask() -> None:
    pred, target = _vol((1, 16, 15, 14)), _vol((1, 16, 15, 14))
    full = torch.ones(16, 15, 14, dtype=torch.bool)
    whole = float(metrics.ssim3d(pred[None], target[None], 400.0)[0])
    assert metrics.masked_ssim(pred, target, full, 400.0) == pytest.approx(whole, abs=1e-12)
    _, smap = structural_similarity(target[0].numpy(), pred[0].numpy(), data_range=400.0, gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False, full=True)
    mask = torch.zeros(16, 15, 14, dtype=torch.bool)
    mask[5:9, 3:10, 6:9] = True  # partly within the window radius (5) of the border: those voxels are left out
    inner = mask.numpy().copy()
    inner[:, :5] = False
    assert metrics.masked_ssim(pred, target, mask, 400.0) == pytest.approx(float(smap[inner].mean()), abs=1e-6)
    edge = torch.zeros(16, 15, 14, dtype=torch.bool)
    edge[0, 0, 0] = True  # inside the border the window does not fit
    with pytest.raises(ValueError, match="mask"):
        metrics.masked_ssim(pred, target, edge, 400.0)


def test_wasserstein_matches_scipy() -> None:
    a, b = RNG.normal(0, 1, 500), RNG.gamma(2.0, 1.5, 321)
    expected = wasserstein_distance(a, b)
    assert metrics.wasserstein1d(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-10)
    assert metrics.wasserstein1d(torch.from_numpy(a), torch.from_numpy(a + 3.0)) == pytest.approx(3.0, rel=1e-10)
    with pytest.raises(ValueError, match="non-empty"):
        metrics.wasserstein1d(torch.zeros(0), torch.ones(3))


def test_relative_volume_cancels_scale() -> None:
    v, mask = _vol(), torch.ones(14, 13, 12, dtype=torch.bool)
    mask[0] = False
    rel = metrics.relative(v, mask)
    assert float(rel[:, mask].mean()) == pytest.approx(1.0, rel=1e-12)
    assert torch.allclose(metrics.relative(3.7 * v, mask), rel)
    with pytest.raises(ValueError, match="volume"):
        metrics.relative(-v, mask)


def _labelled(suvr: dict[int, float], shape: tuple[int, int, int] = (14, 12, 12)) -> tuple[torch.Tensor, torch.Tensor]:
    """A label volume with one slab per region and a 2-frame PET holding `suvr` (reference = 1) times 250."""
    labels = torch.zeros(shape, dtype=torch.int64)
    keys = sorted(suvr)
    for i, key in enumerate(keys):
        labels[1 + i] = key
    pet = torch.full((2, *shape), 10.0, dtype=torch.float64)
    for key, value in suvr.items():
        pet[:, labels == key] = 250.0 * value
    return pet, labels


def test_regional_suvr_mape_and_composite_by_hand() -> None:
    ref = (LABEL["cerebellum_gm"],)
    truth = {LABEL["cerebellum_gm"]: 1.0, LABEL["neocortex"]: 1.5, LABEL["temporoparietal"]: 1.2}
    real, labels = _labelled(truth)
    expected = {LABEL["neocortex"]: 1.5, LABEL["temporoparietal"]: 1.2}
    assert metrics.regional_suvr(real, labels, ref) == pytest.approx(expected)
    fake, _ = _labelled({**truth, LABEL["neocortex"]: 1.2})
    # neocortex 20% low, temporoparietal exact -> 10%; a global scale changes nothing
    assert metrics.suvr_mape(2.0 * fake, real, labels, ref) == pytest.approx(10.0)
    n_neo, n_tp = int((labels == LABEL["neocortex"]).sum()), int((labels == LABEL["temporoparietal"]).sum())
    expect = (1.5 * n_neo + 1.2 * n_tp) / (n_neo + n_tp)
    targets = (LABEL["neocortex"], LABEL["temporoparietal"])
    assert metrics.composite_suvr(real, labels, targets, ref) == pytest.approx(expect)
    with pytest.raises(ValueError, match="reference"):
        metrics.regional_suvr(real, labels, (LABEL["pons"],))


def test_positivity_reads_each_tracer_the_right_way() -> None:
    for tracer, (_, cut, sense) in POSITIVITY.items():
        above, below = positivity(cut + 0.1, tracer), positivity(cut - 0.1, tracer)
        assert (above, below) == ((1.0, 0.0) if sense == ">" else (0.0, 1.0))
    assert math.isnan(positivity(float("nan"), "AV45"))
    with pytest.raises(ValueError, match="tracer"):
        positivity(1.0, "PIB")


def test_subject_metrics_with_and_without_labels() -> None:
    truth = {LABEL["cerebellum_gm"]: 1.0, LABEL["cerebellum_wm"]: 1.0, LABEL["temporoparietal"]: 1.4,
             LABEL["neocortex"]: 1.3, LABEL["inferior_temporal"]: 1.2}
    real, labels = _labelled(truth)
    mask = (labels > 0).numpy()
    plain = subject_metrics(2.0 * real, real, mask, "AV45")  # a dose/calibration error only
    assert set(plain) == set(SUBJECT_METRICS)
    assert plain["psnr_rel"] == math.inf and plain["ssim_rel"] == pytest.approx(1.0)
    assert plain["psnr_brain"] < 30 and plain["wasserstein"] > 100
    assert all(math.isnan(plain[k]) for k in ("suvr_mape", "positivity_agreement"))
    nolab = subject_metrics(2.0 * real, real, mask, "AV45", np.zeros((14, 12, 12), np.uint8))
    assert math.isnan(nolab["suvr_mape"])  # all-zero labels = no truth
    lab = subject_metrics(2.0 * real, real, mask, "AV45", labels.numpy().astype(np.uint8))
    assert lab["suvr_mape"] == pytest.approx(0.0, abs=1e-9)
    assert lab["positive_real"] == 1.0 and lab["positivity_agreement"] == 1.0
    flat, _ = _labelled(dict.fromkeys(truth, 1.0))  # uptake pattern lost: reads negative
    lost = subject_metrics(flat, real, mask, "AV45", labels.numpy().astype(np.uint8))
    assert lost["positive_fake"] == 0.0 and lost["positivity_agreement"] == 0.0 and lost["suvr_mape"] > 20
    s = aggregate_subjects([lab, lost])
    assert s["n"] == 2 and s["n_labelled"] == 2 and s["positivity_agreement"] == pytest.approx(0.5)


def _subject(tracer: str, truth: dict[str, float], fake_truth: dict[str, float]) -> dict[str, float]:
    """subject_metrics of slab phantoms whose regions hold `truth` (real) and `fake_truth` (generated) SUVRs."""
    real, labels = _labelled({LABEL[k]: v for k, v in truth.items()})
    fake, _ = _labelled({LABEL[k]: v for k, v in fake_truth.items()})
    return subject_metrics(3.0 * fake, real, (labels > 0).numpy(), tracer, labels.numpy().astype(np.uint8))


def test_subject_biomarkers_of_each_tracer_by_hand() -> None:
    """Equal-size slabs: composites are plain means of the regional SUVRs; a global scale changes nothing."""
    av45 = {"cerebellum_gm": 1.0, "cerebellum_wm": 1.0, "temporoparietal": 1.4, "neocortex": 1.3,
            "inferior_temporal": 1.2}
    s = _subject("AV45", av45, {**av45, "neocortex": 1.0})
    assert s["suvr_real.neocortex"] == pytest.approx(1.3) and s["suvr_fake.neocortex"] == pytest.approx(1.0)
    assert math.isnan(s["suvr_real.cerebellum_gm"])  # part of the reference region
    assert s["centiloid_real"] == pytest.approx(188.22 * 1.3 - 189.16)
    assert s["centiloid_error"] == pytest.approx(188.22 * (1.2 - 1.3))
    assert s["centiloid_abs_error"] == pytest.approx(18.822)
    assert all(math.isnan(s[k]) for k in ("braak_real", "metaroi_real", "metaroi_abs_pct_error"))
    av1451 = {"cerebellum_gm": 1.0, "medial_temporal": 1.5, "inferior_temporal": 1.35, "neocortex": 1.0}
    t = _subject("AV1451", av1451, {**av1451, "inferior_temporal": 1.0})
    assert (t["braak_real"], t["braak_fake"], t["braak_abs_error"]) == (2.0, 1.0, 1.0)  # III-IV read as I-II
    assert all(math.isnan(t[k]) for k in ("centiloid_real", "metaroi_real"))
    fdg = {"pons": 1.0, "temporoparietal": 1.3, "inferior_temporal": 1.1, "medial_temporal": 0.9}
    f = _subject("FDG", fdg, {**fdg, "temporoparietal": 1.1, "medial_temporal": 1.3})  # medial temporal: not meta-ROI
    assert f["metaroi_real"] == pytest.approx(1.2) and f["metaroi_fake"] == pytest.approx(1.1)
    assert f["metaroi_pct_error"] == pytest.approx(-100 / 12) and f["metaroi_abs_pct_error"] == pytest.approx(100 / 12)
    assert f["suvr_composite_real"] == pytest.approx(f["metaroi_real"])  # FDG positivity reads the meta-ROI
    assert all(math.isnan(f[k]) for k in ("centiloid_real", "braak_real"))


def _assert_absent_with_reason(summary: dict[str, object], keys: tuple[str, ...] = BIOMARKER_KEYS) -> None:
    for key in keys:
        if summary[key] is None:
            assert note_for(summary, key), f"{key} is absent without a reason"


def test_biomarkers_of_the_mean_pet_on_tiny_shards(tiny_shards: str) -> None:
    """Every tracer's biomarker columns and summary keys exist; the other tracers' are absent with a reason.
    The train split (several subjects per tracer) so that the cohort statistics are defined."""
    from ganbert.scoring.evaluate import evaluate_split, generator_predictor, mean_pet

    only = {"AV45": "centiloid", "AV1451": "braak", "FDG": "metaroi"}
    for tracer, mine in only.items():
        ev = evaluate_split(generator_predictor(mean_pet(tiny_shards, tracer)), tiny_shards, "train", tracer)
        s = ev.summary
        labelled = [subject for subject in ev.subjects if math.isfinite(subject["suvr_mape"])]
        assert s["n_labelled"] == len(labelled) >= 3  # a tiny PET grid can miss a small reference region (pons)
        assert all(set(SUBJECT_METRICS) <= set(subject) for subject in ev.subjects)
        assert all(math.isfinite(subject["positive_real"]) and math.isfinite(subject["suvr_real.neocortex"])
                   for subject in labelled)
        _assert_absent_with_reason(s)
        for tracer2, other in only.items():
            keys = [k for k in BIOMARKER_KEYS if k.startswith(other + ".")]
            cols = [k for k in BIOMARKER_METRICS if k.startswith(other + "_")]
            if other == mine:
                assert all(math.isfinite(subject[c]) for subject in labelled for c in cols), tracer
                assert any(s[k] is not None for k in keys), (tracer, keys)
            else:
                assert all(math.isnan(subject[c]) for subject in ev.subjects for c in cols), (tracer, other)
                assert all(s[k] is None for k in keys) and f"{tracer2} only" in s[NOTES_KEY][other]
        icc = [s[f"suvr.{r}.icc21"] for r in ("temporoparietal", "neocortex", "inferior_temporal")]
        assert all(v is not None and -1.0 <= v <= 1.0 for v in icc), (tracer, icc)
        if tracer == "AV45":
            assert s["suvr.cerebellum_gm.icc21"] is None and "reference" in note_for(s, "suvr.cerebellum_gm.icc21")
        print(tracer, {k: s[k] for k in BIOMARKER_KEYS if s[k] is not None and not k.startswith("suvr.")},
              {k: v for k, v in s[NOTES_KEY].items() if not k.startswith("suvr.")})


def _without_labels(data_dir: str, out: Path) -> str:
    """A copy of shards whose rows carry no region labels (all zeros, has_labels false), as real ADNI shards."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ganbert.store import shards

    shutil.copytree(data_dir, out)
    manifest = shards.read_manifest(out)
    for entry in manifest["shards"]:
        path = out / entry["file"]
        table = pq.read_table(path)
        labels = table.column("labels").combine_chunks()
        zeros = pa.ExtensionArray.from_storage(labels.type, pa.FixedSizeListArray.from_arrays(
            pa.array(np.zeros(len(labels) * labels.type.storage_type.list_size, np.uint8)),
            labels.type.storage_type.list_size))
        table = table.set_column(table.schema.get_field_index("labels"), "labels", zeros)
        table = table.set_column(table.schema.get_field_index("has_labels"), "has_labels",
                                 pa.array([False] * len(labels), pa.bool_()))
        pq.write_table(table, path, compression="zstd")
        entry.update(bytes=path.stat().st_size, sha256=shards.sha256_file(path))
    for row in manifest["rows"]:
        row["labels"] = False
    shards.save_manifest(out, manifest)
    assert shards.verify(out) == []
    return str(out)


def test_evaluate_without_labels_reports_every_biomarker_absent(tiny_shards: str, tmp_path: Path) -> None:
    """Shards without region labels (real ADNI data): the run succeeds, and every biomarker value, per subject
    and over subjects, is absent (empty / null) with a reason, never 0."""
    data = _without_labels(tiny_shards, tmp_path / "shards")
    out = tmp_path / "eval"
    assert cli_main(["evaluate", "--baseline", "mean-pet", "--data", data, "--split", "train", "--tracer", "AV45",
                     "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] >= 3 and summary["n_labelled"] == 0 and summary["psnr"] is not None
    region_keys = ("suvr_mape", "suvr_composite_real", "positive_real", "positivity_agreement", *BIOMARKER_METRICS)
    assert all(summary[k] is None for k in (*region_keys, *BIOMARKER_KEYS))
    _assert_absent_with_reason(summary)
    assert "no region labels" in summary[NOTES_KEY]["centiloid"]
    import csv

    with (out / "subjects.csv").open() as fobj:
        rows = list(csv.DictReader(fobj))
    assert len(rows) == summary["n"]
    assert all(row[c] == "" for row in rows for c in (*region_keys, *REGIONAL_SUVR))
    assert all(row["psnr"] != "" for row in rows)


def test_brain_mask_prefers_the_column_and_falls_back_to_the_t1(tiny_shards: str) -> None:
    from ganbert.store import loader

    geo = geometry_of(tiny_shards)
    row = next(loader.read_rows(tiny_shards, "test", "AV45"))
    row.pop("brain_mask", None)
    mask, source = brain_mask(row, geo)
    assert source == "t1" and mask.shape == tuple(geo.pet_size)
    assert 0.1 < mask.mean() < 0.9  # head foreground, not the whole grid
    given = np.zeros(geo.pet_size, np.uint8)
    given[4:9, 3:8, 3:8] = 1
    mask2, source2 = brain_mask({**row, "brain_mask": given.reshape(-1).tolist()}, geo)  # flat, as pyarrow lists it
    assert source2 == "brain_mask" and (mask2 == given.astype(bool)).all()


def test_evaluate_cli_model_and_baseline(tiny_shards: str, tmp_path: Path) -> None:
    from ganbert.models import build_generator
    from ganbert.models.saved import save_model_dir

    torch.manual_seed(0)
    cfg = config_mod.tiny()
    model_dir = save_model_dir(tmp_path / "model", cfg, build_generator(cfg))
    out_m, out_b = tmp_path / "model_eval", tmp_path / "baseline_eval"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cli_main(["evaluate", "--model", str(model_dir), "--data", tiny_shards, "--split", "test",
                     "--out", str(out_m), "--tracking-uri", uri]) == 0
    assert cli_main(["evaluate", "--baseline", "mean-pet", "--data", tiny_shards, "--split", "test",
                     "--tracer", "AV45", "--out", str(out_b)]) == 0
    for out in (out_m, out_b):
        summary = json.loads((out / "summary.json").read_text())
        for key in ("n", "psnr", "ssim", "rmse", "psnr01", "ssim01", "psnr_brain", "ssim_brain", "psnr_rel",
                    "ssim_rel", "wasserstein"):
            assert summary[key] is not None and math.isfinite(summary[key]), key
        lines = (out / "subjects.csv").read_text().splitlines()
        assert len(lines) == 1 + summary["n"] and summary["n"] >= 1 and summary["split"] == "test"
    # the mean training PET beats an untrained generator
    b, m = (json.loads((o / "summary.json").read_text()) for o in (out_b, out_m))
    assert b["psnr"] > m["psnr"] and b["wasserstein"] < m["wasserstein"]
    from mlflow import MlflowClient

    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("evaluate").experiment_id])
    assert runs and runs[0].data.metrics["test_psnr"] == pytest.approx(m["psnr"])
    # results are never overwritten unasked; a baseline needs a tracer when the split holds several
    assert cli_main(["evaluate", "--baseline", "mean-pet", "--data", tiny_shards, "--tracer", "AV45",
                     "--out", str(out_b)]) == 2
    assert cli_main(["evaluate", "--baseline", "mean-pet", "--data", tiny_shards, "--out", str(tmp_path / "x")]) == 2
    assert cli_main(["evaluate", "--baseline", "mean-pet", "--data", tiny_shards, "--tracer", "AV45",
                     "--out", str(out_b), "--overwrite"]) == 0


def test_mean_pet_baseline_reads_the_volume_recorded_at_preprocessing(tiny_shards: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The baseline is the recorded mean normalised training PET: no training row is read, and it equals the mean
    streamed from the rows (float32 rounding of a float64 mean)."""
    from ganbert.scoring import evaluate
    from ganbert.store import stats

    streamed = torch.stack(list(stats.normalised_train_pet(tiny_shards, "AV45"))).mean(0).float()

    def no_rows(*args: object, **kwargs: object) -> None:
        raise AssertionError("mean_pet read the training rows")

    monkeypatch.setattr(stats, "normalised_train_pet", no_rows)
    torch.testing.assert_close(evaluate.mean_pet(tiny_shards, "AV45").mean, streamed, rtol=1e-6, atol=1e-6)


def test_evaluate_takes_preset_config_and_overrides_like_every_command(tiny_shards: str, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`geometry.tracer` and `run.experiment` apply; a geometry that contradicts the shards and an override that
    evaluation cannot honour are refused with the field named."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("run: {experiment: from-config}\n")
    base = ["evaluate", "--baseline", "mean-pet", "--data", tiny_shards, "--split", "test"]
    assert cli_main(base + ["--out", str(tmp_path / "a"), "--tracking-uri", uri, "--preset", "tiny",
                            "--config", str(cfg_file), "geometry.tracer=FDG"]) == 0
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["tracer"] == "FDG"
    from mlflow import MlflowClient

    assert MlflowClient(uri).get_experiment_by_name("from-config") is not None
    assert cli_main(base + ["--out", str(tmp_path / "b"), "--preset", "demo", "geometry.tracer=FDG"]) == 2
    assert "geometry: the shards in" in capsys.readouterr().err
    assert cli_main(base + ["--out", str(tmp_path / "c"), "--preset", "tiny", "optim.lr=0.1"]) == 2
    assert "optim.lr: evaluate does not use it" in capsys.readouterr().err


def test_a_checkpoint_given_as_a_uri_is_loaded(tmp_path: Path) -> None:
    from ganbert.experiments.study import load_checkpoint
    from ganbert.models import build_generator
    from ganbert.models.saved import save_model_dir

    cfg = config_mod.tiny()
    generator = build_generator(cfg)
    model_dir = save_model_dir(tmp_path / "model", cfg, generator)
    loaded = load_checkpoint(model_dir.as_uri())
    for k, v in generator.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
