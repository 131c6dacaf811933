"""Atomic file writes: a temporary file in the target folder, then os.replace (readers never see half a file)."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence


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
