"""MLflow tracking for rank 0 (client API, explicit run ids) with a no-op twin, and run/experiment helpers."""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from ganbert.track.mlflow_model import log_pyfunc_model

PARENT_TAG = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment in its GenAI overview unless this experiment tag says model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# A runs-table view stored on the experiment (MLflow's "share view"); opened with ?viewStateShareKey=<key>.
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
VIEW_KEY = "ganbert-compare"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow's server-side limits (mlflow.utils.validation): checked here so a long value is truncated, not rejected.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000


@runtime_checkable
class Tracker(Protocol):
    """What training and tuning log through; MLflowTracker on rank 0, NullTracker elsewhere."""

    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_model(self, model_dir: Path) -> str | None: ...

    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """The no-op tracker of non-zero ranks: same methods, logs nothing, run_id None."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        """Do nothing."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Do nothing."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Do nothing."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Do nothing."""

    def log_model(self, model_dir: Path) -> str | None:
        """Do nothing; no model URI."""
        return None

    def finish(self, status: str = "FINISHED") -> None:
        """Do nothing."""

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None


def _param_value(key: str, value: Any) -> str:
    """MLflow param string: tuples/lists as `a,b`, truncated to MLflow's limit with a note."""
    if isinstance(value, (tuple, list)):
        text = ",".join(str(v) for v in value)
    else:
        text = str(value)
    if len(text) > MAX_PARAM_LENGTH:
        note = f"...[truncated {len(text)} chars]"
        warnings.warn(f"MLflow param {key}: value of {len(text)} chars truncated to {MAX_PARAM_LENGTH}", stacklevel=3)
        text = text[: MAX_PARAM_LENGTH - len(note)] + note
    return text


def _tag_value(value: Any) -> str:
    text = str(value)
    if len(text) > MAX_TAG_LENGTH:
        note = f"...[truncated {len(text)} chars]"
        text = text[: MAX_TAG_LENGTH - len(note)] + note
    return text


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i: i + size] for i in range(0, len(items), size)]


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """For a local SQLite store: `<db folder>/mlartifacts/<experiment>` (MLflow would use ./mlruns of the cwd)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///"):])
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (db.parent / "mlartifacts" / safe).resolve().as_uri()


def ensure_experiment(tracking_uri: str, experiment: str) -> str:
    """Id of the named experiment, created if missing (tolerates a concurrent creator).

    On a local SQLite store its artifacts go next to the database (`<db folder>/mlartifacts/<name>`).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not experiment:
        raise ValueError("experiment must be a non-empty name")
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise ValueError(f"experiment {experiment!r} is deleted; restore it or pick another name")
        if EXPERIMENT_KIND_TAG not in found.tags:  # made before ganbert tagged its experiments
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(experiment, artifact_location=_artifact_location(tracking_uri, experiment),
                                             tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}))
    except MlflowException:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return str(found.experiment_id)


