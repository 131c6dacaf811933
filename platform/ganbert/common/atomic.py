"""Atomic file writes: a temporary file in the target folder, then os.replace (readers never see half a file), or,
for files that must never be replaced, a hard link that fails when the name is taken."""

from __future__ import annotations

import csv
import io
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically, creating the folder; no temporary file is left on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically, creating the folder; no temporary file is left on failure."""
    return write_bytes(path, text.encode())


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[object]],
              quoting: int = csv.QUOTE_MINIMAL) -> Path:
    """Write a CSV (header, then rows; "\\n" line ends) atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=quoting, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def publish(tmp: str | Path, path: str | Path, overwrite: bool) -> bool:
    """Move the finished file `tmp` (in `path`'s folder) to `path`; `tmp` is gone afterwards.

    overwrite: os.replace. Otherwise `path` is created only if absent: os.link fails when the name exists, so two
    writers racing for one name never replace each other (exactly one wins). On a filesystem without hard links the
    name is claimed with O_CREAT | O_EXCL first (readers may then see an empty file for a moment). Returns False when
    `path` already existed and was kept.
    """
    tmp, path = Path(tmp), Path(path)
    try:
        if overwrite:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here: claim the name exclusively, then move the file onto it
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                return False
            os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def create_file(path: str | Path, write: Callable[[Path], Any], overwrite: bool = False) -> bool:
    """`write(tmp)` a temporary file that ends in `path`'s name, then `publish` it; False when `path` was kept.

    No temporary file is left on failure; the folder is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        write(tmp)
        return publish(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
