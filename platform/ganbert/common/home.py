"""The project home ($GANBERT_HOME) that default outputs resolve into, and storage paths that may be URIs."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "GANBERT_HOME"
RAY_WORKING_DIR_MARK = "runtime_resources"  # Ray unpacks a job's --working-dir under <temp>/session_*/runtime_resources


def is_uri(path: str) -> bool:
    """True for `scheme://...` locations (s3://, gs://, file://, hdfs://), which are passed on untouched."""
    return "://" in str(path)


def in_ray_working_dir(cwd: Path | None = None) -> bool:
    """True when `cwd` is a `ray job submit --working-dir` copy, which Ray may evict at any time."""
    return RAY_WORKING_DIR_MARK in (cwd or Path.cwd()).resolve().parts


def home() -> Path:
    """$GANBERT_HOME, else `./runs`; inside a Ray job's working-dir copy, `~/ganbert` (never the evictable copy)."""
    env = os.environ.get(HOME_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_absolute():
            raise ValueError(f"{HOME_ENV} must be an absolute path, got {env!r}")
        return path
    if in_ray_working_dir():
        return Path.home() / "ganbert"
    return Path.cwd().resolve() / "runs"


def resolve(path: str) -> str:
    """A URI or absolute path as is; `runs/...` (the documented defaults) inside `home()`; else absolute from cwd."""
    if is_uri(path):
        return path.rstrip("/")
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    if p.parts and p.parts[0] == "runs":
        return str(home().joinpath(*p.parts[1:]))
    if in_ray_working_dir():
        raise ValueError(f"{path!r}: a relative path inside a Ray job's working dir would be evicted with it; "
                         f"give an absolute path or a URI, or set {HOME_ENV}")
    return str(p.resolve())


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a URI."""
    return "/".join([base.rstrip("/"), *parts]) if is_uri(base) else str(Path(base).joinpath(*parts))


def filesystem(path: str) -> tuple[object, str]:
    """(pyarrow filesystem, path inside it) of a local path or URI."""
    import pyarrow.fs as pafs

    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def upload_dir(local: Path, dest: str) -> None:
    """Copy a local folder to `dest` (a path or URI every node reaches), replacing files of the same names."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(dest)
    fs.create_dir(inner, recursive=True)  # type: ignore[attr-defined]
    pafs.copy_files(str(local), inner, destination_filesystem=fs)


def download_dir(src: str, local: Path) -> Path:
    """Copy a folder at a path or URI into the local folder `local` (created); returns `local`."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(src)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:  # type: ignore[attr-defined]
        raise ValueError(f"{src}: no such folder")
    Path(local).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(inner, str(Path(local).resolve()), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return Path(local)


def read_bytes(path: str) -> bytes | None:
    """The bytes of a file at a path or URI; None when it does not exist."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.File:  # type: ignore[attr-defined]
        return None
    with fs.open_input_stream(inner) as f:  # type: ignore[attr-defined]
        return f.read()


def read_text(path: str) -> str | None:
    """The text of a file at a path or URI; None when it does not exist."""
    data = read_bytes(path)
    return None if data is None else data.decode()


def write_bytes(path: str, data: bytes) -> None:
    """Write a file at a path (atomically: temporary file, then rename) or a URI (one object put)."""
    if not is_uri(path):
        from ganbert.common.atomic import write_bytes as write_local

        write_local(path, data)
        return
    fs, inner = filesystem(path)
    with fs.open_output_stream(inner) as f:  # type: ignore[attr-defined]
        f.write(data)


def exists(path: str) -> bool:
    """Whether a file or folder exists at a path or URI."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound  # type: ignore[attr-defined]


def default_tracking_uri(root: str | Path | None = None) -> str:
    """`$MLFLOW_TRACKING_URI` if set, else `sqlite:///<root or the project home>/mlflow.db` (folder created)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    folder = Path(root).expanduser().resolve() if root is not None else home()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"
