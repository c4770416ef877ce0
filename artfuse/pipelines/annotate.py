"""`artfuse annotate`: a label job's predictions as IIIF Presentation 3 annotations that a museum's own viewer shows.

Under `--out` (local, file:// or s3://, published at `--base-url`):
- `iiif/<digest of the manifest id>/annotations.json`: one AnnotationPage per manifest (object), one Annotation per
  canvas and task, from the latest prediction of each canvas;
- `iiif/<same>/manifest.json`: with `--manifests`, a copy of each Presentation 3 manifest whose canvases carry their
  annotations embedded (what Mirador 4 reads);
- `runs/<run_id>.json`: one AnnotationPage per run for the rows that are not from IIIF (files, S3), targeting each
  image's URL;
- `context.json`: the project's JSON-LD context for the `artfuse:` properties.
What an annotation holds, and why: `data/iiif_annotations.py`.

The predictions are read in Arrow batches and never whole: IIIF rows are spread by manifest over spill files of at
most `annotate.bucket_rows` rows (a manifest's rows all in one), and each spill file is then grouped in memory, so
memory stays flat whatever the output's size. A document is written only where its bytes differ from what is there:
a rerun writes nothing, and a new night rewrites only the pages of the manifests it labelled.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import yaml

from artfuse.config import Config, ConfigError, StorageConfig
from artfuse.data import corrections as corrections_data
from artfuse.data import http, iiif, storage
from artfuse.data import iiif_annotations as ia
from artfuse.review.predictions import open_predictions

log = logging.getLogger(__name__)
ROW_COLUMNS = ("uri", "sha256", "object_id", "canvas_id", "needs_review", "model_id", "run_id", "labelled_at")
ROW_TYPES = dict.fromkeys(ROW_COLUMNS, pa.string()) | {
    "needs_review": pa.bool_(),
    "labelled_at": pa.timestamp("us", "UTC"),
}
IN_FLIGHT_PER_THREAD = 4  # documents queued per write thread: enough to keep them busy, few enough to stay small
COMPARE_CHUNK = 1 << 20


class AnnotationInvalid(ValueError):
    """A document annotate built does not validate against the IIIF Presentation 3 JSON Schema (--validate)."""


@dataclass(frozen=True)
class Decision:
    label: str
    reviewer: str
    machine_label: str | None


class Decisions:
    """The latest curator decision per object and task. A decision applies to the bytes it was made on: a row with
    the same sha256 (under any uri; an image replaced since has new bytes and its own prediction), or, for a
    decision without a hash, the same uri."""

    def __init__(self, table: pa.Table | None = None):
        self.by_sha: dict[tuple[str, str], tuple[Decision, object]] = {}
        self.by_uri: dict[tuple[str, str], tuple[Decision, object]] = {}
        if table is None:
            return
        for d in corrections_data.latest(table).to_pylist():
            decision = (Decision(d["label"], d["reviewer"] or "anonymous", d["previous_label"]), d["decided_at"])
            if d["sha256"]:
                self.by_sha[(d["sha256"], d["task"])] = decision
            else:
                self.by_uri[(d["uri"], d["task"])] = decision

    def __len__(self) -> int:
        return len(self.by_sha) + len(self.by_uri)

    def get(self, uri: str, sha256: str | None, task: str) -> tuple[Decision, object] | None:
        if sha256 and (sha256, task) in self.by_sha:
            return self.by_sha[(sha256, task)]
        return self.by_uri.get((uri, task))


def load_vocabulary(uri: str, storage_config: StorageConfig | None = None) -> dict[tuple[str, str], str]:
    """(task, label) -> vocabulary URI (Getty AAT, Wikidata, ...) from a CSV with columns task,label,uri, or a YAML
    or JSON mapping {task: {label: uri}}."""
    try:
        raw = storage.read_bytes(uri, storage_config).decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"vocabulary file not found: {uri}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"vocabulary file {uri} is not UTF-8 text ({e})") from None
    entries: list[tuple[str, str, str, str]] = []  # task, label, uri, where
    if uri.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(raw))
        if not {"task", "label", "uri"} <= set(reader.fieldnames or []):
            raise ConfigError(f"vocabulary file {uri} needs the columns task,label,uri (has {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            entries.append((row["task"], row["label"], (row["uri"] or "").strip(), f"line {line}"))
    else:
        try:
            mapping = yaml.safe_load(raw) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"vocabulary file {uri} is neither CSV (by its name) nor YAML/JSON: {e}") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, dict) for v in mapping.values()):
            raise ConfigError(f"vocabulary file {uri} must map each task to {{label: uri}}")
        for task, labels in mapping.items():
            entries += [
                (str(task), str(label), str(target).strip(), f"{task}.{label}") for label, target in labels.items()
            ]
    vocabulary = {}
    for task, label, target, where in entries:
        if not http.is_http(target):
            raise ConfigError(f"vocabulary file {uri}, {where}: {target!r} is not an http(s) URI (IIIF needs one)")
        vocabulary[(task, label)] = target
    return vocabulary


def image_url_mapping(pairs: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """`PREFIX=URL` pairs: images stored under PREFIX are published under URL; the longest prefix wins."""
    mapping = []
    for pair in pairs:
        prefix, sep, url = pair.partition("=")
        if not sep or not prefix or not http.is_http(url):
            raise ConfigError(f"--image-url expects PREFIX=URL with an http(s) URL, e.g. s3://bucket/images/="
                              f"https://images.museum.org/; got {pair!r}")  # fmt: skip
        mapping.append((storage.canonical_uri(prefix) + ("/" if prefix.endswith("/") else ""), url))
    return sorted(mapping, key=lambda m: -len(m[0]))


def image_target(uri: str, mapping: list[tuple[str, str]]) -> str:
    """The URL an annotation of a file or S3 object targets: its published URL where `mapping` says, else its own
    URI (s3://..., file:///...)."""
    for prefix, url in mapping:
        if uri.startswith(prefix):
            return url + quote(uri[len(prefix) :], safe="/")
    if http.is_http(uri) or uri.startswith(storage.S3_PREFIX):
        return uri
    return "file://" + quote(uri, safe="/")


@dataclass
class Selection:
    """Which (row, task) pairs become annotations, and with which label."""

    rows: tuple[str, ...]
    decisions: Decisions
    vocabulary: dict[tuple[str, str], str]

    def label(self, row: dict, task: str, target: str) -> ia.Label | None:
        machine = row[task]
        if machine is None:
            return None
        decided = self.decisions.get(row["uri"], row["sha256"], task) if self.decisions else None
        wanted = (
            "all" in self.rows
            or ("accepted" in self.rows and row["needs_review"] is False)
            or ("decided" in self.rows and decided is not None)
        )
        if not wanted:
            return None
        label, reviewer, created = machine, None, row["labelled_at"]
        if decided is not None:
            (decision, decided_at) = decided
            label, reviewer, created = decision.label, decision.reviewer, decided_at
        return ia.Label(
            target=target,
            task=task,
            label=label,
            machine_label=machine,
            score=row[f"{task}_score"],
            needs_review=bool(row["needs_review"]),
            model_id=row["model_id"] or "",
            run_id=row["run_id"] or "",
            created=created,
            reviewer=reviewer,
            vocabulary_uri=self.vocabulary.get((task, label)),
        )


@dataclass
class Writer:
    """Writes documents under `out` where their bytes differ from what is there, `threads` at a time; counts."""

    out: str
    storage_config: StorageConfig | None
    threads: int
    written: dict[str, int] = field(default_factory=dict)
    unchanged: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self._pool = ThreadPoolExecutor(self.threads)
        self._pending: deque[Future] = deque()
        self._lock = threading.Lock()

    def put(self, kind: str, relative: str, data: bytes, *, only_over: bool = False) -> None:
        """Write `data` to `<out>/<relative>` unless it holds those bytes; `only_over`: only where a file is there
        already (an empty page replaces an older one, and is not written where there was none)."""
        while len(self._pending) >= self.threads * IN_FLIGHT_PER_THREAD:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._put, kind, relative, data, only_over))

    def put_file(self, kind: str, relative: str, local_path: str) -> None:
        self.flush()
        uri = storage.join(self.out, relative)
        changed = not _same_file(uri, local_path, self.storage_config)
        if changed:
            storage.write_file(uri, local_path, self.storage_config)
        self.count(kind, changed)

    def read(self, relative: str) -> bytes | None:
        try:
            return storage.read_bytes(storage.join(self.out, relative), self.storage_config)
        except FileNotFoundError:
            return None

    def flush(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        self.flush()
        self._pool.shutdown(wait=True)

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _put(self, kind: str, relative: str, data: bytes, only_over: bool) -> None:
        existing = self.read(relative)
        if existing == data or (only_over and existing is None):
            self.count(kind, False)
            return
        storage.write_bytes(storage.join(self.out, relative), data, self.storage_config)
        self.count(kind, True)

    def count(self, kind: str, changed: bool) -> None:
        with self._lock:
            counts = self.written if changed else self.unchanged
            counts[kind] = counts.get(kind, 0) + 1


def annotate(
    predictions: str,
    out: str,
    base_url: str,
    cfg: Config,
    *,
    manifests: str | None = None,
    corrections: str | None = None,
    vocabulary: str | None = None,
    rows: tuple[str, ...] | list[str] = ia.DEFAULT_SELECTION,
    image_urls: tuple[str, ...] | list[str] = (),
    validate: bool = False,
) -> dict:
    """Write the predictions under `predictions` as IIIF annotations under `out`, published at `base_url`; returns
    what was read and written."""
    started = time.monotonic()
    if not http.is_http(base_url):
        raise ConfigError(
            f"--base-url must be the http(s) URL --out is published at (IIIF ids are URLs); got {base_url!r}"
        )
    rows = tuple(rows)
    if unknown := set(rows) - set(ia.SELECTIONS):
        raise ConfigError(f"--rows takes {', '.join(ia.SELECTIONS)}; got {', '.join(sorted(unknown))}")
    if rows == ("decided",) and not corrections:
        raise ConfigError("--rows decided needs --corrections (the corrections dataset `artfuse review` writes)")
    base = base_url.rstrip("/")
    context_url = f"{base}/{ia.CONTEXT_NAME}"
    dataset, tasks = open_predictions(predictions, cfg.storage)
    selection = Selection(
        rows=rows,
        decisions=Decisions(corrections_data.read(corrections, cfg.storage) if corrections else None),
        vocabulary=load_vocabulary(vocabulary, cfg.storage) if vocabulary else {},
    )
    checker = Checker(validate)
    writer = Writer(out, cfg.storage, cfg.annotate.write_threads)
    counts = {"rows_read": 0, "rows_iiif": 0, "rows_other": 0, "machine": 0, "curator": 0}
    try:
        writer.put("context", ia.CONTEXT_NAME, ia.context_document())
        with tempfile.TemporaryDirectory(prefix="artfuse-annotate-") as spill_dir:
            spill = spill_rows(dataset, tasks, spill_dir, cfg.annotate.batch_rows, cfg.annotate.bucket_rows, counts)
            for path in spill.buckets:
                for object_id, items in manifest_pages(path, tasks, selection, base, cfg.annotate.language):
                    page_id = f"{base}/{ia.page_path(object_id)}"
                    doc = ia.page(page_id, items, context_url)
                    checker.check(doc, page_id)
                    _count_creators(items, counts)
                    writer.put("page", ia.page_path(object_id), ia.dumps(doc), only_over=not items)
            mapping = image_url_mapping(image_urls)
            for run_id, path in sorted(spill.runs.items()):
                write_run_page(run_id, path, tasks, selection, base, context_url, cfg, mapping, writer, checker, counts)
        writer.flush()
        if manifests:
            for manifest in iiif.manifests(manifests, cfg.storage):
                write_manifest_copy(manifest, base, context_url, writer, checker)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    result = {
        "predictions": predictions,
        "out": out,
        "base_url": base_url,
        "rows": list(rows),
        "tasks": tasks,
        "decisions": len(selection.decisions),
        "rows_read": counts["rows_read"],
        "rows_iiif": counts["rows_iiif"],
        "rows_other": counts["rows_other"],
        "annotations": {"machine": counts["machine"], "curator": counts["curator"]},
        "written": dict(sorted(writer.written.items())),
        "unchanged": dict(sorted(writer.unchanged.items())),
        "validated": checker.checked if validate else None,
        "seconds": round(time.monotonic() - started, 1),
    }
    log.info("annotate: %s", result)
    return result


@dataclass
class Spill:
    buckets: list[str]  # spill files of IIIF rows, a manifest's rows all in one
    runs: dict[str, str]  # run_id -> spill file of its rows that are not from IIIF


def spill_rows(dataset, tasks: list[str], folder: str, batch_rows: int, bucket_rows: int, counts: dict) -> Spill:
    """Stream the prediction rows without error (only the columns annotations need) into spill files: IIIF rows by a
    hash of their manifest id into ceil(rows / bucket_rows) buckets, other rows by run, each in scan order."""
    present = set(dataset.schema.names)
    columns = [*ROW_COLUMNS, *(c for t in tasks for c in (t, f"{t}_score"))]
    schema = pa.schema([dataset.schema.field(c) if c in present else pa.field(c, ROW_TYPES[c]) for c in columns])
    n_buckets = max(1, math.ceil(dataset.count_rows() / bucket_rows))
    writers: dict[str, ipc.RecordBatchStreamWriter] = {}
    paths: dict[str, str] = {}

    def write(key: str, table: pa.Table) -> None:
        if key not in writers:
            paths[key] = os.path.join(folder, f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.arrows")
            writers[key] = ipc.new_stream(paths[key], schema)
        writers[key].write_table(table)

    try:
        wanted = [c for c in columns if c in present]
        for batch in dataset.to_batches(columns=[*wanted, "error"], batch_size=batch_rows):
            counts["rows_read"] += batch.num_rows
            table = pa.Table.from_batches([batch])
            table = table.filter(pc.is_null(table["error"]))
            table = pa.table(  # outputs written before IIIF input have no object columns
                [table[c] if c in present else pa.nulls(table.num_rows, schema.field(c).type) for c in columns],
                schema=schema,
            )
            from_iiif = pc.and_(pc.is_valid(table["object_id"]), pc.is_valid(table["canvas_id"]))
            iiif_rows, other = table.filter(from_iiif), table.filter(pc.invert(from_iiif))
            counts["rows_iiif"] += iiif_rows.num_rows
            counts["rows_other"] += other.num_rows
            if iiif_rows.num_rows:
                buckets = np.array(
                    [zlib.crc32(o.encode()) % n_buckets for o in iiif_rows["object_id"].to_pylist()], np.int32
                )
                for bucket in np.unique(buckets).tolist():
                    write(f"bucket-{bucket}", iiif_rows.filter(pa.array(buckets == bucket)))
            if other.num_rows:
                runs = other["run_id"].fill_null("")
                for run_id in pc.unique(runs).to_pylist():
                    write(f"run-{run_id}", other.filter(pc.equal(runs, run_id)))
    finally:
        for w in writers.values():
            w.close()
    return Spill(
        buckets=[paths[k] for k in sorted(paths) if k.startswith("bucket-")],
        runs={k[len("run-") :]: paths[k] for k in paths if k.startswith("run-")},
    )


def manifest_pages(
    path: str, tasks: list[str], selection: Selection, base: str, language: str
) -> Iterator[tuple[str, list[dict]]]:
    """(manifest id, its annotations) for every manifest in one spill file: the latest row of each canvas, one
    annotation per selected task, in canvas and task order."""
    with ipc.open_stream(path) as reader:
        table = reader.read_all()
    table = table.sort_by([("object_id", "ascending"), ("canvas_id", "ascending"), ("labelled_at", "descending")])
    objects = table["object_id"].to_numpy(zero_copy_only=False)
    canvases = table["canvas_id"].to_numpy(zero_copy_only=False)
    first = np.ones(len(objects), dtype=bool)  # the latest row of each (manifest, canvas)
    first[1:] = (objects[1:] != objects[:-1]) | (canvases[1:] != canvases[:-1])
    table = table.filter(pa.array(first))
    columns = table.to_pydict()
    del table
    current, items = None, []
    for i in range(len(columns["object_id"])):
        row = {name: values[i] for name, values in columns.items()}
        if row["object_id"] != current:
            if current is not None:
                yield current, items
            current, items = row["object_id"], []
        page_id = f"{base}/{ia.page_path(current)}"
        for task in tasks:
            label = selection.label(row, task, row["canvas_id"])
            if label is not None:
                items.append(ia.annotation(label, page_id, language))
    if current is not None:
        yield current, items


def write_run_page(
    run_id: str,
    path: str,
    tasks: list[str],
    selection: Selection,
    base: str,
    context_url: str,
    cfg: Config,
    mapping: list[tuple[str, str]],
    writer: Writer,
    checker: Checker,
    counts: dict,
) -> None:
    """One run's rows that are not from IIIF as one AnnotationPage, streamed through a local file (a run may hold
    millions of rows), in uri and task order."""
    relative = ia.run_page_path(run_id)
    page_id = f"{base}/{relative}"
    head = ia.dumps(ia.page(page_id, [], context_url))
    checker.check(ia.page(page_id, [], context_url), page_id)
    n = 0
    with tempfile.NamedTemporaryFile("wb", suffix=".json", delete=False) as f, ipc.open_stream(path) as reader:
        try:
            f.write(head[: -len(b"]}")])
            for batch in reader:  # the run's rows in the order the label job wrote them
                for row in batch.to_pylist():
                    for task in tasks:
                        label = selection.label(row, task, image_target(row["uri"], mapping))
                        if label is None:
                            continue
                        item = ia.annotation(label, page_id, cfg.annotate.language)
                        checker.check(item, item["id"], annotation_only=True)
                        counts["curator" if label.reviewer is not None else "machine"] += 1
                        f.write((b"," if n else b"") + ia.dumps(item))
                        n += 1
            f.write(b"]}")
            f.close()
            if n or writer.read(relative) is not None:
                writer.put_file("run page", relative, f.name)
        finally:
            os.unlink(f.name)


def write_manifest_copy(manifest: dict, base: str, context_url: str, writer: Writer, checker: Checker) -> None:
    """A Presentation 3 manifest's copy with its canvases' annotations embedded, beside its page; a manifest without
    labels, or of Presentation 2, is counted and left."""
    object_id = manifest.get("id") or manifest.get("@id") or ""
    if not ia.is_presentation3(manifest):
        writer.count("manifest (not Presentation 3, not copied)", False)
        return
    raw = writer.read(ia.page_path(object_id))
    if raw is None:
        writer.count("manifest (no labels, not copied)", False)
        return
    copy_id = f"{base}/{ia.manifest_path(object_id)}"
    copy = ia.embed(manifest, copy_id, json.loads(raw), context_url)
    checker.check(copy, copy_id)
    writer.put("manifest", ia.manifest_path(object_id), ia.dumps(copy))


@dataclass
class Checker:
    """--validate: every document against the IIIF Presentation 3 JSON Schema before it is written."""

    enabled: bool
    checked: int = 0

    def check(self, doc: dict, name: str, *, annotation_only: bool = False) -> None:
        if not self.enabled:
            return
        errors = ia.schema_errors(doc, annotation_only=annotation_only)
        if errors:
            hint = " (--image-url says where images are published)" if "must be http(s) URLs" in errors[0] else ""
            raise AnnotationInvalid(f"{name} does not validate against IIIF Presentation 3: {errors[0]}{hint}")
        self.checked += 1


def _count_creators(items: list[dict], counts: dict) -> None:
    for item in items:
        counts["curator" if item["creator"]["type"] == "Person" else "machine"] += 1


def _same_file(uri: str, local_path: str, storage_config: StorageConfig | None) -> bool:
    """Whether `uri` holds the bytes of the local file (sizes first, then chunk by chunk)."""
    fs, path = storage.resolve(uri, storage_config)
    try:
        if fs.size(path) != os.path.getsize(local_path):
            return False
        with fs.open(path, "rb") as theirs, open(local_path, "rb") as ours:
            while True:
                a, b = theirs.read(COMPARE_CHUNK), ours.read(COMPARE_CHUNK)
                if a != b:
                    return False
                if not a:
                    return True
    except FileNotFoundError:
        return False
