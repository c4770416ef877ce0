"""`artfuse bench --nightly N --new M`: what one night costs when the archive is large and almost all done.

The bench builds an archive of N objects (hard links of a few generated JPEGs in a nested, archive-like tree,
on local disk or under an s3:// prefix), writes the previous nights' output for the N - M old ones itself
(rows in the prediction schema, in files of `label.rows_per_file` rows over a few run dates, as the job would
have left them; the result says so), adds M new objects, and runs the label job once, in a process of its own
so that its peak memory (`ru_maxrss`) is the driver's alone; it joins the local Ray the bench started, as a
nightly job joins its cluster. The result holds the job's durations by phase
(listing, done-set read, planning, labelling), the driver's peak memory, and a check that exactly the M new
objects got a row and nothing else did.

A local archive is kept between runs of the same N (a marker file beside it says it is complete), since a
million hard links take minutes; `--keep-archive` off deletes it at the end. With `--inventory`, the bench
also writes an S3 Inventory of the archive (AWS's CSV format) and labels from its manifest.json: the job
then lists nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from artfuse.cluster.runtime import ensure_ray
from artfuse.config import Config, ConfigError
from artfuse.data import inventory, storage
from artfuse.pipelines.bench import DISTINCT_IMAGES, machine, save_untrained_package, synthetic_jpegs
from artfuse.pipelines.label import prediction_schema, read_output

log = logging.getLogger(__name__)
ARCHIVE_ROOT = Path(tempfile.gettempdir()) / "artfuse-nightly"
NEW_FOLDER = "arrived-tonight"  # where the bench puts the night's new objects inside the archive
PREVIOUS_NIGHTS = 3  # run dates the previous output is spread over
PREVIOUS_MODEL_ID = "bench-previous-nights"  # model_id of the rows the bench writes itself
UPLOAD_THREADS = 16
TASKS = {"label": [str(i) for i in range(10)]}


def bench_nightly(
    cfg: Config,
    n_objects: int,
    n_new: int,
    *,
    model_uri: str | None = None,
    out: str | None = None,
    archive: str | None = None,
    use_inventory: bool = False,
    keep_archive: bool = True,
) -> dict:
    """Build (or reuse) the archive, write the previous nights' output, add the new objects, label once."""
    if not 0 < n_new <= n_objects:
        raise ConfigError(f"bench --nightly N --new M needs 0 < M <= N; got N={n_objects}, M={n_new}")
    archive = archive or str(ARCHIVE_ROOT / f"archive-{n_objects}")
    old = n_objects - n_new
    # A nightly job joins a running cluster (`ray job submit`): the bench starts its local Ray here, once, and the
    # label run joins it, so the night's figures hold the job's own work and not a Ray start.
    ensure_ray()
    with tempfile.TemporaryDirectory(prefix="artfuse-nightly-") as tmp:
        work = Path(tmp)
        model_uri = model_uri or save_untrained_package(str(work / "model"), cfg, {t: len(v) for t, v in TASKS.items()})
        jpegs = synthetic_jpegs(DISTINCT_IMAGES, cfg.bench.width, cfg.bench.height)
        prepared = time.time()
        built = ensure_archive(archive, jpegs, old, cfg)
        new_uris = add_new_objects(archive, jpegs, n_new, cfg)
        output = str(work / "predictions") if not archive.startswith(storage.S3_PREFIX) else f"{archive}-output"
        if output.startswith(storage.S3_PREFIX):
            clear(output, cfg)
        previous = write_previous_nights(output, archive_rows(archive, jpegs, old), cfg)
        source = write_archive_inventory(archive, jpegs, old, n_new, cfg) if use_inventory else archive
        prepare_s = time.time() - prepared
        log.info("bench: labelling one night over %d objects (%d new) from %s", n_objects, n_new, source)
        report, peak_kb = run_in_own_process(model_uri, source, output, cfg)

        fs, root = storage.arrow_filesystem(output, cfg.storage)
        rows = read_output(fs, root, ["uri", "run_id"])
        mine = rows.filter(pc.equal(rows["run_id"], report["run_id"]))
        labelled_uris = set(mine["uri"].to_pylist())
        exact = labelled_uris == set(new_uris) and mine.num_rows == n_new and rows.num_rows == old + n_new
        remove_new_objects(archive, cfg)
        if output.startswith(storage.S3_PREFIX):
            clear(output, cfg)
    if not keep_archive:
        delete_archive(archive, cfg)
    d = report["durations_s"]
    result = {
        "n_objects": n_objects,
        "n_new": n_new,
        "labelled": report["labelled"],
        "errors": report["errors"],
        "rows_written": mine.num_rows,
        "rows_in_output": rows.num_rows,
        "exactly_the_new_objects": exact,
        "listing_s": d["listing"],
        "done_set_s": d["done_set"],
        "planning_s": d["planning"],
        "ray_start_s": d["ray_start"],
        "labelling_s": d["labelling"],
        "verifying_s": d["verifying"],
        "total_s": d["total"],
        "driver_peak_mb": round(peak_kb / 1024),
        "input": "s3 inventory (CSV)" if use_inventory else ("s3 listing" if archive.startswith("s3://") else "local"),
        "archive": archive,
        "archive_built_s": built,
        "prepare_s": round(prepare_s, 2),
        "previous_output": previous,
        "machine": machine(),
        "label_report": report,
    }
    if out:
        storage.write_bytes(out, json.dumps(result, indent=1).encode(), cfg.storage)
    return result


