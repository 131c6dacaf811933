"""`ganbert report`: the method x tracer table (paper Tables 1/2) from the finished runs of an MLflow experiment."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

from ganbert.common.atomic import write_text
from ganbert.config import METHODS, TRACERS

METHOD_KEY = "model.method"
TRACER_KEY = "geometry.tracer"
SELECT_METRIC = "val_psnr"
REPORT_METRICS = ("val_psnr", "val_ssim", "val_rmse", "val_psnr01", "val_ssim01")
REPORT_RUN_NAME = "report"
KIND_TAG = "ganbert.kind"
ROW_TAG = "ganbert.row"
TEST_PREFIX = "test_"
PAIRED_KEY = re.compile(r"(?P<tracer>[^/]+)/(?P<row>[^.]+)\.(?P<key>[^.]+)\.(?P<stat>delta|ci_lo|ci_hi|p)")
TEST_COLUMNS = (("psnr", "PSNR", 2), ("ssim", "SSIM", 3), ("rmse", "RMSE", 3), ("psnr_brain", "PSNR brain", 2),
                ("psnr_rel", "PSNR rel", 2), ("ssim_rel", "SSIM rel", 3), ("wasserstein", "W1", 3),
                ("suvr_mape", "SUVR MAPE %", 2), ("positivity_agreement", "positivity", 2))

# SPEC section 7: the paper's ADNI3 results (PSNR, SSIM, RMSE); the paper gives no best epoch.
PAPER_RESULTS: dict[tuple[str, str], tuple[float, float, float]] = {
    ("pix2pix-tanh", "AV45"): (50.41, 0.0, 1.85),
    ("pix2pix-tanhshrink", "AV45"): (48.66, 0.0, 2.28),
    ("ganbert", "AV45"): (57.58, 0.27, 0.80),
    ("ganbert-cnnd", "AV45"): (56.53, 0.31, 0.91),
    ("ganbert", "AV1451"): (51.05, 0.25, 0.82),
    ("ganbert-cnnd", "AV1451"): (51.25, 0.26, 0.81),
    ("ganbert", "FDG"): (56.53, 0.11, 0.82),
    ("ganbert-cnnd", "FDG"): (47.52, 0.38, 2.38),
}


def _order(values: list[str], known: tuple[str, ...]) -> list[str]:
    """Known names in their SPEC order, then any others sorted."""
    return [v for v in known if v in values] + sorted(v for v in set(values) if v not in known)


def _best_epoch(history: dict[int, float]) -> int | None:
    """Epoch of the highest finite value (the earliest on ties), None if there is none."""
    finite = [(value, -step) for step, value in history.items() if isinstance(value, (int, float))
              and math.isfinite(value)]
    return -max(finite)[1] if finite else None


def build_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best run per (method, tracer) by its best `val_psnr` epoch, with the metrics at that epoch.

    runs: [{"run_id": str, "run_name": str, "params": {"model.method": .., "geometry.tracer": ..},
            "history": {"val_psnr": {epoch: value}, "val_ssim": {...}, ...}}, ...]
    Runs without method/tracer params or without a finite val_psnr are skipped. Returns rows
    {"method", "tracer", "run_id", "run_name", "best_epoch", "psnr", "ssim", "rmse", "psnr01", "ssim01", "runs",
    "test"} (a metric missing at the best epoch is None; "test": the run's `test` dict, {} without one),
    ordered by method then tracer in SPEC order.
    """
    if not isinstance(runs, list):
        raise ValueError(f"runs must be a list of run dicts, got {type(runs).__name__}")
    best: dict[tuple[str, str], dict[str, Any]] = {}
    counts: dict[tuple[str, str], int] = {}
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or "params" not in run or "history" not in run:
            raise ValueError(f"runs[{i}] must be a dict with 'params' and 'history', got {run!r:.80}")
        method, tracer = run["params"].get(METHOD_KEY), run["params"].get(TRACER_KEY)
        history = run["history"].get(SELECT_METRIC, {})
        epoch = _best_epoch(history)
        if method is None or tracer is None or epoch is None:
            continue
        key = (str(method), str(tracer))
        counts[key] = counts.get(key, 0) + 1
        at = {name: run["history"].get(metric, {}).get(epoch)
              for name, metric in (("psnr", "val_psnr"), ("ssim", "val_ssim"), ("rmse", "val_rmse"),
                                   ("psnr01", "val_psnr01"), ("ssim01", "val_ssim01"))}
        row = {"method": key[0], "tracer": key[1], "run_id": run.get("run_id"), "run_name": run.get("run_name"),
               "best_epoch": epoch, "test": dict(run.get("test") or {}), **at}
        if key not in best or row["psnr"] > best[key]["psnr"]:
            best[key] = row
    rows: list[dict[str, Any]] = []
    for method in _order([k[0] for k in best], tuple(METHODS)):
        for tracer in _order([k[1] for k in best if k[0] == method], TRACERS):
            rows.append({**best[(method, tracer)], "runs": counts[(method, tracer)]})
    return rows


