"""`artfuse bench --simulate [TIMINGS.json]`: the label pipeline's scheduling on a GPU machine, on any machine.

Ray starts with the logical resources of the GPU machine the timings were measured on (16 CPUs and 1 GPU a node),
on this machine, and runs the label job's own pipeline (`label.label_stages` and `label.write_predictions`: the same
stages, resources, batch sizes and Parquet output) with each stage's device work replaced by a sleep of the time
measured on the card for that batch: a CPU decode task sleeps batch / (one task's decode rate) and emits a decoded
batch of the real size; the model actor runs the real `LabelModel.__call__` (prediction rows included) with its
forward pass (and, with GPU decode, its nvJPEG decode) replaced by sleeps of the card's per-batch times. Sleeping
stages cost this machine nothing, so what remains is what a faster machine cannot buy: Ray Data's scheduling,
backpressure, the object store, the actor's queue, the writer. The ratio is the real bench's: pipeline /
min(model alone, CPU decode alone), with both "alone" figures the timings' own.

The GPU stand-in keeps the card's rules: one forward pass at a time and one nvJPEG decode at a time per GPU (a lock
each), the two free to overlap. That overlap is an assumption (nvJPEG on the card's JPEG engines or on SMs the
forward pass leaves idle) that only a card can confirm (scripts/device_bench.sh).

With `--nodes 1 2 4`, a local multi-node cluster (`ray.cluster_utils.Cluster`) of that many such nodes, one model
actor per GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import ray
import ray.data
import torch
from ray.cluster_utils import Cluster

from artfuse.bench.simulated_read import simulated_read
from artfuse.config import Config, ConfigError, LabelConfig
from artfuse.data import storage
from artfuse.data.preprocess import CROP_FRACTION
from artfuse.pipelines.label import LabelModel, label_stages, write_predictions

log = logging.getLogger(__name__)
GB = 2**30
PATHS = ("cpu_decode", "gpu_decode")
ACTOR_START_S = 600
TASKS = {"label": [str(i) for i in range(10)]}
# This machine cannot hold the card's object store (tens of GB a node), so blocks and store shrink by the same factor:
# Ray Data's budgets then hold the same number of blocks as on the card, which is what its scheduling sees.
SIMULATED_OBJECT_STORE_GB = 1.0  # a node's object store here


@dataclass(frozen=True)
class Timings:
    """Per-image rates measured on one GPU machine (the default: `timings/h200.json`), and that machine's node."""

    machine: str
    cpus: int  # a node's CPUs
    gpus: int  # a node's GPUs (one model actor each)
    memory_gb: float  # a node's memory
    object_store_gb: float  # a node's Ray object store (Ray's default: 30 % of memory)
    batch_size: int  # model and decode batch the rates were measured at
    img_size: int  # model input side; decode emits img_size / CROP_FRACTION, as the package's resize
    jpeg_bytes: int  # one JPEG, as the GPU-decode path carries it to the actor
    model_img_s: float  # one model actor's forward pass alone
    cpu_decode_task_img_s: float  # one CPU decode task alone
    gpu_decode_img_s: float  # nvJPEG alone on one GPU
    read_task_img_s: float  # one GPU-decode read task (bytes, sha256, header) alone

    @property
    def resize(self) -> int:
        return int(round(self.img_size / CROP_FRACTION))

    @classmethod
    def load(cls, uri: str | None = None) -> Timings:
        try:
            if uri:
                raw = json.loads(storage.read_bytes(uri))
            else:
                raw = json.loads(resources.files("artfuse.bench").joinpath("timings/h200.json").read_text())
            rates, node = raw["img_s"], raw["node"]
            return cls(
                machine=str(raw["machine"]),
                cpus=int(node["cpus"]),
                gpus=int(node["gpus"]),
                memory_gb=float(node["memory_gb"]),
                object_store_gb=float(node["object_store_gb"]),
                batch_size=int(raw["batch_size"]),
                img_size=int(raw["img_size"]),
                jpeg_bytes=int(raw["jpeg_bytes"]),
                model_img_s=float(rates["model"]),
                cpu_decode_task_img_s=float(rates["cpu_decode_task"]),
                gpu_decode_img_s=float(rates["gpu_decode"]),
                read_task_img_s=float(rates["read_task"]),
            )
        except FileNotFoundError as e:
            raise ConfigError(f"bench --simulate: no timings file at {uri}") from e
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"bench --simulate: {uri or 'the default timings'} is not a timings file ({type(e).__name__}: {e}); "
                "see artfuse/bench/timings/h200.json for the keys"
            ) from e

    def slowed(self, factor: float) -> Timings:
        """The same machine with every rate `factor` times slower."""
        rates = ("model_img_s", "cpu_decode_task_img_s", "gpu_decode_img_s", "read_task_img_s")
        return dataclasses.replace(self, **{name: getattr(self, name) / factor for name in rates})

    @property
    def shrink(self) -> float:
        """How much smaller than on the card the simulation's objects and object store are."""
        return self.object_store_gb / SIMULATED_OBJECT_STORE_GB

    @property
    def decoded_row_bytes(self) -> int:
        return max(1, round(self.resize * self.resize * 3 / self.shrink))

    @property
    def encoded_row_bytes(self) -> int:
        return max(1, round(self.jpeg_bytes / self.shrink))

    @property
    def cpu_decode_img_s(self) -> float:
        """CPU decode alone on one node, as `artfuse bench` measures it: one task per CPU, side by side."""
        return self.cpus * self.cpu_decode_task_img_s


