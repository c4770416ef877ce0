"""URI -> filesystem: local paths, file:// and s3://, the one place artfuse touches storage.

http(s):// URIs (IIIF manifests and images) can be read, through artfuse.data.http, not listed or written.

S3 goes through s3fs (and pyarrow's S3FileSystem where Ray wants an Arrow filesystem). The endpoint comes
from the config or AWS_ENDPOINT_URL(_S3); region and credentials come from the standard AWS chain and are
never logged. Filesystem instances are cached by fsspec itself, per process, so Ray workers build their own.
"""

from __future__ import annotations

import fcntl
import logging
import os
import posixpath
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from urllib.parse import urlsplit

import botocore
import botocore.config
import botocore.exceptions
import botocore.session
import fsspec
import pyarrow as pa
import pyarrow.fs as pafs

from artfuse.config import ConfigError, StorageConfig
from artfuse.data import http

log = logging.getLogger(__name__)
S3_PREFIX = "s3://"
FILE_PREFIX = "file://"
# An endpoint that does not answer (refused, reset, timed out), as opposed to an answer about the object.
UNREACHABLE = (ConnectionError, TimeoutError, botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)
T = TypeVar("T")
LISTING_BATCH = 10_000  # listed objects gathered as Python tuples before they become Arrow columns
S3_PREFIXES_PER_THREAD = 4  # a concurrent S3 listing looks for this many prefixes per thread before listing them
S3_MAX_DEPTH = 4  # ... and looks no deeper than this many levels below the listed prefix
LISTING_PROGRESS_S = 10.0  # a listing that takes longer logs a progress line this often


class StorageUnavailable(RuntimeError):
    """The storage endpoint did not answer for `storage.patience_s`."""


def canonical_uri(uri: str) -> str:
    """The form `list_objects` reports: "s3://bucket/key", or an absolute local path (file:// dropped)."""
    if uri.startswith(S3_PREFIX):
        return S3_PREFIX + _s3_path(uri)
    if http.is_http(uri):
        return uri
    return _local_path(uri)


def storage_options(storage: StorageConfig | None = None) -> dict:
    """Keyword arguments for s3fs.S3FileSystem (also usable as `storage_options` for pandas/Ray)."""
    cfg = storage or StorageConfig()
    options: dict = {"anon": cfg.anon, "use_listings_cache": False}  # nightly jobs must see new objects
    endpoint = _endpoint_url(cfg)
    if endpoint:
        options["endpoint_url"] = endpoint
    if cfg.region:
        options["client_kwargs"] = {"region_name": cfg.region}
    return options


def resolve(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path to use with it ("bucket/key" for S3)."""
    if uri.startswith(S3_PREFIX):
        return fsspec.filesystem("s3", **storage_options(storage)), _s3_path(uri)
    return fsspec.filesystem("file"), _local_path(uri)


def arrow_filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for `uri`, for Ray Data's Parquet I/O and Ray Train's storage."""
    if not uri.startswith(S3_PREFIX):
        return pafs.LocalFileSystem(), _local_path(uri)
    cfg = storage or StorageConfig()
    kwargs: dict = {"anonymous": cfg.anon}
    endpoint = _endpoint_url(cfg)
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["scheme"] = parts.scheme
        kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
    region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs), _s3_path(uri)


def list_objects(
    uri: str, storage: StorageConfig | None = None, *, suffixes: tuple[str, ...] | None = None
) -> pa.Table:
    """Every object under `uri` (recursive; a file lists itself) as a table of uri, size, etag, sorted by uri.

    `iter_objects`' batches in one table: for a listing that fits in memory. `etag` is the S3 ETag, or for local
    files the mtime in nanoseconds, so that a changed object gets a new value. `suffixes` keeps names ending in one
    of them, ignoring case.
    """
    batches = list(iter_objects(uri, storage, suffixes=suffixes))
    return pa.concat_tables(batches or [_listing_table([])]).sort_by("uri")


