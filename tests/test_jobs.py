"""jobs/*.py: thin `ray job submit` entry points; the README's `ray start --head` runs jobs/train.py --preset tiny."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from http_status import status
from ray_nodes import free_port, is_loopback, listening, outward_address, session_members, stop_session

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("train", "tune", "preprocess", "report", "synthesize")
RAY = str(Path(sys.executable).parent / "ray")
SUBMIT_DOC = re.compile(r"ray job submit --address http://127\.0\.0\.1:8265 --working-dir \. -- python jobs/(\w+)\.py ")

# Submitted as `python -c`: where the job driver, a plain task and an actor with its own env_vars (like Ray Train's
# worker_runtime_env) import `ganbert` from.
PROBE = """
import sys
sys.path.insert(0, "jobs")
import _entry
_entry.use_submitted_copy()
_entry.join_cluster()
import ganbert
import ray

@ray.remote(num_cpus=0)
def where():
    import ganbert
    return ganbert.__file__

@ray.remote(num_cpus=0)
class Where:
    def file(self):
        import ganbert
        return ganbert.__file__

print("driver=" + ganbert.__file__)
print("task=" + ray.get(where.remote()))
print("actor=" + ray.get(Where.options(runtime_env={"env_vars": {"GANBERT_PROBE": "1"}}).remote().file.remote()))
"""


def _load_entry() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_jobs_entry_under_test", ROOT / "jobs" / "_entry.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- fast checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", JOBS)
def test_job_docstring_names_its_submit_command(name: str) -> None:
    source = (ROOT / "jobs" / f"{name}.py").read_text()
    first = source.splitlines()[0]
    assert first.startswith('"""') and first.endswith('"""'), "one-line module docstring"
    match = SUBMIT_DOC.search(first)
    assert match and match.group(1) == name, first
    assert f'run("{name}")' in source


@pytest.mark.parametrize("name", JOBS)
def test_job_runs_its_subcommand_without_the_installed_package(name: str, tmp_path: Path) -> None:
    """`python -S` skips site-packages' .pth files (the editable install): only jobs/_entry.py can find ganbert."""
    code = (f"import runpy, sys; sys.path.append({sysconfig.get_paths()['purelib']!r}); "
            f"sys.path.insert(0, {str(ROOT / 'jobs')!r}); sys.argv = ['{name}.py', '--help']; "
            f"runpy.run_path({str(ROOT / 'jobs' / f'{name}.py')!r}, run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith(f"usage: ganbert {name} "), out.stdout[:500]
    assert "ray.init" not in out.stderr and "Connecting to" not in out.stderr  # --help never starts Ray


def test_entry_prefers_the_submitted_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = _load_entry()
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    entry.use_submitted_copy()
    platform = str(ROOT / "platform")
    assert sys.path[0] == platform
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [platform, "/elsewhere"]  # local Ray workers inherit it


def test_entry_starts_no_ray_without_ray_address(tmp_path: Path) -> None:
    """Outside a cluster the CLI starts its own local Ray later: join_cluster neither imports nor starts Ray."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'jobs')!r}); import _entry; _entry.use_submitted_copy(); "
            "_entry.join_cluster(); import ganbert; print('ray' in sys.modules, ganbert.__file__)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", str(ROOT / "platform" / "ganbert" / "__init__.py")]


# --- a real `ray start --head` cluster -----------------------------------------------------------

@dataclass
class Cluster:
    """A `ray start --head --block` on 127.0.0.1 in its own session and temp dir, with Ray's token auth on."""

    address: str  # dashboard (job submission) URL
    env: dict[str, str]  # environment for the `ray` CLI and the cluster (auth mode and token file, the venv's PATH)
    root: Path  # short tmp dir: Ray's --temp-dir and the runs' outputs
    proc: subprocess.Popen[bytes]
    gcs_port: int
    auth: dict[str, str]  # the Authorization header that carries the token

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RAY, *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)

    def submit(self, entrypoint: list[str], timeout: float) -> tuple[str, subprocess.CompletedProcess[str]]:
        """Blocking `ray job submit --working-dir .` from the repository root; returns (job id, CLI result)."""
        job = f"ganbert-test-{uuid.uuid4().hex[:8]}"
        args = ["job", "submit", "--address", self.address, "--submission-id", job, "--working-dir", ".", "--",
                *entrypoint]
        deadline = time.monotonic() + timeout
        while True:
            try:
                out = self.ray(*args, timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                self.ray("job", "stop", "--address", self.address, job)
                logs = self.ray("job", "logs", "--address", self.address, job).stdout
                pytest.fail(f"job {job} ran past {timeout:.0f} s; logs:\n{logs[-6000:]}")
            if "No available agent to submit job" not in out.stderr + out.stdout or time.monotonic() > deadline - 60:
                return job, out
            time.sleep(2)  # the dashboard agent is still registering

    def status(self, job: str) -> str:
        """The job's status from the Jobs API (JobStatus value, e.g. SUCCEEDED)."""
        from ray.job_submission import JobSubmissionClient

        return str(JobSubmissionClient(self.address, headers=self.auth).get_job_status(job).value)

    def logs(self, job: str) -> str:
        return self.ray("job", "logs", "--address", self.address, job).stdout


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """One node on 127.0.0.1 with every port free-picked (other Rays may run here), set up as the README's head:
    token auth (its own token file) and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the node's address is loopback)."""
    root = Path(tempfile.mkdtemp(prefix="gbj", dir="/tmp"))  # short: Ray's unix sockets live under --temp-dir
    token = secrets.token_hex(32)
    (root / "auth_token").write_text(token)
    (root / "auth_token").chmod(0o600)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "PYTHONPATH", "MLFLOW_TRACKING_URI", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE",
                        "RAY_AUTH_TOKEN")}
    # The cluster, the CLI and (inherited from the raylet) the job all read RAY_AUTH_MODE and the token file.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(root / "auth_token"),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # teardown: no 30 s drain on SIGTERM
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")  # the job's `python`
    dashboard = free_port()
    ports = {flag: free_port() for flag in ("--port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                             "--runtime-env-agent-port", "--metrics-export-port",
                                             "--ray-client-server-port", "--node-manager-port",
                                             "--object-manager-port")}
    log_path = root / "ray-start.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
         "--temp-dir", str(root / "ray"), *[str(x) for kv in ports.items() for x in kv]],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while status(f"{address}/api/version", post=False) is None:  # the job server answers (401: no token)
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed (rc {proc.poll()}):\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield Cluster(address=address, env=env, root=root, proc=proc, gcs_port=ports["--port"],
                      auth={"Authorization": f"Bearer {token}"})
    finally:
        stop_session(proc, 60, grace=10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_submitted_job_ships_ganbert_to_every_worker(cluster: Cluster) -> None:
    """Driver, tasks and actors import the uploaded copy, never the editable install in this checkout."""
    job, out = cluster.submit(["python", "-c", PROBE], timeout=120)
    logs = cluster.logs(job)
    assert out.returncode == 0 and cluster.status(job) == "SUCCEEDED", f"{out.stderr[-3000:]}\n{logs[-4000:]}"
    found = dict(re.findall(r"^(driver|task|actor)=(\S+)$", logs, re.MULTILINE))
    assert set(found) == {"driver", "task", "actor"}, logs[-4000:]
    ray_dir = str(cluster.root / "ray")
    assert "/runtime_resources/working_dir_files/" in found["driver"]
    for where in ("driver", "task", "actor"):
        assert found[where].startswith(ray_dir) and not found[where].startswith(str(ROOT)), found
    for where in ("task", "actor"):
        assert "/runtime_resources/py_modules_files/" in found[where], found


@pytest.mark.slow
def test_job_api_refuses_a_job_without_the_token(cluster: Cluster) -> None:
    """A job posted with no token (401) or a wrong one (403) is refused and never created."""
    from ray.job_submission import JobSubmissionClient

    body = json.dumps({"entrypoint": "echo never-run"}).encode()
    for headers, code in (({}, 401), ({"Authorization": "Bearer " + secrets.token_hex(32)}, 403)):
        request = urllib.request.Request(f"{cluster.address}/api/jobs/", data=body, method="POST",
                                         headers={"Content-Type": "application/json", **headers})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == code
    jobs = JobSubmissionClient(cluster.address, headers=cluster.auth).list_jobs()  # the token opens it
    assert not [job for job in jobs if "never-run" in job.entrypoint]


# A driver that connects to `address` with no token and runs a task if it gets in. Short GCS timeouts: a refused
# driver gives up in seconds instead of retrying for minutes.
INTRUDER = ("import ray; ray.init(address={address!r}, log_to_driver=False); "
            "print('RAN', ray.get(ray.remote(lambda: 1).remote()))")
SHORT_GCS_WAIT = {"RAY_gcs_server_port_wait_time_s": "1", "RAY_gcs_rpc_server_connect_timeout_s": "1",
                  "RAY_gcs_server_request_timeout_seconds": "2", "RAY_gcs_rpc_server_reconnect_timeout_s": "2"}


@pytest.mark.slow
def test_head_refuses_drivers_without_the_token(cluster: Cluster, tmp_path: Path) -> None:
    """The head's GCS port on the machine's non-loopback address: nothing listens there, so a driver with no token
    cannot connect; on 127.0.0.1 the GCS answers, and refuses it (no token)."""
    outward = outward_address()
    if outward is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((outward, cluster.gcs_port), timeout=10).close()
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    env.update(SHORT_GCS_WAIT, RAY_AUTH_MODE="disabled", HOME=str(tmp_path))  # no token anywhere it would look
    drivers = {where: subprocess.Popen([sys.executable, "-c", INTRUDER.format(address=f"{where}:{cluster.gcs_port}")],
                                       cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
               for where in (outward, "127.0.0.1")}
    outputs = {where: proc.communicate(timeout=180)[0] for where, proc in drivers.items()}
    for where, proc in drivers.items():
        assert proc.returncode != 0 and "RAN" not in outputs[where], f"{where}: {outputs[where][-3000:]}"
    assert "Unauthenticated" in outputs["127.0.0.1"], outputs["127.0.0.1"][-3000:]


# --- the README's own lines ------------------------------------------------------------------------

def _readme_job_lines() -> list[str]:
    """The bash block of the README's "Local Ray head and job submission" section, one command per line."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Local Ray head and job submission"):]
    begin = section.index("```bash\n") + len("```bash\n")
    block = section[begin:section.index("\n```", begin)]
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_job_lines_run_as_written(tmp_path: Path) -> None:
    """From the repository root, in a shell whose PATH lacks the venv: the README's activation, token, `ray start`
    and the train submission succeed, the job prints `ganbert train`'s per-epoch [val] lines and no Ray Train report
    dumps, and the job's checkpoints, model and MLflow run land in $GANBERT_HOME, not in Ray's working-dir copy;
    the head listens on loopback only and its job API refuses a job without the token.

    Only what cannot be shared with other Rays on this machine is changed: the dashboard port (8265) and the
    head's other ports and temp dir are free-picked, `ray start` gets --block so the test can end it, and HOME is
    a temporary folder (the token the README generates lands there). The session's $GANBERT_CACHE is kept (the
    phantom's T1s are registered once per test session, as a user's own cache keeps them), so the job builds its
    phantom cohort without registering again. The tune line (12 trials) is checked for its space and options, not
    run: it takes longer than the suite.
    """
    lines = _readme_job_lines()
    assert lines[0].startswith("source .venv/bin/activate")
    starts = [i for i, line in enumerate(lines) if line.startswith("ray start ")]
    submits = [line for line in lines if line.startswith("ray job submit ")]
    assert len(starts) == 1 and len(submits) == 2
    assert "jobs/tune.py --space search_spaces/ablation.yaml" in submits[1]
    assert (ROOT / "search_spaces" / "ablation.yaml").is_file()
    root = Path(tempfile.mkdtemp(prefix="gbr", dir="/tmp"))  # short: Ray's unix sockets live under --temp-dir
    dashboard = free_port()
    ports = " ".join(f"{flag} {free_port()}" for flag in (
        "--port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
        "--metrics-export-port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port"))
    start = (f"{lines[starts[0]]} --block --dashboard-port {dashboard} --temp-dir {root / 'ray'} {ports} "
             f"> {root / 'ray-start.log'} 2>&1 &")
    wait = (f"until python {ROOT / 'tests' / 'http_status.py'} http://127.0.0.1:{dashboard}/api/version > /dev/null; "
            f"do sleep 1; done; until ray job list --address http://127.0.0.1:{dashboard} > /dev/null 2>&1; "
            "do sleep 2; done")  # the job server answers, then answers a client with the token
    refused = f"python {ROOT / 'tests' / 'http_status.py'} http://127.0.0.1:{dashboard}/api/jobs/ --post"  # no token
    script = [*lines[:starts[0]], start, wait, submits[0].replace("8265", str(dashboard)), refused]
    home = root / "home"
    (root / "user").mkdir()
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")
           and k not in ("RAY_ADDRESS", "PYTHONPATH", "MLFLOW_TRACKING_URI", "VIRTUAL_ENV", "GANBERT_HOME")}
    env.update(PATH=os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin),
               GANBERT_HOME=str(home), HOME=str(root / "user"), RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    proc = subprocess.Popen(["bash", "-e", "-c", "\n".join(script)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=420)
        head = listening({pid for pid, _ in session_members(proc.pid)})  # the head still runs in the session
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        head = []
    finally:
        stop_session(proc, 60, grace=10)
        shutil.rmtree(root / "ray", ignore_errors=True)
    log = out.decode(errors="replace")
    assert proc.returncode == 0, log[-6000:]
    assert "succeeded" in log, log[-6000:]
    assert "HTTP 401" in log, log[-2000:]  # the job API without the token
    # `ganbert train`'s own lines (the job's output is the command's), not Train V2's TrainingReport(...) dumps
    assert "[val] epoch 0: val_psnr=" in log, log[-4000:]
    assert "TrainingReport(" not in log and "Reporting training result" not in log, log[-4000:]
    assert head and all(is_loopback(address) for address, _, _ in head), head
    # `ray job submit ... -- python jobs/train.py --preset tiny`: the run's checkpoints, model and MLflow run
    storage = home / "ray" / "tiny"
    ckpt = re.search(r"^checkpoint: (\S+)$", log, re.MULTILINE)
    assert ckpt and Path(ckpt.group(1)).parent == storage, log[-4000:]
    assert "runtime_resources" not in ckpt.group(1)
    checkpoints = sorted(p for p in storage.glob("checkpoint_*") if p.is_dir())
    assert Path(ckpt.group(1)) in checkpoints, log[-4000:]
    assert all((c / "state.json").is_file() and (c / "generator.safetensors").is_file() for c in checkpoints)
    model = re.search(r"^model: (models:/\S+)$", log, re.MULTILINE)
    assert model and (storage / "model" / "MODEL_URI").read_text().strip() == model.group(1), log[-4000:]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ganbert").experiment_id],
                              filter_string="attributes.run_name = 'tiny'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["val_psnr"] > 0
