"""Evaluate a model package on a labelled collection: metrics.json (DESIGN.md's contract) and confusion PNGs.

When the collection is the one the package was trained on (same fingerprint), only its validation split is
scored, split exactly as in training; any other collection is scored whole.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from artfuse.cluster.runtime import ensure_ray
from artfuse.config import Config, ConfigError, DataConfig
from artfuse.data import corrections, storage
from artfuse.data.catalog import Collection, load_collection
from artfuse.models.package import read_manifest
from artfuse.pipelines.label import prediction_dataset
from artfuse.reporting.metrics import confusion_matrix, summarize
from artfuse.reporting.plots import plot_confusion

log = logging.getLogger(__name__)


def evaluate(model_uri: str, data_uri: str | None, cfg: Config, out_dir: str | Path | None = None) -> dict:
    manifest = read_manifest(model_uri, cfg.storage)
    vocabs: dict[str, list[str]] = manifest["tasks"]
    training = manifest.get("training", {})
    # The split of the training run (seed, fraction), so "val" means the same images it meant there.
    trained_split = training.get("data_config", {})
    data_cfg = dataclasses.replace(
        cfg.data,
        tasks=list(vocabs),
        seed=trained_split.get("seed", cfg.data.seed),
        val_fraction=trained_split.get("val_fraction", cfg.data.val_fraction),
    )
    collection = truth_collection(data_uri, data_cfg, list(vocabs), cfg)
    if not data_uri:  # the hard cases alone: the tasks a reviewer decided
        vocabs = {task: vocabs[task] for task in collection.tasks}
    missing = [t for t in vocabs if t not in collection.tasks]
    if missing:
        raise ConfigError(
            f"{data_uri} has no label column for task(s) {missing}; the model predicts {list(vocabs)}"
        )
    held_out = collection.fingerprint == training.get("fingerprint")
    truth = collection.subset("val") if held_out else collection.table
    log.info(
        "evaluating on %d images (%s)",
        truth.num_rows,
        "the training run's validation split" if held_out else "all",
    )

    ensure_ray()
    ds = prediction_dataset(truth, model_uri, cfg, run_id="evaluate", labelled_at=datetime.now(UTC))
    predicted = pa.concat_tables(ray.get(ds.select_columns(["uri", *vocabs, "error"]).to_arrow_refs()))
    predicted = predicted.rename_columns(["uri", *(f"predicted_{t}" for t in vocabs), "error"])
    joined = truth.select(["uri", *vocabs]).join(predicted, keys="uri")
    ok = np.array([e is None for e in joined["error"].to_pylist()], dtype=bool)

    metrics: dict = {
        "n": int(ok.sum()),
        "split": "val" if held_out else "all" if data_uri else "corrections",
        "errors": int((~ok).sum()),
        "tasks": {},
    }
    for task, vocab in vocabs.items():
        index = {label: i for i, label in enumerate(vocab)}
        y_true = [index.get(v, -1) for v in np.asarray(joined[task].to_pylist(), dtype=object)[ok]]
        y_pred = [index[v] for v in np.asarray(joined[f"predicted_{task}"].to_pylist(), dtype=object)[ok]]
        known = np.array(y_true) >= 0
        summary = summarize(
            confusion_matrix(np.array(y_true)[known], np.array(y_pred)[known], len(vocab)), vocab
        )
        summary["unknown_labels"] = int((~known).sum())  # labels the model was never taught
        metrics["tasks"][task] = summary
    if out_dir:
        out = str(out_dir)
        storage.write_bytes(storage.join(out, "metrics.json"), json.dumps(metrics, indent=1).encode(), cfg.storage)
        for task, summary in metrics["tasks"].items():
            png = io.BytesIO()
            plot_confusion(summary, task, png)
            storage.write_bytes(storage.join(out, f"confusion_{task}.png"), png.getvalue(), cfg.storage)
    return metrics


def truth_collection(data_uri: str | None, data_cfg: DataConfig, tasks: list[str], cfg: Config) -> Collection:
    """What to score against: a collection (with a corrections dataset's decisions applied, as training applies
    them), or with no collection the objects of the corrections dataset alone."""
    if not data_uri:
        if not cfg.data.corrections:
            raise ConfigError(
                "evaluate needs a labelled collection (--data), a corrections dataset (--corrections), or both"
            )
        return corrections.as_collection(cfg.data.corrections, tasks, cfg.storage)
    collection = load_collection(data_uri, data_cfg, cfg.storage)
    if cfg.data.corrections:
        collection, _ = corrections.apply(collection, cfg.data.corrections, cfg.storage)
    return collection
