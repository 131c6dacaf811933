"""The one way the CLI gets a Ray session: join $RAY_ADDRESS, else start a one-node Ray on 127.0.0.1 only."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

CPUS_ENV = "GANBERT_NUM_CPUS"  # logical CPUs of the local Ray the CLI starts (default: the machine's cores)


def ensure_ray(num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Keep an initialised Ray; else join the cluster in $RAY_ADDRESS; else start a local Ray.

    The local Ray has `num_cpus`, else $GANBERT_NUM_CPUS, else one per core. It is one node that no other node
    joins, so its node address is 127.0.0.1: the GCS, raylet, object manager, agents, workers and the dashboard
    (for watching Train and Tune) all listen on loopback only, and with Ray's token authentication (on by default
    for a local Ray since 2.59, unless RAY_AUTH_MODE says otherwise) every one of them also demands the token.
    One listener is not Ray's and ignores both: while a Ray Train run lasts, rank 0's torch.distributed rendezvous
    store (TCPStore) listens on every interface, as torch binds it (README, "What listens where").
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    if num_cpus is None and os.environ.get(CPUS_ENV):
        num_cpus = int(os.environ[CPUS_ENV])
    # Workers log at WARNING: our own print() lines ([train], [val]) still reach the console, Ray Train's per-report
    # INFO dumps ("Reporting training result ...: TrainingReport(...)") and worker-group chatter do not.
    with loopback_node():
        # address="local": a new Ray even where `ray start` left a cluster address in Ray's temp dir (ray.init() would
        # join that cluster, or fail on num_cpus, or hang on a head that no longer runs).
        ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                       log_to_driver=True,
                       logging_level="WARNING", logging_config=ray.LoggingConfig(log_level="WARNING"))
    if dashboard and ctx.dashboard_url:
        print(f"[ray] local Ray started; dashboard at http://{ctx.dashboard_url}", flush=True)


@contextmanager
def loopback_node() -> Iterator[None]:
    """While open, a Ray started by this process (`ray.init` without an address) takes 127.0.0.1 as its node address.

    On Linux, `ray.init` replaces a loopback `_node_ip_address` with the machine's outward address, and every Ray
    server then listens on all interfaces. Ray keeps loopback where it does not support clusters: its
    `ENABLE_RAY_CLUSTER` flag (the variable RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which `ray start` reads too, as the
    README's head does), read once when `ray` is imported. It is cleared only while the node starts and only in this
    process: the node keeps its address, and a later `ray.init(address=...)` or a `ray start --address` that a child
    process runs are not affected.
    """
    from ray._private import ray_constants

    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous
