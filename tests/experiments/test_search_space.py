"""Search-space YAML files: shipped files load on every preset, Ray expands them as stated, bad input is named."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.tune.search.sample import Categorical, Float, Integer
from ray.tune.search.variant_generator import generate_variants

from ganbert import config as config_mod
from ganbert.experiments.search_space import BUNDLE_KEY, SearchSpace, load_space, trial_overrides

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
EXPECTED_GRID = {"masking.yaml": 9, "pet_masking.yaml": 3, "lambdas.yaml": 6, "quantization.yaml": 4,
                 "ablation.yaml": 12, "balance.yaml": 8}


def _trials(space: SearchSpace) -> list[dict]:
    """Ray Tune's own expansion of the param space (one sample per grid point)."""
    return [cfg for _, cfg in generate_variants(space.param_space)]


def _write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_files_are_the_expected_set() -> None:
    study_files = ["study.yaml", "methods.yaml"]  # ganbert study
    assert sorted(p.name for p in SPACES.glob("*.yaml")) == sorted([*EXPECTED_GRID, *study_files])


@pytest.mark.parametrize("preset", ["tiny", "paper"])
@pytest.mark.parametrize("name", sorted(EXPECTED_GRID))
def test_shipped_space_loads_and_expands(name: str, preset: str) -> None:
    path = SPACES / name
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# "), "each file starts with a comment saying what it sweeps"
    assert f"ganbert tune --space search_spaces/{name}" in path.read_text()
    base = config_mod.PRESETS[preset]()
    space = load_space(path, base)
    assert (space.metric, space.mode, space.num_samples) == ("val_psnr", "max", 1)
    assert space.grid_size == EXPECTED_GRID[name]
    trials = _trials(space)
    assert len(trials) == EXPECTED_GRID[name]
    seen = set()
    for trial in trials:
        overrides = trial_overrides(trial)
        cfg = config_mod.apply(base, overrides)  # every trial is a valid run config
        seen.add(tuple(sorted((k, str(v)) for k, v in overrides.items())))
        assert cfg.preset == preset
    assert len(seen) == len(trials)


def test_masking_and_ablation_values() -> None:
    masking = load_space(SPACES / "masking.yaml")
    ratios = {(o["sequence.mri_mask_ratio"], o["sequence.pet_mask_ratio"])
              for o in map(trial_overrides, _trials(masking))}
    assert (0.05, 0.25) in ratios and len(ratios) == 9
    ablation = load_space(SPACES / "ablation.yaml")
    pairs = {(o["model.method"], o["geometry.tracer"]) for o in map(trial_overrides, _trials(ablation))}
    assert pairs == {(m, t) for m in config_mod.METHODS for t in config_mod.TRACERS}
    quant = load_space(SPACES / "quantization.yaml")
    assert {(o["sequence.scheme"], o.get("sequence.scale")) for o in map(trial_overrides, _trials(quant))} == {
        ("paper", 100.0), ("paper", 1000.0), ("paper", 10000.0), ("monotonic", None)}


def test_lambda_bundles_apply_together() -> None:
    space = load_space(SPACES / "lambdas.yaml")
    overrides = [trial_overrides(t) for t in _trials(space)]
    triples = [(o["optim.lambda_nsp"], o["optim.lambda_mlm"], o["optim.lambda_l1"]) for o in overrides]
    assert (20.0, 1.0, 20.0) in triples and (0.0, 0.0, 20.0) in triples and len(set(triples)) == 6
    assert all(BUNDLE_KEY not in o for o in overrides)


def test_domains_nested_style_and_tune_block(tmp_path: Path) -> None:
    path = _write(tmp_path, """
tune: {metric: val_ssim, mode: max, num_samples: 3}
optim:
  lr: {loguniform: [1.0e-5, 1.0e-3]}
  lambda_l1: {uniform: [5, 40]}
  betas: {choice: [[0.5, 0.999], [0.9, 0.999]]}
model.base_channels: {randint: [2, 9]}
optim.epochs: 3
""")
    space = load_space(path)
    assert (space.metric, space.mode, space.num_samples) == ("val_ssim", "max", 3)
    assert space.grid_size == 1 and space.num_trials == 3
    ps = space.param_space
    assert isinstance(ps["optim.lr"], Float) and (ps["optim.lr"].lower, ps["optim.lr"].upper) == (1e-5, 1e-3)
    assert isinstance(ps["optim.lambda_l1"], Float)
    assert isinstance(ps["model.base_channels"], Integer)
    assert isinstance(ps["optim.betas"], Categorical) and ps["optim.betas"].categories == [[0.5, 0.999], [0.9, 0.999]]
    assert ps["optim.epochs"] == 3
    for _ in range(5):
        trial = _trials(space)[0]
        cfg = config_mod.apply(config_mod.tiny(), trial_overrides(trial))
        assert 1e-5 <= cfg.optim.lr < 1e-3 and 2 <= cfg.model.base_channels < 9 and cfg.optim.epochs == 3
        assert cfg.optim.betas in ((0.5, 0.999), (0.9, 0.999))


