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

import dataclasses
import functools
import hashlib
import json
import logging
import math
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

from artfuse.bench.label import DISTINCT_IMAGES, machine, save_untrained_package, synthetic_jpegs
from artfuse.cluster.runtime import ensure_ray
from artfuse.config import Config, ConfigError
from artfuse.data import inventory, storage
from artfuse.pipelines.label import output_dataset, prediction_schema, read_output

log = logging.getLogger(__name__)
ARCHIVE_ROOT = Path(tempfile.gettempdir()) / "artfuse-nightly"
NEW_FOLDER = "arrived-tonight"  # where the bench puts the night's new objects inside the archive
PREVIOUS_NIGHTS = 3  # run dates the previous output is spread over
PREVIOUS_MODEL_ID = "bench-previous-nights"  # model_id of the rows the bench writes itself
UPLOAD_THREADS = 16
LINK_THREADS = 8
LINKS_PER_SOURCE = 60_000  # hard links per source file, under ext4's 65,000
# what the free-space check budgets: a folder entry per object (about 30 B on ext4) with room to spare, and a row of the
# previous nights' output (about 30 B in Parquet)
ARCHIVE_BYTES_PER_OBJECT = 100
OUTPUT_BYTES_PER_ROW = 100
SPARE_BYTES = 2 * 2**30
SPARE_INODES = 100_000
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
        output = str(work / "predictions") if not archive.startswith(storage.S3_PREFIX) else f"{archive}-output"
        check_free_space(archive, output, jpegs, old, n_new, cfg)
        prepared = time.time()
        built = ensure_archive(archive, jpegs, old, cfg)
        new_uris = add_new_objects(archive, jpegs, n_new, cfg)
        if output.startswith(storage.S3_PREFIX):
            clear(output, cfg)
        previous = write_previous_nights(output, archive, jpegs, old, cfg)
        source = write_archive_inventory(archive, jpegs, old, n_new, cfg) if use_inventory else archive
        prepare_s = time.time() - prepared
        log.info("bench: labelling one night over %d objects (%d new) from %s", n_objects, n_new, source)
        report, peak_kb = run_in_own_process(model_uri, source, output, cfg)

        fs, root = storage.arrow_filesystem(output, cfg.storage)
        in_output = output_dataset(fs, root).count_rows()
        mine = read_output(fs, root, ["uri", "run_id"], pc.field("run_id") == report["run_id"])
        labelled_uris = set(mine["uri"].to_pylist())
        exact = labelled_uris == set(new_uris) and mine.num_rows == n_new and in_output == old + n_new
        disk = disk_used(archive, output, cfg) if not archive.startswith(storage.S3_PREFIX) else None
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
        "rows_in_output": in_output,
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
        "disk": disk,
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


def source_count(n: int, distinct: int) -> int:
    """How many source files `n` hard links need: a multiple of `distinct` (object i is JPEG i % distinct either way)
    holding each under LINKS_PER_SOURCE links."""
    return distinct * max(1, math.ceil(n / (distinct * LINKS_PER_SOURCE)))


def sources_folder(archive: str, prefix: str) -> Path:
    return Path(archive, prefix, ".sources")  # hidden: never listed as an input


def ensure_archive(archive: str, jpegs: list[bytes], n: int, cfg: Config) -> float | None:
    """The N old objects under `archive`, reusing a complete one of the same N. Returns build seconds (None: reused)."""
    marker = f"{archive}.ready"
    expected = {"objects": n, "jpegs": [hashlib.md5(j).hexdigest() for j in jpegs]}
    if not archive.startswith(storage.S3_PREFIX):
        expected["sources"] = source_count(n, len(jpegs))
    if storage.exists(marker, cfg.storage) and json.loads(storage.read_bytes(marker, cfg.storage)) == expected:
        log.info("bench: reusing the archive of %d objects at %s", n, archive)
        return None
    started = time.time()
    log.info("bench: building an archive of %d objects at %s", n, archive)
    delete_archive(archive, cfg)
    if archive.startswith(storage.S3_PREFIX):
        upload(archive, jpegs, range(n), "", cfg)
    else:
        link_tree(Path(archive), jpegs, range(n), "")
    storage.write_bytes(marker, json.dumps(expected).encode(), cfg.storage)
    log.info("bench: archive built in %.1f s", time.time() - started)
    return round(time.time() - started, 1)


