"""Config presets, overrides and validation errors naming the field."""

from pathlib import Path

import pytest

from ganbert import config


@pytest.mark.parametrize("name", ["tiny", "demo", "paper"])
def test_presets_build_and_round_trip(name: str, tmp_path: Path) -> None:
    cfg = config.PRESETS[name]()
    config.save(cfg, tmp_path / "c.yaml")
    again = config.load(name, tmp_path / "c.yaml")
    assert again == cfg


def test_paper_geometry_is_the_spec() -> None:
    cfg = config.paper()
    assert cfg.geometry.mri_size == (256, 256, 256) and cfg.geometry.pet_size == (93, 76, 76)
    assert cfg.sequence.tokens == 1027 and cfg.mri_grid == (8, 8, 8) and cfg.pet_grid == (4, 8, 8)
    assert (cfg.optim.lambda_nsp, cfg.optim.lambda_mlm, cfg.optim.lambda_l1) == (20.0, 1.0, 20.0)
    assert (cfg.sequence.mri_mask_ratio, cfg.sequence.pet_mask_ratio) == (0.05, 0.25)


def test_precedence_preset_then_file_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "o.yaml"
    f.write_text("optim:\n  lr: 0.5\n  epochs: 7\nsequence:\n  scheme: monotonic\n")
    cfg = config.load("tiny", f, ["optim.lr=0.25", "geometry.pet_size=16,12,12"])
    assert cfg.optim.lr == 0.25 and cfg.optim.epochs == 7 and cfg.sequence.scheme == "monotonic"
    assert cfg.geometry.pet_size == (16, 12, 12) and cfg.geometry.mri_size == (32, 32, 32)


@pytest.mark.parametrize("override, field", [
    ("sequence.pet_mask_ratio=-0.1", "sequence.pet_mask_ratio"),
    ("sequence.mri_mask_ratio=1.0", "sequence.mri_mask_ratio"),
    ("optim.lambda_nsp=-1", "optim.lambda_nsp"),
    ("model.bert_max_positions=100", "model.bert_max_positions"),
    ("geometry.pet_frames=3", "geometry.pet_frames"),
    ("geometry.pet_size=2,3,3", "geometry.pet_size"),
    ("sequence.length=100", "sequence.length"),
    ("model.method=cyclegan", "model.method"),
    ("optim.epochs=abc", "optim.epochs"),
    ("optim.nope=1", "optim.nope"),
    ("sequence.scheme=log", "sequence.scheme"),
    ("run.validate_every=0", "run.validate_every"),
    ("run.checkpoint_every=3", "run.checkpoint_every"),  # not a multiple of validate_every=2 below
    ("run.in_memory_mb=-1", "run.in_memory_mb"),
])
def test_bad_values_fail_at_construction_naming_the_field(override: str, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        config.load("tiny", overrides=["run.validate_every=2", "run.checkpoint_every=2", override])


def test_bad_yaml_file_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        config.load("tiny", f)


def test_flat_has_every_field() -> None:
    flat = config.tiny().flat()
    assert flat["optim.lambda_nsp"] == 1.0 and flat["geometry.pet_size"] == (14, 12, 12) and flat["preset"] == "tiny"
