"""`python -m ganbert.gpu_check`: its CPU smoke test (tiny preset) with Ray, MLflow, nibabel and pyarrow blocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ganbert import gpu_check

PLATFORM = Path(__file__).resolve().parents[1] / "platform"
# None in sys.modules makes `import name` raise ImportError, as on a GPU machine without these packages
RUN = ("import runpy, sys\n"
       "for name in {blocked!r}: sys.modules[name] = None\n"
       "sys.argv = ['gpu_check'] + {args!r}\n"
       "runpy.run_module('ganbert.gpu_check', run_name='__main__', alter_sys=True)\n")


def test_gpu_check_runs_on_cpu_with_the_tiny_preset_and_no_ray_mlflow_or_nibabel(tmp_path: Path) -> None:
    out = tmp_path / "check"
    args = ["--out", str(out), "--device", "cpu", "--preset", "tiny", "--steps", "1", "--train-steps", "1",
            "--skip-compile"]
    env = dict(os.environ, PYTHONPATH=str(PLATFORM))
    code = RUN.format(blocked=gpu_check.EDGE_MODULES, args=args)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert "| check | setting | result | samples/s | peak MiB | seconds |" in lines
    rows = [line for line in lines if line.startswith("| ") and not line.startswith(("| check", "| ---"))]
    assert [row.split(" | ")[0] for row in rows] == ["| train", "| resume", "| synthesis"] + ["| step speed"] * 5
    assert "checks (finite losses, resume, synthesis, imports): PASS" in lines

    report = json.loads((out / gpu_check.REPORT).read_text())
    assert report["ok"] and report["imported"] == [] and report["preset"] == "tiny"
    assert set(report["speed"]) == set(gpu_check.VARIANTS)
    for name, row in report["speed"].items():
        if gpu_check.VARIANTS[name]["optim.compile"]:
            assert row == {"skipped": "--skip-compile"}
        else:
            assert row["finite"] and row["samples_per_s"] > 0 and row["peak_mib"] > 0, name
    assert report["train"]["finite"] and report["train"]["steps"] == 1
    assert report["resume"]["state_exact"] and report["resume"]["loss_rel_diff"] == 0.0
    assert report["resume"]["update_rel_diff"] == 0.0  # a CPU is deterministic
    assert report["synthesis"]["finite"] and report["synthesis"]["shape"] == [1, 2, 14, 12, 12]
    assert not report["goals"]["apply"]
    assert [p.name for p in out.iterdir()] == [gpu_check.REPORT]  # the checkpoint was temporary

    assert gpu_check.main(args) == 2  # an existing report is kept


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_gpu_check_without_a_gpu_says_so_and_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert gpu_check.main(["--out", str(tmp_path / "check")]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "check").exists()
    assert gpu_check.main(["--out", str(tmp_path / "check"), "--device", "cpu"]) == 2  # paper on a CPU: refused