def link_tree(root: Path, jpegs: list[bytes], numbers: range, prefix: str) -> None:
    """Object i is a hard link to source file i % S (a copy of JPEG i % len(jpegs)), S = `source_count`: many objects,
    a few inodes' worth of disk, and no source past the file system's limit on links (ext4: 65,000)."""
    sources = sources_folder(str(root), prefix)
    sources.mkdir(parents=True, exist_ok=True)
    count = source_count(len(numbers), len(jpegs))
    for k in range(count):
        if not (sources / f"{k}.jpg").exists():
            (sources / f"{k}.jpg").write_bytes(jpegs[k % len(jpegs)])

    def link_box(start: int) -> None:
        box = numbers[start : start + 1000]
        (root / prefix / object_key(box[0])).parent.mkdir(parents=True, exist_ok=True)
        for i in box:
            os.link(sources / f"{i % count}.jpg", root / prefix / object_key(i))

    # a box at a time, side by side: the links are system calls, which let other threads run meanwhile
    with ThreadPoolExecutor(LINK_THREADS) as pool:
        for done, _ in enumerate(pool.map(link_box, range(0, len(numbers), 1000)), start=1):
            if done % 1000 == 0:
                log.info("bench: %d objects linked", done * 1000)


def check_free_space(archive: str, output: str, jpegs: list[bytes], old: int, new: int, cfg: Config) -> None:
    """Refuse, before writing anything, a local archive or output the disk cannot hold (with room to spare)."""
    needs: dict[str, list[int]] = {}  # folder -> [bytes, inodes]
    marker = f"{archive}.ready"
    building = not (storage.exists(marker, cfg.storage) and json.loads(storage.read_bytes(marker, cfg.storage))
                    .get("objects") == old)  # fmt: skip
    if not archive.startswith(storage.S3_PREFIX):
        n = (old if building else 0) + new
        sources = source_count(old, len(jpegs)) + source_count(new, len(jpegs))
        need = needs.setdefault(existing_parent(archive), [0, 0])
        need[0] += n * ARCHIVE_BYTES_PER_OBJECT + sources * max(map(len, jpegs))
        need[1] += n // 1000 + sources + 100
    if not output.startswith(storage.S3_PREFIX):
        need = needs.setdefault(existing_parent(output), [0, 0])
        need[0] += (old + new) * OUTPUT_BYTES_PER_ROW
        need[1] += (old + new) // max(cfg.label.rows_per_file, 1) + 100
    for folder, (bytes_needed, inodes_needed) in needs.items():
        found = os.statvfs(folder)
        free, inodes = found.f_bavail * found.f_frsize, found.f_favail
        if free < bytes_needed + SPARE_BYTES or inodes < inodes_needed + SPARE_INODES:
            raise ConfigError(
                f"bench --nightly {old + new}: the archive and output need about {bytes_needed / 2**30:.1f} GiB and "
                f"{inodes_needed:,} inodes under {folder} (plus {SPARE_BYTES / 2**30:.0f} GiB and {SPARE_INODES:,} to "
                f"spare), which has {free / 2**30:.1f} GiB and {inodes:,} free: free space, or pass --archive on a "
                "larger disk"
            )


def existing_parent(path: str) -> str:
    found = Path(path).resolve()
    while not found.exists():
        found = found.parent
    return str(found)


def disk_used(archive: str, output: str, cfg: Config) -> dict:
    """Blocks and inodes the local archive (its folders and source files: the objects are links) and the output
    take, from a walk of the folders alone (the objects themselves cost no stat)."""
    archive_bytes = archive_inodes = 0
    for folder, subfolders, files in os.walk(archive):
        archive_bytes += os.stat(folder).st_blocks * 512
        archive_inodes += 1
        if Path(folder).name == ".sources":
            for name in files:
                archive_bytes += os.stat(Path(folder, name)).st_blocks * 512
                archive_inodes += 1
            subfolders.clear()
    output_bytes = output_files = 0
    for folder, _, files in os.walk(output):
        output_files += len(files)
        output_bytes += sum(os.stat(Path(folder, name)).st_blocks * 512 for name in files)
    return {
        "archive_mb": round(archive_bytes / 2**20),
        "archive_inodes": archive_inodes,
        "output_mb": round(output_bytes / 2**20),
        "output_files": output_files,
    }


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


