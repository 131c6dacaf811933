"""The project cache ($GANBERT_CACHE, else <home>/cache): results made once from their inputs, then read back."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import zipfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator, Sequence

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


@contextmanager
def making(name: str, key: str) -> Iterator[None]:
    """Held while this process makes the result `key` of <cache>/<name>: another process about to make the same one
    (a Ray Data task on another tracer of the subject, a second preprocess run) waits here, then finds it kept.

    The lock is the file <cache>/.locks/<name>-<key>; with the cache "off" or not writable, nothing is held.
    """
    place = root()
    handle = None
    if place is not None:
        try:
            (place / ".locks").mkdir(parents=True, exist_ok=True)
            handle = (place / ".locks" / f"{name}-{key}").open("a")
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            if handle is not None:
                handle.close()
            handle = None
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock


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
    kept = _read(path)
    if kept is not None:
        return kept
    with making(name, h.hexdigest()):
        kept = _read(path)  # made by another process while this one waited
        if kept is not None:
            return kept
        made = build()
        if path is not None:
            buf = io.BytesIO()
            np.savez(buf, **made)
            try:
                write_bytes(path, buf.getvalue())
            except OSError:
                pass
    return made


def _read(path: Path | None) -> dict[str, np.ndarray] | None:
    """The arrays kept at `path`, or None when there is none or it cannot be read (then they are made again)."""
    if path is None:
        return None
    try:
        with np.load(path, allow_pickle=False) as kept:
            return {k: kept[k] for k in kept.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
