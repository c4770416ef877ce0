"""S3 Inventory as an input: AWS's manifest.json + CSV / Parquet / ORC data files, built here by hand as S3 writes
them, read without listing the bucket; and a night labelled from one on the local S3 server."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.orc as paorc
import pyarrow.parquet as pq
import pytest

from artfuse.bench.label import save_untrained_package, synthetic_jpegs
from artfuse.config import ConfigError, load_config
from artfuse.data import storage
from artfuse.data.catalog import list_inputs
from artfuse.data.inventory import read_inventory, write_inventory
from artfuse.pipelines.label import label, read_output

TINY = ["model.img_size=64", "model.d_model=32", "model.depth=1", "model.pretrained=none"]
FAST = ["label.batch_size=16", "label.decode_batch_size=8", "label.rows_per_file=16", "label.actor_memory_mb=256"]
CSV_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass"
# (key as stored, is_latest, is_delete_marker, size, etag): a versioned bucket's inventory
ROWS = [
    ("scans/1907/les demoiselles+1.jpg", True, False, 1200, "aa11"),
    ("scans/1907/étude.jpg", True, False, 900, "bb22"),
    ("scans/1907/étude.jpg", False, False, 800, "old0"),  # an older version
    ("scans/1889/gone.jpg", True, True, None, None),  # deleted: its latest version is a delete marker
    ("scans/1889/", True, False, 0, "d41d"),  # a folder marker
    ("scans/.thumbs/x.jpg", True, False, 50, "cc33"),  # hidden
    ("scans/notes.json", True, False, 10, "dd44"),  # not an image
]
EXPECTED = {
    "s3://museum/scans/1907/les demoiselles+1.jpg": (1200, "aa11"),
    "s3://museum/scans/1907/étude.jpg": (900, "bb22"),
}


def aws_data_file(fmt: str) -> bytes:
    """The ROWS as S3 writes an inventory data file: gzipped header-less CSV with URL-encoded keys, or Parquet / ORC
    with snake_case columns."""
    if fmt == "CSV":
        from urllib.parse import quote_plus

        lines = []
        for key, latest, deleted, size, etag in ROWS:
            size = "" if size is None else str(size)
            fields = ["museum", quote_plus(key), "v1", str(latest).lower(), str(deleted).lower(), size,
                      "2026-11-30T01:02:03.000Z", etag or "", "STANDARD"]  # fmt: skip
            lines.append(",".join(f'"{f}"' for f in fields))
        return gzip.compress(("\n".join(lines) + "\n").encode())
    table = pa.table(
        {
            "bucket": ["museum"] * len(ROWS),
            "key": [r[0] for r in ROWS],
            "version_id": ["v1"] * len(ROWS),
            "is_latest": [r[1] for r in ROWS],
            "is_delete_marker": [r[2] for r in ROWS],
            "size": pa.array([r[3] for r in ROWS], pa.int64()),
            "last_modified_date": pa.array([0] * len(ROWS), pa.timestamp("ms")),
            "e_tag": [r[4] for r in ROWS],
            "storage_class": ["STANDARD"] * len(ROWS),
        }
    )
    sink = io.BytesIO()
    (pq.write_table if fmt == "Parquet" else paorc.write_table)(table, sink)
    return sink.getvalue()


def publish(root: str, fmt: str, data: bytes, checksum: str | None = None) -> str:
    """AWS's layout under `root` (a local folder or s3://bucket/prefix): config-ID/data/<file> and
    config-ID/<timestamp>/manifest.json; returns the manifest's URI."""
    folder = storage.join(root, "museum", "daily")
    name = "data/5f1c.csv.gz" if fmt == "CSV" else f"data/5f1c.{fmt.lower()}"
    storage.write_bytes(storage.join(folder, name), data)
    prefix = root[len("s3://") :].split("/", 1)[1] + "/" if root.startswith("s3://") else "inventories/"
    manifest = {
        "sourceBucket": "museum",
        "destinationBucket": "arn:aws:s3:::"
        + (root[len("s3://") :].split("/")[0] if root.startswith("s3://") else "x"),
        "version": "2016-11-30",
        "creationTimestamp": "1764464523000",
        "fileFormat": fmt,
        "fileSchema": CSV_SCHEMA if fmt == "CSV" else "message s3.inventory { ... }",
        "files": [
            {
                "key": f"{prefix}museum/daily/{name}",
                "size": len(data),
                "MD5checksum": checksum or hashlib.md5(data).hexdigest(),
            }
        ],  # fmt: skip
    }
    uri = storage.join(folder, "2026-11-30T01-00Z", "manifest.json")
    storage.write_bytes(uri, json.dumps(manifest).encode())
    return uri


