"""The label job's data-safety promises: it never deletes, labels each object once, and says what it did.

Each test names the promise it backs (README, Guarantees). Tiny images and an untrained tiny model keep them fast.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import fsspec.implementations.local
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from test_label import FAST, SMALL, TINY

from artfuse.bench.label import save_untrained_package
from artfuse.config import ConfigError, load_config
from artfuse.data import storage
from artfuse.data.catalog import list_inputs
from artfuse.data.prediction_files import is_own_file
from artfuse.data.samples import generate_samples
from artfuse.pipelines.evaluate import evaluate
from artfuse.pipelines.label import label
from artfuse.pipelines.label_output import (
    LOCK,
    OutputLocked,
    OutputUnreadable,
    labelled_inputs,
    output_lock,
)


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
    state = labelled_inputs(str(tmp_path / "out"), None)
    inputs = pa.table({"uri": ["a"], "etag": ["e"], "size": [1]})
    assert state.not_done(inputs).equals(inputs) and state.foreign == [str(out / "theirs.parquet")]


def held_by_a_dead_run(out: str) -> str:
    """A lock as a killed run leaves it; returns that run's id."""
    dead = "20260101T000000-deadbeef"
    storage.create_new(storage.join(out, LOCK), json.dumps({"run_id": dead, "host": "gone", "pid": 1}).encode())
    return dead


@pytest.mark.parametrize("where", ["local", "s3"])
def test_one_run_per_output_and_a_safe_takeover_of_a_dead_runs_lock(where, tmp_path, request):
    """Hole 4: the lock is atomic on the output's storage; a second run fails naming it and its holder; only a run
    told the dead run's id takes over, and of two such runs at once exactly one wins."""
    out = str(tmp_path / "out") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/out"
    with output_lock(out, None, "20260102T000000-aaaaaaaa") as taken_over:
        assert taken_over == {}
        with pytest.raises(OutputLocked, match=rf"run 20260102T000000-aaaaaaaa .*{LOCK}.*label.break_lock="):
            with output_lock(out, None, "20260102T000000-bbbbbbbb"):
                pass
    assert not storage.exists(storage.join(out, LOCK)), "a finished run releases its lock"

    dead = held_by_a_dead_run(out)
    with pytest.raises(OutputLocked, match=dead):
        with output_lock(out, None, "20260102T000000-cccccccc", break_lock="20991231T000000-00000000"):
            pass
    barrier, won, refused = threading.Barrier(2), [], threading.Event()

    def take_over(run_id: str) -> None:
        barrier.wait()
        try:
            with output_lock(out, None, run_id, break_lock=dead) as taken_over:
                won.append((run_id, taken_over["run_id"]))
                refused.wait(timeout=30)  # hold it until the other has been refused (both winning: no wait forever)
        except OutputLocked:
            refused.set()

    runs = [threading.Thread(target=take_over, args=(f"20260102T000000-{c * 8}",)) for c in "de"]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert len(won) == 1 and won[0][1] == dead
    assert not storage.exists(storage.join(out, LOCK))


def test_label_refuses_an_output_another_run_holds(package, tmp_path):
    collection, out = tmp_path / "archive", str(tmp_path / "predictions")
    generate_samples(str(collection), n=6, size_range=SMALL)
    dead = held_by_a_dead_run(out)
    with pytest.raises(OutputLocked, match=dead):
        label(package, str(collection), out, load_config(None, TINY))
    assert json.loads(storage.read_bytes(storage.join(out, LOCK)))["run_id"] == dead, "not this run's to remove"


def test_run_date_must_be_a_date():
    """Hole 6: run_date names a folder under --out; anything but YYYY-MM-DD is refused (../x would escape)."""
    assert load_config(None, ["label.run_date=2026-01-02"]).label.run_date == "2026-01-02"
    for bad in ("../x", "2026-01-02/../../elsewhere", "2026-1-2", "2026-02-30", "today"):
        with pytest.raises(ConfigError, match="label.run_date must be a date, YYYY-MM-DD"):
            load_config(None, [f"label.run_date={bad}"])


def test_an_input_that_lists_nothing_fails_naming_it(package, tmp_path):
    """Hole 7: an empty folder, or a file that is no manifest, fails loudly (exit 2). A night with nothing new
    stays a success: test_label.py::test_every_input_gets_one_row_and_reruns_label_only_new_objects."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "inputs.txt").write_text("a.jpg\n")
    (tmp_path / "inputs.json").write_text('["a.jpg"]')  # read as IIIF, which refuses it by name
    for input_uri in (tmp_path / "empty", tmp_path / "inputs.txt", tmp_path / "inputs.json"):
        with pytest.raises(ConfigError, match=re.escape(str(input_uri))):
            label(package, str(input_uri), str(tmp_path / "out"), load_config(None, TINY))
    with pytest.raises(ConfigError, match="lists nothing to label"):
        label(package, str(tmp_path / "empty"), str(tmp_path / "out"), load_config(None, TINY))
    assert not (tmp_path / "out" / LOCK).exists()


def test_evaluate_writes_to_s3_through_storage(package, tmp_path, s3_bucket, ray_local, monkeypatch):
    """Hole 5: `evaluate --out s3://...` writes to S3, not to a local folder named `s3:`."""
    monkeypatch.chdir(tmp_path)
    generate_samples(str(tmp_path / "c"), n=12, size_range=SMALL)
    out = f"s3://{s3_bucket}/evaluation"
    metrics = evaluate(package, str(tmp_path / "c"), load_config(None, [*TINY, *FAST]), out)
    assert json.loads(storage.read_bytes(f"{out}/metrics.json")) == metrics
    assert storage.read_bytes(f"{out}/confusion_label.png").startswith(b"\x89PNG")
    assert not (tmp_path / "s3:").exists()
