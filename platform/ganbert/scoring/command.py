"""`ganbert evaluate`: a model or the mean-PET baseline scored on a split, written and optionally logged to MLflow."""

from __future__ import annotations

import argparse
from pathlib import Path

from ganbert.common import home
from ganbert.config import Config, GeometryConfig
from ganbert.ingest.phantom import REGIONS
from ganbert.scoring import biomarkers
from ganbert.scoring.evaluate import (
    BASELINES,
    METRICS,
    check_out,
    evaluate_split,
    generator_predictor,
    geometry_of,
    mean_pet,
    write_evaluation,
)
from ganbert.store import shards


def tracer_for(data_dir: str, split: str, tracer: str | None) -> str:
    """`tracer`, else the split's only tracer; ValueError naming --tracer when the split holds several."""
    if tracer:
        return tracer
    have = sorted({s["tracer"] for s in shards.shards_for(shards.read_manifest(data_dir), split)})
    if len(have) != 1:
        raise ValueError(f"--tracer: split {split!r} of {data_dir} holds tracers {have}; name one")
    return have[0]


def check_config(cfg: Config | None, explicit: set[str], geo: GeometryConfig, data_dir: str,
                 model_cfg: Config | None) -> None:
    """Refuse a --preset/--config/overrides configuration whose geometry contradicts the shards or the model, and
    overrides evaluation cannot honour (the model's own config fixes how it predicts)."""
    if cfg is None:
        return
    usable = {"geometry.tracer", "run.experiment"}
    ignored = sorted(k for k in explicit if k not in usable and not k.startswith("geometry."))
    if ignored:
        raise ValueError(f"{ignored[0]}: evaluate does not use it (the model's config or the shards fix it); "
                         f"evaluate reads the geometry (checked) and {sorted(usable)}")
    shards.check_geometry(shards.read_manifest(data_dir), cfg.geometry, data_dir)
    if model_cfg is not None:
        shards.check_geometry({"geometry": shards.geometry_record(model_cfg.geometry)}, cfg.geometry, "the model")


def main(args: argparse.Namespace, cfg: Config | None = None, explicit: set[str] | None = None) -> int:
    """`ganbert evaluate (--model URI_OR_DIR | --baseline mean-pet) --data SHARDS --split test --out DIR
    [--preset P] [--config FILE] [key=value ...]`.

    The configuration, when given, must match the shards' geometry (and the model's); `geometry.tracer` picks the
    tracer and `run.experiment` the MLflow experiment when set explicitly (--tracer / --experiment win).
    """
    from ganbert.models.saved import pick_device
    from ganbert.track.mlflow_model import load_model

    explicit = explicit or set()
    if bool(args.model) == bool(args.baseline):
        raise ValueError("--model / --baseline: give exactly one")
    out = Path(args.out).resolve()
    check_out(out, args.overwrite)
    data_dir = home.resolve(args.data)  # a path, or a URI pyarrow reads (s3://, gs://)
    geo = geometry_of(data_dir)
    chosen = cfg.geometry.tracer if cfg is not None and "geometry.tracer" in explicit else None
    experiment = args.experiment or (cfg.run.experiment if cfg is not None and "run.experiment" in explicit
                                     else "evaluate")
    if args.model:
        generator, model_cfg = load_model(args.model, args.tracking_uri)
        check_config(cfg, explicit, geo, data_dir, model_cfg)
        tracer = args.tracer or chosen or model_cfg.geometry.tracer
        predict, name = generator_predictor(generator, pick_device()), model_cfg.model.method
    else:
        if args.baseline not in BASELINES:
            raise ValueError(f"--baseline must be one of {BASELINES}, got {args.baseline!r}")
        check_config(cfg, explicit, geo, data_dir, None)
        tracer = tracer_for(data_dir, args.split, args.tracer or chosen)
        predict, name = generator_predictor(mean_pet(data_dir, tracer)), args.baseline
    evaluation = evaluate_split(predict, data_dir, args.split, tracer, geo, out / "figures")
    info = {"model": args.model or "", "baseline": args.baseline or "", "name": name, "data": data_dir,
            "split": args.split, "tracer": tracer}
    csv, js = write_evaluation(out, evaluation, info)
    s = evaluation.summary
    print(f"evaluate: {name} on {s['n']} {tracer} {args.split} subjects: " + " ".join(
        f"{k}={s[k]:.4f}" for k in METRICS if s.get(k) is not None))
    for line in biomarkers.report(s, tuple(REGIONS.values())):
        print(f"  {line}")
    print(f"wrote {csv} and {js}")
    if args.tracking_uri:
        from ganbert.track.tracking import MLflowTracker

        with MLflowTracker(args.tracking_uri, experiment, f"evaluate-{name}-{tracer}-{args.split}",
                           tags={"ganbert.kind": "evaluate"}) as tracker:
            tracker.log_params({f"evaluate.{k}": v for k, v in info.items()})
            tracker.log_metrics({f"{args.split}_{k}": v for k, v in s.items() if isinstance(v, (int, float))}, step=0)
            tracker.log_artifact(csv)
            tracker.log_artifact(js)
            if (out / "figures").is_dir():
                tracker.log_artifact(out / "figures", "figures")
        print(f"logged to run {tracker.run_id} of experiment {experiment!r} at {args.tracking_uri}")
    return 0
