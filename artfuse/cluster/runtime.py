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
        # address="local": a new local cluster, never a `ray start` head that happens to run on this machine. With
        # its dashboard, whose state API Ray Train's PlacementGroupCleaner needs: when Tune stops a trial (ASHA),
        # the trial's Train controller dies with it, and only the cleaner gives its workers' CPUs back.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, log_to_driver=True)
    log.info("Ray resources: %s", ray.cluster_resources())


def node_cpus() -> int:
    """CPUs of this node: as Ray counts them inside Ray (container limits included; `os.cpu_count()` in a pod is
    the host's), else the CPUs this process may run on."""
    if ray.is_initialized():
        here = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node["NodeID"] == here and node["Resources"].get("CPU"):
                return max(1, int(node["Resources"]["CPU"]))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def alive_node_ids() -> set[str]:
    """The IDs of the cluster's nodes that are alive now."""
    return {node["NodeID"] for node in ray.nodes() if node.get("Alive")}
