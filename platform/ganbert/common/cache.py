"""The project cache ($GANBERT_CACHE, else <home>/cache): results made once from their inputs, then read back."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ganbert.common import home
from ganbert.common.atomic import write_bytes

CACHE_ENV = "GANBERT_CACHE"  # a folder, or "off" (nothing kept: the benchmarks, which time the making itself)
LIBRARIES = ("numpy", "scipy", "nilearn", "nibabel", "SimpleITK")


def root() -> Path | None:
    """The cache: $GANBERT_CACHE, else <home>/cache (./runs/cache); None when $GANBERT_CACHE is "off"."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen == "off":
        return None
    return Path(chosen).expanduser() if chosen else home.home() / "cache"


def folder(name: str) -> Path | None:
    """<cache>/<name> (`root`); None when $GANBERT_CACHE is "off"."""
    place = root()
    return None if place is None else place / name


def versions() -> list[str]:
    """The installed versions of the libraries whose results are kept (a new one makes them again)."""
    return [f"{name}=={metadata.version(name)}" for name in LIBRARIES]


def arrays(name: str, build: Callable[[], dict[str, np.ndarray]], sources: Sequence[str],
           **parts: object) -> dict[str, np.ndarray]:
    """The arrays `build()` returns, made once per key and kept as <cache>/<name>/<key>.npz (no pickle).

    The key covers `parts`, the text of the `sources` files that make them (an edit makes them again) and the
    libraries' versions. A missing, unreadable or unwritable file only means building again.
    """
    h = hashlib.sha256(json.dumps({"parts": parts, "libraries": versions()}, sort_keys=True).encode())
    for source in sources:
        h.update(Path(source).read_bytes())
    place = folder(name)
    path = None if place is None else place / f"{h.hexdigest()}.npz"
    if path is not None:
        try:
            with np.load(path, allow_pickle=False) as kept:
                return {k: kept[k] for k in kept.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            pass
    made = build()
    if path is not None:
        buf = io.BytesIO()
        np.savez(buf, **made)
        try:
            write_bytes(path, buf.getvalue())
        except OSError:
            pass
    return made
