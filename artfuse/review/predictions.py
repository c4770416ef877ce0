"""A labelling job's output as the review sees it: the latest prediction row of each object."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from artfuse.config import ConfigError, StorageConfig
from artfuse.data import storage

TOPK_SUFFIX = "_topk"
ROW_COLUMNS = ("uri", "sha256", "size", "etag", "needs_review", "model_id", "run_id", "labelled_at", "error")


def prediction_tasks(schema: pa.Schema) -> list[str]:
    """The tasks a predictions dataset holds: every `<task>` with `<task>_score` and `<task>_topk` columns."""
    names = set(schema.names)
    return [
        name[: -len(TOPK_SUFFIX)]
        for name in schema.names
        if name.endswith(TOPK_SUFFIX) and {name[: -len(TOPK_SUFFIX)], f"{name[: -len(TOPK_SUFFIX)]}_score"} <= names
    ]


def open_predictions(uri: str, storage_config: StorageConfig | None = None) -> tuple[pads.Dataset, list[str]]:
    """The predictions under a label job's `--out` as one Arrow dataset (hive partitions; `_reports`, the lock and
    set-aside files left out), and the tasks it holds; a clear error where there are none."""
    fs, root = storage.arrow_filesystem(uri, storage_config)
    try:
        dataset = pads.dataset(root, filesystem=fs, format="parquet", partitioning="hive", ignore_prefixes=["_", "."])
    except (FileNotFoundError, pa.ArrowInvalid) as e:
        raise ConfigError(f"no predictions at {uri} ({e}): give the --out of an `artfuse label` run") from None
    tasks = prediction_tasks(dataset.schema)
    if not tasks:
        raise ConfigError(f"{uri} holds no predictions (no <task>, <task>_score, <task>_topk columns)")
    return dataset, tasks


def load_latest(
    uri: str, storage_config: StorageConfig | None = None, *, embeddings: Literal["no", "if_any", "required"] = "no"
) -> pa.Table:
    """One row per object (uri): its latest prediction (by labelled_at), sorted by uri, with the `embedding` column
    when asked for (`required`: an error where the predictions have none)."""
    dataset, tasks = open_predictions(uri, storage_config)
    columns = [*ROW_COLUMNS, *(c for t in tasks for c in (t, f"{t}_score", f"{t}{TOPK_SUFFIX}"))]
    if embeddings == "required" or (embeddings == "if_any" and "embedding" in dataset.schema.names):
        if "embedding" not in dataset.schema.names:
            raise ConfigError(
                f"the predictions at {uri} have no embedding column: label with --set label.embeddings=true"
            )
        columns.append("embedding")
    table = dataset.to_table(columns=columns)
    if not table.num_rows:
        raise ConfigError(f"the predictions at {uri} hold no rows")
    ordered = table.sort_by([("uri", "ascending"), ("labelled_at", "descending")])
    uris = ordered["uri"].to_numpy(zero_copy_only=False)
    first = np.ones(len(uris), dtype=bool)
    first[1:] = uris[1:] != uris[:-1]
    return ordered.filter(pa.array(first))


def run_ids(table: pa.Table) -> list[str]:
    return sorted(pc.unique(table["run_id"]).to_pylist(), reverse=True)
