"""S3 Inventory as an input: an inventory's manifest.json (AWS's format) -> (uri, size, etag) of the objects it lists.

Archives of millions of objects publish an inventory daily so that nobody has to list the bucket. The manifest
names the source bucket, the data files' format (`fileFormat`: CSV, Parquet or ORC), for CSV the columns
(`fileSchema`, the data files have no header), and the data files (`files`: key in the destination bucket, size,
MD5checksum). Columns used: Bucket, Key, Size, ETag, and IsLatest / IsDeleteMarker when the inventory lists
versions (Parquet and ORC spell them bucket, key, size, e_tag, is_latest, is_delete_marker). Keys are
URL-encoded in CSV files only.

A manifest on S3 reads its data files from its destination bucket; a copy on local disk keeps AWS's layout
(`<config-ID>/<timestamp>/manifest.json` beside `<config-ID>/data/<file>`). Every data file's MD5 is checked:
a half-copied inventory must not silently drop objects from a night.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import posixpath
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from urllib.parse import quote_plus, unquote_plus

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.orc as paorc
import pyarrow.parquet as pq

from artfuse.config import ConfigError, StorageConfig
from artfuse.data import storage as st

MANIFEST_NAME = "manifest.json"
FORMATS = ("CSV", "Parquet", "ORC")
READ_THREADS = 8  # data files are fetched side by side (an inventory of 10M objects is tens of files)
CSV_SCHEMA = "Bucket, Key, Size, LastModifiedDate, ETag"  # what `write_inventory` writes
ARN_PREFIX = "arn:aws:s3:::"
_EMPTY = pa.table(
    {"uri": pa.array([], pa.string()), "size": pa.array([], pa.int64()), "etag": pa.array([], pa.string())}
)


def is_inventory(uri: str, storage: StorageConfig | None = None) -> bool:
    """A manifest.json on storage whose JSON names a sourceBucket and a fileFormat (a IIIF manifest may have the
    same name, so the content decides)."""
    if posixpath.basename(uri.rstrip("/")) != MANIFEST_NAME or (
        "://" in uri and not uri.startswith(("s3://", "file://"))
    ):
        return False
    try:
        manifest = json.loads(st.read_bytes(uri, storage))
    except (FileNotFoundError, ValueError):
        return False
    return isinstance(manifest, dict) and "sourceBucket" in manifest and "fileFormat" in manifest


def read_inventory(uri: str, storage: StorageConfig | None = None) -> pa.Table:
    """(uri, size, etag) of every current object the inventory at `uri` (a manifest.json) lists, sorted by uri.

    Delete markers, older versions and folder markers (keys ending in "/") are left out.
    """
    return pa.concat_tables([_EMPTY, *iter_inventory(uri, storage)]).sort_by("uri")


def iter_inventory(uri: str, storage: StorageConfig | None = None) -> Iterator[pa.Table]:
    """`read_inventory` a data file at a time (each sorted by uri), READ_THREADS read ahead: an inventory of tens of
    millions of objects never sits whole in memory."""
    manifest = _read_manifest(uri, storage)
    fmt = manifest["fileFormat"]
    data_uris = [_data_file_uri(uri, manifest, f["key"]) for f in manifest["files"]]

    def read(item: tuple[str, dict]) -> pa.Table:
        data_uri, entry = item
        try:
            raw = st.read_bytes(data_uri, storage)
        except FileNotFoundError:
            raise ConfigError(f"inventory data file {data_uri} (listed in {uri}) not found") from None
        checksum = entry.get("MD5checksum")
        if checksum and hashlib.md5(raw).hexdigest() != checksum:
            raise ConfigError(f"inventory data file {data_uri} does not match its MD5checksum in {uri}: copy it again")
        return _objects(_read_data_file(raw, fmt, manifest.get("fileSchema", ""), data_uri), fmt).sort_by("uri")

    with ThreadPoolExecutor(READ_THREADS) as pool:
        ahead: deque[Future] = deque()
        for item in zip(data_uris, manifest["files"], strict=True):
            ahead.append(pool.submit(read, item))
            if len(ahead) > READ_THREADS:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _read_manifest(uri: str, storage: StorageConfig | None) -> dict:
    try:
        manifest = json.loads(st.read_bytes(uri, storage))
    except FileNotFoundError:
        raise ConfigError(f"inventory manifest not found: {uri}") from None
    except ValueError as e:
        raise ConfigError(f"inventory manifest {uri} is not JSON: {e}") from None
    missing = [k for k in ("sourceBucket", "fileFormat", "files") if k not in manifest]
    if missing:
        raise ConfigError(f"{uri} is not an S3 Inventory manifest: it lacks {', '.join(missing)}")
    fmt = next((f for f in FORMATS if f.lower() == str(manifest["fileFormat"]).lower()), None)
    if fmt is None:
        raise ConfigError(f"inventory {uri} has fileFormat {manifest['fileFormat']!r}; expected one of {FORMATS}")
    if fmt == "CSV" and not manifest.get("fileSchema"):
        raise ConfigError(f"CSV inventory {uri} has no fileSchema naming its columns")
    return manifest | {"fileFormat": fmt}


def _data_file_uri(manifest_uri: str, manifest: dict, key: str) -> str:
    if manifest_uri.startswith(st.S3_PREFIX):
        bucket = (
            manifest.get("destinationBucket", "").removeprefix(ARN_PREFIX)
            or st.canonical_uri(manifest_uri)[len(st.S3_PREFIX) :].split("/", 1)[0]
        )
        return f"{st.S3_PREFIX}{bucket}/{key}"
    config_folder = posixpath.dirname(posixpath.dirname(st.canonical_uri(manifest_uri)))
    return posixpath.join(config_folder, "data", posixpath.basename(key))


def _read_data_file(raw: bytes, fmt: str, file_schema: str, data_uri: str) -> pa.Table:
    try:
        if fmt == "CSV":
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            names = [name.strip() for name in file_schema.split(",")]
            return pacsv.read_csv(
                pa.BufferReader(raw),
                read_options=pacsv.ReadOptions(column_names=names),
                convert_options=pacsv.ConvertOptions(column_types={name: pa.string() for name in names}),
            )
        if fmt == "Parquet":
            return pq.read_table(pa.BufferReader(raw))
        return paorc.ORCFile(pa.BufferReader(raw)).read()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise ConfigError(f"inventory data file {data_uri} cannot be read as {fmt}: {e}") from None


def _objects(table: pa.Table, fmt: str) -> pa.Table:
    """The data file's rows -> (uri, size, etag) of current objects."""
    columns = {name.lower().replace("_", ""): table.column(name) for name in table.column_names}
    for needed in ("bucket", "key", "size", "etag"):
        if needed not in columns:
            raise ConfigError(f"an S3 Inventory used as input needs the {needed} field; this one has "
                              f"{', '.join(table.column_names)}: add it to the inventory configuration")  # fmt: skip
    keys = pc.cast(columns["key"], pa.string())
    if fmt == "CSV":
        keys = pa.array([unquote_plus(key) for key in keys.to_pylist()], pa.string())
    keep = pc.invert(pc.ends_with(keys, "/"))
    if "islatest" in columns:
        keep = pc.and_(keep, _truthy(columns["islatest"]))
    if "isdeletemarker" in columns:
        keep = pc.and_(keep, pc.invert(_truthy(columns["isdeletemarker"])))
    rows = pa.table({"bucket": pc.cast(columns["bucket"], pa.string()), "key": keys, "size": columns["size"],
                     "etag": pc.cast(columns["etag"], pa.string())}).filter(pc.fill_null(keep, False))  # fmt: skip
    bucket_key = pc.binary_join_element_wise(rows["bucket"], rows["key"], "/")
    return pa.table(
        {
            "uri": pc.binary_join_element_wise(st.S3_PREFIX, bucket_key, ""),
            "size": pc.cast(rows["size"], pa.int64()),
            "etag": pc.utf8_trim(rows["etag"], '"'),
        }
    )


