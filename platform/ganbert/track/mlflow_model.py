"""The generator as an MLflow pyfunc model: logged from a model directory, resolved back to one."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ganbert.common.home import default_tracking_uri
from ganbert.models.saved import CONFIG_FILE, GENERATOR_FILE, MODEL_ARTIFACT

# Packages the pyfunc model needs at load time (pinned to what is installed, see constraints.txt).
MODEL_REQUIREMENTS = ("torch", "safetensors", "pyyaml", "numpy", "transformers", "mlflow")

_URI_LOCK = threading.Lock()


def _check_model_dir(model_dir: Path) -> None:
    missing = [name for name in (GENERATOR_FILE, CONFIG_FILE) if not (model_dir / name).is_file()]
    if missing:
        raise ValueError(f"model_dir {model_dir}: missing {', '.join(missing)}")


def model_requirements() -> list[str]:
    """Pinned pip requirements of the pyfunc model (the installed versions)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in MODEL_REQUIREMENTS]


def model_signature(model_dir: Path) -> Any:
    """Signature from config.yaml: input "mri" float32 (-1, 1, D, H, W), output float32 (-1, T, d, h, w),
    param batch_size (int, default 1)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    from ganbert import config as config_mod

    path = Path(model_dir) / CONFIG_FILE
    try:
        cfg = config_mod.from_dict(yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError, TypeError) as err:
        raise ValueError(f"model config {path}: {err}") from None
    g = cfg.geometry
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, *g.mri_size), "mri")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, g.pet_frames, *g.pet_size))]),
        params=ParamSchema([ParamSpec("batch_size", "integer", 1)]),
    )


def log_pyfunc_model(tracking_uri: str, experiment_id: str, run_id: str, model_dir: Path) -> str:
    """Log `model_dir` (generator.safetensors + config.yaml) as a models-from-code pyfunc of run `run_id`.

    The code file is ganbert/track/pyfunc_model.py; the ganbert package travels as code_paths, the
    requirements are pinned (no inference run). Returns the model URI `models:/<model id>`.
    """
    import mlflow
    import mlflow.pyfunc
    from mlflow.models import Model

    model_dir = Path(model_dir)
    _check_model_dir(model_dir)
    package = Path(__file__).resolve().parents[1]  # the whole ganbert package travels with the model
    client = mlflow.MlflowClient(tracking_uri)
    # mlflow.pyfunc.log_model needs a fluent active run and files the LoggedModel under the fluent
    # experiment; instead create the LoggedModel in the run's experiment and call Model.log (what
    # pyfunc.log_model calls) with explicit ids. Model.log reads the global tracking URI: set it for
    # this call only, under a lock.
    params = {k: v for k, v in client.get_run(run_id).data.params.items()}
    logged = client.create_logged_model(experiment_id=experiment_id, name="model", source_run_id=run_id,
                                        params=params, model_type="ganbert-generator")
    with _URI_LOCK, _use_tracking_uri(tracking_uri), warnings.catch_warnings():
        # No input example on purpose: one paper-size MRI is 64 MiB; the signature describes the input.
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        info = Model.log(
            artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id, model_id=logged.model_id,
            python_model=str(Path(__file__).resolve().with_name("pyfunc_model.py")),
            artifacts={MODEL_ARTIFACT: str(model_dir)},
            code_paths=[str(package)],
            pip_requirements=model_requirements(),
            signature=model_signature(model_dir),
            flavor_name="pyfunc.ModelFromCode",
        )
    return str(info.model_uri)


@contextlib.contextmanager
def _use_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """Temporarily make `tracking_uri` MLflow's global tracking URI (for APIs without a client argument).

    Restores both the previous global URI and `$MLFLOW_TRACKING_URI` (MLflow's own helper unsets the
    variable when no global URI was set before).
    """
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old_global = tracking_utils._tracking_uri
    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    tracking_utils.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        tracking_utils.set_tracking_uri(old_global)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def _artifact_subdir(local_model: Path) -> Path:
    """The `model_dir` artifact folder of a saved pyfunc model folder (reads its MLmodel)."""
    meta = yaml.safe_load((local_model / "MLmodel").read_text()) or {}
    entry = meta.get("flavors", {}).get("python_function", {}).get("artifacts", {}).get(MODEL_ARTIFACT)
    if not entry or "path" not in entry:
        raise ValueError(f"model {local_model}: MLmodel has no {MODEL_ARTIFACT!r} artifact (not a ganbert model)")
    return local_model / entry["path"]


def _local_model_dir(local: Path, uri: str) -> Path:
    """The model folder inside a local folder: the folder itself, or a pyfunc model folder's artifact."""
    if (local / GENERATOR_FILE).is_file() and (local / CONFIG_FILE).is_file():
        return local
    if (local / "MLmodel").is_file():
        found = _artifact_subdir(local)
        _check_model_dir(found)
        return found
    raise ValueError(f"model {uri}: folder has neither {GENERATOR_FILE} + {CONFIG_FILE} nor an MLmodel")


