"""A part of the shards that one role reads: the rows of some splits, optionally only those of given subjects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ganbert.store import shards


@dataclass(frozen=True)
class Part:
    """Rows of the shards whose split is in `splits` and (when `subjects` is set) whose subject is in `subjects`.

    `name` names the part in metric keys (`val_psnr`) and messages. The shards' own split "train" is
    `Part("train", ("train",))`; fold k's training subjects are `Part("train", ("train", "val"), {...})`.
    """

    name: str
    splits: tuple[str, ...]
    subjects: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must be a non-empty part name")
        bad = [s for s in self.splits if s not in shards.SPLITS]
        if not self.splits or bad:
            raise ValueError(f"splits must be a non-empty subset of {shards.SPLITS}, got {self.splits}")

    def holds(self, record: dict[str, Any], tracer: str | None = None) -> bool:
        """Whether a manifest row record (split, tracer, subject) belongs to this part (and tracer)."""
        return (record["split"] in self.splits and (tracer is None or record["tracer"] == tracer)
                and (self.subjects is None or record["subject"] in self.subjects))

    def describe(self) -> str:
        """`split 'train'`, or `part 'val' (3 subjects of splits train+val)` for a subject subset."""
        if self.subjects is None and self.splits == (self.name,):
            return f"split {self.name!r}"
        who = "" if self.subjects is None else f"{len(self.subjects)} subjects of "
        return f"part {self.name!r} ({who}splits {'+'.join(self.splits)})"


def as_part(split: str | Part) -> Part:
    """A Part as it is; a split name ("train", "val", "test") as the whole split."""
    if isinstance(split, Part):
        return split
    if split not in shards.SPLITS:
        raise ValueError(f"split must be one of {shards.SPLITS} or a Part, got {split!r}")
    return Part(split, (split,))
