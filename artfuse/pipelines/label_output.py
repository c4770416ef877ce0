"""What the label job keeps under its `--out`: which Parquet files are its own, what they already hold, and what
happens to files it cannot use. Nothing here deletes a file.

The job names every file it writes `artfuse-<run_id>_<write id>_<task>-<i>.parquet` (`data/prediction_files.py`). When
it reads the output back:
- a readable Parquet file with the prediction columns counts, whoever named it (files of earlier versions too);
  its footer's uri statistics say which range of inputs it can hold, so that the anti-join against a batch of
  inputs reads only the files whose range meets the batch's (a file without them is read whole, once);
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
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
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
CACHED_ROWS = 500_000  # output rows whose keys stay in memory between batches of inputs (about 50 MB)


class OutputLocked(RuntimeError):
    """Another run holds the output's lock."""


class OutputUnreadable(RuntimeError):
    """A file under the output could not be read; the run stops rather than relabel (or lose) its rows."""


@dataclass
class OutputState:
    """What the output already holds, for an anti-join a range of keys at a time: the files with prediction rows,
    each with the smallest and largest uri its Parquet statistics give, so that a batch of inputs reads only the
    files whose range meets its own (a night's files each hold a narrow range: the job labels in uri order)."""

    fs: object = None
    paths: list[str] = field(default_factory=list)  # files of predictions with uri statistics, by smallest uri
    firsts: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    lasts: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    resident: pa.Table = field(
        default_factory=lambda: EMPTY_KEYS
    )  # keys of the files without uri statistics, read whole once
    torn: list[tuple[str, Exception]] = field(default_factory=list)  # files of ours cut short, moved by set_aside_torn
    set_aside: list[dict] = field(default_factory=list)  # {"file", "to"}: torn files this run moved
    foreign: list[str] = field(default_factory=list)  # files the job did not write and does not use
    read_s: float = 0.0  # seconds spent reading keys for not_done
    out_uri: str = ""
    root: str = ""
    cache: OrderedDict = field(default_factory=OrderedDict)  # path -> its keys, the most recently used last
    cached_rows: int = 0

    def not_done(self, inputs: pa.Table) -> pa.Table:
        """The `inputs` (uri, etag, size, ...) that no output row holds (a left anti-join on KEY)."""
        if not inputs.num_rows:
            return inputs
        bounds = pc.min_max(inputs["uri"])
        first, last = bounds["min"], bounds["max"]
        overlapping = pc.and_(pc.less_equal(self.firsts, last), pc.greater_equal(self.lasts, first))
        wanted = [self.paths[i] for i in pc.indices_nonzero(overlapping).to_pylist()]
        started = time.monotonic()
        done = pa.concat_tables([self.resident, *self._keys(wanted)])
        self.read_s += time.monotonic() - started
        in_range = pc.and_(pc.greater_equal(done["uri"], first), pc.less_equal(done["uri"], last))
        done = done.filter(in_range)
        return inputs.join(done, keys=KEY, join_type="left anti") if done.num_rows else inputs

    def _keys(self, paths: list[str]) -> list[pa.Table]:
        """The key columns of `paths`, from the cache or read side by side; the cache keeps the CACHED_ROWS most
        recently used rows (neighbouring batches of inputs meet the same files)."""
        missing = [path for path in paths if path not in self.cache]
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for path, (keys, error) in zip(missing, pool.map(lambda p: _read_keys(self.fs, p), missing), strict=True):
                if keys is None:
                    raise OutputUnreadable(
                        f"cannot read {_uri(self.out_uri, self.root, path)} ({type(error).__name__}: {error}): rerun "
                        "once storage answers (or grant read access), or move the file out of the output"
                    ) from error
                self.cache[path] = keys
                self.cached_rows += keys.num_rows
        found = []
        for path in paths:
            self.cache.move_to_end(path)
            found.append(self.cache[path])
        while self.cached_rows > CACHED_ROWS and len(self.cache) > len(paths):
            _, keys = self.cache.popitem(last=False)
            self.cached_rows -= keys.num_rows
        return found

    def set_aside_torn(self, run_id: str) -> list[dict]:
        """Move the torn files of ours under `_set_aside/<run_id>/` (their inputs are labelled again)."""
        self.set_aside = [_set_aside(self.fs, self.out_uri, self.root, path, run_id, e) for path, e in self.torn]
        self.torn = []
        return self.set_aside