def object_key(i: int) -> str:
    """An archive-like nested key: 100 boxes of 1,000 objects per collection."""
    return f"collection-{i // 100_000:03d}/box-{i // 1000 % 100:02d}/{i:07d}.jpg"


def ensure_archive(archive: str, jpegs: list[bytes], n: int, cfg: Config) -> float | None:
    """The N old objects under `archive`, reusing a complete one of the same N. Returns build seconds (None: reused)."""
    marker = f"{archive}.ready"
    expected = json.dumps({"objects": n, "jpegs": [hashlib.md5(j).hexdigest() for j in jpegs]})
    if storage.exists(marker, cfg.storage) and storage.read_bytes(marker, cfg.storage).decode() == expected:
        log.info("bench: reusing the archive of %d objects at %s", n, archive)
        return None
    started = time.time()
    log.info("bench: building an archive of %d objects at %s", n, archive)
    delete_archive(archive, cfg)
    if archive.startswith(storage.S3_PREFIX):
        upload(archive, jpegs, range(n), "", cfg)
    else:
        link_tree(Path(archive), jpegs, range(n), "")
    storage.write_bytes(marker, expected.encode(), cfg.storage)
    log.info("bench: archive built in %.1f s", time.time() - started)
    return round(time.time() - started, 1)


def link_tree(root: Path, jpegs: list[bytes], numbers: range, prefix: str) -> None:
    """Object i is a hard link to JPEG i % len(jpegs): many objects, a few inodes' worth of disk."""
    sources = root / ".sources"
    sources.mkdir(parents=True, exist_ok=True)
    for k, data in enumerate(jpegs):
        if not (sources / f"{k}.jpg").exists():
            (sources / f"{k}.jpg").write_bytes(data)
    made: set[Path] = set()
    for i in numbers:
        path = root / prefix / object_key(i)
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        os.link(sources / f"{i % len(jpegs)}.jpg", path)
        if i and i % 100_000 == 0:
            log.info("bench: %d objects linked", i)


def upload(archive: str, jpegs: list[bytes], numbers: range, prefix: str, cfg: Config) -> None:
    def put(i: int) -> None:
        storage.write_bytes(storage.join(archive, prefix, object_key(i)), jpegs[i % len(jpegs)], cfg.storage)

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        for done, _ in enumerate(pool.map(put, numbers), start=1):
            if done % 10_000 == 0:
                log.info("bench: %d objects uploaded", done)


