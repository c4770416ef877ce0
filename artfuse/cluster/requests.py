"""Resource requests checked against the cluster's nodes before a job starts.

Ray waits, silently and for ever, for a node that can hold a request; so a request no node of a fixed-size cluster
can ever hold (a Train worker, a model actor beside a decode task, a Tune trial) fails here at once, naming the
setting, what it asked, the largest node and the fix. On a cluster that may still grow (`cluster.autoscaling`) it
only warns. The label job's actor pool is also sized here: no larger than the nodes hold beside one decode task,
and free to shrink to what they would still hold without their largest node, so that a lost node shrinks the pool
instead of starving every decode task (docs/architecture.md, "A lost node").
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field

import ray

from artfuse.config import ClusterConfig, Config, ConfigError, LabelConfig

log = logging.getLogger(__name__)

GIB = 2**30
EPSILON = 1e-9  # Ray counts fractional resources in 1/10000ths
# What Ray Data reserves for a map task that names no CPUs (the train job's decode and augment stages).
DATA_TASK = {"CPU": 1.0}


@dataclass(frozen=True)
class Request:
    """One thing Ray places: `resources` in Ray's names (CPU, GPU, memory in bytes), and for each the setting
    (`section.field=value`) that asked for it, for the message."""

    what: str
    resources: dict[str, float]
    settings: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "resources", {k: float(v) for k, v in self.resources.items() if v})


@dataclass(frozen=True)
class PoolSize:
    """An actor pool as Ray Data takes it: starts at `initial`, grows to `max`, may shrink to `min`."""

    min: int
    max: int
    initial: int


def check_train(cfg: Config) -> None:
    """The run's Train workers, with room for one Ray Data task beside them (its decode and augment stages)."""
    t = cfg.train
    worker = Request(
        "a Train worker",
        {"CPU": t.cpus_per_worker, "GPU": 1.0 if t.use_gpu else 0.0},
        {"CPU": f"train.cpus_per_worker={t.cpus_per_worker:g}", "GPU": "train.use_gpu=true"},
    )
    check_fits(worker, t.num_workers, [Request("a Ray Data task", DATA_TASK)], cfg.cluster, "train.num_workers")


def check_trial(cfg: Config, trial_driver: dict[str, float]) -> None:
    """One Tune trial (its process and its Train workers), with room for one Ray Data task beside it."""
    t, workers = cfg.tune, cfg.train.num_workers
    worker = Request(
        "a trial's Train worker",
        {"CPU": t.cpus_per_trial / workers, "GPU": 1.0 if t.gpus_per_trial else 0.0},
        {"CPU": f"tune.cpus_per_trial={t.cpus_per_trial:g}", "GPU": f"tune.gpus_per_trial={t.gpus_per_trial:g}"},
    )
    beside = [Request("the trial's process", trial_driver), Request("a Ray Data task", DATA_TASK)]
    check_fits(worker, workers, beside, cfg.cluster, "train.num_workers")


def label_pool(lc: LabelConfig, actor: dict, decode: dict, cluster: ClusterConfig) -> PoolSize:
    """`fit_pool` for the label job's model actors and decode tasks, given as Ray Data's remote args."""
    model = Request(
        "a model actor",
        ray_names(actor),
        {
            "CPU": f"label.cpus_per_actor={lc.cpus_per_actor:g}",
            "GPU": f"label.num_gpus_per_actor={lc.num_gpus_per_actor:g}",
            "memory": f"label.actor_memory_mb={lc.actor_memory_mb}",
        },
    )
    decoder = Request("a decode task", ray_names(decode), {"CPU": f"label.decode_cpus={lc.decode_cpus:g}"})
    return fit_pool(model, [decoder], lc.min_actors, lc.max_actors, cluster)


def ray_names(remote_args: dict) -> dict[str, float]:
    """`num_cpus=1, num_gpus=0, memory=...` (a task's or actor's remote args) in resource names: CPU, GPU, memory."""
    names = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
    return {names[key]: value for key, value in remote_args.items() if key in names}


def cluster_nodes() -> list[dict[str, float]]:
    """Each alive node's total CPUs, GPUs and memory (bytes), as `ray.nodes()` reports them."""
    return [
        {key: node["Resources"].get(key, 0.0) for key in ("CPU", "GPU", "memory")}
        for node in ray.nodes()
        if node.get("Alive")
    ]


def may_grow(cfg: ClusterConfig) -> bool:
    """Whether nodes may still join: as `cluster.autoscaling` says; `auto` means yes for a cluster this job joined
    (RAY_ADDRESS, as inside `ray job submit`), no for the local one a job or test started, which never grows."""
    if cfg.autoscaling == "auto":
        return bool(os.environ.get("RAY_ADDRESS"))
    return bool(cfg.autoscaling)


def check_fits(unit: Request, count: int, beside: list[Request], cfg: ClusterConfig, count_setting: str) -> None:
    """Raise ConfigError unless the cluster can hold `count` of `unit` and one of each of `beside` at once (only
    warn where nodes may still join); `count_setting` names the setting that asked for `count`."""
    nodes = cluster_nodes()
    if most_that_fit(unit.resources, [b.resources for b in beside], nodes) >= count:
        return
    unmet(unit, count, beside, nodes, cfg, f"{count_setting}={count}")


