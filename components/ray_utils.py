"""Joining or starting a Ray cluster. Stages that need Ray call `ensure_ray()`; it joins the cluster named by
RAY_ADDRESS (or `address=`), else starts a local one bound to 127.0.0.1 with the dashboard and usage stats off.
Nothing here shuts a cluster down: Prefect and the stages never own the cluster's lifecycle (a local cluster
started here lives as long as the Python process that started it)."""
from __future__ import annotations

import os


def ensure_ray(address: str | None = None, num_cpus: int | None = None, namespace: str = "m1"):
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return ray.get_runtime_context()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return ray.init(address=address, namespace=namespace, log_to_driver=True)
    # address="local": a new instance, never one found through /tmp/ray's cluster file (a stopped head leaves it
    # behind, and ray.init() then waits on a GCS that is gone).
    return ray.init(address="local", num_cpus=num_cpus, namespace=namespace, include_dashboard=False,
                    _node_ip_address="127.0.0.1", log_to_driver=True, configure_logging=False)
