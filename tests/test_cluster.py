"""cluster.yaml passes Ray's own cluster-launcher validation, installs the project with its pins, and keeps Ray and
MLflow inside the cluster's security group and behind authentication (no network)."""

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
    assert any('"mlflow[auth]"' in c and "-c " in c for c in cfg["head_setup_commands"])  # the basic-auth app
    assert "flask-wtf==" in (ROOT / "constraints.txt").read_text()


SECRETS = "~/ganbert-cluster.env"


def _ray_inbound_rules() -> Any:
    """Ray's `_create_default_inbound_rules` (AWS provider), run from its source: the module imports boto3, which
    only the head installs (cluster.yaml's head_setup_commands)."""
    import ast
    import itertools

    import ray.autoscaler._private.aws as aws

    source = (Path(aws.__file__).parent / "config.py").read_text()
    names = {"_create_default_inbound_rules", "_create_default_intracluster_inbound_rules",
             "_create_default_ssh_inbound_rules"}
    tree = ast.Module([node for node in ast.parse(source).body
                       if isinstance(node, ast.FunctionDef) and node.name in names], type_ignores=[])
    scope: dict[str, Any] = {"itertools": itertools}
    exec(compile(tree, "ray/autoscaler/_private/aws/config.py", "exec"), scope)
    return scope["_create_default_inbound_rules"]


def test_security_group_lets_in_only_ssh_and_the_cluster() -> None:
    """The inbound rules Ray gives the cluster's group (its own function, with our extra rules): all traffic from
    the group's members, port 22 from anywhere, nothing else (no extra IpPermissions to open Ray or MLflow)."""
    _create_default_inbound_rules = _ray_inbound_rules()
    group = _validated(_raw())["provider"]["security_group"]
    assert group["GroupName"] and not group.get("IpPermissions")
    rules = _create_default_inbound_rules(["sg-cluster"], group.get("IpPermissions"))
    outside = [r for r in rules if r.get("IpRanges") or r.get("Ipv6Ranges") or r.get("PrefixListIds")]
    assert [(r["FromPort"], r["ToPort"], r["IpProtocol"]) for r in outside] == [(22, 22, "tcp")]
    inside = [r for r in rules if r not in outside]
    assert inside and all(pair["GroupId"] == "sg-cluster" for r in inside for pair in r["UserIdGroupPairs"])


def test_ray_and_mlflow_demand_credentials_on_every_node() -> None:
    """Every node gets the secrets file and starts Ray with it (token auth); MLflow runs its basic-auth app with an
    admin created from the same file; the dashboard stays on the head's loopback."""
    cfg = _validated(_raw())
    assert cfg["file_mounts"][SECRETS] == "~/.ganbert/cluster.env"
    assert any(c.startswith("chmod 600 " + SECRETS) for c in cfg["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all(c.startswith(f"set -a && . {SECRETS} && set +a;") for c in starts), key
    mlflow = next(c for c in cfg["head_start_ray_commands"] if "mlflow server" in c)
    assert "--app-name basic-auth" in mlflow and f". {SECRETS}" in mlflow
    assert 'MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD"' in mlflow
    assert "default_permission = NO_PERMISSIONS" in mlflow and "MLFLOW_FLASK_SERVER_SECRET_KEY" in mlflow
    top = (ROOT / "cluster.yaml").read_text().split("cluster_name:")[0]
    secrets_line = next(line for line in top.splitlines() if "~/.ganbert/cluster.env" in line and "secrets" in line)
    for key in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN=", "MLFLOW_TRACKING_USERNAME=", "MLFLOW_TRACKING_PASSWORD=",
                "umask 077"):
        assert key in secrets_line, key


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