def iter_objects(
    uri: str, storage: StorageConfig | None = None, *, suffixes: tuple[str, ...] | None = None
) -> Iterator[pa.Table]:
    """Every object under `uri` (recursive; a file lists itself) as tables of at most LISTING_BATCH rows (uri, size,
    etag), each of keys close together in sort order (one S3 prefix's pages; a few neighbouring local folders),
    though not sorted. Raises ConfigError when nothing is there.

    Paginated listings (no request per object), with a progress line every LISTING_PROGRESS_S, so that millions of
    objects neither hold a Python dict each nor leave the job silent for minutes; S3 prefixes are listed side by
    side (`storage.list_threads`).
    """
    fs, path = resolve(uri, storage)
    wanted = tuple(s.lower() for s in suffixes) if suffixes is not None else None
    started = last_progress = time.monotonic()
    count = 0
    if uri.startswith(S3_PREFIX):
        threads = (storage or StorageConfig()).list_threads
        runs = _s3_runs(path, storage, threads)
    else:
        runs = _batched(_local_objects(path))
    try:
        for run in runs:
            rows = [
                (_to_uri(uri, name), size, etag)
                for name, size, etag in run
                if wanted is None or name.lower().endswith(wanted)
            ]
            count += len(rows)
            if time.monotonic() - last_progress > LISTING_PROGRESS_S:
                last_progress = time.monotonic()
                log.info("listing %s: %d objects so far", uri, count)
            if rows:
                yield _listing_table(rows)
    except FileNotFoundError:
        pass
    except PermissionError as e:
        raise ConfigError(f"access denied listing {uri}: check the AWS credentials and bucket policy") from e
    if not count and not fs.exists(path):
        raise ConfigError(f"collection path not found: {uri}")
    if time.monotonic() - started > LISTING_PROGRESS_S:
        log.info("listed %s: %d objects in %.0f s", uri, count, time.monotonic() - started)


Row = tuple[str, int, str]  # (path as the filesystem names it, size, etag)


def _batched(rows: Iterator[Row]) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) == LISTING_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _local_objects(path: str) -> Iterator[Row]:
    """(path, size, etag) of every file under `path` (or `path` itself), one folder at a time in name order
    (os.scandir: the file type comes with the folder's entries, so only files cost a stat)."""
    if not os.path.isdir(path):
        stat = os.stat(path)  # FileNotFoundError: nothing there
        yield path, stat.st_size, _mtime_etag(stat.st_mtime)
        return
    folders = [path]
    while folders:
        try:
            entries = os.scandir(folders.pop())
        except FileNotFoundError:
            continue  # removed while we listed
        below = []
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir():
                        below.append(entry.path)
                        continue
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                yield entry.path, stat.st_size, _mtime_etag(stat.st_mtime)
        folders.extend(sorted(below, reverse=True))  # the first in name order is listed next


def _s3_runs(path: str, storage: StorageConfig | None, threads: int) -> Iterator[list[Row]]:
    """("bucket/key", size, etag) of every object under `path` ("bucket/prefix", or one object's "bucket/key") in
    runs of at most LISTING_BATCH rows, each from one prefix's pages (sorted within a run).

    With one thread, one flat paginated ListObjectsV2 (1,000 keys a request). With more, the delimiter's common
    prefixes are found a level at a time (each level's prefixes listed side by side) until there are
    S3_PREFIXES_PER_THREAD per thread or no level is left, and then each prefix is listed flat, `threads` at a time:
    the same objects, with the round trips of many prefixes overlapping."""
    bucket, _, prefix = path.partition("/")
    client = _s3_client(storage)
    root = f"{prefix}/" if prefix else ""
    seen = False
    try:
        if threads <= 1:
            for run in _batched(_s3_pages(client, bucket, root)):
                seen = True
                yield run
        else:
            with ThreadPoolExecutor(threads) as pool:
                frontier, depth = [root], 0
                while frontier and len(frontier) < threads * S3_PREFIXES_PER_THREAD and depth < S3_MAX_DEPTH:
                    below = []
                    for kind, found in _side_by_side(pool, threads, frontier, lambda p: _s3_level(client, bucket, p)):
                        if kind == "prefix":
                            below.append(found)
                        else:
                            seen = True
                            yield found
                    frontier, depth = sorted(below), depth + 1
                for run in _side_by_side(pool, threads, frontier, lambda p: _batched(_s3_pages(client, bucket, p))):
                    seen = True
                    yield run
        if not seen and prefix:
            head = client.head_object(Bucket=bucket, Key=prefix)
            yield [(path, int(head["ContentLength"]), str(head["ETag"]).strip('"'))]
    except botocore.exceptions.ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("AccessDenied", "403"):
            raise PermissionError(str(e)) from e
        if code in ("NoSuchBucket", "NoSuchKey", "404"):
            return
        raise


