"""Ray Tune sweeps: `ganbert tune --space search_spaces/masking.yaml --preset tiny` (resumes after a crash).

Each trial is a driver function that builds and fits a `TorchTrainer` (Train V2) reporting to Tune through
`TuneReportCallback`; one MLflow parent run per sweep, a child run per trial tagged with its swept values.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from ganbert import config as config_mod
from ganbert.common import home
from ganbert.common.raysession import ensure_ray
from ganbert.config import Config
from ganbert.experiments.search_space import BUNDLE_KEY, load_space, trial_overrides
from ganbert.prep.phantom_cache import data_dir_for
from ganbert.track.tracking import MLflowTracker, end_open_run, find_run, link_model, set_runs_view
from ganbert.train.loop import fit

# What a trial (the driver of one Train run, which only waits) asks of Ray: no CPU, so that N one-CPU trials fit on N
# CPUs (with 0.01 CPU each, a 2-CPU Ray ran two one-worker trials one after the other). Tune must place the trial
# with some resource, so it asks for 1 MiB of Ray's `memory` resource, which every node has.
TRIAL_DRIVER = {"CPU": 0, "memory": 2**20}


def trial_config(base: Config, swept: dict[str, Any], sweep: str, trial_id: str) -> Config:
    """The run config of one trial: base + swept overrides, its own run name under the sweep's storage."""
    cfg = config_mod.apply(base, trial_overrides(swept))
    storage = home.join(home.resolve(base.run.storage), sweep)
    return config_mod.apply(cfg, {"run.name": f"{sweep}-{trial_id}", "run.storage": storage})


def run_trial(swept: dict[str, Any], base: dict[str, Any], sweep: str, data_dir: str, tracking_uri: str,
              parent_run_id: str | None) -> None:
    """Tune driver function: fit one TorchTrainer with the trial's config (resumes its own checkpoints)."""
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(config_mod.from_dict(base), swept, sweep, trial_id)
    tags = {"ganbert.sweep": sweep, **{f"swept.{k}": str(v) for k, v in trial_overrides(swept).items()}}
    fit(cfg, data_dir, tracking_uri, parent_run_id=parent_run_id, tags=tags, callbacks=[TuneReportCallback()])


class RunEnds(tune.Callback):
    """Ends a trial's MLflow child run on the sweep driver: FAILED when the trial errored for good, KILLED when
    a scheduler (ASHA) stopped it or the sweep was interrupted; a finished trial's run is already FINISHED."""

    def __init__(self, tracking_uri: str, experiment: str, sweep: str, base: Config) -> None:
        self.tracking_uri, self.experiment, self.sweep, self.base = tracking_uri, experiment, sweep, base

    def _end(self, trial: Any, status: str, replace: tuple[str, ...] = ()) -> None:
        end_open_run(self.tracking_uri, self.experiment, f"{self.sweep}-{trial.trial_id}", status, replace)

    def stopped_early(self, trial: Any) -> bool:
        """Whether the trial's last report is before its last epoch (a scheduler stopped it)."""
        epochs = config_mod.apply(self.base, trial_overrides(trial.config or {})).optim.epochs
        return int((trial.last_result or {}).get("epoch", -1)) < epochs - 1

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        # A stopped trial's workers are shut down gracefully, and MLflow's exit hook marks their run FINISHED.
        self._end(trial, "KILLED", ("FINISHED",) if self.stopped_early(trial) else ())

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED")

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        for trial in trials:
            if trial.status != "TERMINATED" and trial.status != "ERROR":
                self._end(trial, "KILLED")


def sweep_name(space_path: str | Path, cfg: Config) -> str:
    return f"{cfg.run.name}-{Path(space_path).stem}"