def archive_rows(archive: str, jpegs: list[bytes], numbers: range, prefix: str = "") -> pa.Table:
    """(uri, size, etag) of objects `numbers` under `archive`/`prefix` as a listing reports them, computed without
    listing: every link of a source file shares its inode's size and mtime (a local etag, as `storage.list_objects`
    makes it), and an S3 object's ETag is its content's MD5."""
    if archive.startswith(storage.S3_PREFIX):
        etags = [hashlib.md5(j).hexdigest() for j in jpegs]
        uris = [storage.join(archive, prefix, object_key(i)) for i in numbers]
        which = np.arange(numbers.start, numbers.stop) % len(jpegs)
    else:
        etags = source_etags(sources_folder(archive, prefix))
        count = len(etags)
        uris = [str(Path(archive, prefix, object_key(i))) for i in numbers]
        which = np.arange(numbers.start, numbers.stop) % count
    sizes = np.array([len(j) for j in jpegs])[which % len(jpegs)]
    return pa.table(
        {
            "uri": pa.array(uris, pa.string()),
            "size": pa.array(sizes, pa.int64()),
            "etag": pa.array(np.array(etags, dtype=object)[which], pa.string()),
        }
    )


@functools.cache
def source_etags(folder: Path) -> list[str]:
    """The local etag (mtime in ns, as a listing gives it) of source files 0, 1, ... in `folder`."""
    count = sum(1 for name in os.listdir(folder) if name.endswith(".jpg"))
    return [str(round((folder / f"{k}.jpg").stat().st_mtime * 1e9)) for k in range(count)]


def write_previous_nights(output: str, archive: str, jpegs: list[bytes], n: int, cfg: Config) -> dict:
    """Prediction rows for the archive's objects 0..n-1 as earlier runs would have left them: files of
    `label.rows_per_file` rows under a few run_date partitions, made a file at a time. Written by this bench (model_id
    PREVIOUS_MODEL_ID), not by a label job."""
    started = time.time()
    source_etags.cache_clear()  # the archive may have been built again since
    schema = prediction_schema(TASKS, None)
    per_file = max(cfg.label.rows_per_file, 1)
    today = datetime.now(UTC)
    fs, root = storage.arrow_filesystem(output, cfg.storage)

    def write(start: int) -> None:
        part = archive_rows(archive, jpegs, range(start, min(start + per_file, n)))
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
    objects = pa.concat_tables(
        [archive_rows(archive, jpegs, range(old)), archive_rows(archive, jpegs, range(new), NEW_FOLDER)]
    )
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


def bench_listing(cfg: Config, n_objects: int, archive: str | None = None, out: str | None = None) -> dict:
    """`artfuse bench --listing N --archive s3://...`: list an archive of N objects on S3 (uploaded once, kept) flat
    (one ListObjectsV2 pagination) and side by side (`storage.list_threads` prefixes at once); the two seconds, and
    whether both listings hold the same rows."""
    archive = archive or ""
    if not archive.startswith(storage.S3_PREFIX):
        raise ConfigError(
            "bench --listing needs an s3:// --archive: it measures listing S3 (a local folder lists alone)"
        )
    jpegs = synthetic_jpegs(DISTINCT_IMAGES, cfg.bench.width, cfg.bench.height)
    built = ensure_archive(archive, jpegs, n_objects, cfg)
    result = {"n_objects": n_objects, "archive_built_s": built, **compare_listings(archive, cfg)}
    if out:
        storage.write_bytes(out, json.dumps(result, indent=1).encode(), cfg.storage)
    return result


def compare_listings(archive: str, cfg: Config) -> dict:
    """List `archive` flat, then side by side: seconds, keys/s and whether both hold the same rows."""
    flat_cfg = dataclasses.replace(cfg.storage, list_threads=1)
    timings, listings = {}, {}
    for name, storage_cfg in (("flat", flat_cfg), ("side_by_side", cfg.storage)):
        started = time.time()
        listings[name] = storage.list_objects(archive, storage_cfg)
        timings[name] = time.time() - started
        log.info("bench: listed %d objects %s in %.1f s", listings[name].num_rows, name, timings[name])
    return {
        "archive": archive,
        "listed": listings["flat"].num_rows,
        "flat_s": round(timings["flat"], 2),
        "side_by_side_s": round(timings["side_by_side"], 2),
        "list_threads": cfg.storage.list_threads,
        "flat_keys_s": round(listings["flat"].num_rows / timings["flat"]),
        "side_by_side_keys_s": round(listings["side_by_side"].num_rows / timings["side_by_side"]),
        "speedup": round(timings["flat"] / timings["side_by_side"], 2),
        "same_rows": listings["flat"].equals(listings["side_by_side"]),
        "machine": machine(),
    }


def format_listing(result: dict) -> str:
    return (
        f"listing {result['listed']:,} objects on S3: flat {result['flat_s']:.1f} s ({result['flat_keys_s']:,} keys/s),"
        f" side by side ({result['list_threads']} threads) {result['side_by_side_s']:.1f} s"
        f" ({result['side_by_side_keys_s']:,} keys/s): {result['speedup']:.1f}x; same rows: {result['same_rows']}"
    )


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
