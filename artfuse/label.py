"""Nightly labelling with Ray Data: list -> skip what is done -> read + decode (CPU tasks) -> model actors -> Parquet.

Every listed input yields exactly one row per run, a prediction or an error. Rows land under
`<out>/run_date=YYYY-MM-DD/` (hive partitioning); a rerun skips inputs the output already holds with the
same uri, etag and size, so the same night twice adds nothing and a new night labels only new or changed
objects. A file left half-written by a killed run is removed on the next run and its inputs labelled again.
Run one labelling job per output at a time.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray.data

from artfuse import stages, storage
from artfuse.catalog import list_inputs
from artfuse.config import Config, LabelConfig, StorageConfig
from artfuse.package import load_package, read_manifest
from artfuse.predict import Predictor, pick_device
from artfuse.preprocess import Preprocess
from artfuse.runtime import ensure_ray

log = logging.getLogger(__name__)
KEY = ["uri", "etag", "size"]  # what makes an input "the same object" across nights
EMPTY_KEYS = pa.table(
    {"uri": pa.array([], pa.string()), "etag": pa.array([], pa.string()), "size": pa.array([], pa.int64())}
)
TOPK_TYPE = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float32())]))


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
    model_id: str,
    run_id: str,
    labelled_at: datetime,
) -> pa.Table:
    """The one place a prediction row is built. `outputs` holds the model's outputs for the rows without error."""
    n = len(batch["uri"])
    ok = stages.decoded_ok(batch["error"])
    where = np.flatnonzero(ok)
    columns: dict[str, list | np.ndarray] = {key: batch[key] for key in ("uri", "size", "width", "height")}
    for key in (
        "etag",
        "sha256",
        "format",
        "error",
    ):  # optional text; all-null columns come back from Arrow as NaN
        columns[key] = [v if isinstance(v, str) else None for v in batch[key]]
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
            confident[i] &= score[i] >= cfg.review_threshold
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
    """The model actor: loads the package once, then only copies, normalises and runs the forward pass."""

    def __init__(
        self,
        model_uri: str,
        cfg: LabelConfig,
        storage_config: StorageConfig,
        run_id: str,
        labelled_at: datetime,
    ):
        package = load_package(model_uri, storage_config)
        self.predictor = Predictor(package, pick_device(cfg.num_gpus_per_actor > 0))
        self.row_args = dict(
            tasks=package.tasks, cfg=cfg, model_id=package.model_id, run_id=run_id, labelled_at=labelled_at
        )
        self.embeddings = cfg.embeddings

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = stages.decoded_ok(batch["error"])
        outputs = self.predictor(batch["image"][ok], embeddings=self.embeddings) if ok.any() else {}
        return prediction_rows(batch, outputs, **self.row_args)


def _decode_stage_args(num_cpus: float) -> dict:
    return {"num_cpus": num_cpus}


def prediction_dataset(
    table: pa.Table, model_uri: str, cfg: Config, *, run_id: str, labelled_at: datetime
) -> ray.data.Dataset:
    """Inputs (uri, size, etag) -> prediction rows, as a lazy Ray Dataset (labelling and evaluation share it)."""
    manifest = read_manifest(model_uri, cfg.storage)
    preprocess = Preprocess.from_dict(manifest["preprocess"])
    lc = cfg.label
    ds = stages.dataset_from_table(table.select(["uri", "size", "etag"]), lc.decode_batch_size)
    ds = ds.map_batches(
        stages.read_and_decode,
        fn_kwargs=dict(
            size=preprocess.resize,
            max_pixels=cfg.data.max_pixels,
            max_bytes=cfg.data.max_bytes,
            storage_config=cfg.storage,
            with_hash=True,
        ),
        batch_size=lc.decode_batch_size,
        # A remote-args function keeps Ray from fusing decode into the model actor (DESIGN.md, stage fusion).
        ray_remote_args_fn=functools.partial(_decode_stage_args, lc.decode_cpus),
    )
    return ds.map_batches(
        LabelModel,
        fn_constructor_kwargs=dict(
            model_uri=model_uri, cfg=lc, storage_config=cfg.storage, run_id=run_id, labelled_at=labelled_at
        ),
        batch_size=lc.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=lc.min_actors, max_size=lc.max_actors),
        num_gpus=lc.num_gpus_per_actor,
        num_cpus=lc.cpus_per_actor,
    )