def _s3_pages(client, bucket: str, prefix: str) -> Iterator[Row]:
    """The objects of a ListObjectsV2 pagination (folder markers left out)."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", ()):
            if not item["Key"].endswith("/"):  # a folder marker, not an object
                yield f"{bucket}/{item['Key']}", int(item["Size"]), str(item["ETag"]).strip('"')


def _s3_level(client, bucket: str, prefix: str) -> Iterator[tuple[str, list[Row] | str]]:
    """What lies directly under `prefix` (delimiter "/"): ("prefix", a common prefix) and ("objects", a run of at most
    LISTING_BATCH objects), as the pages come."""
    run: list[Row] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        for common in page.get("CommonPrefixes", ()):
            yield "prefix", common["Prefix"]
        for item in page.get("Contents", ()):
            if not item["Key"].endswith("/"):
                run.append((f"{bucket}/{item['Key']}", int(item["Size"]), str(item["ETag"]).strip('"')))
            if len(run) == LISTING_BATCH:
                yield "objects", run
                run = []
    if run:
        yield "objects", run


def _side_by_side(
    pool: ThreadPoolExecutor, threads: int, items: list[str], produce: Callable[[str], Iterator[T]]
) -> Iterator[T]:
    """What `produce(item)` yields for every item, `threads` items at a time, in the order it arrives. A bounded
    queue holds the producers back while the consumer is busy, so memory stays a few batches per thread."""
    arrived: queue.Queue = queue.Queue(maxsize=2 * threads)
    stop = threading.Event()
    finished = object()

    def hand_over(value) -> bool:
        while not stop.is_set():
            try:
                arrived.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work(item: str) -> None:
        try:
            for value in produce(item):
                if not hand_over((None, value)):
                    return
        except BaseException as e:  # noqa: BLE001 - raised in the consumer
            hand_over((e, None))
        finally:
            hand_over((finished, None))

    futures = [pool.submit(work, item) for item in items]
    remaining = len(items)
    try:
        while remaining:
            error, value = arrived.get()
            if error is finished:
                remaining -= 1
            elif error is not None:
                raise error
            else:
                yield value
    finally:
        stop.set()
        for future in futures:
            future.cancel()


def _s3_client(storage: StorageConfig | None):
    """A botocore S3 client with the same endpoint, region, credentials chain and anonymity as `resolve`'s s3fs."""
    cfg = storage or StorageConfig()
    # one connection per listing thread (botocore keeps 10), so that side-by-side requests do not queue for one
    config = botocore.config.Config(max_pool_connections=max(10, cfg.list_threads))
    if cfg.anon:
        config = config.merge(botocore.config.Config(signature_version=botocore.UNSIGNED))
    session = botocore.session.get_session()
    return session.create_client(
        "s3", endpoint_url=_endpoint_url(cfg) or None, region_name=cfg.region or None, config=config
    )


def _listing_table(rows: list[Row]) -> pa.Table:
    uris, sizes, etags = zip(*rows, strict=True) if rows else ((), (), ())
    return pa.table(
        [pa.array(uris, pa.string()), pa.array(sizes, pa.int64()), pa.array(etags, pa.string())],
        names=["uri", "size", "etag"],
    )


def read_bytes(uri: str, storage: StorageConfig | None = None, *, max_bytes: int | None = None) -> bytes:
    """The object's bytes; `max_bytes` bounds what an HTTP(S) answer may bring (other objects are listed with
    their size, which the caller checks before reading)."""
    if http.is_http(uri):
        return http.get(uri, storage, max_bytes=max_bytes).body
    fs, path = resolve(uri, storage)
    return patiently(lambda: fs.cat_file(path), uri, storage)


def patiently(call: Callable[[], T], uri: str, storage: StorageConfig | None) -> T:
    """`call()`, retried while the endpoint does not answer, for up to `storage.patience_s`; then
    StorageUnavailable naming the endpoint. Answers (not found, access denied) are not retried."""
    cfg = storage or StorageConfig()
    deadline, delay = time.monotonic() + cfg.patience_s, 0.5
    while True:
        try:
            return call()
        except UNREACHABLE as e:
            if time.monotonic() + delay > deadline:
                where = (_endpoint_url(cfg) or "AWS S3") if uri.startswith(S3_PREFIX) else "local storage"
                raise StorageUnavailable(
                    f"{where} did not answer for {cfg.patience_s:g} s (storage.patience_s) reading {uri}: "
                    f"{type(e).__name__}: {e}"
                ) from e
            log.warning("%s did not answer (%s); retrying in %.1f s", uri, type(e).__name__, delay)
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


