"""cluster.yaml passes Ray's own cluster-launcher validation and installs the project with its pins (no network)."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
COMMAND_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                 "head_start_ray_commands", "worker_start_ray_commands")


def _raw() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _validated(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before touching the cloud: merge the provider defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_validation() -> None:
    cfg = _validated(_raw())
    assert cfg["provider"]["type"] == "aws"
    nodes = cfg["available_node_types"]
    assert nodes[cfg["head_node_type"]]["resources"]["GPU"] == 0
    gpu_types = [name for name, node in nodes.items() if node["resources"].get("GPU", 0) >= 1]
    assert gpu_types == ["gpu_worker"]
    gpu = nodes["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith(("g5.", "p3.", "g6.", "p4d."))
    assert gpu["resources"]["CPU"] >= 4 and gpu["max_workers"] >= 1
    assert cfg["max_workers"] >= sum(n.get("min_workers", 0) for n in nodes.values())


def test_setup_installs_project_with_constraints() -> None:
    cfg = _validated(_raw())
    setup = cfg["setup_commands"]
    torch_i = next(i for i, c in enumerate(setup) if "-c constraints.txt torch==2.13.0" in c)
    project_i = next(i for i, c in enumerate(setup) if "-c constraints.txt -e ." in c)
    assert torch_i < project_i  # torch first, so the project install cannot pick another torch
    assert all("pip install" not in c or "-c " in c for c in setup + cfg["head_setup_commands"])
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
    assert "CUDA" in (ROOT / "cluster.yaml").read_text()
    assert any(remote.endswith("ganbert") and local == "." for remote, local in cfg["file_mounts"].items())
    assert any(">> ~/.bashrc" in c for c in setup)  # the PATH line survived YAML (no stray comment)
    head = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head and "--disable-usage-stats" in head
    assert "--dashboard-host 127.0.0.1" in head and "mlflow server" in head
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "MLFLOW_TRACKING_URI" in workers and "--disable-usage-stats" in workers


def test_every_command_is_valid_bash() -> None:
    cfg = _raw()
    for key in COMMAND_LISTS:
        for command in cfg.get(key) or []:
            result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert result.returncode == 0, f"{key}: {command!r}: {result.stderr}"


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(unknown_field=1),
    lambda c: c.update(head_node_type="nope"),
    lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=99),
])
def test_ray_validation_rejects_broken_variants(mutate: Any) -> None:
    config = _raw()
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validated(config)
