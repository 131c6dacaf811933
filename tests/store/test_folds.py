"""Cross-validation folds: stratified by group, disjoint, written once and reused, statistics from each fold's own
training subjects only, and Parts that read exactly those subjects."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ganbert.store import folds, loader, shards, stats
from ganbert.store.part import Part


def test_assignment_is_stratified_balanced_and_independent_of_input_order() -> None:
    groups = {f"s{i:02d}": ("CN", "MCI", "AD")[i % 3] for i in range(23)}
    fold_of = folds.assign(groups, 5, seed=3)
    sizes = Counter(fold_of.values())
    assert set(sizes) == set(range(5)) and max(sizes.values()) - min(sizes.values()) <= 1
    for g in ("CN", "MCI", "AD"):
        per_fold = Counter(f for s, f in fold_of.items() if groups[s] == g)
        assert max(per_fold.values()) - min(per_fold.get(i, 0) for i in range(5)) <= 1, g
    shuffled = dict(reversed(list(groups.items())))
    assert folds.assign(shuffled, 5, seed=3) == fold_of
    assert folds.assign(groups, 5, seed=4) != fold_of


def test_too_many_folds_and_one_fold_are_refused() -> None:
    groups = {"a": "CN", "b": "AD", "c": "MCI"}
    with pytest.raises(ValueError, match="4 folds need at least 4 non-test subjects"):
        folds.assign(groups, 4, 0)
    with pytest.raises(ValueError, match="k must be >= 2"):
        folds.assign(groups, 1, 0)


def test_folds_partition_the_non_test_subjects(tiny_shards: str) -> None:
    manifest = shards.read_manifest(tiny_shards)
    made = folds.make_folds(manifest, 3, 0)
    pool = {r["subject"] for r in manifest["rows"] if r["split"] != "test"}
    test = {r["subject"] for r in manifest["rows"] if r["split"] == "test"}
    held = [f.held_out for f in made]
    assert set().union(*held) == pool and sum(len(h) for h in held) == len(pool)  # each subject held out once
    for f in made:
        assert not (f.train & f.val) and not (f.train & f.held_out) and not (f.val & f.held_out)
        assert f.train | f.val | f.held_out == pool and not (f.train | f.val | f.held_out) & test
        assert f.val and f.train


def _copy(tiny_shards: str, tmp_path: Path) -> str:
    dst = tmp_path / "shards"
    shutil.copytree(tiny_shards, dst, ignore=shutil.ignore_patterns("folds-*"))
    return str(dst)


def test_folds_are_written_once_with_their_own_statistics_and_reused(tiny_shards: str, tmp_path: Path) -> None:
    data = _copy(tiny_shards, tmp_path)
    made = folds.ensure(data, 3, 0, 64)
    path = Path(data) / folds.file_name(3, 0)
    record = json.loads(path.read_text())
    assert record["k"] == 3 and record["seed"] == 0 and len(record["folds"]) == 3
    # reused: a second call reads the file (a marker written into it comes back), never redraws
    record["folds"][0]["stats"]["AV45"]["pet_std"] = 12345.0
    path.write_text(json.dumps(record))
    again = folds.ensure(data, 3, 0, 64)
    assert again == made
    assert folds.fold_stats(data, made[0], "AV45", 64)["pet_std"] == 12345.0
    # each fold's statistics are those of its training subjects alone, not of the split or its held-out fold
    fold = made[1]
    own = stats.tracer_stats(data, "AV45", 64, fold.part("train"))
    got = folds.fold_stats(data, fold, "AV45", 64)
    assert got["rows"] == own["rows"] == loader.count_rows(data, fold.part("train"), "AV45")
    assert got["pet"] == own["pet"] and got["pet_std"] == own["pet_std"]
    np.testing.assert_array_equal(got["pet_mean_volume"], own["pet_mean_volume"])
    assert got["pet_std"] != stats.tracer_stats(data, "AV45", 64)["pet_std"]
    with_held = stats.tracer_stats(data, "AV45", 64, Part("x", ("train", "val"), fold.train | fold.held_out))
    assert got["pet_std"] != with_held["pet_std"]
    # the shards gained or lost subjects since: refused, never silently redrawn
    record = json.loads(path.read_text())
    record["subjects"] = record["subjects"][1:]
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="made for 10 non-test subjects"):
        folds.ensure(data, 3, 0, 64)


def test_a_part_reads_exactly_its_subjects(tiny_shards: str) -> None:
    fold = folds.make_folds(shards.read_manifest(tiny_shards), 3, 0)[0]
    for role in ("train", "val", "held_out"):
        part = fold.part(role)
        rows = list(loader.read_rows(tiny_shards, part, "FDG"))
        assert rows and {r["subject"] for r in rows} <= getattr(fold, role)
        assert len(rows) == loader.count_rows(tiny_shards, part, "FDG")
        assert [(p, r) for p, r in loader.split_positions(tiny_shards, part, "FDG")] == [
            (str(Path(tiny_shards) / e["shard"]), e["row"]) for e in loader.part_records(
                shards.read_manifest(tiny_shards), tiny_shards, part, "FDG")]
    # the whole split through a Part equals the split by name
    whole = [r["pet_image_id"] for r in loader.read_rows(tiny_shards, Part("train", ("train",)), "AV45")]
    assert whole == [r["pet_image_id"] for r in loader.read_rows(tiny_shards, "train", "AV45")]
    with pytest.raises(ValueError, match="part 'nobody'"):
        loader.split_positions(tiny_shards, Part("nobody", ("train",), frozenset({"no-such-subject"})), "AV45")