class SimulatedLabelModel(LabelModel):
    """`LabelModel` with the GPU's work replaced by sleeps of the card's per-batch times; the rest is the real actor."""

    def __init__(
        self, timings: Timings, cfg: LabelConfig, run_id: str, labelled_at: datetime, gpu_decode: bool, clock: str
    ):
        self.timings = timings
        self.clock = clock  # a file: when each batch left the model, to time the steady state apart from start-up
        self.row_args = dict(
            tasks=TASKS,
            cfg=cfg,
            review_thresholds=dict.fromkeys(TASKS, 0.5),
            model_id="simulated",
            run_id=run_id,
            labelled_at=labelled_at,
        )
        self.embeddings = False
        self.gpu_decode = gpu_decode
        self.pause = None
        self.device = torch.device("cpu")  # no CUDA streams: the locks below stand in for the GPU's engines
        # One GPU: one forward pass at a time, one nvJPEG decode at a time, each free of the other.
        self.forward_engine, self.decode_engine = threading.Lock(), threading.Lock()
        self.rng = np.random.default_rng(0)

    def predict(self, images) -> dict[str, np.ndarray]:
        with self.forward_engine:
            time.sleep(len(images) / self.timings.model_img_s)
        with open(self.clock, "a") as clock:
            clock.write(f"{time.time()} {len(images)}\n")
        return {
            task: self.rng.dirichlet(np.ones(len(vocab)), len(images)).astype(np.float32)
            for task, vocab in TASKS.items()
        }

    def decode_on_device(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        n = len(batch["uri"])
        with self.decode_engine:
            time.sleep(n / self.timings.gpu_decode_img_s)
        return np.zeros((n, self.timings.decoded_row_bytes), np.uint8), batch["error"].copy()


def simulate(
    cfg: Config,
    timings_uri: str | None = None,
    nodes: list[int] | None = None,
    out: str | None = None,
    paths: tuple[str, ...] = PATHS,
) -> dict:
    """Run the simulated label pipeline for each decode path and cluster size; return (and write) the figures."""
    timings = Timings.load(timings_uri)
    nodes = nodes or [1]
    if min(nodes) < 1:
        raise ConfigError(f"bench --simulate --nodes needs node counts of at least 1; got {nodes}")
    if ray.is_initialized():
        raise ConfigError(
            "bench --simulate starts its own Ray with the GPU machine's resources: run it in a fresh "
            "process, without RAY_ADDRESS"
        )
    result: dict = {"timings": dataclasses.asdict(timings)}
    by_path: dict[str, list[dict]] = {path: [] for path in paths}
    for n_nodes in nodes:
        # One cluster per size, both paths on it in turn: starting a cluster (a node's 16 workers on this machine's
        # cores) is this machine's cost, not the card's, and each path's steady state leaves its start-up out anyway.
        with simulated_cluster(timings, n_nodes):
            for path in paths:
                by_path[path].append(simulate_once(cfg, timings, n_nodes, gpu_decode=path == "gpu_decode"))
    for path, runs in by_path.items():
        for run in runs:
            run["scaling"] = round(run["steady_img_s"] / (runs[0]["steady_img_s"] * run["nodes"] / nodes[0]), 3)
            result["label"] = run.pop("label")
        result[path] = runs[0] | {"by_nodes": runs}
    if out:
        storage.write_bytes(out, json.dumps(result, indent=1).encode(), cfg.storage)
    return result


def simulated_label_config(cfg: LabelConfig, timings: Timings, n_nodes: int) -> LabelConfig:
    """The bench's settings on the card (batches of the timings' size, one actor per GPU), other label.* as set."""
    actors = n_nodes * timings.gpus
    return dataclasses.replace(
        cfg,
        batch_size=timings.batch_size,
        decode_batch_size=timings.batch_size,
        num_gpus_per_actor=1.0,
        min_actors=actors,
        max_actors=actors,
    )


@contextlib.contextmanager
def simulated_cluster(timings: Timings, n_nodes: int) -> Iterator[None]:
    """A local cluster of `n_nodes` nodes with the GPU machine's logical resources, connected to for the duration."""
    node = dict(
        num_cpus=timings.cpus,
        num_gpus=timings.gpus,
        object_store_memory=int(SIMULATED_OBJECT_STORE_GB * GB),
        memory=int((timings.memory_gb - timings.object_store_gb) * GB),
    )
    cluster = Cluster(initialize_head=True, head_node_args=node | dict(include_dashboard=False))
    try:
        for _ in range(n_nodes - 1):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield
    finally:
        ray.shutdown()
        cluster.shutdown()


def simulate_once(cfg: Config, timings: Timings, n_nodes: int, gpu_decode: bool) -> dict:
    """One simulated label run on the connected cluster of `n_nodes` GPU nodes (`simulated_cluster`)."""
    scale = cfg.bench.simulate_time_scale
    if scale <= 0:
        raise ConfigError(f"bench.simulate_time_scale must be above 0; got {scale}")
    slowed = timings.slowed(scale)
    lc = simulated_label_config(cfg.label, timings, n_nodes)
    # The real bench's ratio: pipeline / min(model alone, decode alone), decode being the path's own (CPU: one task
    # per CPU; GPU: nvJPEG). The GPU path is also compared with the CPU path's limit (issue goal: 1.5x).
    cpu_limit = n_nodes * min(timings.model_img_s, timings.cpu_decode_img_s)
    limit = n_nodes * min(timings.model_img_s, timings.gpu_decode_img_s) if gpu_decode else cpu_limit
    n_images = max(lc.batch_size * 8, math.ceil(cfg.bench.pipeline_seconds * limit))
    n_images = math.ceil(n_images / lc.batch_size) * lc.batch_size
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-00000000"
    read_kwargs = dict(
        seconds_per_image=1 / (slowed.read_task_img_s if gpu_decode else slowed.cpu_decode_task_img_s),
        row_bytes=timings.encoded_row_bytes if gpu_decode else timings.decoded_row_bytes,
        gpu_decode=gpu_decode,
    )
    table = pa.table(
        {
            "uri": [f"s3://simulated/{i:09d}.jpg" for i in range(n_images)],
            "size": pa.array(np.full(n_images, timings.jpeg_bytes, np.int64)),
            "etag": [f"{i:x}" for i in range(n_images)],
        }
    )
    with tempfile.TemporaryDirectory(prefix="artfuse-simulate-") as tmp:
        clock = Path(tmp, "clock")
        actor_kwargs = dict(
            timings=slowed,
            cfg=lc,
            run_id=run_id,
            labelled_at=datetime.now(UTC),
            gpu_decode=gpu_decode,
            clock=str(clock),
        )
        # Reads wait for the model actors: on this machine an actor's start-up (importing torch) is nothing like
        # the card's, and decode would pile up a backlog meanwhile that the steady state must not drain.
        ray.data.DataContext.get_current().wait_for_min_actors_s = ACTOR_START_S
        ds = label_stages(table, simulated_read, read_kwargs, SimulatedLabelModel, actor_kwargs, lc)
        started = time.perf_counter()
        write_predictions(ds, str(Path(tmp, "predictions")), cfg, run_id)
        seconds = time.perf_counter() - started
        written = pads.dataset(str(Path(tmp, "predictions")), format="parquet").count_rows()
        steady_img_s = steady_rate(clock.read_text()) * scale
    stats = ds.stats()
    if log.isEnabledFor(logging.DEBUG):
        log.debug("Ray Data stats:\n%s", stats)
    if written != n_images:
        raise RuntimeError(f"the simulated pipeline wrote {written} rows for {n_images} inputs")
    pipeline_img_s = n_images / seconds * scale
    decode_slots = n_nodes * timings.cpus - math.ceil(n_nodes * timings.gpus * lc.cpus_per_actor)
    return {
        "nodes": n_nodes,
        "pipeline_img_s": round(pipeline_img_s, 1),
        "ratio": round(pipeline_img_s / limit, 3),
        # from the first batch out of the model to the last: without start-up, which here is this machine's (an
        # actor importing torch on 2 busy cores), not the card's
        "steady_img_s": round(steady_img_s, 1),
        "steady_ratio": round(steady_img_s / limit, 3),
        "limit_img_s": round(limit, 1),  # min(model alone, decode alone) on n_nodes nodes
        "vs_cpu_decode_limit": round(pipeline_img_s / cpu_limit, 3),
        "images": n_images,
        "seconds": round(seconds, 2),
        "busy": busy_shares(stats, seconds, {"read": decode_slots, "model": n_nodes * timings.gpus}),
        "label": dataclasses.asdict(lc),
    }


def steady_rate(clock: str) -> float:
    """Images per second from the first batch out of the model to the last (the clock file's 'time images' lines)."""
    ticks = sorted((float(t), int(n)) for t, n in (line.split() for line in clock.splitlines()))
    if len(ticks) < 2:
        raise RuntimeError("bench --simulate: too few batches to time a steady state; raise bench.pipeline_seconds")
    return sum(n for _, n in ticks[1:]) / (ticks[-1][0] - ticks[0][0])


OPERATOR = re.compile(r"^Operator \d+ (?P<name>.+?): (?P<tasks>\d+) tasks executed", re.M)
TASK_TIME = re.compile(r"\* Remote wall time: .*?, (?P<total>[\d.]+)(?P<unit>us|ms|s|min) total")
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0}


