"""The pure layers (models/: networks, sequences, tokens, intensity, the model folder; the GAN step, metrics, input QC,
ensembles, atlas, model cards) import neither Ray nor MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PLATFORM = Path(__file__).resolve().parents[1] / "platform"
PURE = ["ganbert.models"] + sorted(f"ganbert.models.{p.stem}" for p in (PLATFORM / "ganbert" / "models").glob("*.py")
                                   if p.stem != "__init__") + [
    "ganbert.train.step", "ganbert.scoring.metrics", "ganbert.scoring.biomarkers", "ganbert.prep.qc",
    "ganbert.serve.atlas", "ganbert.serve.ensemble", "ganbert.track.model_card"]
EDGES = ("ray", "mlflow")


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_neither_ray_nor_mlflow(module: str) -> None:
    """Each module in a fresh interpreter of its own, so one module's imports cannot hide another's."""
    probe = (f"import importlib, sys; importlib.import_module({module!r}); "
             f"print(' '.join(m for m in {EDGES!r} if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PLATFORM), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"