def labelled_inputs(out_uri: str, storage_config: StorageConfig | None) -> pa.Table:
    """(uri, etag, size) already in the output. Unreadable files (a run killed mid-write) are removed."""
    fs, root = storage.resolve(out_uri, storage_config)
    if not fs.exists(root):
        return EMPTY_KEYS
    tables = []
    for path in sorted(fs.find(root)):
        if not path.endswith(".parquet") or "/_" in path[len(root) :]:
            continue
        try:
            with fs.open(path, "rb") as f:
                tables.append(pq.read_table(f, columns=KEY))
        except Exception as e:  # noqa: BLE001 - a torn file from an interrupted run; its inputs are redone
            log.warning("removing unreadable output file %s (an interrupted run?): %s", path, e)
            fs.rm(path)
    if not tables:
        return EMPTY_KEYS
    return pa.concat_tables(tables).group_by(KEY).aggregate([])


def label(model_uri: str, input_uri: str, out_uri: str, cfg: Config) -> dict:
    """Label what is new under `input_uri` into `out_uri`; returns (and writes) the run report."""
    started = time.time()
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    labelled_at = datetime.now(UTC)
    run_date = cfg.label.run_date or f"{labelled_at:%Y-%m-%d}"
    read_manifest(model_uri, cfg.storage)  # a bad --model fails here, before any work

    listed = list_inputs(input_uri, cfg.storage)
    done = labelled_inputs(out_uri, cfg.storage)
    todo = listed.join(done, keys=KEY, join_type="left anti") if done.num_rows else listed
    todo = todo.sort_by("uri")
    listed_s = time.time() - started
    log.info(
        "listed %d inputs, %d already labelled, %d to label",
        listed.num_rows,
        listed.num_rows - todo.num_rows,
        todo.num_rows,
    )

    counts = {"labelled": 0, "errors": 0}
    if todo.num_rows:
        ensure_ray()
        ds = prediction_dataset(todo, model_uri, cfg, run_id=run_id, labelled_at=labelled_at)
        fs, root = storage.arrow_filesystem(storage.join(out_uri, f"run_date={run_date}"), cfg.storage)
        ds.write_parquet(root, filesystem=fs, min_rows_per_file=max(cfg.label.batch_size, 1024))
        counts = run_counts(out_uri, run_id, cfg.storage)
    elapsed = time.time() - started
    report = {
        "run_id": run_id,
        "run_date": run_date,
        "model": model_uri,
        "input": input_uri,
        "output": out_uri,
        "listed": listed.num_rows,
        "skipped": listed.num_rows - todo.num_rows,
        "labelled": counts["labelled"],
        "errors": counts["errors"],
        "img_s": round(todo.num_rows / max(elapsed - listed_s, 1e-9), 2) if todo.num_rows else 0.0,
        "durations_s": {"listing": round(listed_s, 2), "total": round(elapsed, 2)},
    }
    if counts["labelled"] + counts["errors"] != todo.num_rows:
        raise RuntimeError(f"labelling lost rows: {todo.num_rows} to label, {counts} written ({out_uri})")
    storage.write_bytes(
        storage.join(out_uri, "_reports", f"{run_id}.json"),
        json.dumps(report, indent=1).encode(),
        cfg.storage,
    )
    return report


def run_counts(out_uri: str, run_id: str, storage_config: StorageConfig | None) -> dict:
    fs, root = storage.arrow_filesystem(out_uri, storage_config)
    table = read_output(fs, root, ["run_id", "error"])
    mine = table.filter(pc.equal(table["run_id"], run_id))
    errors = int(pc.sum(pc.is_valid(mine["error"])).as_py() or 0)
    return {"labelled": mine.num_rows - errors, "errors": errors}


def read_output(fs, root: str, columns: list[str]) -> pa.Table:
    """The predictions under `root` (all run dates), without the report folder."""
    dataset = pads.dataset(
        root, filesystem=fs, format="parquet", partitioning="hive", ignore_prefixes=["_", "."]
    )
    return dataset.to_table(columns=columns)