@pytest.mark.parametrize("fmt", ["CSV", "Parquet", "ORC"])
def test_inventory_lists_the_current_images_it_names(tmp_path, fmt):
    manifest = publish(str(tmp_path / "inventories"), fmt, aws_data_file(fmt))
    inputs = list_inputs(manifest)
    assert {u: (s, e) for u, s, e in zip(*(inputs[c].to_pylist() for c in ("uri", "size", "etag")), strict=True)} == (
        EXPECTED
    )
    # the whole inventory, before the input filter: current objects, no folder marker, delete marker or old version
    assert read_inventory(manifest).num_rows == 4


def test_a_damaged_or_incomplete_inventory_is_refused(tmp_path):
    data = aws_data_file("CSV")
    manifest = publish(str(tmp_path / "a"), "CSV", data, checksum="0" * 32)
    with pytest.raises(ConfigError, match="MD5checksum"):
        list_inputs(manifest)
    manifest = publish(str(tmp_path / "b"), "CSV", data)
    Path(storage.canonical_uri(manifest)).parent.parent.joinpath("data", "5f1c.csv.gz").unlink()
    with pytest.raises(ConfigError, match="not found"):
        list_inputs(manifest)
    with pytest.raises(ConfigError, match="not found"):
        list_inputs(str(tmp_path / "nowhere" / "manifest.json"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({"sourceBucket": "x", "fileFormat": "XML", "files": []}))
    with pytest.raises(ConfigError, match="fileFormat"):
        list_inputs(str(tmp_path / "c" / "manifest.json"))


@pytest.mark.parametrize("fmt", ["CSV", "Parquet", "ORC"])
def test_write_inventory_reads_back(tmp_path, fmt):
    objects = pa.table(
        {
            "uri": ["s3://b/a b/c+d.jpg", "s3://b/x/é%20.jpg"],
            "size": pa.array([1, 2], pa.int64()),
            "etag": ["e1", "e2"],
        }
    )
    manifest = write_inventory(objects, str(tmp_path / "inv"), fmt=fmt, rows_per_file=1)
    assert read_inventory(manifest).to_pylist() == objects.to_pylist()
    assert len(json.loads(Path(manifest).read_text())["files"]) == 2


def test_a_night_from_an_inventory_on_s3_labels_exactly_the_new_objects(s3_bucket, ray_local):
    """Night one labels what the inventory lists; night two's inventory adds three objects: only they get rows."""
    cfg = load_config(None, [*TINY, *FAST])
    model, out = f"s3://{s3_bucket}/models/tiny", f"s3://{s3_bucket}/labels"
    save_untrained_package(model, cfg, {"label": 3})
    jpegs = synthetic_jpegs(3, 48, 32)
    uris = [f"s3://{s3_bucket}/archive/{i // 4}/{i:03d}.jpg" for i in range(9)]
    for i, uri in enumerate(uris):
        storage.write_bytes(uri, jpegs[i % 3])
    listed = list_inputs(f"s3://{s3_bucket}/archive")  # the ETags S3 gives these objects
    storage.write_bytes(f"s3://{s3_bucket}/archive/9/late.jpg", jpegs[0])  # after the inventory: not labelled tonight

    first = label(model, write_inventory(listed.slice(0, 6), f"s3://{s3_bucket}/inv1", fmt="CSV"), out, cfg)
    assert (first["listed"], first["labelled"] + first["errors"]) == (6, 6)
    second = label(model, write_inventory(listed, f"s3://{s3_bucket}/inv2", fmt="Parquet"), out, cfg)
    assert (second["listed"], second["skipped"], second["labelled"], second["errors"]) == (9, 6, 3, 0)
    fs, root = storage.arrow_filesystem(out)
    rows = read_output(fs, root, ["uri", "run_id"])
    assert rows.num_rows == 9 and sorted(rows["uri"].to_pylist()) == sorted(uris)
    tonight = rows.filter(pa.compute.equal(rows["run_id"], second["run_id"]))
    assert sorted(tonight["uri"].to_pylist()) == uris[6:]
