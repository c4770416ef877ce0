"""What the label job keeps under its `--out`: which Parquet files are its own, what they already hold, and what
happens to files it cannot use. Nothing here deletes a file.

The job names every file it writes `artfuse-<run_id>_<write id>_<task>-<i>.parquet` (`data/prediction_files.py`). When
it reads the output back:
- a readable Parquet file with the prediction columns counts, whoever named it (files of earlier versions too);
- a file named as ours that is not valid Parquet is a write cut short by a killed run: it is moved to
  `<out>/_set_aside/<this run_id>/<its path>` and its inputs are labelled again;
- any other file (not ours and not predictions) is left alone and reported as foreign;
- a read that fails (permission, network, throttling) fails the run naming the file: it may be transient, and
  a job must not guess that rows it cannot see are gone.

One run at a time per output: `output_lock` creates `<out>/_lock.json` atomically on the output's own storage
and a second run fails naming it and its holder. A lock left by a dead run is taken over only by a run told that
run's id (`label.break_lock`), with a compare-and-swap, so that two such runs cannot both win.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from artfuse.config import StorageConfig
from artfuse.data import storage
from artfuse.data.prediction_files import is_own_file

log = logging.getLogger(__name__)
KEY = ["uri", "etag", "size"]  # what makes an input "the same object" across nights
PREDICTION_COLUMNS = frozenset([*KEY, "run_id", "model_id", "labelled_at", "error"])
EMPTY_KEYS = pa.table(
    {"uri": pa.array([], pa.string()), "etag": pa.array([], pa.string()), "size": pa.array([], pa.int64())}
)
SET_ASIDE = "_set_aside"  # where torn files go, one folder per run that moved them
LOCK = "_lock.json"
READ_THREADS = 8  # output files read at once: a local disk or S3 serves several reads while one is parsed


class OutputLocked(RuntimeError):
    """Another run holds the output's lock."""


class OutputUnreadable(RuntimeError):
    """A file under the output could not be read; the run stops rather than relabel (or lose) its rows."""


@dataclass
class OutputState:
    done: pa.Table  # (uri, etag, size) already labelled (not deduplicated: only an anti-join reads it)
    set_aside: list[dict] = field(default_factory=list)  # {"file", "to"}: torn files this run moved
    foreign: list[str] = field(default_factory=list)  # files the job did not write and does not use


def labelled_inputs(out_uri: str, storage_config: StorageConfig | None, run_id: str) -> OutputState:
    """(uri, etag, size) already in the output; torn files of ours are set aside (under `run_id`), others reported."""
    fs, root = storage.resolve(out_uri, storage_config)
    state = OutputState(done=EMPTY_KEYS)
    if not fs.exists(root):
        return state
    paths = [path for path in sorted(fs.find(root)) if not _skipped(path[len(root) :])]
    # Reads side by side (an archive's output is thousands of files; a night reads only their key columns), then
    # decided in path order, so the first unreadable file is the one named, as a one-by-one read would.
    with ThreadPoolExecutor(READ_THREADS) as pool:
        outcomes = list(pool.map(lambda path: _read_keys(fs, path), paths))
    tables, torn = [], []
    for path, (keys, error) in zip(paths, outcomes, strict=True):
        uri = _uri(out_uri, root, path)
        if keys is not None:
            tables.append(keys)
        elif error is None:  # readable Parquet without the prediction columns
            state.foreign.append(uri)
        elif isinstance(error, pa.ArrowInvalid):  # the bytes arrived and are not Parquet: torn if we wrote it
            if is_own_file(path):
                torn.append((path, error))
            else:
                state.foreign.append(uri)
        else:
            raise OutputUnreadable(
                f"cannot read {uri} ({type(error).__name__}: {error}); nothing under {out_uri} was changed: rerun "
                "once storage answers (or grant read access), or move the file out of the output if it is not needed"
            ) from error
    # Only once every file was read: a run that fails on a read leaves the output exactly as it found it.
    state.set_aside = [_set_aside(fs, out_uri, root, path, run_id, e) for path, e in torn]
    for uri in state.foreign:
        log.warning("leaving %s alone: not a prediction file of this job (its rows, if any, are not counted)", uri)
    if tables:
        state.done = pa.concat_tables(tables)
    return state


def _skipped(below: str) -> bool:
    return "/_" in below or "/." in below  # reports, the lock, set-aside files, hidden files


def _read_keys(fs, path: str) -> tuple[pa.Table | None, Exception | None]:
    """The key columns of one output file; (None, None) for Parquet that is not predictions; (None, error) when
    it cannot be read."""
    try:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            if not PREDICTION_COLUMNS <= set(parquet.schema_arrow.names):
                return None, None
            return parquet.read(columns=KEY), None
    except Exception as e:  # noqa: BLE001 - decided by the caller, in path order
        return None, e


def _set_aside(fs, out_uri: str, root: str, path: str, run_id: str, error: Exception) -> dict:
    relative = path[len(root) :].lstrip("/")
    target = f"{root}/{SET_ASIDE}/{run_id}/{relative}"
    fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    fs.mv(path, target)
    moved = {"file": _uri(out_uri, root, path), "to": _uri(out_uri, root, target)}
    log.warning("set aside %s (a write cut short, %s): its inputs are labelled again", moved["to"], error)
    return moved


def _uri(out_uri: str, root: str, path: str) -> str:
    """`path` (as the filesystem names it) as a URI of the same kind as `out_uri`."""
    return storage.join(out_uri, path[len(root) :])


@contextmanager
def output_lock(
    out_uri: str, storage_config: StorageConfig | None, run_id: str, break_lock: str = ""
) -> Iterator[dict]:
    """Hold `<out>/_lock.json` while the block runs; yields the lock taken over from a dead run ({} if none)."""
    uri = storage.join(out_uri, LOCK)
    mine = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "since": f"{datetime.now(UTC):%FT%TZ}"}
    data = json.dumps(mine).encode()
    taken_over: dict = {}
    try:
        storage.create_new(uri, data, storage_config)
    except FileExistsError:
        try:
            held, version = storage.read_versioned(uri, storage_config)
        except FileNotFoundError:  # its holder released it a moment ago: start again
            with output_lock(out_uri, storage_config, run_id) as taken_over:
                yield taken_over
            return
        holder = json.loads(held)
        if not break_lock or holder.get("run_id") != break_lock:
            raise OutputLocked(
                f"{out_uri} is being labelled by run {holder.get('run_id')} (host {holder.get('host')}, pid "
                f"{holder.get('pid')}, since {holder.get('since')}): its lock is {uri}. If that run is dead, rerun "
                f"with --set label.break_lock={holder.get('run_id')}"
            ) from None
        try:
            storage.replace_if_unchanged(uri, data, version, storage_config)
        except FileExistsError:
            raise OutputLocked(f"another run took over the lock {uri} first: not labelling {out_uri}") from None
        log.warning("took over the lock %s from run %s (told it is dead)", uri, break_lock)
        taken_over = holder
    try:
        yield taken_over
    finally:
        still, _ = storage.read_versioned(uri, storage_config)
        if json.loads(still).get("run_id") == run_id:  # a lock someone took over is theirs now
            storage.remove(uri, storage_config)
