"""The label job's anti-join against its output, a batch of the listing at a time: exactly the new objects."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from artfuse.data import storage
from artfuse.data.catalog import list_inputs
from artfuse.pipelines import label, label_output
from artfuse.pipelines.label import inputs_not_done
from artfuse.pipelines.label_output import KEY, labelled_inputs

RUN = "20260101T000000-0123abcd"


def archive(root: Path, prefixes: dict[str, int]) -> None:
    for prefix, n in prefixes.items():
        for i in range(n):
            path = root / prefix / f"{i:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"{prefix}-{i}".encode())


def write_output(out: Path, done: pa.Table, rows_per_file: int, seed: int) -> None:
    """Earlier nights' rows as the job and others leave them: most files of neighbouring uris, one of rows from all
    over the archive, one without Parquet statistics (read whole), and a torn file of ours."""
    rows = done.to_pylist()
    random.Random(seed).shuffle(rows)
    scattered, rest = rows[:rows_per_file], sorted(rows[rows_per_file:], key=lambda row: row["uri"])
    unstated, rest = rest[-rows_per_file:], rest[:-rows_per_file]
    night = out / "run_date=2026-01-01"
    night.mkdir(parents=True)
    files = [scattered, unstated] + [rest[i : i + rows_per_file] for i in range(0, len(rest), rows_per_file)]
    for n, part in enumerate(files):
        k = len(part)
        table = pa.table(
            {
                "uri": [row["uri"] for row in part],
                "size": pa.array([row["size"] for row in part], pa.int64()),
                "etag": [row["etag"] for row in part],
                "model_id": ["m"] * k,
                "run_id": ["earlier"] * k,
                "labelled_at": pa.array([datetime.now(UTC)] * k, pa.timestamp("us", tz="UTC")),
                "error": pa.nulls(k, pa.string()),
            }
        )
        pq.write_table(table, night / f"artfuse-{RUN}_{n:03d}_0-0.parquet", write_statistics=n != 1)
    (night / f"artfuse-{RUN}_999_0-0.parquet").write_bytes(b"PAR1 cut short")


@pytest.mark.parametrize(("listing_batch", "anti_join_rows", "cached_rows"), [(7, 5, 10), (1000, 100_000, 500_000)])
def test_the_anti_join_a_batch_at_a_time_finds_exactly_the_new_objects(
    tmp_path, monkeypatch, listing_batch, anti_join_rows, cached_rows
):
    """Prefixes with no new object, new objects beside old ones, a whole new prefix, an object changed since it was
    labelled, output files of any layout: what is left is the listing less the output's keys, no more, no less, at
    batch sizes that split prefixes and evict the cache, and at the defaults."""
    monkeypatch.setattr(storage, "LISTING_BATCH", listing_batch)
    monkeypatch.setattr(label, "ANTI_JOIN_ROWS", anti_join_rows)
    monkeypatch.setattr(label_output, "CACHED_ROWS", cached_rows)
    root, out = tmp_path / "archive", tmp_path / "out"
    archive(root, {"a": 30, "b/deep": 25, "c": 12, "d": 1})
    done = list_inputs(str(root)).select(KEY)
    write_output(out, done, rows_per_file=6, seed=listing_batch)
    (root / "c" / "0003.jpg").write_bytes(b"changed since")  # same uri, new size and etag: labelled again
    archive(root, {"b/new": 4, "new-prefix/x": 9})
    (root / "a" / "0030.jpg").write_bytes(b"a new one beside the old")
    listed = list_inputs(str(root))
    expected = listed.join(done, keys=KEY, join_type="left anti").sort_by("uri")

    output = labelled_inputs(str(out), None)
    todo, n_listed, duplicates, _ = inputs_not_done(str(root), output, None, 224)
    assert (n_listed, duplicates) == (listed.num_rows, 0)
    assert todo.equals(expected)
    new = {str(root / "c/0003.jpg"), str(root / "a/0030.jpg")}
    new |= {str(p) for p in (root / "b/new").rglob("*.jpg")} | {str(p) for p in (root / "new-prefix").rglob("*.jpg")}
    assert set(todo["uri"].to_pylist()) == new and todo.num_rows == 15
    assert [path for path, _ in output.torn] == [str(out / "run_date=2026-01-01" / f"artfuse-{RUN}_999_0-0.parquet")]
    assert output.resident.num_rows == 6  # the file without statistics
