"""Two Ray nodes on this machine (`ray start --head` + `ray start --address`): a 2-worker tiny run spread over both
survives the second node's raylet being killed mid-run and restarted, ending with the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ray_nodes import free_port, session_members, stop_session
from uninterrupted import UNINTERRUPTED, Uninterrupted

RAY = str(Path(sys.executable).parent / "ray")

DRIVER = """
import json, sys
import ray
from ganbert import config
from ganbert.train import loop
ray.init()
cfg = config.apply(config.tiny(), {**json.loads(sys.argv[5]), "run.name": sys.argv[1], "run.storage": sys.argv[2]})
out = loop.fit(cfg, sys.argv[3], sys.argv[4])
nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
print("RESULT " + json.dumps({"model_dir": out.model_dir, "step": out.metrics.get("step"), "nodes": len(nodes)}))
"""


def _node_ports() -> list[str]:
    flags = ("--node-manager-port", "--object-manager-port", "--metrics-export-port", "--runtime-env-agent-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port")
    return [str(x) for flag in flags for x in (flag, free_port())]


class TwoNodes:
    """A head with 1 logical CPU and a second node with 1 logical CPU, on 127.0.0.1, ports free-picked."""

    def __init__(self, root: Path) -> None:
        self.root = root
        dropped = ("RAY_ADDRESS", "PYTHONPATH", "MLFLOW_TRACKING_URI")
        self.env = {k: v for k, v in os.environ.items() if k not in dropped}
        # The GCS checks each node every 0.5 s and marks it dead after 3 checks that fail (a killed raylet refuses at
        # once; a slow one still has the default 10 s to answer each), so the killed node's death is seen in about
        # 1.5 s rather than after the defaults' 5 misses.
        self.env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", RAY_health_check_period_ms="500",
                        RAY_health_check_failure_threshold="3")
        self.gcs = f"127.0.0.1:{free_port()}"
        self.dashboard = free_port()
        self.head = self._start(["--head", "--port", self.gcs.split(":")[1], "--dashboard-host", "127.0.0.1",
                                 "--dashboard-port", str(self.dashboard), "--temp-dir", str(root / "ray"),
                                 "--ray-client-server-port", str(free_port())], "head")
        try:
            self._wait_nodes(1)
            self.second = self.start_second()
        except BaseException:
            stop_session(self.head, 30)
            raise

    def _start(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
                                 "--num-cpus", "1", *_node_ports(), *args], cwd=self.root, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def start_second(self) -> subprocess.Popen[bytes]:
        proc = self._start(["--address", self.gcs], "second")
        try:
            self._wait_nodes(2)
        except BaseException:
            stop_session(proc, 30)
            raise
        return proc

    def alive_nodes(self) -> int:
        """Alive nodes, from the head dashboard's node summary (cheap: no Ray driver per poll)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.dashboard}/nodes?view=summary", timeout=5) as r:
                nodes = json.loads(r.read())["data"]["summary"]
        except (OSError, ValueError, KeyError):
            return 0
        return sum(1 for n in nodes if n.get("raylet", {}).get("state") == "ALIVE")

    def _wait_nodes(self, n: int) -> None:
        deadline = time.monotonic() + 240
        while self.alive_nodes() < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} Ray nodes not up: {(self.root / 'head.log').read_text()[-3000:]}")
            time.sleep(1)

    def kill_second_raylet(self) -> None:
        raylets = [pid for pid, cmd in session_members(self.second.pid) if "/raylet" in cmd.split(" ")[0]]
        assert raylets, session_members(self.second.pid)
        for pid in raylets:
            os.kill(pid, signal.SIGKILL)
        stop_session(self.second, 30)

    def stop(self) -> None:
        stop_session(self.second, 30)
        stop_session(self.head, 30)


def _driver(cluster: TwoNodes, name: str, storage: Path, data: str, uri: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", DRIVER, name, str(storage), data, uri, json.dumps(UNINTERRUPTED)],
                            env=cluster.env | {"RAY_ADDRESS": cluster.gcs}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _result(proc: subprocess.Popen[str], timeout: float) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, out[-6000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_two_node_run_survives_a_killed_raylet(tiny_shards: str, uninterrupted: Uninterrupted) -> None:
    """The 2-worker run of `UNINTERRUPTED`, one worker on each node: the second node's raylet is killed after the first
    checkpoint and the node restarted; the run resumes and ends with the weights of the uninterrupted run (trained
    on the test session's one-node Ray: the same arithmetic)."""
    root = Path(tempfile.mkdtemp(prefix="gb2n", dir="/tmp"))  # short: Ray's unix sockets live under it
    cluster = TwoNodes(root)
    try:
        storage, uri = root / "shared" / "ray", f"sqlite:///{root / 'shared' / 'mlflow.db'}"
        faulty = _driver(cluster, "faulty", storage, tiny_shards, uri)
        deadline = time.monotonic() + 300
        while not list((storage / "faulty").glob("checkpoint_*")):  # epoch 1 checkpointed: now kill the second node
            assert faulty.poll() is None and time.monotonic() < deadline, "the run ended before the fault"
            time.sleep(0.5)
        cluster.kill_second_raylet()
        time.sleep(3)
        assert faulty.poll() is None, "the run ended before the node came back"
        cluster.second = cluster.start_second()
        resumed = _result(faulty, timeout=600)
    finally:
        cluster.stop()
    assert resumed["nodes"] == 2
    assert resumed["step"] == uninterrupted.out.metrics["step"]
    a = load_file(str(Path(uninterrupted.out.model_dir) / "generator.safetensors"))
    b = load_file(str(Path(resumed["model_dir"]) / "generator.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
