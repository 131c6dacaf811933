"""The pure layers (models/: networks, sequences, tokens, intensity, the model folder; the GAN step, metrics, input QC,
ensembles, atlas, model cards) import neither Ray nor MLflow;
inference loads no transformers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PLATFORM = Path(__file__).resolve().parents[1] / "platform"
PURE = ["ganbert.models"] + sorted(f"ganbert.models.{p.stem}" for p in (PLATFORM / "ganbert" / "models").glob("*.py")
                                   if p.stem != "__init__") + [
    "ganbert.train.step", "ganbert.scoring.metrics", "ganbert.scoring.biomarkers", "ganbert.prep.qc",
    "ganbert.serve.atlas", "ganbert.serve.ensemble", "ganbert.track.model_card"]
EDGES = ("ray", "mlflow")


# Imports each module in turn in one fresh interpreter and stops at the first after which Ray or MLflow is loaded: a
# module imported later cannot hide an earlier one's imports, since each is checked before the next is imported.
PROBE = """
import importlib, sys
for module in sys.argv[1:]:
    importlib.import_module(module)
    edges = [m for m in {edges!r} if m in sys.modules]
    if edges:
        print(module, "imports", " ".join(edges))
        break
"""


def test_pure_modules_import_neither_ray_nor_mlflow() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PLATFORM), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", PROBE.format(edges=EDGES), *PURE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", out.stdout.strip()


def test_inference_never_loads_transformers() -> None:
    """BERT is a training-only network: synthesis and its model folder load neither it nor `transformers` (about 2 s
    of import in every synthesis process and Ray Data worker)."""
    modules = ["ganbert.serve.synthesize", "ganbert.track.pyfunc_model", "ganbert.models.saved"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PLATFORM), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", PROBE.format(edges=("transformers",)), *modules], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", out.stdout.strip()
