"""Connecting to Ray: the cluster in RAY_ADDRESS (set inside `ray job submit`) when there is one, else a local one."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Initialise Ray once per process; jobs call this instead of `ray.init()` so tests can start their own cluster."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local": a new local cluster, never a `ray start` head that happens to run on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    log.info("Ray resources: %s", ray.cluster_resources())