def busy_shares(stats: str, wall_s: float, slots: dict[str, int]) -> dict[str, dict]:
    """Per stage of Ray Data's stats text: its tasks' total time / the run's wall time / the stage's slots (the
    CPUs left for decode, the model actors). The stage nearest 1.0 is the bottleneck."""
    found = {}
    blocks = OPERATOR.split(stats)
    for name, _tasks, body in zip(blocks[1::3], blocks[2::3], blocks[3::3], strict=True):
        total = TASK_TIME.search(body)
        if not total:
            continue
        stage = "model" if "LabelModel" in name else "read" if "read" in name.lower() else None
        if stage is None:
            continue
        task_s = float(total["total"]) * UNITS[total["unit"]]
        found[stage] = {
            "operator": name,
            "task_s": round(task_s, 2),
            "busy_share": round(task_s / wall_s / max(slots[stage], 1), 3),
        }
    return found


def format_simulate(result: dict) -> str:
    lines = [f"simulated on this machine with the timings of: {result['timings']['machine']}"]
    for path in PATHS:
        if path not in result:
            continue
        for run in result[path].get("by_nodes", [result[path]]):
            busy = ", ".join(f"{stage} busy {b['busy_share']:.2f}" for stage, b in run["busy"].items())
            scaling = f", {run['scaling']:.2f} x linear" if "scaling" in run else ""
            lines.append(
                f"{path:<10} {run['nodes']} node(s): {run['pipeline_img_s']:>8.1f} img/s, ratio"
                f" {run['ratio']:.3f} of {run['limit_img_s']:.0f} (steady state {run['steady_img_s']:.0f} img/s,"
                f" {run['steady_ratio']:.3f}){scaling} ({busy})"
            )
    return "\n".join(lines)