class MLflowTracker:
    """Logs one MLflow run through MlflowClient with an explicit run id (no global active run).

    Several trackers can coexist in one process (Tune trials, parent + children). Passing `run_id`
    resumes logging into that existing run (training restarted after a crash).
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None, run_id: str | None = None) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        if not tracking_uri:
            raise ValueError("tracking_uri must be a non-empty MLflow URI")
        if not experiment:
            raise ValueError("experiment must be a non-empty name")
        if not run_name:
            raise ValueError("run_name must be a non-empty name")
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self._finished = False
        all_tags = {k: _tag_value(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
            except MlflowException as err:
                raise ValueError(f"run_id {run_id!r}: no such run at {tracking_uri} ({err.message})") from None
            self.run_id: str | None = run.info.run_id
            self.experiment_id = str(run.info.experiment_id)
            if run.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            if all_tags:
                self.set_tags(all_tags)
        else:
            self.experiment_id = ensure_experiment(tracking_uri, experiment)
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
            self.run_id = run.info.run_id

    # --- logging --------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Log params in batches of 100; tuples become `a,b`; over-long values are truncated.

        A param the run already has with another value (a resumed run with a changed config) is
        not re-logged (MLflow params are immutable): it is recorded as tag `param_changed.<key>`.
        """
        from mlflow.entities import Param

        assert self.run_id is not None
        values = {str(k): _param_value(str(k), v) for k, v in params.items()}
        existing = self.client.get_run(self.run_id).data.params
        fresh = {k: v for k, v in values.items() if k not in existing}
        changed = {k: v for k, v in values.items() if k in existing and existing[k] != v}
        for chunk in _chunks(sorted(fresh.items()), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk])
        if changed:
            warnings.warn(f"run {self.run_id}: params {sorted(changed)} already logged with other values; "
                          "recorded as tags param_changed.<key>", stacklevel=2)
            self.set_tags({f"param_changed.{k}": f"{existing[k]} -> {v}" for k, v in changed.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log scalar metrics at `step` (one timestamp), in batches of 1000."""
        from mlflow.entities import Metric

        assert self.run_id is not None
        if int(step) != step or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        now = int(time.time() * 1000)
        items: list[Metric] = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"metric {key}: not a number: {value!r}") from None
            items.append(Metric(str(key), number, now, int(step)))
        for chunk in _chunks(items, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (or a directory's contents) under `artifact_path` of the run."""
        assert self.run_id is not None
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise ValueError(f"path {path}: no such file or directory to log as an artifact")

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags (values truncated to MLflow's limit), in batches of 100."""
        from mlflow.entities import RunTag

        assert self.run_id is not None
        items = [RunTag(str(k), _tag_value(v)) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=chunk)

    def log_model(self, model_dir: Path) -> str | None:
        """Log the generator as a models-from-code pyfunc over `generator.safetensors` + `config.yaml`.

        Returns the model URI (`models:/<model id>`); also set as run tag `model_uri`.
        """
        assert self.run_id is not None
        info = log_pyfunc_model(self.tracking_uri, self.experiment_id, self.run_id, Path(model_dir))
        self.set_tags({"model_uri": info})
        return info

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status` (FINISHED, FAILED or KILLED); later calls do nothing."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        if self._finished or self.run_id is None:
            return
        self.client.set_terminated(self.run_id, status)
        self._finished = True

    def __enter__(self) -> MLflowTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.finish("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))


def runs_view_state(params: list[str], metrics: list[str], tags: list[str] | None = None,
                    order_by: str | None = "val_psnr") -> dict[str, Any]:
    """An MLflow 3 runs-table view: Models plus these param / metric / tag columns, sorted by a metric (desc).

    Sorting by a metric also lists a sweep's child runs flat instead of folded under their parent.
    """
    columns = ["attributes.`Models`"] + [f"params.`{k}`" for k in params] + [f"metrics.`{k}`" for k in metrics]
    columns += [f"tags.`{k}`" for k in tags or []]
    state: dict[str, Any] = {"selectedColumns": columns, "columnOrder": [], "columnWidths": {}}
    if order_by:
        state.update(orderByKey=f"metrics.`{order_by}`", orderByAsc=False)
    return state


def ui_path(experiment_id: str, key: str | None = VIEW_KEY) -> str:
    """The MLflow UI path (after http://host:port/) of an experiment's runs in the model-training view."""
    query = "workflowType=machine_learning" + (f"&viewStateShareKey={key}" if key else "")
    return f"#/experiments/{experiment_id}/runs?{query}"


def set_runs_view(tracking_uri: str, experiment: str, params: list[str], metrics: list[str],
                  tags: list[str] | None = None, order_by: str | None = "val_psnr", key: str = VIEW_KEY,
                  name: str = "ganbert: compare runs") -> str:
    """Save `runs_view_state` as a named view of the experiment (its Views menu); returns `ui_path` opening it.

    Stored as MLflow's saved-view experiment tag `mlflow.sharedViewState.<key>`; saving again replaces it.
    """
    import json

    from mlflow import MlflowClient

    if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
        raise ValueError(f"key must be letters, digits, '-' or '_', got {key!r}")
    experiment_id = ensure_experiment(tracking_uri, experiment)
    now = int(time.time() * 1000)
    state = json.dumps(runs_view_state(params, metrics, tags, order_by), separators=(",", ":"))
    value = json.dumps({"name": name, "createdAt": now, "updatedAt": now, "state": state}, separators=(",", ":"))
    if len(value) > MAX_TAG_LENGTH:
        raise ValueError(f"params/metrics: the view needs {len(value)} characters, over MLflow's {MAX_TAG_LENGTH}")
    MlflowClient(tracking_uri).set_experiment_tag(experiment_id, SHARED_VIEW_PREFIX + key, value)
    return ui_path(experiment_id, key)


def link_model(tracking_uri: str, run_id: str, model_uri: str) -> None:
    """Record a logged model (`models:/<id>`) as an output of a run too (a sweep's best on its parent); idempotent."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelOutput

    if not model_uri.startswith("models:/"):
        raise ValueError(f"model_uri must be models:/<model id>, got {model_uri!r}")
    client = MlflowClient(tracking_uri)
    model_id = model_uri[len("models:/"):]
    outputs = client.get_run(run_id).outputs
    if any(m.model_id == model_id for m in (outputs.model_outputs if outputs else [])):
        return  # already listed (a resumed sweep or study links again)
    client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])


def make_tracker(rank: int, **kwargs: Any) -> Tracker:
    """MLflowTracker(**kwargs) on rank 0, NullTracker on every other rank."""
    if int(rank) != rank or rank < 0:
        raise ValueError(f"rank must be a non-negative integer, got {rank!r}")
    if rank == 0:
        return MLflowTracker(**kwargs)
    return NullTracker()


def find_run(tracking_uri: str, experiment: str, run_name: str) -> str | None:
    """Id of the latest run named `run_name` in `experiment`, or None (used to resume into it)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage == "deleted":
        return None
    quoted = run_name.replace("\\", "\\\\").replace("'", "\\'")
    runs = client.search_runs([found.experiment_id], filter_string=f"attributes.run_name = '{quoted}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def end_open_run(tracking_uri: str, experiment: str, run_name: str, status: str,
                 replace: tuple[str, ...] = ()) -> str | None:
    """End the latest run named `run_name` with `status` if it is still RUNNING (its process died or was stopped)
    or its status is in `replace` (a worker that Ray shut down gracefully leaves its run FINISHED at exit).

    Called by the driver, which outlives the workers that log the run: a run never stays RUNNING. Returns its id.
    """
    from mlflow import MlflowClient

    if status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
    run_id = find_run(tracking_uri, experiment, run_name)
    if run_id is None:
        return None
    client = MlflowClient(tracking_uri)
    if client.get_run(run_id).info.status in ("RUNNING", *replace):
        client.set_terminated(run_id, status)
    return run_id