def state_api_answers() -> bool:
    """True when the connected Ray serves its State API (the dashboard), which Ray Train's placement-group cleaner
    asks whether a stopped trial's controller is gone before it frees that trial's workers."""
    from ray.util.state import list_actors

    try:
        list_actors(limit=1, timeout=10, raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - ServerUnavailable, timeouts, an unreachable dashboard: all mean no
        return False
    return True


def run_sweep(space_path: str | Path, cfg: Config, data_dir: str, tracking_uri: str, max_concurrent: int = 1,
              asha: bool = False) -> tune.ResultGrid:
    """Run (or resume) the sweep of `space_path` over `cfg`; returns Tune's results.

    With `asha` on a Ray without its State API, says so first: each trial ASHA stops keeps its workers' resources
    there, and later trials may wait for them for ever (README, "Resume").
    """
    if asha and not state_api_answers():
        print("[tune] warning: this Ray does not serve its State API (no dashboard), which Ray Train uses to free the "
              "workers of a trial ASHA stops: each stopped trial will keep its workers' CPUs/GPUs and later trials "
              "may wait for them for ever. Start Ray with its dashboard (`ganbert tune` does on a local Ray; "
              "`ray start --head` has it unless --include-dashboard=false)", flush=True)
    space = load_space(space_path, cfg)
    name = sweep_name(space_path, cfg)
    storage = home.resolve(cfg.run.storage)
    parent = MLflowTracker(tracking_uri, cfg.run.experiment, name,
                           run_id=find_run(tracking_uri, cfg.run.experiment, name),
                           tags={"ganbert.sweep": name, "ganbert.space": Path(space_path).name})
    parent.log_params({f"space.{k}": v for k, v in space.specs.items()})
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.to_dict(), sweep=name, data_dir=data_dir,
                             tracking_uri=tracking_uri, parent_run_id=parent.run_id),
        TRIAL_DRIVER)
    path = home.join(storage, name)
    ends = RunEnds(tracking_uri, cfg.run.experiment, name, cfg)
    if tune.Tuner.can_restore(path):
        print(f"[tune] resuming sweep {name} from {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
        tuner._local_tuner._run_config.callbacks = [ends]  # type: ignore[union-attr]  # not restored with the sweep
    else:
        scheduler = ASHAScheduler(max_t=cfg.optim.epochs, grace_period=1, time_attr="epoch") if asha else None
        tuner = tune.Tuner(
            trainable, param_space=space.param_space,
            tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, num_samples=space.num_samples,
                                        max_concurrent_trials=max_concurrent, scheduler=scheduler),
            run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[ends]))
    try:
        results = tuner.fit()
    except BaseException:
        parent.finish("FAILED")
        raise
    best = results.get_best_result() if len(results) else None
    if best is not None and best.metrics:
        parent.log_metrics({f"best_{space.metric}": float(best.metrics.get(space.metric, float("nan")))}, step=0)
        best_run = find_run(tracking_uri, cfg.run.experiment, f"{name}-{best.metrics.get('trial_id')}")
        if best_run:  # the best trial's model is listed on the parent row too
            from mlflow import MlflowClient

            uri = MlflowClient(tracking_uri).get_run(best_run).data.tags.get("model_uri")
            if uri:
                link_model(tracking_uri, str(parent.run_id), uri)
                parent.set_tags({"best_model_uri": uri, "best_run_id": best_run})
    parent.finish()
    view = set_runs_view(tracking_uri, cfg.run.experiment, swept_keys(space.specs),
                         ["val_psnr", "val_ssim", "val_rmse", "val_psnr01", "val_ssim01"], order_by=space.metric)
    print(f"[tune] compare in the MLflow UI: mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1, then "
          f"open http://127.0.0.1:5000/{view}", flush=True)
    return results


def swept_keys(specs: dict[str, Any]) -> list[str]:
    """The config keys a space sets (bundle entries expanded), method and tracer first: the runs-table columns."""
    keys = ["model.method", "geometry.tracer"]
    for key, spec in specs.items():
        if key == BUNDLE_KEY:
            values = next(iter(spec.values())) if isinstance(spec, dict) else []
            keys += [k for entry in values if isinstance(entry, dict) for k in entry]
        else:
            keys.append(key)
    return list(dict.fromkeys(keys))


def main(args: argparse.Namespace, cfg: Config) -> int:
    ensure_ray(dashboard=True)
    data_dir = data_dir_for(cfg, args.data)
    tracking_uri = args.tracking_uri or home.default_tracking_uri()
    cfg = config_mod.apply(cfg, {"run.storage": home.resolve(cfg.run.storage)})  # trials run elsewhere
    results = run_sweep(args.space, cfg, data_dir, tracking_uri, args.max_concurrent, args.asha)
    metric = load_space(args.space, cfg).metric
    print(f"[tune] {len(results)} trials, {results.num_errors} errored")
    for r in results:
        swept = {k: v for k, v in (r.config or {}).items()}
        value = (r.metrics or {}).get(metric)
        print(f"  {swept} -> {metric}={value}")
    print(f"tracking: {tracking_uri}")
    return 1 if results.num_errors else 0


