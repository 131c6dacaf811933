"""The one way the CLI gets a Ray session: join $RAY_ADDRESS, else start a local Ray bound to 127.0.0.1."""

from __future__ import annotations

import os


def ensure_ray(num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Keep an initialised Ray; else join the cluster in $RAY_ADDRESS; else start a local Ray.

    The local Ray's dashboard (for watching Train and Tune) listens on 127.0.0.1 only.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    ctx = ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=True,
                   logging_level="WARNING")
    if dashboard and ctx.dashboard_url:
        print(f"[ray] local Ray started; dashboard at http://{ctx.dashboard_url}", flush=True)
