"""What the MLflow 3 UI reads: experiments tagged for model training, a saved runs view, models linked to runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ganbert.experiments.tune import swept_keys
from ganbert.track.tracking import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    SHARED_VIEW_PREFIX,
    VIEW_KEY,
    MLflowTracker,
    ensure_experiment,
    link_model,
    set_runs_view,
)


def test_experiments_open_in_model_training_and_carry_a_compare_view(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = ensure_experiment(uri, "abl")
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    old = client.create_experiment("older")  # made without the tag: tagged when ganbert next uses it
    ensure_experiment(uri, "older")
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND

    path = set_runs_view(uri, "abl", ["model.method", "optim.lambda_nsp"], ["val_psnr", "test_psnr"],
                         tags=["ganbert.row"])
    assert path == f"#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    envelope = json.loads(client.get_experiment(exp_id).tags[SHARED_VIEW_PREFIX + VIEW_KEY])
    assert envelope["name"] and isinstance(envelope["createdAt"], int)  # MLflow's saved-view envelope
    state = json.loads(envelope["state"])
    assert state["selectedColumns"] == ["attributes.`Models`", "params.`model.method`", "params.`optim.lambda_nsp`",
                                        "metrics.`val_psnr`", "metrics.`test_psnr`", "tags.`ganbert.row`"]
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`val_psnr`", False)  # also un-nests children
    with pytest.raises(ValueError, match="key"):
        set_runs_view(uri, "abl", [], [], key="a b")


def test_link_model_lists_a_childs_model_on_the_parent(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    with (MLflowTracker(uri, "abl", "sweep") as parent,
          MLflowTracker(uri, "abl", "trial", parent_run_id=parent.run_id) as child):
        model = client.create_logged_model(experiment_id=child.experiment_id, name="model", source_run_id=child.run_id)
        link_model(uri, str(parent.run_id), f"models:/{model.model_id}")
        link_model(uri, str(parent.run_id), f"models:/{model.model_id}")  # a resumed sweep links again
    outputs = client.get_run(str(parent.run_id)).outputs
    assert [m.model_id for m in outputs.model_outputs] == [model.model_id]
    with pytest.raises(ValueError, match="model_uri"):
        link_model(uri, str(parent.run_id), "runs:/x/model")


def test_swept_keys_expand_bundles() -> None:
    specs = {"sequence.scale": {"grid": [1, 2]},
             "bundle": {"grid": [{"optim.lambda_nsp": 1.0, "optim.lambda_mlm": 0.0}, {"optim.lambda_nsp": 0.0}]}}
    assert swept_keys(specs) == ["model.method", "geometry.tracer", "sequence.scale", "optim.lambda_nsp",
                                 "optim.lambda_mlm"]
