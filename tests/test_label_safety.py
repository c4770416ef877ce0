"""The label job's data-safety promises: it never deletes, labels each object once, and says what it did.

Each test names the promise it backs (README, Guarantees). Tiny images and an untrained tiny model keep them fast.
"""

from __future__ import annotations

from pathlib import Path

import fsspec.implementations.local
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from test_label import FAST, SMALL, TINY

from artfuse.config import load_config
from artfuse.data.catalog import list_inputs
from artfuse.data.samples import generate_samples
from artfuse.pipelines.bench import save_untrained_package
from artfuse.pipelines.label import label
from artfuse.pipelines.label_output import OutputUnreadable, is_own_file, labelled_inputs


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> str:
    return save_untrained_package(str(tmp_path_factory.mktemp("pkg") / "model"), load_config(None, TINY), {"label": 6})


def rows_by_uri(out: Path) -> dict[str, int]:
    """Rows per uri in the job's own files (a reader of this output skips foreign files the same way)."""
    files = [str(p) for p in out.glob("run_date=*/*.parquet") if is_own_file(p.name)]
    table = pads.dataset(files, format="parquet").to_table(columns=["uri"])
    counts: dict[str, int] = {}
    for uri in table["uri"].to_pylist():
        counts[uri] = counts.get(uri, 0) + 1
    return counts


def manifest_with_a_duplicate_and_a_missing_object(folder: Path) -> tuple[str, list[str]]:
    """A manifest of the sample images that lists one twice and one that does not exist; returns it and its
    distinct uris (the last one is the missing object)."""
    generate_samples(str(folder / "images"), n=8, size_range=SMALL)
    paths = sorted(str(p.relative_to(folder)) for p in (folder / "images").rglob("*") if p.is_file())
    listed = [*paths, paths[0], "images/deleted-last-week.jpg"]
    (folder / "manifest.csv").write_text("path\n" + "\n".join(listed) + "\n")
    return str(folder / "manifest.csv"), [*sorted(str(folder / p) for p in paths), str(folder / listed[-1])]


def test_manifest_duplicates_and_missing_objects_are_listed_once(tmp_path):
    """Holes 2 and 3 at the listing: a path twice is one input (counted); a missing object is an input."""
    manifest, distinct = manifest_with_a_duplicate_and_a_missing_object(tmp_path)
    listed = list_inputs(manifest)
    assert sorted(listed["uri"].to_pylist()) == sorted(distinct)
    assert listed.schema.metadata[b"duplicates"] == b"1"
    missing = listed.filter(pads.field("uri") == str(tmp_path / "images/deleted-last-week.jpg")).to_pylist()
    assert missing == [{"uri": str(tmp_path / "images/deleted-last-week.jpg"), "size": 0, "etag": ""}]


def test_label_keeps_every_file_under_out_and_says_what_it_did(package, tmp_path, ray_local, monkeypatch):
    """Holes 1-3 and the fault 'under --out': a torn file of ours is set aside, a stranger's file left alone, a
    failing read fails the run naming the file; a manifest's duplicate is labelled once and its missing object
    gets an error row; every input ends with one row."""
    manifest, distinct = manifest_with_a_duplicate_and_a_missing_object(tmp_path / "archive")
    out = tmp_path / "predictions"
    cfg = load_config(None, [*TINY, *FAST, "label.rows_per_file=4", "label.batch_size=4", "label.decode_batch_size=4"])

    first = label(package, manifest, str(out), cfg)
    n = len(distinct)
    assert (first["listed"], first["duplicates_ignored"], first["labelled"], first["errors"]) == (n, 1, n - 1, 1)
    assert rows_by_uri(out) == {uri: 1 for uri in distinct}
    rows = pads.dataset(out, format="parquet", partitioning="hive").to_table(columns=["uri", "error"]).to_pylist()
    assert [r["error"] for r in rows if r["uri"] == distinct[-1]][0].startswith("missing")

    ours = sorted(out.rglob("*.parquet"))
    assert len(ours) >= 2 and all(is_own_file(p.name, first["run_id"]) for p in ours)
    torn, unreadable = ours[0], ours[1]
    torn_rows = pq.read_metadata(torn).num_rows
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # a write cut short by a kill
    partition = torn.parent
    stranger = partition / "curator-notes.parquet"
    pq.write_table(pa.table({"uri": ["x"], "note": ["check the frame"]}), stranger)
    not_parquet = partition / "scratch.parquet"
    not_parquet.write_bytes(b"not parquet at all")
    kept = {p: p.read_bytes() for p in (stranger, not_parquet, unreadable)}

    # A read that fails (tests run as root, so the permission error is injected) stops the run: nothing moves.
    real_open = fsspec.implementations.local.LocalFileSystem._open

    def refuse(self, path, *args, **kwargs):
        if str(path) == str(unreadable):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(self, path, *args, **kwargs)

    monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "_open", refuse)
    with pytest.raises(OutputUnreadable, match=str(unreadable)):
        label(package, manifest, str(out), cfg)
    assert torn.exists() and not (out / "_set_aside").exists()
    monkeypatch.undo()

    second = label(package, manifest, str(out), cfg)
    moved = out / "_set_aside" / second["run_id"] / torn.relative_to(out)
    assert second["set_aside"] == [{"file": str(torn), "to": str(moved)}]
    assert moved.exists() and not torn.exists()
    assert sorted(second["foreign_files"]) == sorted([str(stranger), str(not_parquet)])
    assert all(p.read_bytes() == data for p, data in kept.items()), "a file was changed"
    assert (second["skipped"], second["labelled"] + second["errors"]) == (n - torn_rows, torn_rows)
    assert rows_by_uri(out) == {uri: 1 for uri in distinct}


def test_a_foreign_file_is_not_read_as_done(tmp_path):
    """A Parquet file of someone else's with a uri column does not mark those inputs as labelled."""
    out = tmp_path / "out" / "run_date=2026-01-01"
    out.mkdir(parents=True)
    pq.write_table(pa.table({"uri": ["a"], "etag": ["e"], "size": [1]}), out / "theirs.parquet")
    state = labelled_inputs(str(tmp_path / "out"), None, "20260101T000000-00000000")
    assert state.done.num_rows == 0 and state.foreign == [str(out / "theirs.parquet")]