def fit_pool(actor: Request, beside: list[Request], min_size: int, max_size: int, cfg: ClusterConfig) -> PoolSize:
    """The actor pool the cluster can hold beside one of each of `beside` (a decode task): never more actors than fit
    (a pool that takes every CPU starves the tasks that feed it), allowed to shrink to what the nodes hold without
    their largest one. Raises ConfigError when not even one actor fits (only warns where nodes may still join)."""
    nodes = cluster_nodes()
    others = [b.resources for b in beside]
    fits = most_that_fit(actor.resources, others, nodes)
    if fits < 1:
        unmet(actor, 1, beside, nodes, cfg, "")
    if may_grow(cfg):
        return PoolSize(min=min_size, max=max_size, initial=min_size)
    initial, largest = min(min_size, fits), min(max_size, fits)
    if initial < min_size or largest < max_size:
        log.warning(
            "the cluster holds %d model actors beside a decode task, not label.min_actors=%d / max_actors=%d: "
            "running %d to %d",
            fits, min_size, max_size, initial, largest,
        )  # fmt: skip
    survivors = sorted(nodes, key=node_size)[:-1]
    floor = max(1, min(initial, most_that_fit(actor.resources, others, survivors)))
    return PoolSize(min=floor, max=largest, initial=initial)


def most_that_fit(unit: dict[str, float], beside: list[dict[str, float]], nodes: list[dict[str, float]]) -> int:
    """How many `unit`s the nodes hold at once beside one of each of `beside`; -1 when `beside` alone does not fit.

    Exact for identical units: every placement of the few `beside` requests is tried (nodes of the same shape count
    once per request), then each node holds as many units as its free resources allow."""
    shapes = Counter(tuple(sorted(node.items())) for node in nodes)
    candidates = [dict(shape) for shape, n in shapes.items() for _ in range(min(n, len(beside)))]
    untouched = sum(copies(unit, dict(shape)) * (n - min(n, len(beside))) for shape, n in shapes.items())
    best = -1
    for placement in itertools.product(range(len(candidates)), repeat=len(beside)):
        free = [dict(node) for node in candidates]
        if all(take(free[i], request) for i, request in zip(placement, beside, strict=True)):
            best = max(best, untouched + sum(copies(unit, node) for node in free))
    return best


def take(free: dict[str, float], request: dict[str, float]) -> bool:
    """Reserve `request` out of `free` if it fits."""
    if any(free.get(key, 0.0) + EPSILON < amount for key, amount in request.items()):
        return False
    for key, amount in request.items():
        free[key] = free.get(key, 0.0) - amount
    return True


def copies(unit: dict[str, float], free: dict[str, float]) -> int:
    """How many `unit`s fit in `free` (a unit that asks for nothing fits without limit: counted as a million)."""
    counts = [math.floor((free.get(key, 0.0) + EPSILON) / amount) for key, amount in unit.items() if amount > 0]
    return min(counts, default=10**6)


def node_size(node: dict[str, float]) -> tuple[float, float, float]:
    return node.get("GPU", 0.0), node.get("CPU", 0.0), node.get("memory", 0.0)


def unmet(
    unit: Request, count: int, beside: list[Request], nodes: list[dict[str, float]], cfg: ClusterConfig, counted: str
) -> None:
    """Raise (or, where nodes may still join, log) the one-line message for a request the nodes cannot hold;
    `counted` is the setting that asked for `count` units, named when one unit alone would fit."""
    requests = [unit, *beside]
    # The resources short even when each is counted alone: those settings are the ones to change.
    short = [
        key
        for key in sorted({key for r in requests for key in r.resources})
        if most_that_fit(project(unit.resources, key), [project(b.resources, key) for b in beside], nodes) < count
    ] or sorted({key for r in requests for key in r.resources})
    settings = list(dict.fromkeys(r.settings[key] for key in short for r in requests if key in r.settings)) or [
        unit.settings[key] for key in unit.resources if key in unit.settings
    ]
    if count > 1 and most_that_fit(unit.resources, [b.resources for b in beside], nodes) >= 1:
        settings.append(counted)
    asked = " and ".join(
        f"{f'{count} x ' if r is unit and count > 1 else ''}{r.what} ({describe(r.resources)})" for r in requests
    )
    largest = max(nodes, key=node_size, default={})
    names = [setting.split("=")[0] for setting in settings]
    message = (
        f"{', '.join(settings)}: the cluster cannot hold {asked} at once; its largest node has {describe(largest, 0)}"
        f" ({len(nodes)} node{'s' if len(nodes) != 1 else ''}): lower {' or '.join(names)}, or run on larger nodes"
    )
    if may_grow(cfg):
        log.warning("%s; waiting for nodes to join (cluster.autoscaling)", message)
        return
    raise ConfigError(f"{message} (or set cluster.autoscaling=true if nodes may still join)")


def project(resources: dict[str, float], key: str) -> dict[str, float]:
    return {key: resources[key]} if key in resources else {}


def describe(resources: dict[str, float], default: float | None = None) -> str:
    """E.g. `2 CPUs, 0 GPUs, 4.0 GiB memory`; with `default`, resources the node lacks show as that."""
    parts = []
    for key, unit in (("CPU", "CPU"), ("GPU", "GPU")):
        amount = resources.get(key, default)
        if amount is not None:
            parts.append(f"{amount:g} {unit}{'' if amount == 1 else 's'}")
    memory = resources.get("memory", default)
    if memory is not None:
        parts.append(f"{memory / GIB:.1f} GiB memory")
    return ", ".join(parts)
