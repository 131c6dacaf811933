"""K folds of the non-test subjects for cross-validated studies: stratified by diagnostic group, written once.

`ensure(data_dir, k, seed, length)` writes `folds-k<K>-seed<S>.json` beside the shards' manifest on first use and
reads it back ever after, so every study, rerun and row of the same K and seed uses the same folds. The locked
test split is never in a fold. Fold i holds out its subjects (they get its predictions), trains on the subjects
of the other folds except a validation carve-out (`VAL_FRACTION` of them, stratified, for checkpoint choice).
The statistics a fold's run uses (token calibration quantiles, PET level, the mean PET volume that starts the
generator and is the mean-PET baseline) are computed here, once, over that fold's training subjects only:
numbers in the JSON, mean volumes in `folds-k<K>-seed<S>.safetensors` beside it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors.numpy

from ganbert.common import home
from ganbert.config import TRACERS
from ganbert.store import shards, stats
from ganbert.store.part import Part

FORMAT = "ganbert-folds/1"
VAL_FRACTION = 0.15  # of a fold's training pool, carved out (stratified) to choose its checkpoint
ROLES = ("train", "val", "held_out")
POOL = ("train", "val")  # the shards' splits the folds divide; "test" stays locked


@dataclass(frozen=True)
class Fold:
    """Fold `index` of `k` (seed `seed`): the subjects it trains on, validates on and holds out (predicts)."""

    index: int
    k: int
    seed: int
    train: frozenset[str]
    val: frozenset[str]
    held_out: frozenset[str]

    def part(self, role: str) -> Part:
        """The Part of the shards a role reads: "train", "val" or "held_out" subjects of the non-test splits."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        return Part(role, POOL, getattr(self, role))

    @property
    def tag(self) -> str:
        """Short name for run names and files: `f2` (fold 2)."""
        return f"f{self.index}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (subject lists sorted)."""
        return {"index": self.index, "k": self.k, "seed": self.seed,
                **{role: sorted(getattr(self, role)) for role in ROLES}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fold:
        """Inverse of `to_dict`."""
        return cls(int(data["index"]), int(data["k"]), int(data["seed"]),
                   *(frozenset(str(s) for s in data[role]) for role in ROLES))


def subject_groups(manifest: dict[str, Any]) -> dict[str, str]:
    """Non-test subject -> diagnostic group (its most frequent `group` over its rows; "unknown" if none)."""
    seen: dict[str, Counter[str]] = {}
    for r in manifest["rows"]:
        if r["split"] in POOL:
            seen.setdefault(r["subject"], Counter())[r.get("group") or "unknown"] += 1
    return {s: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for s, c in sorted(seen.items())}


def _order(subjects: list[str], seed: int, salt: str) -> list[str]:
    """A seeded order of subjects that depends only on (seed, salt, the ids), not on their input order."""
    key = lambda s: hashlib.sha256(f"ganbert-fold:{seed}:{salt}:{s}".encode()).hexdigest()  # noqa: E731
    return sorted(subjects, key=key)


def assign(groups: dict[str, str], k: int, seed: int) -> dict[str, int]:
    """Subject -> fold index, stratified by group: each group in a seeded order is dealt round-robin, each group
    starting where the previous one stopped, so every fold holds about 1/k of each group and fold sizes differ
    by at most one. Raises ValueError naming `k` when there are fewer subjects than folds."""
    if k < 2:
        raise ValueError(f"k must be >= 2 folds (1 is the fixed train/val/test split), got {k}")
    if len(groups) < k:
        raise ValueError(f"k: {k} folds need at least {k} non-test subjects, the shards hold {len(groups)}")
    out: dict[str, int] = {}
    at = 0
    for group in sorted(set(groups.values())):
        for subject in _order([s for s, g in groups.items() if g == group], seed, group):
            out[subject] = at % k
            at += 1
    return out


def carve_val(pool: list[str], groups: dict[str, str], seed: int, index: int,
              fraction: float = VAL_FRACTION) -> frozenset[str]:
    """max(1, round(fraction * n)) subjects of a fold's training pool for validation: an evenly spaced pick over
    the pool ordered by group (then a seeded order), so the groups are represented in proportion."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if len(pool) < 2:
        raise ValueError(f"a fold's training pool needs >= 2 subjects (train and val), got {len(pool)}")
    ordered = [s for g in sorted({groups[s] for s in pool})
               for s in _order([s for s in pool if groups[s] == g], seed, f"val{index}:{g}")]
    n = min(len(pool) - 1, max(1, round(fraction * len(pool))))
    return frozenset(ordered[int((i + 0.5) * len(ordered) / n)] for i in range(n))


def make_folds(manifest: dict[str, Any], k: int, seed: int, val_fraction: float = VAL_FRACTION) -> list[Fold]:
    """The k folds of the manifest's non-test subjects (`assign` then `carve_val` per fold)."""
    groups = subject_groups(manifest)
    fold_of = assign(groups, k, seed)
    folds = []
    for i in range(k):
        held = frozenset(s for s, f in fold_of.items() if f == i)
        pool = sorted(s for s, f in fold_of.items() if f != i)
        val = carve_val(pool, groups, seed, i, val_fraction)
        folds.append(Fold(i, k, seed, frozenset(pool) - val, val, held))
    return folds


def file_name(k: int, seed: int, suffix: str = ".json") -> str:
    """`folds-k5-seed0.json` (and `.safetensors` for the mean volumes)."""
    return f"folds-k{k}-seed{seed}{suffix}"


def _pool_subjects(manifest: dict[str, Any]) -> list[str]:
    return sorted({r["subject"] for r in manifest["rows"] if r["split"] in POOL})


def _fold_stats(data_dir: str, fold: Fold, length: int) -> dict[str, dict[str, Any]]:
    """{tracer: statistics of the fold's training subjects} (stats.tracer_stats), tracers with training rows."""
    out = {}
    for tracer in TRACERS:
        found = stats.tracer_stats(data_dir, tracer, length, fold.part("train"))
        if found is not None:
            out[tracer] = found
    return out


def _read(data_dir: str, k: int, seed: int) -> dict[str, Any] | None:
    text = home.read_text(home.join(data_dir, file_name(k, seed)))
    if text is None:
        return None
    record = json.loads(text)
    if record.get("format") != FORMAT:
        raise ValueError(f"{home.join(data_dir, file_name(k, seed))}: not a {FORMAT} file")
    return record


def ensure(data_dir: str, k: int, seed: int, length: int, val_fraction: float = VAL_FRACTION) -> list[Fold]:
    """The k folds of `data_dir` for `seed`: read from its folds file, or made, with their statistics, and written.

    Raises ValueError when the shards' non-test subjects changed since the file was written (folds are never
    redrawn silently: a new cohort needs a new seed or the file removed).
    """
    manifest = shards.read_manifest(data_dir)
    subjects = _pool_subjects(manifest)
    record = _read(data_dir, k, seed)
    if record is not None:
        if record["subjects"] != subjects:
            raise ValueError(f"{home.join(data_dir, file_name(k, seed))}: made for {len(record['subjects'])} non-test "
                             f"subjects, the shards now hold {len(subjects)}; pick another fold seed or remove it")
        return [Fold.from_dict(f) for f in record["folds"]]
    folds = make_folds(manifest, k, seed, val_fraction)
    volumes: dict[str, np.ndarray] = {}
    fold_records = []
    for fold in folds:
        found = _fold_stats(data_dir, fold, length)
        for tracer, st in found.items():
            volumes[f"{fold.index}/{tracer}"] = st.pop("pet_mean_volume")
        fold_records.append(fold.to_dict() | {"stats": found})
    home.write_bytes(home.join(data_dir, file_name(k, seed, ".safetensors")), safetensors.numpy.save(volumes))
    record = {"format": FORMAT, "k": k, "seed": seed, "val_fraction": val_fraction, "stratify": "group",
              "subjects": subjects, "groups": subject_groups(manifest), "folds": fold_records}
    home.write_bytes(home.join(data_dir, file_name(k, seed)), (json.dumps(record, indent=1) + "\n").encode())
    print(f"[folds] wrote {k} folds (seed {seed}) of {len(subjects)} non-test subjects and their statistics to "
          f"{home.join(data_dir, file_name(k, seed))}", flush=True)
    return folds


def recorded_mean_volume(data_dir: str, fold: Fold, tracer: str) -> np.ndarray | None:
    """The fold's mean normalised training PET `(T, d, h, w)` of a tracer as written with the folds, or None."""
    data = home.read_bytes(home.join(data_dir, file_name(fold.k, fold.seed, ".safetensors")))
    return None if data is None else safetensors.numpy.load(data).get(f"{fold.index}/{tracer}")


def fold_stats(data_dir: str, fold: Fold, tracer: str, length: int) -> dict[str, Any]:
    """A fold's training statistics for one tracer (with `pet_mean_volume`), as `stats.for_run` gives the
    training split's: recorded in the folds file at this length, else computed now from its training subjects."""
    record = _read(data_dir, fold.k, fold.seed)
    recorded = (record or {"folds": []})["folds"]
    st = next((f["stats"].get(tracer) for f in recorded if f["index"] == fold.index), None)
    if st is not None and st["length"] == length:
        volume = recorded_mean_volume(data_dir, fold, tracer)
        if volume is not None:
            return st | {"pet_mean_volume": volume}
    found = stats.tracer_stats(data_dir, tracer, length, fold.part("train"))
    if found is None:
        raise ValueError(f"fold {fold.index} of {fold.k}: no training rows for tracer {tracer} in {data_dir}")
    print(f"[folds] fold {fold.index} statistics for {tracer} at sequence.length={length} computed from "
          f"{found['rows']} training rows", flush=True)
    return found