def labelled_inputs(out_uri: str, storage_config: StorageConfig | None) -> OutputState:
    """What the output already holds, from its files' Parquet footers (read side by side; the rows are read later,
    a range at a time, by `OutputState.not_done`). Torn files of ours are found here and moved only by
    `set_aside_torn`; other files that are not predictions are reported. A footer that cannot be read fails the run
    naming the file, with nothing under the output changed."""
    fs, root = storage.resolve(out_uri, storage_config)
    state = OutputState(fs=fs, out_uri=out_uri, root=root)
    if not fs.exists(root):
        return state
    paths = [path for path in sorted(fs.find(root)) if not _skipped(path[len(root) :])]
    # Footers side by side (an archive's output is thousands of files), then decided in path order, so the first
    # unreadable file is the one named, as a one-by-one read would.
    with ThreadPoolExecutor(READ_THREADS) as pool:
        outcomes = list(pool.map(lambda path: _read_footer(fs, path), paths))
    ranged, whole = [], []
    for path, (footer, error) in zip(paths, outcomes, strict=True):
        uri = _uri(out_uri, root, path)
        if footer is not None:
            if footer.first is None:
                whole.append(path)
            elif footer.rows:
                ranged.append((footer.first, footer.last, path))
        elif error is None:  # readable Parquet without the prediction columns
            state.foreign.append(uri)
        elif isinstance(error, pa.ArrowInvalid):  # the bytes arrived and are not Parquet: torn if we wrote it
            if is_own_file(path):
                state.torn.append((path, error))
            else:
                state.foreign.append(uri)
        else:
            raise OutputUnreadable(
                f"cannot read {uri} ({type(error).__name__}: {error}); nothing under {out_uri} was changed: rerun "
                "once storage answers (or grant read access), or move the file out of the output if it is not needed"
            ) from error
    for uri in state.foreign:
        log.warning("leaving %s alone: not a prediction file of this job (its rows, if any, are not counted)", uri)
    ranged.sort()
    state.paths = [path for _, _, path in ranged]
    state.firsts = pa.array([first for first, _, _ in ranged], pa.string())
    state.lasts = pa.array([last for _, last, _ in ranged], pa.string())
    if whole:
        state.resident = pa.concat_tables(state._keys(whole))
        state.cache.clear()
        state.cached_rows = 0
    return state


def _skipped(below: str) -> bool:
    return "/_" in below or "/." in below  # reports, the lock, set-aside files, hidden files


@dataclass
class Footer:
    rows: int
    first: str | None  # the smallest and largest uri, from the row groups' statistics (None: a row group has none)
    last: str | None


def _read_footer(fs, path: str) -> tuple[Footer | None, Exception | None]:
    """One output file's row count and uri range; (None, None) for Parquet that is not predictions; (None, error)
    when it cannot be read."""
    try:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            if not PREDICTION_COLUMNS <= set(parquet.schema_arrow.names):
                return None, None
            metadata = parquet.metadata
            column = parquet.schema_arrow.get_field_index("uri")
            firsts, lasts = [], []
            for group in range(metadata.num_row_groups):
                chunk = metadata.row_group(group)
                if not chunk.num_rows:
                    continue
                stats = chunk.column(column).statistics
                if stats is None or not stats.has_min_max:
                    return Footer(metadata.num_rows, None, None), None
                firsts.append(stats.min)
                lasts.append(stats.max)
            if not firsts:
                return Footer(metadata.num_rows, None, None) if metadata.num_rows else Footer(0, "", ""), None
            return Footer(metadata.num_rows, min(firsts), max(lasts)), None
    except Exception as e:  # noqa: BLE001 - decided by the caller, in path order
        return None, e


def _read_keys(fs, path: str) -> tuple[pa.Table | None, Exception | None]:
    """The key columns of one output file; (None, error) when it cannot be read."""
    try:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).read(columns=KEY), None
    except Exception as e:  # noqa: BLE001 - raised by the caller, naming the file
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
