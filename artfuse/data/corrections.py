"""The corrections dataset: a curator's decisions on predictions, and how they join a training collection.

A corrections dataset is a folder (local, file:// or s3://) of Parquet files, one per decision, each under a
name no other writer can pick (time, reviewer and a random part). Appending never reads or rewrites what is
there, so any number of reviewers may write at once and none loses a decision; when one object was decided
more than once, the latest decision for it (and a task) wins.

In training, a decision overrides the collection's label of the same object (same uri, or the same bytes:
sha256) and moves it into the training split; a decided object outside the collection joins it when every
task of the collection was decided for it.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from artfuse.config import ConfigError, StorageConfig
from artfuse.data import storage
from artfuse.data.catalog import Collection

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("sha256", pa.string()),
        ("size", pa.int64()),
        ("etag", pa.string()),
        ("task", pa.string()),
        ("label", pa.string()),  # the reviewer's answer
        ("previous_label", pa.string()),  # what the model predicted
        ("previous_score", pa.float32()),
        ("model_id", pa.string()),
        ("run_id", pa.string()),
        ("reviewer", pa.string()),
        ("decided_at", pa.timestamp("us", tz="UTC")),
    ]
)
OBJECT_KEYS = ("uri", "sha256")  # a decision applies to the object at its uri and to identical bytes elsewhere


def append(uri: str, decisions: list[dict], storage_config: StorageConfig | None = None) -> str:
    """Write `decisions` (dicts with SCHEMA's fields; decided_at defaults to now) as one new file under `uri`."""
    now = datetime.now(UTC)
    rows = [{**d, "decided_at": d.get("decided_at") or now} for d in decisions]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    reviewer = "".join(c if c.isalnum() else "-" for c in str(rows[0]["reviewer"] or "anonymous"))[:32]
    name = f"{now:%Y%m%dT%H%M%S%f}-{reviewer}-{uuid.uuid4().hex[:12]}.parquet"
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    target = storage.join(uri, name)
    storage.write_bytes(target, sink.getvalue().to_pybytes(), storage_config)
    return target


class CorrectionsReader:
    """Reads a corrections dataset, and on `refresh()` only the files written since (by anyone)."""

    def __init__(self, uri: str, storage_config: StorageConfig | None = None):
        self.uri = uri
        self.storage_config = storage_config
        self._seen: set[str] = set()
        self._tables: list[pa.Table] = []

    def refresh(self) -> pa.Table:
        """Every decision in the dataset, new files read once; returns the new decisions only."""
        fs, root = storage.resolve(self.uri, self.storage_config)
        try:
            names = [p for p in fs.find(root) if p.endswith(".parquet") and "/." not in p and "/_" not in p]
        except FileNotFoundError:
            names = []
        new = []
        for path in sorted(set(names) - self._seen):
            with fs.open(path, "rb") as f:
                new.append(pq.read_table(f).select(SCHEMA.names).cast(SCHEMA))
            self._seen.add(path)
        self._tables += new
        return pa.concat_tables(new) if new else SCHEMA.empty_table()

    @property
    def table(self) -> pa.Table:
        return pa.concat_tables(self._tables) if self._tables else SCHEMA.empty_table()


def read(uri: str, storage_config: StorageConfig | None = None) -> pa.Table:
    """Every decision under `uri`; a missing or empty dataset is an error (nothing to learn from)."""
    if not storage.exists(uri, storage_config):
        raise ConfigError(f"corrections dataset not found: {uri} (artfuse review --corrections writes one)")
    reader = CorrectionsReader(uri, storage_config)
    reader.refresh()
    if not reader.table.num_rows:
        raise ConfigError(f"the corrections dataset {uri} holds no decisions yet")
    return reader.table


def latest(decisions: pa.Table) -> pa.Table:
    """One decision per (object, task): the latest, where an object is its uri or, across uris, its sha256."""
    order = decisions.sort_by([("decided_at", "descending")])
    seen: set[tuple[str, str]] = set()
    keep = []
    columns = [order.column(name).to_pylist() for name in ("uri", "sha256", "task")]
    for i, (uri, sha256, task) in enumerate(zip(*columns, strict=True)):
        keys = {(f"uri:{uri}", task)} | ({(f"sha256:{sha256}", task)} if sha256 else set())
        if keys & seen:
            continue  # a later decision on this object was kept already
        seen |= keys
        keep.append(i)
    return order.take(pa.array(keep, pa.int64())).sort_by([("uri", "ascending"), ("task", "ascending")])


@dataclass
class Learned:
    """What a training run took from a corrections dataset (recorded in the package)."""

    uri: str
    decisions: int  # latest decisions for the collection's tasks that reached the training table
    relabelled: int  # of those, decisions that changed the collection's label
    added: int  # objects outside the collection that joined it
    left_out: int  # decisions not used: other tasks, or a new object without a label for every task

    def to_dict(self) -> dict:
        return dict(
            uri=self.uri, decisions=self.decisions, relabelled=self.relabelled, added=self.added, left_out=self.left_out
        )


def apply(
    collection: Collection, corrections_uri: str, storage_config: StorageConfig | None = None
) -> tuple[Collection, Learned]:
    """`collection` with the latest decisions under `corrections_uri` applied: labels overridden, decided objects in
    the training split, decided objects from outside added."""
    decisions = latest(read(corrections_uri, storage_config))
    usable = decisions.filter(pc.is_in(decisions["task"], pa.array(collection.tasks, pa.string())))
    table = collection.table
    uris = table["uri"].to_pylist()
    row_of_uri = {u: i for i, u in enumerate(uris)}
    row_of_sha = _hashes_of_candidates(table, usable, row_of_uri, storage_config)
    labels = {task: table[task].to_pylist() for task in collection.tasks}
    split = table["split"].to_pylist()
    outside: dict[str, dict] = {}
    used = relabelled = 0
    for d in usable.to_pylist():
        rows = {row_of_uri[d["uri"]]} if d["uri"] in row_of_uri else set()
        rows |= set(row_of_sha.get(d["sha256"], ()))
        if not rows:
            outside.setdefault(d["uri"], {"size": d["size"], "etag": d["etag"]})[d["task"]] = d["label"]
            continue
        used += 1
        relabelled += any(labels[d["task"]][row] != d["label"] for row in rows)
        for row in rows:
            labels[d["task"]][row] = d["label"]
            split[row] = "train"
    added = {u: o for u, o in outside.items() if all(task in o for task in collection.tasks)}
    used += len(added) * len(collection.tasks)
    new_rows = sorted(added.items())
    merged = pa.table(
        {
            "uri": pa.array(uris + [u for u, _ in new_rows], pa.string()),
            "size": pa.array(table["size"].to_pylist() + [o["size"] for _, o in new_rows], pa.int64()),
            "etag": pa.array(table["etag"].to_pylist() + [o["etag"] for _, o in new_rows], pa.string()),
            **{task: pa.array(labels[task] + [o[task] for _, o in new_rows], pa.string()) for task in collection.tasks},
            "split": pa.array(split + ["train"] * len(new_rows), pa.string()),
        }
    ).sort_by("uri")
    learned = Learned(
        uri=corrections_uri,
        decisions=used,
        relabelled=relabelled,
        added=len(new_rows),
        left_out=decisions.num_rows - used,
    )
    if learned.left_out:
        log.warning(
            "%d of %d decisions left out of training: tasks the collection lacks (it has %s), or objects outside it "
            "without a decision for every task",
            learned.left_out,
            decisions.num_rows,
            collection.tasks,
        )
    vocabs = {task: sorted(set(merged[task].to_pylist())) for task in collection.tasks}
    digest = hashlib.sha256(collection.extra.encode())
    for row in decisions.select(["uri", "sha256", "task", "label"]).to_pylist():
        digest.update("\x1f".join(str(v) for v in row.values()).encode())
    return replace(collection, table=merged, vocabs=vocabs, extra=digest.hexdigest()[:16]), learned


def as_collection(corrections_uri: str, tasks: list[str], storage_config: StorageConfig | None = None) -> Collection:
    """The decided objects alone as a collection (the hard cases), every row in split "val": the `tasks` that have
    decisions, and the objects decided for each of them."""
    decisions = latest(read(corrections_uri, storage_config))
    decided = set(decisions["task"].to_pylist())
    if not decided & set(tasks):
        raise ConfigError(f"{corrections_uri} holds decisions for tasks {sorted(decided)}, none of {tasks}")
    tasks = [task for task in tasks if task in decided]
    objects: dict[str, dict] = {}
    for d in decisions.to_pylist():
        objects.setdefault(d["uri"], {"size": d["size"], "etag": d["etag"]})[d["task"]] = d["label"]
    uris = sorted(u for u, o in objects.items() if all(task in o for task in tasks))
    table = pa.table(
        {
            "uri": pa.array(uris, pa.string()),
            "size": pa.array([objects[u]["size"] for u in uris], pa.int64()),
            "etag": pa.array([objects[u]["etag"] for u in uris], pa.string()),
            **{task: pa.array([objects[u][task] for u in uris], pa.string()) for task in tasks},
            "split": pa.array(["val"] * len(uris), pa.string()),
        }
    )
    vocabs = {task: sorted(set(table[task].to_pylist())) for task in tasks}
    return Collection(root=storage.canonical_uri(corrections_uri), table=table, tasks=tasks, vocabs=vocabs)


def _hashes_of_candidates(
    table: pa.Table, decisions: pa.Table, row_of_uri: dict[str, int], storage_config: StorageConfig | None
) -> dict[str, list[int]]:
    """sha256 -> collection rows, for the rows that could hold the bytes of a decision made under another uri:
    only rows of the same size as such a decision are read and hashed."""
    elsewhere = [d for d in decisions.to_pylist() if d["uri"] not in row_of_uri and d["sha256"]]
    sizes = {d["size"] for d in elsewhere}
    if not sizes:
        return {}
    candidates = np.flatnonzero(np.isin(table["size"].to_numpy(), np.array(sorted(sizes), dtype=np.int64)))
    found: dict[str, list[int]] = {}
    for row in candidates.tolist():
        digest = hashlib.sha256(storage.read_bytes(table["uri"][row].as_py(), storage_config)).hexdigest()
        found.setdefault(digest, []).append(row)
    return found
