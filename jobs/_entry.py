"""Shared body of `jobs/*.py`: run one `ganbert` subcommand from this checkout (or the job's uploaded working dir).

Recommended submission (the working dir is this repository; `.gitignore` keeps `.venv/` and `runs/` out of the upload):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train.py --preset tiny

No runtime-env flag is needed: `ganbert` is imported from `<working dir>/platform` on the driver, and when the
driver joins a cluster (RAY_ADDRESS is set, as inside `ray job submit`) it ships that same package to every Ray
worker of the job as a `py_modules` runtime env, so no node needs `ganbert` installed (an installed copy is shadowed).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PLATFORM = Path(__file__).resolve().parent.parent / "platform"
RAY_COMMANDS = frozenset({"preprocess", "train", "tune", "synthesize"})  # subcommands whose Ray workers import ganbert


def use_submitted_copy() -> None:
    """Import `ganbert` from `<root>/platform` ahead of any installed copy (no-op when that folder is absent).

    PYTHONPATH is exported too, so the workers of a local Ray started by this process import the same copy.
    """
    if not (PLATFORM / "ganbert" / "__init__.py").is_file():
        return
    sys.path.insert(0, str(PLATFORM))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLATFORM), os.environ.get("PYTHONPATH")) if p)


def join_cluster() -> None:
    """With RAY_ADDRESS set, connect to that cluster shipping this process's `ganbert` as a `py_modules` entry.

    Merged by Ray with the submitted job's runtime env (working_dir, env_vars, ...); a job that already sets
    `py_modules` gets Ray's merge-conflict error. Without RAY_ADDRESS the CLI starts its own local Ray later.
    """
    if not os.environ.get("RAY_ADDRESS"):
        return
    import ray

    import ganbert

    if not ray.is_initialized():
        ray.init(runtime_env={"py_modules": [str(Path(ganbert.__file__).resolve().parent)]}, log_to_driver=True)


def run(command: str, argv: list[str] | None = None) -> int:
    """`ganbert <command> <argv>` (argv defaults to this script's arguments); returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    use_submitted_copy()
    if command in RAY_COMMANDS and not {"-h", "--help"} & set(args):
        join_cluster()
    from ganbert import cli

    return cli.main([command, *args])