def _copy_from_filesystem(uri: str, dst: Path) -> Path | None:
    """Copy the folder at a URI pyarrow reads (file://, s3://, gs://, hdfs://) into `dst`; None for other schemes."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        fs, inner = pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid:
        return None  # not a filesystem pyarrow knows (mlflow-artifacts://, dbfs:/, ...): an MLflow URI
    try:
        kind = fs.get_file_info(inner).type
        if kind != pafs.FileType.Directory:
            raise ValueError(f"model {uri}: no folder there ({kind.name.lower()})")
        dst.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(inner, str(dst), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except OSError as err:
        raise ValueError(f"model {uri}: cannot read the folder ({' '.join(str(err).split())[:200]})") from None
    return dst


def resolve_model_dir(uri: str, tracking_uri: str | None = None, dst: str | Path | None = None) -> Path:
    """A local folder with generator.safetensors + config.yaml for `uri`.

    `uri` is such a folder (returned as is), a saved/downloaded pyfunc model folder (has MLmodel), either of them
    given as a URI pyarrow reads (`file://`, `s3://`, `gs://`, `hdfs://`: copied into `dst`), or an MLflow model URI
    (`models:/<id>`, `runs:/<run>/model`, ...) that is downloaded into `dst` (default: a fresh temp folder) with
    mlflow.artifacts.download_artifacts.
    """
    if not uri:
        raise ValueError("uri must be a model directory or an MLflow model URI")
    local = Path(uri).expanduser()
    if local.is_dir():
        return _local_model_dir(local, uri)
    if "://" not in uri and ":/" not in uri:
        raise ValueError(f"model {uri}: not a folder and not an MLflow URI (runs:/..., models:/...)")
    if dst is None:
        dst = tempfile.mkdtemp(prefix="ganbert-model-")
    if "://" in uri:
        copied = _copy_from_filesystem(uri, Path(dst) / "model")
        if copied is not None:
            return _local_model_dir(copied, uri)
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    if tracking_uri is None:
        tracking_uri = default_tracking_uri()
    try:
        # models:/ URIs are resolved against the global tracking URI whatever tracking_uri= says.
        with _URI_LOCK, _use_tracking_uri(tracking_uri):
            downloaded = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst),
                                                             tracking_uri=tracking_uri, registry_uri=tracking_uri)
    except MlflowException as err:
        raise ValueError(f"model {uri}: cannot download ({err.message})") from None
    found = _artifact_subdir(Path(downloaded))
    _check_model_dir(found)
    return found


def load_model(model: str, tracking_uri: str | None = None) -> tuple[Any, Any]:
    """(generator in eval mode on CUDA when present else CPU, its Config) from a model folder or an MLflow URI."""
    generator, cfg, _ = load_model_and_card(model, tracking_uri)
    return generator, cfg


def load_model_and_card(model: str, tracking_uri: str | None = None) -> tuple[Any, Any, dict[str, Any] | None]:
    """`load_model` plus the folder's model card metadata (None for a model published before model cards)."""
    from ganbert.models.saved import load_generator, pick_device
    from ganbert.track.model_card import read_metadata

    with tempfile.TemporaryDirectory(prefix="ganbert-model-") as tmp:
        folder = resolve_model_dir(model, tracking_uri, dst=tmp)
        generator, cfg = load_generator(folder, pick_device())
        return generator, cfg, read_metadata(folder)