def write_bytes(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write `data` to `uri`, creating parent folders; never leaves a half-written object behind."""
    fs, path = resolve(uri, storage)
    if uri.startswith(S3_PREFIX):
        patiently(lambda: fs.pipe_file(path, data), uri, storage)  # an S3 PUT is atomic already (and repeatable)
        return
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    partial = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        fs.pipe_file(partial, data)
        os.replace(partial, path)
    finally:
        if fs.exists(partial):
            fs.rm_file(partial)


def write_file(uri: str, local_path: str, storage: StorageConfig | None = None) -> None:
    """Copy the local file `local_path` to `uri` as `write_bytes` writes bytes, without reading it into memory
    (S3: s3fs's multipart upload)."""
    fs, path = resolve(uri, storage)
    if uri.startswith(S3_PREFIX):
        patiently(lambda: fs.put_file(local_path, path), uri, storage)
        return
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    partial = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        shutil.copyfile(local_path, partial)
        os.replace(partial, path)
    finally:
        if fs.exists(partial):
            fs.rm_file(partial)


def create_new(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write `data` to `uri` only if nothing is there (atomically: O_EXCL locally, a conditional PUT on S3);
    raises FileExistsError otherwise. What locks are made of."""
    fs, path = resolve(uri, storage)
    if uri.startswith(S3_PREFIX):
        fs.pipe_file(path, data, mode="create")  # PutObject If-None-Match: * (S3 and moto answer 412 when present)
        return
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def read_versioned(uri: str, storage: StorageConfig | None = None) -> tuple[bytes, str]:
    """`uri`'s content and a version (S3 ETag; inode and mtime locally) for `replace_if_unchanged`."""
    fs, path = resolve(uri, storage)
    if uri.startswith(S3_PREFIX):
        bucket, _, key = path.partition("/")

        def read() -> tuple[bytes, str]:
            # One GetObject: its body and ETag belong together (a stat then a read could straddle a replacement).
            try:
                got = _s3_client(storage).get_object(Bucket=bucket, Key=key)
            except botocore.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    raise FileNotFoundError(uri) from e
                raise
            return got["Body"].read(), got["ETag"]

        return patiently(read, uri, storage)
    with open(path, "rb") as f:
        found = os.fstat(f.fileno())
        return f.read(), f"{found.st_ino}-{found.st_mtime_ns}"


def replace_if_unchanged(uri: str, data: bytes, version: str, storage: StorageConfig | None = None) -> None:
    """Replace `uri` with `data` only if it is still at `version` (`read_versioned`); raises FileExistsError if
    it changed or went. On S3 a PutObject If-Match; locally a check and os.replace under a flock."""
    fs, path = resolve(uri, storage)
    if uri.startswith(S3_PREFIX):
        try:
            fs.pipe_file(path, data, IfMatch=version)
        except (FileNotFoundError, OSError) as e:
            raise FileExistsError(f"{uri} changed since it was read") from e
        return
    # Locally there is no conditional rename, so replacements take turns under an exclusive flock on the folder,
    # and the new file comes in with os.replace: the path is never absent, so a concurrent create_new still fails.
    folder = os.open(posixpath.dirname(path), os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        try:
            found = os.stat(path)
        except FileNotFoundError as e:
            raise FileExistsError(f"{uri} went since it was read") from e
        if f"{found.st_ino}-{found.st_mtime_ns}" != version:
            raise FileExistsError(f"{uri} changed since it was read")
        incoming = f"{path}.{uuid.uuid4().hex}.incoming"
        with open(incoming, "wb") as f:
            f.write(data)
        os.replace(incoming, path)
    finally:
        os.close(folder)  # releases the flock


def remove(uri: str, storage: StorageConfig | None = None) -> None:
    fs, path = resolve(uri, storage)
    patiently(lambda: fs.rm_file(path), uri, storage)


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    fs, path = resolve(uri, storage)
    return fs.exists(path)


def remove_tree(uri: str, storage: StorageConfig | None = None) -> None:
    """Delete everything under `uri` (a folder or prefix); nothing there is fine."""
    fs, path = resolve(uri, storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def makedirs(uri: str, storage: StorageConfig | None = None) -> None:
    fs, path = resolve(uri, storage)
    fs.makedirs(path, exist_ok=True)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with "/" ("s3://b/x" + "y/z.jpg" -> "s3://b/x/y/z.jpg")."""
    pieces = [p.strip("/") for p in parts if p.strip("/")]
    if not pieces:
        return uri
    base = uri.rstrip("/") if uri.rstrip("/") else "/"
    separator = "" if base.endswith("/") else "/"
    return base + separator + "/".join(pieces)


def _s3_path(uri: str) -> str:
    path = uri[len(S3_PREFIX) :].strip("/")
    if not path:
        raise ConfigError(f"an S3 URI needs a bucket: {uri!r} (e.g. s3://my-bucket/collection)")
    return path


def _local_path(uri: str) -> str:
    if uri.startswith(FILE_PREFIX):
        uri = uri[len(FILE_PREFIX) :]  # as fsspec does: no percent-decoding, file names may contain "%"
    elif "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise ConfigError(
            f"unsupported URI scheme '{scheme}://' in {uri}: use a local path, file:// or s3:// "
            "(http(s):// only for reading IIIF manifests and images)"
        )
    return os.path.abspath(os.path.expanduser(uri))


def _to_uri(requested: str, path: str) -> str:
    return S3_PREFIX + path if requested.startswith(S3_PREFIX) else path


def _etag(info: dict) -> str:
    if "ETag" in info:
        return str(info["ETag"]).strip('"')
    return _mtime_etag(float(info["mtime"]))


def _mtime_etag(mtime: float) -> str:
    return str(round(mtime * 1e9))


def _endpoint_url(cfg: StorageConfig) -> str:
    env = os.environ
    return cfg.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or ""
