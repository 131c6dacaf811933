"""Splits by subject: train/val/test about 80/10/10 by a hash of the subject id, never changed once recorded."""

from __future__ import annotations

import hashlib
from typing import Sequence

from ganbert.store import shards


def subject_hash(subject: str) -> str:
    """Hex sha256 of a subject id (salted): the order that places subjects in splits and rows in shards."""
    return hashlib.sha256(f"ganbert-split:{subject}".encode()).hexdigest()


def assign_splits(subjects: Sequence[str], existing: dict[str, str] | None = None, val_fraction: float = 0.1,
                  test_fraction: float = 0.1) -> dict[str, str]:
    """Subject -> train/val/test, deterministic; subjects in `existing` keep their split (no leakage on reruns).

    A fresh cohort is ranked by a hash of the subject id: the first round(test_fraction * n) go to test,
    the next round(val_fraction * n) to val (at least one each when n >= 3), the rest to train. Subjects
    added later are placed by the same hash against the fractions.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1), sum < 1")
    existing = dict(existing or {})
    bad = {s: v for s, v in existing.items() if v not in shards.SPLITS}
    if bad:
        raise ValueError(f"existing splits must be one of {shards.SPLITS}, got {bad}")
    out = dict(existing)
    new = sorted(set(subjects) - set(existing), key=subject_hash)
    if not existing:
        n = len(new)
        n_test = round(test_fraction * n)
        n_val = round(val_fraction * n)
        if n >= 3:
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
            n_val = max(n_val, 1 if val_fraction > 0 else 0)
        for i, subject in enumerate(new):
            out[subject] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    else:
        for subject in new:
            u = int(subject_hash(subject)[:12], 16) / float(16**12)
            out[subject] = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
    return {s: out[s] for s in sorted(out)}
