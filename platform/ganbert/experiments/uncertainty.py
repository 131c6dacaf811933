"""Is a fold ensemble's spread honest? Voxel SD against the real error on held-out subjects, and the ensemble
against its single members (`ganbert bench uncertainty --study DIR`).

For every subject of the locked test split, the K fold models of one study row predict its PET; their mean is
the ensemble output and their voxel-wise SD its uncertainty map (what `ganbert synthesize --model A --model B`
writes as `<out>_sd.nii.gz`). Inside the brain mask: the Spearman correlation between SD and the absolute error
of the mean, and the share of voxels whose real value lies inside mean +- 2 SD (for a Gaussian spread, 95 %). The
ensemble's PSNR/SSIM is paired per subject with each single fold model's (`paired.compare`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from ganbert.experiments import paired
from ganbert.scoring.evaluate import brain_mask, geometry_of, paper_metrics, predict_row
from ganbert.store import loader


def spread_scores(real: torch.Tensor, outputs: torch.Tensor, mask: np.ndarray) -> dict[str, float]:
    """real (T, d, h, w) and member outputs (M, T, d, h, w) in PET units, mask (d, h, w): the in-brain Spearman rho
    of SD vs |mean - real|, the share of real values inside mean +- 2 SD, and the mean SD and |error|."""
    if outputs.ndim != 5 or outputs.shape[0] < 2 or tuple(outputs.shape[1:]) != tuple(real.shape):
        raise ValueError(f"outputs must be (M >= 2, *real.shape), got {tuple(outputs.shape)} for {tuple(real.shape)}")
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))
    mean, sd = outputs.double().mean(0), outputs.double().std(0, correction=1)
    err = (mean - real.double()).abs()
    s, e = sd[:, m].reshape(-1).numpy(), err[:, m].reshape(-1).numpy()
    rho = stats.spearmanr(s, e).statistic
    return {"spearman_sd_abs_error": float(rho), "coverage_2sd": float(np.mean(e <= 2.0 * s)),
            "mean_sd": float(s.mean()), "mean_abs_error": float(e.mean())}


def measure(study_dir: Path, row: str, seed: int | None = None) -> dict[str, Any]:
    """The spread scores of every locked-test subject for one row's fold ensemble of a finished study, and the
    ensemble's PSNR / SSIM paired with each fold model's. Returns a JSON-able dict."""
    from ganbert.experiments.study import load_checkpoint

    result = json.loads((Path(study_dir) / "study.json").read_text())
    cells = [c for c in result["cells"] if c["row"] == row and (seed is None or c["seed"] == seed)]
    if not cells or any(c is None for c in cells[0]["checkpoints"]):
        raise ValueError(f"--row {row!r}: no trained cell with fold checkpoints in {study_dir}/study.json "
                         f"(rows: {sorted({c['row'] for c in result['cells']})})")
    cell = cells[0]
    members = [load_checkpoint(str(c)) for c in cell["checkpoints"]]
    data_dir, tracer = result["data"], cell["tracer"]
    geo = geometry_of(data_dir)
    per_subject: list[dict[str, Any]] = []
    single: dict[int, dict[str, dict[str, float]]] = {i: {} for i in range(len(members))}
    ens: dict[str, dict[str, float]] = {}
    for shard_row in loader.read_rows(data_dir, "test", tracer):
        real = torch.from_numpy(np.array(shard_row["pet"], dtype=np.float32))
        outputs = torch.stack([predict_row(m.eval(), shard_row) for m in members])
        mask, _ = brain_mask(shard_row, geo)
        subject = str(shard_row["subject"])
        scores = spread_scores(real, outputs, mask) | {"subject": subject}
        ens[subject] = paper_metrics(outputs.mean(0), real)
        for i, out in enumerate(outputs):
            single[i][subject] = paper_metrics(out, real)
        per_subject.append(scores | {f"ensemble_{k}": v for k, v in ens[subject].items()})
    comparisons = []
    for metric in ("psnr", "ssim"):
        for i in single:
            c = paired.compare({s: v[metric] for s, v in ens.items()}, {s: v[metric] for s, v in single[i].items()})
            if c is not None:
                comparisons.append({"metric": metric, "fold": i, "n": c.n, "mean_diff": c.mean_diff, "ci_low": c.ci_low,
                                    "ci_high": c.ci_high, "p_wilcoxon": c.p_wilcoxon,
                                    "verdict": paired.verdict(c.ci_low, c.ci_high, True, c.n)})
    keys = ("spearman_sd_abs_error", "coverage_2sd", "mean_sd", "mean_abs_error")
    return {"study": str(study_dir), "row": row, "seed": cell["seed"], "tracer": tracer, "members": len(members),
            "subjects": per_subject, "mean": {k: float(np.mean([s[k] for s in per_subject])) for k in keys},
            "ensemble_vs_fold": comparisons}


def render(found: dict[str, Any]) -> str:
    """Markdown: the spread scores per subject and on average, and the ensemble-vs-fold paired table."""
    lines = [f"Fold ensemble of `{found['row']}` ({found['members']} members, {found['tracer']}, locked test split of "
             f"`{found['study']}`), inside the brain mask:", "",
             "| subject | Spearman(SD, abs error) | real inside mean +- 2 SD | mean SD | mean abs error "
             "| ensemble PSNR |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in found["subjects"] + [found["mean"] | {"subject": "mean", "ensemble_psnr": math.nan}]:
        lines.append(f"| {s['subject']} | {s['spearman_sd_abs_error']:.3f} | {100 * s['coverage_2sd']:.1f} % | "
                     f"{s['mean_sd']:.2f} | {s['mean_abs_error']:.2f} | "
                     + ("–" if math.isnan(s["ensemble_psnr"]) else f"{s['ensemble_psnr']:.2f}") + " |")
    lines += ["", "Ensemble minus each single fold model, per subject (subject-bootstrap 95 % interval):", "",
              "| metric | fold | n | mean diff [95 % CI] | Wilcoxon p | verdict |", "|---|---:|---:|---:|---:|---|"]
    for c in found["ensemble_vs_fold"]:
        p = "–" if c["p_wilcoxon"] is None else f"{c['p_wilcoxon']:.3f}"
        lines.append(f"| {c['metric']} | {c['fold']} | {c['n']} | {c['mean_diff']:+.4f} [{c['ci_low']:+.4f}, "
                     f"{c['ci_high']:+.4f}] | {p} | {c['verdict']} |")
    return "\n".join(lines) + "\n"
