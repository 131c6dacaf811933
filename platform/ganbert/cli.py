"""The `ganbert` command line: `ganbert {phantom,preprocess,train,...,bench,demo} --help` (one handler per stage)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from ganbert import config as config_mod
from ganbert.config import Config


def _config_args(p: argparse.ArgumentParser, default: str | None = "paper") -> None:
    p.add_argument("--preset", choices=sorted(config_mod.PRESETS), default=default,
                   help=f"base configuration (default: {default or 'none'})")
    p.add_argument("--config", default=None, help="YAML file overriding the preset")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="overrides, applied last")


def load_config(args: argparse.Namespace) -> Config:
    """Preset, then --config, then key=value overrides."""
    return config_mod.load(args.preset, args.config, list(args.overrides))


def explicit_keys(args: argparse.Namespace) -> set[str]:
    """The `section.field` keys set on the command line (overrides) or in the --config file."""
    keys = set(config_mod.parse_overrides(list(args.overrides)))
    if args.config is not None:
        import yaml

        tree = yaml.safe_load(open(args.config).read()) or {}
        keys |= set(config_mod.flatten(tree)) if isinstance(tree, dict) else set()
    return keys


# --- handlers (imports are lazy so `ganbert --help` stays fast) ----------------------------------

def _phantom(args: argparse.Namespace) -> int:
    from ganbert.ingest import phantom
    return phantom.main(args)


def _preprocess(args: argparse.Namespace) -> int:
    from ganbert.prep import preprocess
    return preprocess.main(args, load_config(args))


def _train(args: argparse.Namespace) -> int:
    from ganbert.common.raysession import ensure_ray
    from ganbert.prep.phantom_cache import data_dir_for
    from ganbert.train import loop
    cfg = load_config(args)
    ensure_ray(dashboard=True)  # before the phantom may be built, as `ganbert train` always started it
    return loop.main(args, cfg, data_dir_for(cfg, args.data))


def _tune(args: argparse.Namespace) -> int:
    from ganbert.experiments import tune
    return tune.main(args, load_config(args))


def _evaluate(args: argparse.Namespace) -> int:
    from ganbert.scoring import command
    given = args.preset is not None or args.config is not None or bool(args.overrides)
    cfg = config_mod.load(args.preset or "paper", args.config, list(args.overrides)) if given else None
    return command.main(args, cfg, explicit_keys(args))


def _study(args: argparse.Namespace) -> int:
    from ganbert.experiments import study
    return study.main(args, load_config(args))


def _report(args: argparse.Namespace) -> int:
    from ganbert.experiments import report
    return report.main(args)


def _synthesize(args: argparse.Namespace) -> int:
    from ganbert.serve import synthesize
    return synthesize.main(args)


def _bench(args: argparse.Namespace) -> int:
    if args.what == "overhead":
        import ray

        from ganbert.prep.phantom_cache import data_dir_for
        from ganbert.train import overhead

        cfg = load_config(args)
        data_dir = data_dir_for(cfg, args.data)  # built (and cached) before the clock starts
        if ray.is_initialized():  # building the phantom's shards started a Ray; the measured run starts its own
            ray.shutdown()
        return overhead.main(args, cfg, data_dir)
    from ganbert import bench
    return bench.main(args, load_config(args))


def _demo(args: argparse.Namespace) -> int:
    from ganbert import demo
    return demo.main(args, load_config(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ganbert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        handlers[name] = handler
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = add("phantom", _phantom, "write an offline phantom cohort in ADNI download layout")
    p.add_argument("--out", required=True, help="output folder (ADNI/ tree, collection CSV, ground truth)")
    p.add_argument("--subjects", type=int, default=12)
    p.add_argument("--tracers", default="AV45,AV1451,FDG", help="comma-separated tracers")
    p.add_argument("--size", choices=("tiny", "demo", "paper"), default="tiny", help="raw volume sizes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pet-space", choices=("t1", "adni-standard"), default="t1",
                   help="t1: PET in the T1's world; adni-standard: ADNI's 160x160x96 1.5 mm grid under a random "
                        "rigid motion (true pose in ground_truth.json)")
    p.add_argument("--site", choices=("A", "B"), default="A",
                   help="A: the default phantom; B: a cohort shift (other anatomy warp and head size spread, T1 "
                        "noise and bias, PET PSF, noise and scanner scale, amyloid load; data/phantom/site.py)")
    p.add_argument("--format", choices=("nifti", "dicom"), default="nifti",
                   help="nifti, or dicom: one file per slice as ADNI ships them, PET frames with their timing")

    p = add("preprocess", _preprocess, "pair, preprocess and shard an ADNI-layout download on Ray Data")
    p.add_argument("--raw", required=True, help="download root holding the collection CSV(s) and ADNI/")
    p.add_argument("--out", required=True, help="output folder for Parquet shards and manifest.json")
    p.add_argument("--window-days", type=int, default=365, help="max days between a PET and its T1")
    p.add_argument("--registration", choices=("rigid", "none"), default="rigid",
                   help="rigid: register each PET to its T1 (mutual information, SimpleITK); none: trust the headers")
    p.add_argument("--skip-qc", action="store_true",
                   help="keep T1s that fail input QC (scores are still recorded in each manifest row)")
    _config_args(p)

    p = add("train", _train, "train on Ray Train (resumes when rerun with the same run.name)")
    p.add_argument("--data", default=None, help="preprocessed shards (default: a cached phantom cohort)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI or local SQLite)")
    _config_args(p)

    p = add("tune", _tune, "run a Ray Tune sweep from a YAML search space")
    p.add_argument("--space", required=True, help="search_spaces/<name>.yaml")
    p.add_argument("--data", default=None, help="preprocessed shards (default: a cached phantom cohort)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--asha", action="store_true", help="ASHA early stopping on val PSNR")
    p.add_argument("--max-concurrent", type=int, default=1)
    _config_args(p)

    p = add("evaluate", _evaluate, "per-subject test metrics of a model or the mean-PET baseline (subjects.csv, "
            "summary.json)")
    p.add_argument("--model", default=None,
                   help="MLflow model URI (models:/..., runs:/...) or a model/checkpoint folder")
    p.add_argument("--baseline", default=None, choices=("mean-pet",), help="evaluate a baseline instead of a model")
    p.add_argument("--data", required=True, help="preprocessed shards")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--tracer", default=None, help="default: the model's tracer (baseline: the split's only tracer)")
    p.add_argument("--out", required=True, help="output folder (subjects.csv, summary.json, figures/)")
    p.add_argument("--overwrite", action="store_true", help="replace the results in a non-empty --out")
    p.add_argument("--tracking-uri", default=None, help="log the summary to MLflow at this URI")
    p.add_argument("--experiment", default=None,
                   help="MLflow experiment (with --tracking-uri; default: run.experiment when set, else 'evaluate')")
    _config_args(p, default=None)

    p = add("study", _study, "cross-validate every row x tracer of a study (or of a Tune grid) with N seeds, score "
            "the locked test split with each row's fold ensemble, and compare rows per subject with paired intervals")
    p.add_argument("--space", default="search_spaces/study.yaml",
                   help="study YAML (rows and tracers), or a Tune search space whose grid becomes the rows")
    p.add_argument("--folds", type=int, default=5,
                   help="K folds of the non-test subjects (default 5); 1 = the fixed train/val/test split")
    p.add_argument("--fold-seed", type=int, default=0, help="seed of the fold assignment (recorded beside the shards)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per row, tracer and fold (run.seed + 0..N-1)")
    p.add_argument("--reference", default=None,
                   help="the row every other row is paired with (default: 'L1-only U-Net' when present, else the "
                        "row with the preset's values, else the first)")
    p.add_argument("--external", action="append", default=None, metavar="NAME=SHARDS",
                   help="also score each row's fold ensemble on another cohort's shards (all its subjects); repeatable")
    p.add_argument("--bootstrap", type=int, default=10_000, help="subject-bootstrap resamples (default 10000)")
    p.add_argument("--data", default=None, help="preprocessed shards (default: a cached phantom cohort)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--out", default=None, help="output folder (default <GANBERT_HOME or ./runs>/study/<name>)")
    p.add_argument("--overwrite", action="store_true", help="replace the results in a non-empty --out")
    _config_args(p)

    p = add("report", _report, "write the method x tracer table (paper Tables 1/2) from MLflow")
    p.add_argument("--experiment", required=True)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--out", default="runs/report")

    p = add("synthesize", _synthesize, "synthesise PET (4D NIfTI, original units) from T1 MRI, after input QC")
    p.add_argument("--model", required=True, action="append",
                   help="MLflow model URI, a model/checkpoint folder, or a folder as a URI pyarrow reads (file://, "
                        "s3://, gs://); repeat for an ensemble (members averaged, voxel-wise SD written); a "
                        "`ganbert study` folder or name stands for the fold models of one of its rows")
    p.add_argument("--study-row", default=None,
                   help="with a study as --model: the row whose fold models are the ensemble (default: its only "
                        "trained row)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: add each model's left-right mirrored input (mirrored back)")
    p.add_argument("--skip-qc", action="store_true",
                   help="do not reject inputs that fail input QC (the scores are still recorded in _qc.json)")
    p.add_argument("--mri", required=True, help="a T1 NIfTI, or a folder of them (Ray Data)")
    p.add_argument("--out", required=True, help="output NIfTI, or a folder in folder mode")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (default: refuse; folder mode keeps them and resumes)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="folder mode: inputs per actor batch (default 4 on GPU actors, 1 on CPU)")
    p.add_argument("--reference-pet", default=None,
                   help="single file: a real PET of this T1 (NIfTI or DICOM) to score the output against, after "
                        "registering it to the T1; writes <out stem>_reference.json")
    p.add_argument("--reference-registration", choices=("rigid", "none"), default="rigid",
                   help="how the reference PET is put in the T1's space (none: trust the headers)")

    p = add("bench", _bench, "print benchmark figures (and update BENCHMARKS.md)")
    p.add_argument("what", choices=("step", "preprocess", "tokens", "loader", "registration", "overhead",
                                     "uncertainty", "qc"))
    p.add_argument("--study", default=None, help="uncertainty: a finished `ganbert study --folds K` output folder")
    p.add_argument("--row", default=None, help="uncertainty: the study row whose fold ensemble is measured")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--data", default=None,
                   help="tokens, loader, overhead: preprocessed shards (default: the cached phantom)")
    p.add_argument("--write", action="store_true", help="record the figures in BENCHMARKS.md")
    p.add_argument("--subjects", type=int, default=6, help="qc: phantom subjects per size (index 0 has a FLAIR)")
    _config_args(p)

    p = add("demo", _demo, "the main job: phantom cohort -> preprocess -> train -> evaluate -> synthesise")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--subjects", type=int, default=40)
    _config_args(p)
    p.set_defaults(preset="demo")
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv`; `key.path=value` overrides may also follow options that come after a positional
    (`ganbert bench overhead --preset tiny optim.epochs=20`), which argparse alone leaves unrecognised."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return int(args.handler(args) or 0)
    except ValueError as err:
        print(f"ganbert {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
