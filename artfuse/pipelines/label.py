"""Nightly labelling with Ray Data: list -> skip what is done -> read + decode (CPU tasks) -> model actors -> Parquet.

With `label.gpu_decode` on GPU actors, the CPU tasks only read, and JPEGs decode on the actor's GPU (nvJPEG).

Every listed input yields exactly one row per run, a prediction or an error. Rows land under
`<out>/run_date=YYYY-MM-DD/` (hive partitioning); a rerun skips inputs the output already holds with the
same uri, etag and size, so the same night twice adds nothing and a new night labels only new or changed
objects. What the job does with files under the output it cannot use (never delete them) is in `label_output`.
Run one labelling job per output at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray.data
import torch
from ray.data.exceptions import ExecutionTimeoutError

from artfuse.cluster.requests import PoolSize, label_pool
from artfuse.cluster.runtime import alive_node_ids, ensure_ray, node_cpus
from artfuse.config import Config, ConfigError, LabelConfig, PauseConfig, StorageConfig
from artfuse.data import gpudecode, stages, storage
from artfuse.data.catalog import iter_inputs
from artfuse.data.iiif import OBJECT_COLUMNS
from artfuse.data.prediction_files import filename_provider, is_own_file
from artfuse.data.preprocess import Preprocess
from artfuse.models.calibration import review_thresholds
from artfuse.models.package import load_package, read_manifest
from artfuse.models.predict import CPU_INFERENCE_ENV, Predictor, pick_device
from artfuse.pipelines.label_output import KEY, OutputState, labelled_inputs, output_lock
from artfuse.pipelines.pause import pause_point

log = logging.getLogger(__name__)
MB = 2**20
DECODE_TASK_MEMORY = 512 * MB  # a decode worker (about 170 MB: no torch), its read-ahead and decoded batch
ANTI_JOIN_ROWS = 100_000  # inputs checked against the output at once: a listing batch, or a slice of a larger part
# A GPU actor takes three batches at once, each on its own CUDA stream: one decodes (nvJPEG) or copies in, one runs
# the model, one builds its prediction rows on the CPU, instead of the GPU waiting for each step in turn (simulated
# nvJPEG path, bench --simulate: steady 2,390 img/s with one call at a time, 3,713 with two, 4,190 with three).
GPU_ACTOR_CALLS = 3
TOPK_TYPE = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float32())]))


class LabelStalled(RuntimeError):
    """The pipeline moved nothing for `label.stall_timeout_s` and was stopped; what it wrote stays (a rerun labels the
    rest)."""


def prediction_schema(tasks: dict[str, list[str]], embedding_dim: int | None) -> pa.Schema:
    fields = [
        ("uri", pa.string()),
        ("size", pa.int64()),
        ("etag", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
    ]
    fields += [(name, pa.string()) for name in OBJECT_COLUMNS]  # null unless the input says (IIIF)
    for task in tasks:
        fields += [(task, pa.string()), (f"{task}_score", pa.float32()), (f"{task}_topk", TOPK_TYPE)]
    fields.append(("needs_review", pa.bool_()))
    if embedding_dim:
        fields.append(("embedding", pa.list_(pa.float16(), embedding_dim)))
    fields += [
        ("model_id", pa.string()),
        ("run_id", pa.string()),
        ("labelled_at", pa.timestamp("us", tz="UTC")),
        ("error", pa.string()),
    ]
    return pa.schema(fields)


def prediction_rows(
    batch: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray],
    *,
    tasks: dict[str, list[str]],
    cfg: LabelConfig,
    review_thresholds: dict[str, float],
    model_id: str,
    run_id: str,
    labelled_at: datetime,
) -> pa.Table:
    """The one place a prediction row is built. `outputs` holds the model's outputs for the rows without error;
    a row needs review when it failed or any task's score is below that task's threshold."""
    n = len(batch["uri"])
    ok = stages.decoded_ok(batch["error"])
    where = np.flatnonzero(ok)
    columns: dict[str, list | np.ndarray] = {key: batch[key] for key in ("uri", "size", "width", "height")}
    for key in (
        "etag",
        "sha256",
        "format",
        "error",
        *OBJECT_COLUMNS,
    ):  # optional text; all-null columns come back from Arrow as NaN
        columns[key] = [v if isinstance(v, str) else None for v in batch.get(key, [None] * n)]
    confident = np.ones(n, dtype=bool)
    for task, vocab in tasks.items():
        probs = outputs.get(task, np.zeros((0, len(vocab)), np.float32))
        k = min(cfg.topk, len(vocab))
        order = np.argsort(-probs, axis=1)[:, :k]
        label, score, topk = [None] * n, [None] * n, [None] * n
        for row, i in enumerate(where):
            label[i] = vocab[order[row, 0]]
            score[i] = float(probs[row, order[row, 0]])
            topk[i] = [{"label": vocab[j], "score": float(probs[row, j])} for j in order[row]]
            confident[i] &= score[i] >= review_thresholds[task]
        columns.update({task: label, f"{task}_score": score, f"{task}_topk": topk})
    # An input nobody could label needs a person as much as an unsure prediction does.
    columns["needs_review"] = ~ok | ~confident
    embedding = outputs.get("embedding")
    if cfg.embeddings and embedding is not None:
        rows = [None] * n
        for row, i in enumerate(where):
            rows[i] = embedding[row]
        columns["embedding"] = rows
    columns.update(model_id=[model_id] * n, run_id=[run_id] * n, labelled_at=[labelled_at] * n)
    dim = embedding.shape[1] if cfg.embeddings and embedding is not None else None
    schema = prediction_schema(tasks, dim)
    return pa.table({f.name: pa.array(list(columns[f.name]), f.type) for f in schema}, schema=schema)


class LabelModel:
    """The model actor: loads the package once, then only copies, normalises and runs the forward pass
    (and, with GPU decode, decodes the batch's JPEGs on its GPU first)."""

    def __init__(
        self,
        model_uri: str,
        cfg: LabelConfig,
        storage_config: StorageConfig,
        run_id: str,
        labelled_at: datetime,
        gpu_decode: bool = False,
        max_pixels: int = 64_000_000,
        pause: PauseConfig | None = None,
    ):
        package = load_package(model_uri, storage_config)
        self.device = device = pick_device(cfg.num_gpus_per_actor > 0)
        self.thread = threading.local()  # a GPU actor's calls run in threads (GPU_ACTOR_CALLS), a stream each
        # Ray sets one thread per reserved CPU; a CPU model is the slow stage and decode needs little, so the
        # model may use every core of its node (bench: what this buys on a small machine).
        self.threads = (cfg.torch_threads or node_cpus()) if device.type == "cpu" else 0
        self.predictor = Predictor(package, device, cpu_bf16=cfg.cpu_bf16, tta=cfg.tta)
        self.row_args = dict(
            tasks=package.tasks,
            cfg=cfg,
            review_thresholds=review_thresholds(package.meta, cfg),
            model_id=package.model_id,
            run_id=run_id,
            labelled_at=labelled_at,
        )
        self.embeddings = cfg.embeddings
        self.gpu_decode = gpu_decode
        self.resize = package.preprocess.resize
        self.max_pixels = max_pixels
        self.pause = pause

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        pause_point(self.pause, "batch")  # fault tests only: off by default
        with self.own_stream():
            images, error = self.decode_on_device(batch) if self.gpu_decode else decoded_on_cpu(batch)
            outputs = self.predict(images) if len(images) else {}
        return prediction_rows(batch | {"error": error}, outputs, **self.row_args)

    def own_stream(self) -> contextlib.AbstractContextManager:
        """On a GPU, this thread's own CUDA stream: calls on the default stream would queue behind each other."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if not hasattr(self.thread, "stream"):
            self.thread.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self.thread.stream)

    def predict(self, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """The model on decoded images (`Predictor`'s output), with this actor's threads."""
        if self.threads:
            # OpenMP keeps the thread count per calling thread, and Ray Data calls from another thread than
            # __init__'s, where Ray's OMP_NUM_THREADS would leave the model one thread: set it here, every time.
            torch.set_num_threads(self.threads)
        return self.predictor(images, embeddings=self.embeddings)

    def decode_on_device(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
        """GPU decode: the JPEGs the CPU stage only read, decoded on the model's device. Returns the images of the
        rows that decoded and every row's error (the read stage's, or this decode's)."""
        error = batch["error"].copy()
        rows = np.flatnonzero(stages.decoded_ok(error))
        images, failed = gpudecode.to_device(
            batch["encoded"][rows],
            batch["encoding"][rows],
            self.resize,
            self.predictor.device,
            max_pixels=self.max_pixels,
        )
        for position, message in failed.items():
            error[rows[position]] = message
        decoded = [position for position in range(len(rows)) if position not in failed]
        return (images[decoded] if failed else images), error


def decoded_on_cpu(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """CPU decode: the images the read stage decoded (the rows without an error), and every row's error."""
    ok = stages.decoded_ok(batch["error"])
    return (batch["image"] if ok.all() else batch["image"][ok]), batch["error"]


def uses_gpu_decode(cfg: LabelConfig) -> bool:
    """nvJPEG needs the actors to hold a GPU; without one, JPEGs decode in the CPU stage like everything else."""
    if cfg.gpu_decode and cfg.num_gpus_per_actor <= 0:
        log.warning("label.gpu_decode is set but label.num_gpus_per_actor is 0: decoding JPEGs on CPU instead")
    return cfg.gpu_decode and cfg.num_gpus_per_actor > 0


def prediction_dataset(
    table: pa.Table, model_uri: str, cfg: Config, *, run_id: str, labelled_at: datetime
) -> ray.data.Dataset:
    """Inputs (uri, size, etag) -> prediction rows, as a lazy Ray Dataset (labelling and evaluation share it)."""
    manifest = read_manifest(model_uri, cfg.storage)
    preprocess = Preprocess.from_dict(manifest["preprocess"])
    lc = cfg.label
    gpu_decode = uses_gpu_decode(lc)
    if decode_fuses_into_actor(lc):
        raise ConfigError(
            f"label.actor_memory_mb={lc.actor_memory_mb} with label.cpus_per_actor == label.decode_cpus and no GPU "
            "asks for what a decode task asks for: Ray would fuse decode into the model actor; change either"
        )
    read, read_kwargs = read_stage(cfg, preprocess.resize, gpu_decode)
    carried = ["uri", "size", "etag", *(name for name in OBJECT_COLUMNS if name in table.column_names)]
    actor_kwargs = dict(
        model_uri=model_uri,
        cfg=lc,
        storage_config=cfg.storage,
        run_id=run_id,
        labelled_at=labelled_at,
        gpu_decode=gpu_decode,
        max_pixels=cfg.data.max_pixels,
        pause=cfg.pause,
    )
    pool = label_pool(lc, actor_resources(lc), decode_resources(lc), cfg.cluster)
    return label_stages(table.select(carried), read, read_kwargs, LabelModel, actor_kwargs, lc, pool)


def label_stages(
    table: pa.Table,
    read: Callable,
    read_kwargs: dict,
    actor: type,
    actor_kwargs: dict,
    lc: LabelConfig,
    pool: PoolSize | None = None,
) -> ray.data.Dataset:
    """The label pipeline's shape: `table`'s rows in blocks -> `read` as CPU tasks -> `actor` as the model actor pool,
    with the resources and concurrency each stage gets. `bench --simulate` runs the same shape with stand-in stages.
    `pool` (`label_pool`: fitted to the cluster's nodes) overrides label.min_actors / max_actors."""
    pool = pool or PoolSize(min=lc.min_actors, max=lc.max_actors, initial=lc.min_actors)
    ds = stages.dataset_from_table(table, lc.decode_batch_size)
    ds = ds.map_batches(read, fn_kwargs=read_kwargs, batch_size=lc.decode_batch_size, **decode_resources(lc))
    calls = GPU_ACTOR_CALLS if lc.num_gpus_per_actor > 0 else 1  # a CPU actor's model already takes every core
    return ds.map_batches(
        actor,
        fn_constructor_kwargs=actor_kwargs,
        batch_size=lc.batch_size,
        compute=ray.data.ActorPoolStrategy(
            min_size=pool.min,
            max_size=pool.max,
            initial_size=pool.initial,
            max_concurrent_calls_per_actor=calls,
            enable_true_multi_threading=calls > 1,
        ),
        runtime_env=actor_runtime_env(lc),
        **actor_resources(lc),
    )


def write_predictions(ds: ray.data.Dataset, partition_uri: str, cfg: Config, run_id: str) -> None:
    """Run the pipeline, writing its rows as this run's Parquet files under `partition_uri`.

    The writers reserve no CPU and are as many as the model actors: writing a batch's rows takes milliseconds, and
    Ray Data reserves for an operator without a cap a share of the CPUs (a third, with three operators) that the
    decode tasks then cannot have (simulated on an H200 node's resources: `artfuse bench --simulate`).

    Ray Data stops a pipeline that moves nothing for `label.stall_timeout_s`: raised as LabelStalled, naming the
    nodes lost meanwhile, the known cause (docs/architecture.md, "A lost node")."""
    fs, root = storage.arrow_filesystem(partition_uri, cfg.storage)
    ds.context.execution_no_progress_timeout_s = cfg.label.stall_timeout_s or -1  # Ray Data's -1: never
    nodes = alive_node_ids()
    try:
        ds.write_parquet(
            root,
            filesystem=fs,
            min_rows_per_file=max(cfg.label.rows_per_file, 1),
            filename_provider=filename_provider(run_id),
            concurrency=max(cfg.label.max_actors, 1),
            ray_remote_args={"num_cpus": 0},
        )
    except ExecutionTimeoutError as e:
        raise stalled(cfg.label, len(nodes), len(nodes - alive_node_ids()), e) from e


def stalled(cfg: LabelConfig, nodes: int, lost: int, error: Exception) -> LabelStalled:
    """Why a run stopped without progress: `lost` of the `nodes` it started on gone, or Ray Data's own account."""
    stopped = f"labelling moved nothing for {cfg.stall_timeout_s:g} s (label.stall_timeout_s) and was stopped"
    if not lost:
        return LabelStalled(f"{stopped}: {error}")
    return LabelStalled(
        f"{stopped}: {lost} of the {nodes} nodes it started on left the cluster meanwhile. The model actors restarted "
        "on the nodes left can hold every CPU there while they wait for blocks lost with the node, and no decode task "
        "can start to rebuild them. Rerun the same command: it labels only what this run did not write, with an actor "
        "pool fitted to the nodes left"
    )


def read_stage(cfg: Config, resize: int, gpu_decode: bool) -> tuple[Callable, dict]:
    """The CPU stage and its arguments: read and decode, or (GPU decode) read only, leaving JPEGs to the actor."""
    common = dict(
        size=resize,
        max_pixels=cfg.data.max_pixels,
        max_bytes=cfg.data.max_bytes,
        storage_config=cfg.storage,
        with_hash=True,
    )
    if gpu_decode:
        return stages.read_for_gpu_decode, common | dict(gpu_max_pixels=cfg.label.gpu_decode_max_pixels)
    return stages.read_and_decode, common | dict(niceness=cfg.label.decode_niceness)


def decode_resources(cfg: LabelConfig) -> dict:
    """What Ray reserves for each decode task: room for a batch being read and decoded."""
    return dict(num_cpus=cfg.decode_cpus, memory=DECODE_TASK_MEMORY)


def decode_fuses_into_actor(cfg: LabelConfig) -> bool:
    """Ray Data fuses two consecutive map stages whose resource requests are equal (a missing GPU count is 0): the
    decode tasks would then run inside the model actor, on its CPUs alone (docs/architecture.md)."""
    decode, actor = decode_resources(cfg), actor_resources(cfg)
    return all(decode.get(key, 0) == actor.get(key, 0) for key in decode.keys() | actor.keys())


def actor_resources(cfg: LabelConfig) -> dict:
    """What Ray reserves for each model actor (the bench's model-alone task asks for the same)."""
    resources = dict(num_gpus=cfg.num_gpus_per_actor, num_cpus=cfg.cpus_per_actor)
    if cfg.actor_memory_mb:
        resources["memory"] = cfg.actor_memory_mb * MB
    return resources


def actor_runtime_env(cfg: LabelConfig) -> dict | None:
    """A CPU model actor runs the model outside its main thread: it needs `CPU_INFERENCE_ENV` from the start."""
    return {"env_vars": CPU_INFERENCE_ENV} if cfg.num_gpus_per_actor <= 0 else None


def label(model_uri: str, input_uri: str, out_uri: str, cfg: Config) -> dict:
    """Label what is new under `input_uri` into `out_uri`; returns (and writes) the run report."""
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    read_manifest(model_uri, cfg.storage)  # a bad --model fails here, before any work
    with output_lock(out_uri, cfg.storage, run_id, cfg.label.break_lock) as taken_over:
        report = label_locked(model_uri, input_uri, out_uri, cfg, run_id)
    if taken_over:
        report["lock_taken_over_from"] = taken_over
    return report


def label_locked(model_uri: str, input_uri: str, out_uri: str, cfg: Config, run_id: str) -> dict:
    """`label`'s work, for the run that holds the output's lock."""
    started = time.time()
    labelled_at = datetime.now(UTC)
    run_date = cfg.label.run_date or f"{labelled_at:%Y-%m-%d}"
    package = read_manifest(model_uri, cfg.storage)
    thresholds = review_thresholds(package, cfg.label)
    decode_size = Preprocess.from_dict(package["preprocess"]).resize
    output = labelled_inputs(out_uri, cfg.storage)
    done_set_s = time.time() - started
    todo, listed, duplicates, listed_s = inputs_not_done(input_uri, output, cfg.storage, decode_size)
    if not listed:
        raise ConfigError(
            f"--input {input_uri} lists nothing to label (an empty folder or prefix, or a file that is not a "
            ".csv/.parquet manifest): check that the input has not moved"
        )
    output.set_aside_torn(run_id)  # only once every read succeeded: a failed read leaves the output as it was
    done_set_s += output.read_s
    planning_s = time.time() - started - listed_s - done_set_s
    log.info("listed %d inputs, %d already labelled, %d to label", listed, listed - todo.num_rows, todo.num_rows)

    counts = {"labelled": 0, "errors": 0, "review": {"rows": 0, "by_task": dict.fromkeys(thresholds, 0)}}
    ray_start_s = labelling_s = verify_s = 0.0
    if todo.num_rows:
        ensure_ray()
        ray_start_s = time.time() - started - listed_s - done_set_s - planning_s
        planned = time.time()
        partition = storage.join(out_uri, f"run_date={run_date}")
        ds = prediction_dataset(todo, model_uri, cfg, run_id=run_id, labelled_at=labelled_at)
        planning_s += time.time() - planned
        pipeline_started = time.time()
        write_predictions(ds, partition, cfg, run_id)
        labelling_s = time.time() - pipeline_started
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Ray Data stats:\n%s", ds.stats())
        counts = run_counts(partition, run_id, todo, cfg.storage, thresholds)
        verify_s = time.time() - pipeline_started - labelling_s
    elapsed = time.time() - started
    report = {
        "run_id": run_id,
        "run_date": run_date,
        "model": model_uri,
        "input": input_uri,
        "output": out_uri,
        "listed": listed,
        "skipped": listed - todo.num_rows,
        "labelled": counts["labelled"],
        "errors": counts["errors"],
        "duplicates_ignored": duplicates,
        "set_aside": output.set_aside,
        "foreign_files": output.foreign,
        # needs_review rows (failed ones included), per task the predictions below its threshold (None: every one)
        "review": counts["review"] | {"thresholds": {t: v if v < math.inf else None for t, v in thresholds.items()}},
        "img_s": round(todo.num_rows / labelling_s, 2) if labelling_s else 0.0,  # start-up included
        "durations_s": {
            "listing": round(listed_s, 2),
            "done_set": round(done_set_s, 2),  # reading what earlier runs labelled
            "planning": round(planning_s, 2),  # what is left to label, as a Ray Dataset
            "ray_start": round(ray_start_s, 2),
            "labelling": round(labelling_s, 2),
            "verifying": round(verify_s, 2),
            "total": round(elapsed, 2),
        },
    }
    storage.write_bytes(
        storage.join(out_uri, "_reports", f"{run_id}.json"),
        json.dumps(report, indent=1).encode(),
        cfg.storage,
    )
    return report


def inputs_not_done(
    input_uri: str, output: OutputState, storage_config: StorageConfig, image_size: int
) -> tuple[pa.Table | None, int, int, float]:
    """The inputs the output does not hold yet, sorted by uri (None: nothing listed), with how many were listed, how
    many duplicates a manifest named, and the seconds spent listing. A batch of the listing at a time (at most
    ANTI_JOIN_ROWS rows of neighbouring keys), so that neither the listing nor the output's keys ever sit whole in
    memory: the driver's memory does not grow with the archive, only with what is left to label."""
    todo, listed, duplicates, listing_s = [], 0, 0, 0.0
    batches = iter_inputs(input_uri, storage_config, image_size=image_size)  # IIIF: fetched at the model's size
    while True:
        started = time.time()
        batch = next(batches, None)
        listing_s += time.time() - started
        if batch is None:
            break
        listed += batch.num_rows
        duplicates += int((batch.schema.metadata or {}).get(b"duplicates", 0))
        if batch.num_rows > ANTI_JOIN_ROWS:
            batch = batch.sort_by("uri")
        for start in range(0, batch.num_rows, ANTI_JOIN_ROWS):
            todo.append(output.not_done(batch.slice(start, ANTI_JOIN_ROWS)).replace_schema_metadata(None))
    return (pa.concat_tables(todo).sort_by("uri") if todo else None), listed, duplicates, listing_s


def run_counts(
    partition_uri: str,
    run_id: str,
    todo: pa.Table,
    storage_config: StorageConfig | None,
    thresholds: dict[str, float],
) -> dict:
    """Labelled and error rows this run wrote, and `review_counts`; raises unless they are exactly one row per input
    in `todo`."""
    fs, root = storage.arrow_filesystem(partition_uri, storage_config)
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    mine = [f.path for f in found if f.type == pafs.FileType.File and is_own_file(f.path, run_id)]
    if not mine:
        raise RuntimeError(f"labelling lost every row: {todo.num_rows} inputs to label, no file written under {root}")
    written = pads.dataset(mine, filesystem=fs, format="parquet").to_table(
        columns=["uri", "etag", "size", "error", "needs_review", *(f"{task}_score" for task in thresholds)]
    )
    distinct = written.group_by(KEY).aggregate([])
    missing = todo.join(distinct, keys=KEY, join_type="left anti").num_rows
    if written.num_rows != todo.num_rows or distinct.num_rows != written.num_rows or missing:
        raise RuntimeError(
            f"labelling lost or repeated rows: {todo.num_rows} inputs to label, {written.num_rows} rows written "
            f"({distinct.num_rows} distinct, {missing} inputs without a row) under {partition_uri}"
        )
    labelled = written["error"].null_count
    return {"labelled": labelled, "errors": written.num_rows - labelled, "review": review_counts(written, thresholds)}


def review_counts(written: pa.Table, thresholds: dict[str, float]) -> dict:
    """Rows that need review, and per task how many predictions scored below its threshold."""
    return {
        "rows": pc.sum(written["needs_review"]).as_py() or 0,
        "by_task": {
            task: pc.sum(pc.less(written[f"{task}_score"], threshold)).as_py() or 0
            for task, threshold in thresholds.items()
        },
    }


def read_output(fs, root: str, columns: list[str], where: pc.Expression | None = None) -> pa.Table:
    """The predictions under `root` (the output, or one run date's partition), without the report folder."""
    return output_dataset(fs, root).to_table(columns=columns, filter=where)


def output_dataset(fs, root: str) -> pads.Dataset:
    """The predictions under `root` as an Arrow dataset (files not read yet)."""
    return pads.dataset(root, filesystem=fs, format="parquet", partitioning="hive", ignore_prefixes=["_", "."])
