"""storage: one URI layer over local paths, file:// and s3:// (a real S3 endpoint from moto on 127.0.0.1)."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec.implementations.local
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from artfuse.config import ConfigError, StorageConfig
from artfuse.data import storage


def make_tree(root: Path) -> None:
    for relative, data in {
        "a/one.jpg": b"1",
        "a/deeper/two.JPG": b"22",
        "b/three.png": b"333",
        "notes.txt": b"four",
    }.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)


def test_resolve_local_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for uri in (str(tmp_path / "x"), f"file://{tmp_path}/x", "x", "./x/"):
        fs, path = storage.resolve(uri)
        assert isinstance(fs, fsspec.implementations.local.LocalFileSystem)
        assert path == str(tmp_path / "x")
    assert storage.canonical_uri(f"file://{tmp_path}/a%20b") == f"{tmp_path}/a%20b"  # no percent-decoding


def test_resolve_s3_and_bad_schemes() -> None:
    fs, path = storage.resolve("s3://bucket/some/key.jpg", StorageConfig(endpoint_url="http://127.0.0.1:9"))
    assert fs.protocol[0] == "s3" and path == "bucket/some/key.jpg"
    assert storage.canonical_uri("s3://bucket/prefix/") == "s3://bucket/prefix"
    with pytest.raises(ConfigError, match="needs a bucket"):
        storage.resolve("s3://")
    with pytest.raises(ConfigError, match="unsupported URI scheme 'gs://'"):
        storage.resolve("gs://bucket/x")


def test_storage_options_endpoint_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-env:9000")
    assert storage.storage_options()["endpoint_url"] == "http://from-env:9000"
    configured = StorageConfig(endpoint_url="http://from-config:9000", region="eu-west-3", anon=True)
    options = storage.storage_options(configured)
    assert options["endpoint_url"] == "http://from-config:9000"
    assert options["client_kwargs"] == {"region_name": "eu-west-3"} and options["anon"] is True
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert "endpoint_url" not in storage.storage_options()


def test_join() -> None:
    assert storage.join("s3://bucket", "a", "b.jpg") == "s3://bucket/a/b.jpg"
    assert storage.join("s3://bucket/x/", "/y/", "z") == "s3://bucket/x/y/z"
    assert storage.join("/data/set", "label/img.png") == "/data/set/label/img.png"
    assert storage.join("/", "etc") == "/etc"
    assert storage.join("s3://bucket/x") == "s3://bucket/x"


def test_list_objects_local(tmp_path: Path) -> None:
    make_tree(tmp_path)
    listing = storage.list_objects(str(tmp_path))
    assert listing.schema.names == ["uri", "size", "etag"]
    assert listing.schema.field("size").type == pa.int64()
    files = ("a/one.jpg", "a/deeper/two.JPG", "b/three.png", "notes.txt")
    expected = sorted(str(tmp_path / r) for r in files)
    assert listing.column("uri").to_pylist() == expected
    sizes = dict(zip(listing.column("uri").to_pylist(), listing.column("size").to_pylist(), strict=True))
    assert sizes[str(tmp_path / "b/three.png")] == 3
    images = storage.list_objects(f"file://{tmp_path}", suffixes=(".jpg", ".PNG"))
    assert images.num_rows == 3  # suffixes ignore case
    single = storage.list_objects(str(tmp_path / "b/three.png"))
    assert single.column("uri").to_pylist() == [str(tmp_path / "b/three.png")]


def test_local_etag_follows_the_mtime(tmp_path: Path) -> None:
    target = tmp_path / "img.jpg"
    target.write_bytes(b"x")
    os.utime(target, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    first = storage.list_objects(str(tmp_path)).column("etag")[0].as_py()
    os.utime(target, ns=(1_700_000_001_000_000_000, 1_700_000_001_000_000_000))
    second = storage.list_objects(str(tmp_path)).column("etag")[0].as_py()
    assert first != second
    assert abs(int(second) - 1_700_000_001_000_000_000) < 1_000  # nanoseconds (float mtime, sub-us error)


def test_list_objects_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"not found: {tmp_path}/nothing"):
        storage.list_objects(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    assert storage.list_objects(str(tmp_path / "empty")).num_rows == 0


def test_local_read_write_exists_makedirs(tmp_path: Path) -> None:
    target = storage.join(str(tmp_path), "new", "deep", "blob.bin")
    assert not storage.exists(target)
    storage.write_bytes(target, b"payload")
    assert storage.exists(target) and storage.read_bytes(target) == b"payload"
    storage.write_bytes(target, b"replaced")
    assert storage.read_bytes(target) == b"replaced"
    assert [p.name for p in (tmp_path / "new" / "deep").iterdir()] == ["blob.bin"]  # no partial files left
    storage.makedirs(str(tmp_path / "made" / "here"))
    assert (tmp_path / "made" / "here").is_dir()
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "absent"))


def test_arrow_filesystem_local(tmp_path: Path) -> None:
    fs, path = storage.arrow_filesystem(f"file://{tmp_path}/t.parquet")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/t.parquet"


def test_s3_round_trip_and_listing(s3_bucket: str) -> None:
    base = f"s3://{s3_bucket}/collection"
    contents = {"a/one.jpg": b"1", "a/deeper/two.jpg": b"22", "b/three.png": b"333"}
    for relative, data in contents.items():
        storage.write_bytes(storage.join(base, relative), data)
    storage.write_bytes(f"s3://{s3_bucket}/elsewhere.jpg", b"not listed under the prefix")
    assert storage.exists(f"{base}/a/one.jpg") and not storage.exists(f"{base}/a/none.jpg")
    assert storage.read_bytes(f"{base}/b/three.png") == b"333"
    listing = storage.list_objects(base + "/")
    assert listing.column("uri").to_pylist() == sorted(f"{base}/{r}" for r in contents)
    by_uri = {row["uri"]: row for row in listing.to_pylist()}
    for relative, data in contents.items():
        row = by_uri[f"{base}/{relative}"]
        assert row["size"] == len(data)
        assert row["etag"] == hashlib.md5(data).hexdigest()  # a single-part upload's ETag, unquoted
    assert storage.list_objects(base, suffixes=(".png",)).num_rows == 1
    assert storage.list_objects(f"{base}/b/three.png").column("uri").to_pylist() == [f"{base}/b/three.png"]


def test_s3_listing_sees_new_objects(s3_bucket: str) -> None:
    base = f"s3://{s3_bucket}/nightly"
    storage.write_bytes(f"{base}/first.jpg", b"1")
    assert storage.list_objects(base).num_rows == 1
    storage.write_bytes(f"{base}/second.jpg", b"2")  # a new object between two runs in one process
    assert storage.list_objects(base).num_rows == 2


def test_s3_missing_paths(s3_bucket: str) -> None:
    with pytest.raises(ConfigError, match=f"not found: s3://{s3_bucket}/nothing"):
        storage.list_objects(f"s3://{s3_bucket}/nothing")
    with pytest.raises(ConfigError, match="not found"):
        storage.list_objects("s3://no-such-bucket-anywhere/x")


def test_arrow_filesystem_s3_reaches_the_same_objects(s3_bucket: str) -> None:
    fs, path = storage.arrow_filesystem(f"s3://{s3_bucket}/tables/t.parquet")
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{s3_bucket}/tables/t.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), path, filesystem=fs)
    raw = storage.read_bytes(f"s3://{s3_bucket}/tables/t.parquet")
    assert pq.read_table(pa.BufferReader(raw)).column("x").to_pylist() == [1, 2, 3]


def test_s3_listing_is_one_request_not_one_per_object(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import botocore.client

    fs, _ = storage.resolve(f"s3://{s3_bucket}")
    fs.pipe({f"{s3_bucket}/many/{i % 3}/{i}.jpg": b"x" for i in range(30)})
    requests = []
    send = botocore.client.BaseClient._make_api_call

    def counted(self, operation, params):
        requests.append(operation)
        return send(self, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", counted)
    assert storage.list_objects(f"s3://{s3_bucket}/many", StorageConfig(list_threads=1)).num_rows == 30
    assert requests == ["ListObjectsV2"]  # one page here; 100k objects are 100 pages, never 100k HEADs
    requests.clear()
    assert storage.list_objects(f"s3://{s3_bucket}/many").num_rows == 30
    assert requests == ["ListObjectsV2"] * 4  # side by side: the prefix, then its 3 common prefixes


@pytest.fixture(scope="module")
def tree_on_s3(s3_server: str) -> tuple[str, list[str]]:
    """A bucket holding a prefix of two S3 pages (1,000 keys a page), objects beside folders at every
    level, an empty prefix (only a folder marker), a tree deeper than a listing looks, and a file named like a
    folder's neighbour; returns the bucket and its keys."""
    import boto3

    bucket = f"tree-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=bucket)
    keys = [f"arc/big/{i:05d}.jpg" for i in range(1234)]
    keys += [f"arc/big/sub/{i}.jpg" for i in range(3)]
    keys += ["arc/direct.jpg", "arc/big.jpg", "arc/big-x/1.jpg", "arc/empty/", "arc/small/a/1.jpg", "arc/small/2.png"]
    keys += ["arc/deep/a/b/c/d/e/f/g.jpg", "arc/deep/a/b/c/d/h.jpg", "arc/deep/a/i.jpg", "elsewhere/not-listed.jpg"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=bucket, Key=key, Body=key.encode()), keys))
    return bucket, keys


