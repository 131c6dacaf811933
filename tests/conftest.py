"""Shared pytest fixtures: a real local MLflow tracking server, the cached tiny phantom, a local Ray."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ray_nodes import free_port
from uninterrupted import UNINTERRUPTED, Uninterrupted

# a Ray that the code under test starts itself (`ensure_ray`) has the session Ray's 2 CPUs
os.environ.setdefault("GANBERT_NUM_CPUS", "2")
# One OpenMP thread per process (torch's intra-op pool), as Ray gives each worker one per CPU: the two test workers,
# their Rays and CLI subprocesses already fill the two cores, and more threads only spin against each other (the
# test workers took 13 % less CPU with one). Set before torch loads; every process the tests start inherits it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# One cache (registrations, MNI152 maps, the tiny phantom) for the session, as a user's $GANBERT_HOME/cache serves all
# of their runs: a T1 that several tests preprocess or check (the phantom cohort's) is registered once. Fresh per
# session, never the developer's own; made by the main pytest process and shared by its xdist workers (`make test`
# runs two), set before any Ray starts, so workers, CLI subprocesses and `ray start` heads inherit it.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
_CACHE = os.environ["GANBERT_TEST_CACHE"] if _WORKER else tempfile.mkdtemp(prefix="ganbert-test-cache-")
os.environ["GANBERT_TEST_CACHE"] = os.environ["GANBERT_CACHE"] = _CACHE


def pytest_unconfigure(config: pytest.Config) -> None:
    if not _WORKER:
        shutil.rmtree(_CACHE, ignore_errors=True)


# The longest files (`--durations`, with their fixtures), longest first, except that the second one needs no phantom
# shards: the first file's worker builds them meanwhile.
LONGEST_FIRST = ("experiments/test_tune.py", "serve/test_synthesize.py", "test_multinode.py", "test_jobs.py",
                 "train/test_train_loop.py", "experiments/test_study.py", "ingest/test_dicom.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist (`make test`: two workers, each taking whole files in this order), the longest files go first and
    the many short ones last, so that neither worker starts a long file while the other has nothing left to do."""
    if _WORKER:
        here = Path(__file__).parent
        rank = {here / name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path, len(rank)))

# The data stages' fixtures (tiny phantom cohort, shards, bad inputs) that tests/ingest, prep and store use.
pytest_plugins = ["data_fixtures"]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (SQLite store, local artifact root); yields its http URI."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}: "
                                   f"{(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer /health within 90 s at {uri}")
            time.sleep(0.25)
        yield uri
    finally:
        # The server runs uvicorn in a child process: end the whole process group this fixture started.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def tiny_shards() -> str:
    """Preprocessed shards of a tiny phantom cohort (12 subjects, 3 tracers), built once per session in the session's
    cache, where a command run without --data (the README's job) finds them, as a user's runs/cache serves theirs."""
    from ganbert import config
    from ganbert.prep.phantom_cache import data_dir_for

    return data_dir_for(config.tiny(), None)


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    """One local Ray for the whole test session, started as the CLI starts it (`ensure_ray`) with 2 logical CPUs: no
    more than the 2-core machine has. A test that needs a Ray of its own (a `ray start` head, a CLI subprocess)
    starts it in another process; no test shuts this one down."""
    import ray

    from ganbert.common.raysession import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def phantom_t1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, "Path"]:
    """One tiny phantom subject (index 0: it has a FLAIR) with an AV45 PET: {"raw", "t1", "flair", "pet"} paths.

    Its T1's template registration is made once here and reused by QC (brainmask's cache).
    """
    from pathlib import Path

    from ganbert.ingest import adni, dicom, phantom
    from ganbert.prep import qc

    raw = phantom.write_cohort(tmp_path_factory.mktemp("phantom_t1"), 1, ("AV45",), "tiny", 0)
    scans = adni.ingest(raw, 365).scans
    t1 = raw / next(s for s in scans if s.kind == "T1").files[0]
    pet = raw / next(s for s in scans if s.kind == "PET").files[0]
    flair = next(Path(p) for p in sorted((raw / "ADNI").rglob("*FLAIR*.nii")))
    vol = dicom.read_any(t1)
    qc.assess(vol.data, vol.affine)
    return {"raw": raw, "t1": t1, "flair": flair, "pet": pet}


@pytest.fixture(scope="session")
def static_pet(phantom_t1: dict[str, "Path"], tmp_path_factory: pytest.TempPathFactory) -> "Path":
    """The phantom's AV45 PET averaged over frames and resampled to 3 mm voxels (a static PET as scanners export it),
    as a 3D NIfTI: a PET handed in where a T1 belongs."""
    import nibabel as nib
    import numpy as np

    from ganbert.prep.grid import resample

    img = nib.load(str(phantom_t1["pet"]))
    data = img.get_fdata(dtype=np.float32).mean(axis=3)
    zooms = np.linalg.norm(img.affine[:3, :3], axis=0)
    shape = np.round(np.asarray(data.shape) * zooms / 3.0).astype(int)
    affine = img.affine @ np.diag([*(3.0 / zooms), 1.0])
    path = tmp_path_factory.mktemp("static_pet") / "static_pet.nii.gz"
    nib.save(nib.Nifti1Image(resample(data, img.affine, affine, tuple(shape)), affine), str(path))
    return path


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_shards: str, local_ray: None) -> Uninterrupted:
    """`UNINTERRUPTED` trained once per session on the session Ray (its rows held in memory)."""
    from ganbert import config
    from ganbert.train import loop

    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = config.apply(config.tiny(), {**UNINTERRUPTED, "run.name": "whole", "run.storage": str(tmp / "ray")})
    uri = f"sqlite:///{tmp}/mlflow.db"
    return Uninterrupted(cfg, uri, loop.fit(cfg, tiny_shards, uri))  # rows held in memory