@pytest.mark.parametrize(("text", "key", "why"), [
    ("optim.lamda_nsp: {grid: [1, 2]}", "optim.lamda_nsp", "unknown"),
    ("optimizer: {lr: 0.1}", "optimizer.lr", "unknown"),
    ("lr: {grid: [1, 2]}", "lr", "unknown config key"),
    ("sequence.pet_mask_ratio: {grid: [0.25, 1.5]}", "sequence.pet_mask_ratio", "1.5"),
    ("model.method: {choice: [ganbert, gan-bert]}", "model.method", "gan-bert"),
    ("optim.epochs: {grid: [2, 2.5]}", "optim.epochs", "2.5"),
    ("sequence.scheme: {grid: []}", "sequence.scheme", "non-empty"),
    ("sequence.scale: {grid: [10, 10]}", "sequence.scale", "twice"),
    ("optim.lr: {loguniform: [0, 0.1]}", "optim.lr", "low > 0"),
    ("optim.lr: {uniform: [0.1, 0.01]}", "optim.lr", "low < high"),
    ("optim.lr: {uniform: [0.1]}", "optim.lr", "[low, high]"),
    ("sequence.mri_mask_ratio: {uniform: [-0.5, 0.5]}", "sequence.mri_mask_ratio", "-0.5"),
    ("optim.epochs: {uniform: [1, 5]}", "optim.epochs", "does not fit"),
    ("model.base_channels: {randint: [1.5, 4]}", "model.base_channels", "integer bounds"),
    ("optim.lr: {normal: [0, 1]}", "optim.lr", "unknown"),
    ("optim.lr: {grid: [0.1], choice: [0.2]}", "optim.lr", "exactly one key"),
    ("tune: {metric: val_psnr, mode: maximum}\noptim.lr: 0.1", "tune.mode", "maximum"),
    ("tune: {num_samples: 0}\noptim.lr: 0.1", "tune.num_samples", ">= 1"),
    ("tune: {sampler: tpe}\noptim.lr: 0.1", "tune.sampler", "unknown"),
    ("bundle: {grid: [{optim.lr: 0.1}, {optim.lr: -1}]}", "optim.lr", "-1"),
    ("bundle: {uniform: [0, 1]}", "bundle", "grid or choice"),
    ("bundle: {grid: [{optim.lr: {grid: [1, 2]}}]}", "bundle[0].optim.lr", "fixed values"),
    ("optim.lr: 0.1\nbundle: {grid: [{optim.lr: 0.2}]}", "optim.lr", "both"),
])
def test_bad_space_names_file_and_key(tmp_path: Path, text: str, key: str, why: str) -> None:
    path = _write(tmp_path, text, "bad_space.yaml")
    with pytest.raises(ValueError) as err:
        load_space(path)
    message = str(err.value)
    assert "bad_space.yaml" in message and f"key {key}" in message and why in message, message


def test_bad_combination_and_unreadable_file(tmp_path: Path) -> None:
    # each value fits the tiny preset on its own; 64 frames do not divide an 8-value sequence
    path = _write(tmp_path, "geometry.pet_frames: {grid: [2, 64]}\nsequence.length: {grid: [64, 8]}\n",
                  "combo.yaml")
    with pytest.raises(ValueError, match=r"combo.yaml: combination .*geometry.pet_frames"):
        load_space(path)
    with pytest.raises(ValueError, match="missing.yaml"):
        load_space(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="broken.yaml"):
        load_space(_write(tmp_path, "optim.lr: [unclosed\n", "broken.yaml"))
    with pytest.raises(ValueError, match="list.yaml"):
        load_space(_write(tmp_path, "- optim.lr\n", "list.yaml"))


def test_trial_overrides_flattens_and_rejects() -> None:
    trial = {"optim": {"lr": 0.1}, "model.method": "ganbert", BUNDLE_KEY: {"optim.lambda_l1": 5.0}}
    assert trial_overrides(trial) == {"optim.lr": 0.1, "model.method": "ganbert", "optim.lambda_l1": 5.0}
    with pytest.raises(ValueError, match="both"):
        trial_overrides({"optim.lr": 0.1, BUNDLE_KEY: {"optim.lr": 0.2}})
    with pytest.raises(ValueError, match="section.field"):
        trial_overrides({"lr": 0.1})