def _truthy(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_boolean(column.type):
        return column
    return pc.equal(pc.utf8_lower(pc.cast(column, pa.string())), "true")


def write_inventory(
    objects: pa.Table,
    destination: str,
    *,
    fmt: str = "CSV",
    config_id: str = "artfuse",
    rows_per_file: int = 500_000,
    storage: StorageConfig | None = None,
) -> str:
    """Write an inventory of `objects` (uri, size, etag; s3:// URIs of one bucket) under `destination` in AWS's
    layout and `fmt`; returns the manifest's URI. The bench uses it to stand in for the one S3 publishes."""
    if fmt not in FORMATS:
        raise ConfigError(f"inventory format {fmt!r}: expected one of {FORMATS}")
    buckets_keys = [u[len(st.S3_PREFIX) :].split("/", 1) for u in objects["uri"].to_pylist()]
    buckets = {bucket for bucket, _ in buckets_keys}
    if len(buckets) > 1 or not all(u.startswith(st.S3_PREFIX) for u in objects["uri"].to_pylist()):
        raise ConfigError("an S3 Inventory lists the objects of one S3 bucket")
    source = buckets.pop() if buckets else "bucket"
    stamp = datetime.now(UTC)
    folder = st.join(destination, source, config_id)
    destination_key = destination[len(st.S3_PREFIX) :].split("/", 1) if destination.startswith(st.S3_PREFIX) else []
    files = []
    for start in range(0, max(objects.num_rows, 1), rows_per_file):
        part = slice(start, start + rows_per_file)
        bk = buckets_keys[part]
        sizes, etags = objects["size"].to_pylist()[part], objects["etag"].to_pylist()[part]
        name = f"data/{uuid.uuid4()}" + {"CSV": ".csv.gz", "Parquet": ".parquet", "ORC": ".orc"}[fmt]
        raw = _encode(fmt, bk, sizes, etags, stamp)
        st.write_bytes(st.join(folder, name), raw, storage)
        key = "/".join([*destination_key[1:], source, config_id, name])
        files.append({"key": key, "size": len(raw), "MD5checksum": hashlib.md5(raw).hexdigest()})
    manifest = {
        "sourceBucket": source,
        "destinationBucket": ARN_PREFIX + (destination_key[0] if destination_key else "local"),
        "version": "2016-11-30",
        "creationTimestamp": str(int(stamp.timestamp() * 1000)),
        "fileFormat": fmt,
        "fileSchema": CSV_SCHEMA if fmt == "CSV" else _columnar_schema(fmt),
        "files": files,
    }
    uri = st.join(folder, f"{stamp:%Y-%m-%dT%H-%MZ}", MANIFEST_NAME)
    st.write_bytes(uri, json.dumps(manifest, indent=1).encode(), storage)
    return uri


def _encode(fmt: str, buckets_keys: list[list[str]], sizes: list[int], etags: list[str], stamp: datetime) -> bytes:
    if fmt == "CSV":
        text = io.StringIO()
        modified = f"{stamp:%Y-%m-%dT%H:%M:%S.000Z}"
        for (bucket, key), size, etag in zip(buckets_keys, sizes, etags, strict=True):
            text.write(f'"{bucket}","{quote_plus(key, safe="/")}","{size}","{modified}","{etag}"\n')
        return gzip.compress(text.getvalue().encode(), compresslevel=1)
    table = pa.table(
        {
            "bucket": pa.array([b for b, _ in buckets_keys], pa.string()),
            "key": pa.array([k for _, k in buckets_keys], pa.string()),
            "size": pa.array(sizes, pa.int64()),
            "last_modified_date": pa.array([stamp] * len(sizes), pa.timestamp("ms", tz="UTC")),
            "e_tag": pa.array(etags, pa.string()),
        }
    )
    sink = io.BytesIO()
    if fmt == "Parquet":
        pq.write_table(table, sink)
    else:
        paorc.write_table(table, sink)
    return sink.getvalue()


def _columnar_schema(fmt: str) -> str:
    if fmt == "Parquet":
        return (
            "message s3.inventory { required binary bucket (UTF8); required binary key (UTF8); optional int64 size; "
            "optional int64 last_modified_date (TIMESTAMP_MILLIS); optional binary e_tag (UTF8); }"
        )
    return "struct<bucket:string,key:string,size:bigint,last_modified_date:timestamp,e_tag:string>"