@pytest.mark.parametrize(("threads", "per_thread"), [(16, 4), (2, 1), (3, 2)])
def test_concurrent_s3_listing_equals_a_flat_one(tree_on_s3, threads, per_thread, monkeypatch) -> None:
    """Prefixes listed side by side give exactly the flat listing, page boundaries and empty prefixes included. Each
    parameter pair takes another path: prefixes found a level at a time down to the deepest (16 threads look for 64
    prefixes, more than there are), or listed flat (with their pages) after one level or two."""
    bucket, keys = tree_on_s3
    monkeypatch.setattr(storage, "S3_PREFIXES_PER_THREAD", per_thread)
    expected = sorted(f"s3://{bucket}/{k}" for k in keys if k.startswith("arc/") and not k.endswith("/"))
    runs = list(storage.iter_objects(f"s3://{bucket}/arc", StorageConfig(list_threads=threads)))
    assert max(run.num_rows for run in runs) <= storage.LISTING_BATCH
    side_by_side = pa.concat_tables(runs).sort_by("uri")
    assert side_by_side["uri"].to_pylist() == expected
    assert side_by_side.equals(flat_listing(f"s3://{bucket}/arc"))
    for uri in (f"s3://{bucket}/arc/big/00007.jpg", f"s3://{bucket}/arc/empty"):  # one object; a marker alone
        assert storage.list_objects(uri, StorageConfig(list_threads=threads)).equals(flat_listing(uri)), uri


@functools.cache
def flat_listing(uri: str) -> pa.Table:
    return storage.list_objects(uri, StorageConfig(list_threads=1))


def test_a_long_listing_logs_its_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    for folder in range(3):
        (tmp_path / str(folder)).mkdir()
        for i in range(5):
            (tmp_path / str(folder) / f"{i}.jpg").write_bytes(b"x")
    monkeypatch.setattr(storage, "LISTING_BATCH", 4)
    monkeypatch.setattr(storage, "LISTING_PROGRESS_S", -1.0)  # every object is "a while later"
    with caplog.at_level(logging.INFO, logger="artfuse.data.storage"):
        listing = storage.list_objects(str(tmp_path))
    assert listing.num_rows == 15 and listing["uri"].to_pylist() == sorted(listing["uri"].to_pylist())
    progress = [r.getMessage() for r in caplog.records if "objects so far" in r.getMessage()]
    assert len(progress) == 4 and progress[-1].endswith("15 objects so far")  # a line per batch of 4
    assert re.fullmatch(rf"listed {re.escape(str(tmp_path))}: 15 objects in \d+ s", caplog.records[-1].getMessage())