def add_new_objects(archive: str, jpegs: list[bytes], n_new: int, cfg: Config) -> list[str]:
    """M objects the previous nights never saw, under NEW_FOLDER; returns their URIs."""
    remove_new_objects(archive, cfg)
    numbers = range(n_new)
    if archive.startswith(storage.S3_PREFIX):
        upload(archive, jpegs, numbers, NEW_FOLDER, cfg)
        return [storage.join(archive, NEW_FOLDER, object_key(i)) for i in numbers]
    link_tree(Path(archive), jpegs, numbers, NEW_FOLDER)
    return [str(Path(archive, NEW_FOLDER, object_key(i))) for i in numbers]


def remove_new_objects(archive: str, cfg: Config) -> None:
    uri = storage.join(archive, NEW_FOLDER)
    if storage.exists(uri, cfg.storage):
        fs, path = storage.resolve(uri, cfg.storage)
        fs.rm(path, recursive=True)


def delete_archive(archive: str, cfg: Config) -> None:
    for uri in (archive, f"{archive}.ready"):
        if storage.exists(uri, cfg.storage):
            fs, path = storage.resolve(uri, cfg.storage)
            fs.rm(path, recursive=True)


def clear(uri: str, cfg: Config) -> None:
    if storage.exists(uri, cfg.storage):
        fs, path = storage.resolve(uri, cfg.storage)
        fs.rm(path, recursive=True)


def archive_rows(archive: str, jpegs: list[bytes], n: int, prefix: str = "") -> pa.Table:
    """(uri, size, etag) of objects 0..n-1 under `archive`/`prefix` as a listing reports them, computed without
    listing: every link of a JPEG shares its inode's size and mtime (a local etag, as `storage.list_objects` makes
    it), and an S3 object's ETag is its content's MD5."""
    if archive.startswith(storage.S3_PREFIX):
        etags = [hashlib.md5(j).hexdigest() for j in jpegs]
        uris = [storage.join(archive, prefix, object_key(i)) for i in range(n)]
    else:
        sources = Path(archive, ".sources")
        etags = [str(round((sources / f"{k}.jpg").stat().st_mtime * 1e9)) for k in range(len(jpegs))]
        uris = [str(Path(archive, prefix, object_key(i))) for i in range(n)]
    which = np.arange(n) % len(jpegs)
    return pa.table(
        {
            "uri": pa.array(uris, pa.string()),
            "size": pa.array(np.array([len(j) for j in jpegs])[which], pa.int64()),
            "etag": pa.array(np.array(etags, dtype=object)[which], pa.string()),
        }
    )


def write_previous_nights(output: str, objects: pa.Table, cfg: Config) -> dict:
    """Prediction rows for `objects` as earlier runs would have left them: files of `label.rows_per_file` rows under
    a few run_date partitions. Written by this bench (model_id PREVIOUS_MODEL_ID), not by a label job."""
    started = time.time()
    schema = prediction_schema(TASKS, None)
    n, per_file = objects.num_rows, max(cfg.label.rows_per_file, 1)
    today = datetime.now(UTC)
    fs, root = storage.arrow_filesystem(output, cfg.storage)
    files = 0

    def write(start: int) -> None:
        part = objects.slice(start, per_file)
        night = start * PREVIOUS_NIGHTS // max(n, 1)
        date = f"{today - timedelta(days=PREVIOUS_NIGHTS - night):%Y-%m-%d}"
        k = part.num_rows
        topk = [[{"label": "0", "score": 0.9}]] * k
        columns = {
            "uri": part["uri"],
            "size": part["size"],
            "etag": part["etag"],
            "sha256": pa.nulls(k, pa.string()),
            "width": pa.array(np.full(k, cfg.bench.width, np.int32)),
            "height": pa.array(np.full(k, cfg.bench.height, np.int32)),
            "format": pa.array(["JPEG"] * k, pa.string()),
            "label": pa.array(["0"] * k, pa.string()),
            "label_score": pa.array(np.full(k, 0.9, np.float32)),
            "label_topk": pa.array(topk, schema.field("label_topk").type),
            "needs_review": pa.array(np.zeros(k, bool)),
            "model_id": pa.array([PREVIOUS_MODEL_ID] * k, pa.string()),
            "run_id": pa.array([f"bench-night-{night}"] * k, pa.string()),
            "labelled_at": pa.array(
                [today - timedelta(days=PREVIOUS_NIGHTS - night)] * k, schema.field("labelled_at").type
            ),
            "error": pa.nulls(k, pa.string()),
        }
        # columns the bench has no value for (a IIIF object's, say) are null, as the job leaves them
        table = pa.table([columns.get(f.name, pa.nulls(k, f.type)) for f in schema], schema=schema)
        path = f"{root}/run_date={date}/bench-{start // per_file:07d}.parquet"
        fs.create_dir(os.path.dirname(path), recursive=True)
        pq.write_table(table, path, filesystem=fs)

    starts = range(0, n, per_file)
    with ThreadPoolExecutor(UPLOAD_THREADS if output.startswith(storage.S3_PREFIX) else 2) as pool:
        files = len(list(pool.map(write, starts)))
    log.info("bench: wrote the previous nights' output (%d rows, %d files) in %.1f s", n, files, time.time() - started)
    return {
        "written_by": f"this bench (model_id {PREVIOUS_MODEL_ID}), not by a label job",
        "rows": n,
        "files": files,
        "run_dates": PREVIOUS_NIGHTS,
        "seconds": round(time.time() - started, 1),
    }


