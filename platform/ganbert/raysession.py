"""The one way the CLI gets a Ray session: join $RAY_ADDRESS, else start a local Ray bound to 127.0.0.1."""

from __future__ import annotations

import os

CPUS_ENV = "GANBERT_NUM_CPUS"  # logical CPUs of the local Ray the CLI starts (default: the machine's cores)


def ensure_ray(num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Keep an initialised Ray; else join the cluster in $RAY_ADDRESS; else start a local Ray.

    The local Ray has `num_cpus`, else $GANBERT_NUM_CPUS, else one per core. Its dashboard (for watching Train and Tune) listens on 127.0.0.1 only.
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
    ctx = ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=True,
                   logging_level="WARNING", logging_config=ray.LoggingConfig(log_level="WARNING"))
    if dashboard and ctx.dashboard_url:
        print(f"[ray] local Ray started; dashboard at http://{ctx.dashboard_url}", flush=True)