def test_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Test-split metrics (from `ganbert study` / `ganbert evaluate`) per row and tracer: mean and sd over runs.

    runs: build_table's run dicts with "test": {metric: value} (without the `test_` prefix) and optionally
    "row" (the study row; default the method). Returns [{"name", "tracer", "n", "stats": {metric: (mean, sd)}}]
    for the groups with any test metric; sd is the sample sd (0 for one run).
    """
    groups: dict[tuple[str, str], list[dict[str, float]]] = {}
    for run in runs:
        test = run.get("test") or {}
        tracer = run.get("params", {}).get(TRACER_KEY)
        name = run.get("row") or run.get("params", {}).get(METHOD_KEY)
        if test and tracer and name:
            groups.setdefault((str(name), str(tracer)), []).append(test)
    out = []
    for (name, tracer), tests in sorted(groups.items(), key=lambda kv: (kv[0][1] not in TRACERS, kv[0][1], kv[0][0])):
        stats: dict[str, tuple[float, float]] = {}
        for metric, _, _ in TEST_COLUMNS:
            vals = [t[metric] for t in tests if metric in t and math.isfinite(t[metric])]
            if vals:
                mean = sum(vals) / len(vals)
                sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
                stats[metric] = (mean, sd)
        out.append({"name": name, "tracer": tracer, "n": len(tests), "stats": stats})
    return out


def _fmt(value: float | None, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def _grid_table(cells: dict[tuple[str, str], tuple[str, ...]], methods: list[str], tracers: list[str],
                columns: tuple[str, ...]) -> list[str]:
    """Markdown table: rows = methods, per tracer the given columns (e.g. PSNR SSIM RMSE best epoch)."""
    head = ["method"] + [f"{t} {c}" for t in tracers for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for method in methods:
        row = [method]
        for tracer in tracers:
            row += list(cells.get((method, tracer), ("–",) * len(columns)))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def paired_rows(metrics: dict[str, float]) -> list[dict[str, Any]]:
    """A study parent run's paired metrics `<tracer>/<row>.<set>_<metric>.delta|ci_lo|ci_hi|p` as rows
    {"tracer", "row", "key" (<set>_<metric>), "delta", "ci_lo", "ci_hi", "p"} (p None when absent), sorted."""
    found: dict[tuple[str, str, str], dict[str, float]] = {}
    for name, value in metrics.items():
        m = PAIRED_KEY.fullmatch(name)
        if m:
            found.setdefault((m["tracer"], m["row"], m["key"]), {})[m["stat"]] = float(value)
    return [{"tracer": t, "row": r, "key": k, "delta": v["delta"], "ci_lo": v["ci_lo"], "ci_hi": v["ci_hi"],
             "p": v.get("p")} for (t, r, k), v in sorted(found.items()) if {"delta", "ci_lo", "ci_hi"} <= set(v)]


def render_markdown(rows: list[dict[str, Any]], experiment: str, tracking_uri: str, n_runs: int,
                    tests: list[dict[str, Any]] | None = None,
                    studies: dict[str, list[dict[str, Any]]] | None = None) -> str:
    """report.md: this experiment's table, the runs behind it, test metrics where runs have them, and the
    paper's numbers as text (its PET units and ranges differ from the phantom's: no shared axis)."""
    methods = _order([r["method"] for r in rows] + list(METHODS), tuple(METHODS))
    tracers = _order([r["tracer"] for r in rows] + list(TRACERS), TRACERS)
    ours = {(r["method"], r["tracer"]): (_fmt(r["psnr"], 2), _fmt(r["ssim"], 3), _fmt(r["rmse"], 3),
                                         str(r["best_epoch"])) for r in rows}
    paper = {k: (_fmt(v[0], 2), _fmt(v[1], 2), _fmt(v[2], 2)) for k, v in PAPER_RESULTS.items()}
    lines = [f"# GANBERT report: experiment `{experiment}`", "",
             f"Tracking store: `{tracking_uri}`; {n_runs} finished training runs read, "
             f"{sum(r['runs'] for r in rows)} with a tracer and a `val_psnr` history.", "",
             "## This experiment", "",
             "Per method and tracer the run with the best validation PSNR; PSNR (paper range, data range "
             "1010), SSIM and RMSE at that run's best epoch (the epoch of its highest `val_psnr`).", ""]
    lines += _grid_table(ours, methods, tracers, ("PSNR", "SSIM", "RMSE", "best epoch"))
    lines += ["", "Runs behind each cell (all finished runs of the group were compared):", "",
              "| method | tracer | run | run id | runs in group | PSNR [0,1] | SSIM [0,1] |",
              "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['tracer']} | {r['run_name'] or '–'} | `{r['run_id']}` | {r['runs']} | "
                     f"{_fmt(r['psnr01'], 2)} | {_fmt(r['ssim01'], 3)} |")
    if tests:
        lines += ["", "## Test split", "",
                  "Runs evaluated on the test split (`ganbert study`: each run's checkpoint chosen on val); "
                  "mean ± sd over the runs of a row (seeds).", "",
                  "| row | tracer | runs | " + " | ".join(c[1] for c in TEST_COLUMNS) + " |",
                  "|---|---|---:|" + "---:|" * len(TEST_COLUMNS)]
        for t in tests:
            cells = []
            for metric, _, digits in TEST_COLUMNS:
                if metric not in t["stats"]:
                    cells.append("–")
                    continue
                mean, sd = t["stats"][metric]
                cells.append(f"{mean:.{digits}f} ± {sd:.{digits}f}" if t["n"] > 1 else f"{mean:.{digits}f}")
            lines.append(f"| {t['name']} | {t['tracer']} | {t['n']} | " + " | ".join(cells) + " |")
    for study, pairs in (studies or {}).items():
        lines += ["", f"## Study `{study}`: paired differences against its reference row", "",
                  "Row - reference over the subjects both have (`ganbert study`, study.md has the verdicts); "
                  "95 % subject-bootstrap interval; p: Wilcoxon signed-rank, Holm-adjusted over the rows.", "",
                  "| tracer | row | set_metric | difference [95 % CI] | p Holm |", "|---|---|---|---:|---:|"]
        for e in pairs:
            p = "–" if e["p"] is None else f"{e['p']:.3g}"
            lines.append(f"| {e['tracer']} | {e['row']} | {e['key']} | {e['delta']:+.4g} [{e['ci_lo']:+.4g}, "
                         f"{e['ci_hi']:+.4g}] | {p} |")
    lines += ["", "## The paper's numbers (for reference, not from this experiment)", "",
              "Shin et al., GANBERT, Tables 1 and 2 (ADNI3; 64 V100, about 500 epochs; no best epoch "
              "given). – = not reported.", ""]
    lines += _grid_table(paper, list(METHODS), list(TRACERS), ("PSNR", "SSIM", "RMSE"))
    return "\n".join(lines) + "\n"


def render_png(rows: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bar chart: best validation PSNR per method (bars) per tracer (groups).

    The paper's values are not drawn: its ADNI PET units and ranges differ from ours (see report.md's text table).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from ganbert.common.figures import save_png

    methods = _order([r["method"] for r in rows] + list(METHODS), tuple(METHODS))
    tracers = _order([r["tracer"] for r in rows] + list(TRACERS), TRACERS)
    psnr = {(r["method"], r["tracer"]): r["psnr"] for r in rows}
    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(tracers))]
        heights = [psnr.get((method, t)) for t in tracers]
        shown = [(x, h) for x, h in zip(xs, heights) if h is not None and math.isfinite(h)]
        ax.bar([x for x, _ in shown], [h for _, h in shown], width, color=f"C{i % 10}")
    handles = [Patch(color=f"C{i % 10}", label=m) for i, m in enumerate(methods)]
    ax.set_xticks(range(len(tracers)), tracers)
    ax.set_ylabel("validation PSNR (dB)")
    ax.set_title("best validation PSNR per method and tracer")
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return save_png(fig, path)


def _history(client: Any, run_id: str, metric: str) -> dict[int, float]:
    """{step: value} of one metric; a step logged twice (a resumed epoch) keeps the latest value."""
    points = sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.timestamp, m.step))
    return {int(m.step): float(m.value) for m in points}


def collect_runs(tracking_uri: str, experiment: str) -> list[dict[str, Any]]:
    """All finished runs of the experiment (sweep and study children included) as build_table's run dicts,
    plus "test" ({metric: latest value} of its `test_*` metrics) and "row" (its `ganbert.row` tag or None)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"experiment {experiment!r}: not found at {tracking_uri}")
    runs: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        page = client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=1000, page_token=token)
        for run in page:
            if run.data.tags.get(KIND_TAG) == REPORT_RUN_NAME or METHOD_KEY not in run.data.params:
                continue
            history = {m: _history(client, run.info.run_id, m) for m in REPORT_METRICS if m in run.data.metrics}
            test = {k[len(TEST_PREFIX):]: float(v) for k, v in run.data.metrics.items() if k.startswith(TEST_PREFIX)}
            runs.append({"run_id": run.info.run_id, "run_name": run.info.run_name,
                         "params": dict(run.data.params), "history": history, "test": test,
                         "row": run.data.tags.get(ROW_TAG)})
        token = page.token
        if not token:
            return runs


def collect_studies(tracking_uri: str, experiment: str) -> dict[str, list[dict[str, Any]]]:
    """{study run name: paired_rows of its metrics} for the finished `ganbert study` parent runs of the experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'study' and "
                              "attributes.status = 'FINISHED'", max_results=1000)
    return {run.info.run_name: paired_rows(run.data.metrics) for run in runs}


def main(args: argparse.Namespace) -> int:
    """Write <out>/report.md and <out>/report.png and log both to a new run named `report`."""
    from ganbert.common.home import default_tracking_uri
    from ganbert.track.tracking import MLflowTracker

    uri = args.tracking_uri or default_tracking_uri()
    runs = collect_runs(uri, args.experiment)
    rows = build_table(runs)
    out = Path(args.out)
    md = out / "report.md"
    write_text(md, render_markdown(rows, args.experiment, uri, len(runs), test_table(runs),
                                   collect_studies(uri, args.experiment)))
    png = render_png(rows, out / "report.png")
    with MLflowTracker(uri, args.experiment, REPORT_RUN_NAME, tags={KIND_TAG: REPORT_RUN_NAME}) as tracker:
        tracker.log_artifact(md)
        tracker.log_artifact(png)
    print(md.read_text())
    print(f"wrote {md} and {png}; logged to run {tracker.run_id} of experiment {args.experiment!r}")
    return 0