def write_archive_inventory(archive: str, jpegs: list[bytes], old: int, new: int, cfg: Config) -> str:
    """An S3 Inventory (AWS's CSV format) of the archive's objects, as S3 would have published it overnight, in the
    archive's bucket; returns its manifest.json's URI."""
    if not archive.startswith(storage.S3_PREFIX):
        raise ConfigError("bench --nightly --inventory needs an s3:// --archive: an S3 Inventory lists a bucket")
    objects = pa.concat_tables([archive_rows(archive, jpegs, old), archive_rows(archive, jpegs, new, NEW_FOLDER)])
    return inventory.write_inventory(objects, f"{archive}-inventory", fmt="CSV", storage=cfg.storage)


def run_in_own_process(model_uri: str, source: str, output: str, cfg: Config) -> tuple[dict, int]:
    """`label` in a fresh process (joining this process's Ray if it has one): its report and peak RSS in KB."""
    env = {}
    if ray.is_initialized():
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_label_child, args=(send, model_uri, source, output, cfg, env))
    process.start()
    send.close()
    try:
        outcome = receive.recv()
    except EOFError:
        process.join()
        outcome = {"error": f"the label process died (exit code {process.exitcode})"}
    process.join()
    if "error" in outcome:
        raise RuntimeError(f"the nightly label run failed: {outcome['error']}")
    return outcome["report"], outcome["peak_kb"]


def _label_child(send, model_uri: str, source: str, output: str, cfg: Config, env: dict) -> None:
    from artfuse.pipelines.label import label

    os.environ.update(env)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = label(model_uri, source, output, cfg)
        send.send({"report": report, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})
    except Exception as e:  # noqa: BLE001 - reported to the bench, which raises it
        send.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        if ray.is_initialized():
            ray.shutdown()


def format_nightly(result: dict) -> str:
    peak = result["driver_peak_mb"]
    return "\n".join(
        [
            f"one night over {result['n_objects']:,} objects ({result['n_new']:,} new; input: {result['input']}):",
            f"  listing {result['listing_s']:.1f} s, done set {result['done_set_s']:.1f} s, planning"
            f" {result['planning_s']:.1f} s, Ray connect {result['ray_start_s']:.1f} s, labelling"
            f" {result['labelling_s']:.1f} s; total {result['total_s']:.1f} s; driver peak {peak} MB",
            f"  labelled {result['labelled']} + {result['errors']} errors, {result['rows_written']} rows written;"
            f" exactly the new objects: {result['exactly_the_new_objects']}",
            f"  the previous nights' {result['previous_output']['rows']:,} rows were written by this bench"
            f" (model_id {PREVIOUS_MODEL_ID}), not by a label job",
        ]
    )
