"""`artfuse report`: one self-contained static HTML page on a labelling run, for the curator.

What was listed, skipped, labelled, failed (by reason, with example URIs) and sent to review; each task's
labels this run beside all earlier runs; score histograms; the review queue as thumbnails, least confident
first; groups of identical files (same sha256) under different URIs. Everything is inside the page
(thumbnails and plots as data: URIs, CSS inline, no script), so it opens anywhere without a network.

Its size does not grow with the run: at most MAX_REVIEW_CARDS review thumbnails and MAX_DUPLICATE_GROUPS
duplicate thumbnails of THUMBNAIL_PX pixels, MAX_EXAMPLES example URIs per error reason (at most
MAX_REASONS reasons), MAX_LABELS labels per task, MAX_URIS_PER_GROUP URIs per duplicate group, and two
PNGs per task. Rendered with Jinja2, which escapes every URI, label and error message (archive file names
can hold any character).

Reads the label job's output through artfuse.data.storage (local or s3://): the Parquet rows, and the run
report `<predictions>/_reports/<run_id>.json` for what was listed and skipped.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from importlib import resources

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from artfuse.config import Config, ConfigError
from artfuse.data import storage
from artfuse.data.images import preview_jpeg
from artfuse.data.prediction_files import is_own_file
from artfuse.reporting.plots import plot_label_shift, plot_score_histogram

log = logging.getLogger(__name__)
THUMBNAIL_PX = 112  # longest side of a thumbnail (the whole image, as the review page shows it): about 3-5 KB
THUMBNAIL_QUALITY = 70
MAX_REVIEW_CARDS = 60  # review-queue thumbnails: the least confident rows
MAX_EXAMPLES = 5  # example URIs per error reason
MAX_REASONS = 20
MAX_LABELS = 25  # labels shown per task (the most frequent this run or before), the rest summed as "other"
MAX_DUPLICATE_GROUPS = 20
MAX_URIS_PER_GROUP = 5
READ_THREADS = 8  # thumbnails are fetched in parallel: object-store latency, not CPU, bounds them
TEMPLATE = "report.html.j2"


def write_report(predictions_uri: str, out_uri: str, cfg: Config, run_id: str | None = None) -> dict:
    """Render the page for `run_id` (default: the latest run with a run report) to `out_uri`; returns a summary."""
    page = build_page(predictions_uri, cfg, run_id)
    html = render(page)
    storage.write_bytes(out_uri, html.encode(), cfg.storage)
    log.info("report on run %s: %s (%d KB)", page["run_id"], out_uri, len(html) // 1024)
    return {"page": out_uri, "run_id": page["run_id"], "bytes": len(html), "counts": page["counts"]}


def render(page: dict) -> str:
    template = resources.files("artfuse.reporting").joinpath(TEMPLATE).read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(**page)


def build_page(predictions_uri: str, cfg: Config, run_id: str | None) -> dict:
    """Everything the template shows, already bounded."""
    run_id = run_id or latest_run(predictions_uri, cfg)
    run_report = read_run_report(predictions_uri, run_id, cfg)
    predictions = prediction_files(predictions_uri, cfg)
    names = predictions.schema.names
    tasks = [name.removesuffix("_score") for name in names if name.endswith("_score") and name[:-6] in names]
    light = ["uri", "sha256", "run_id", "labelled_at", "error", "needs_review", *tasks, *(f"{t}_score" for t in tasks)]
    rows = predictions.to_table(columns=light)
    this = rows.filter(pc.equal(rows["run_id"], run_id))
    if this.num_rows == 0 and run_report is None:
        raise ConfigError(f"no run {run_id} under {predictions_uri}: no rows and no run report")
    earlier = earlier_rows(rows, this, run_id)
    thresholds = (run_report or {}).get("review", {}).get("thresholds", {})
    failed = this.filter(pc.is_valid(this["error"]))
    labelled = this.filter(pc.is_null(this["error"]))
    review_by_task = (run_report or {}).get("review", {}).get("by_task", {})
    counts = {
        "listed": run_report["listed"] if run_report else None,
        "skipped": run_report["skipped"] if run_report else None,
        "labelled": labelled.num_rows,
        "failed": failed.num_rows,
        "review": int(pc.sum(this["needs_review"]).as_py() or 0),
    }
    review_rows = review_queue(predictions, run_id, tasks)
    duplicates = duplicate_groups(rows, run_id)
    thumbnails = fetch_thumbnails(
        [card["uri"] for card in review_rows] + [group["uris"][0] for group in duplicates["groups"]], cfg
    )
    for card in review_rows:
        card["thumbnail"] = thumbnails.get(card["uri"])
    for group in duplicates["groups"]:
        group["thumbnail"] = thumbnails.get(group["uris"][0])
    return {
        "run_id": run_id,
        "predictions": predictions_uri,
        "run_report": run_report,
        "generated_at": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "labelled_at": this_run_time(this),
        "counts": counts,
        "tasks": [
            task_section(task, labelled, earlier, thresholds.get(task), review_by_task.get(task)) for task in tasks
        ],
        "errors": error_reasons(failed),
        "review_cards": review_rows,
        "review_total": counts["review"] - counts["failed"],
        "duplicates": duplicates,
        "bounds": {
            "cards": MAX_REVIEW_CARDS,
            "examples": MAX_EXAMPLES,
            "labels": MAX_LABELS,
            "groups": MAX_DUPLICATE_GROUPS,
            "uris_per_group": MAX_URIS_PER_GROUP,
            "thumbnail_px": THUMBNAIL_PX,
        },
    }


def latest_run(predictions_uri: str, cfg: Config) -> str:
    """The newest run with a run report (run ids start with their UTC start time, so they sort by it)."""
    reports = storage.join(predictions_uri, "_reports")
    if storage.exists(reports, cfg.storage):
        names = storage.list_objects(reports, cfg.storage, suffixes=(".json",))["uri"].to_pylist()
        if names:
            return max(names).rsplit("/", 1)[-1].removesuffix(".json")
    raise ConfigError(f"no run reports under {reports}: is {predictions_uri} a label job's --out? (or pass --run)")


def read_run_report(predictions_uri: str, run_id: str, cfg: Config) -> dict | None:
    uri = storage.join(predictions_uri, "_reports", f"{run_id}.json")
    if not storage.exists(uri, cfg.storage):
        log.warning("no run report %s: listed and skipped counts are unknown", uri)
        return None
    return json.loads(storage.read_bytes(uri, cfg.storage))


def prediction_files(predictions_uri: str, cfg: Config) -> pads.Dataset:
    """The label job's Parquet files under its output: its own by name, or any other .parquet outside the
    `_reports`/`_set_aside`-style folders (files of earlier versions); other files are not read."""
    fs, root = storage.arrow_filesystem(predictions_uri, cfg.storage)
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    paths = [
        f.path
        for f in found
        if f.type == pafs.FileType.File
        and f.path.endswith(".parquet")
        and not any(part.startswith(("_", ".")) for part in f.path[len(root) :].split("/")[:-1])
    ]
    if not paths:
        raise ConfigError(f"no predictions under {predictions_uri}: is it a label job's --out?")
    # the dataset takes its schema from the first file: the newest run's, so the current columns
    ours = sorted((p for p in paths if is_own_file(p)), key=lambda p: p.rsplit("/", 1)[-1], reverse=True)
    return pads.dataset(ours + sorted(set(paths) - set(ours)), filesystem=fs, format="parquet")


def earlier_rows(rows: pa.Table, this: pa.Table, run_id: str) -> pa.Table:
    """Rows of the runs before this one (all other runs when this one wrote nothing)."""
    others = rows.filter(pc.not_equal(rows["run_id"], run_id))
    if this.num_rows == 0:
        return others
    return others.filter(pc.less(others["labelled_at"], pc.min(this["labelled_at"])))


def this_run_time(this: pa.Table) -> str | None:
    if this.num_rows == 0:
        return None
    return f"{pc.min(this['labelled_at']).as_py():%Y-%m-%d %H:%M} UTC"


def task_section(
    task: str, labelled: pa.Table, earlier: pa.Table, threshold: float | None, review_count: int | None
) -> dict:
    """Label shares this run vs earlier runs, and the score histogram, for one task."""
    earlier = earlier.filter(pc.is_null(earlier["error"]))
    now, before = value_counts(labelled[task]), value_counts(earlier[task])
    n_now, n_before = sum(now.values()), sum(before.values())
    ranked = sorted(set(now) | set(before), key=lambda label: (-now.get(label, 0), -before.get(label, 0), label))
    shown, rest = ranked[:MAX_LABELS], ranked[MAX_LABELS:]
    shares = [
        {
            "label": label,
            "count": now.get(label, 0),
            "share": now.get(label, 0) / n_now if n_now else 0.0,
            "earlier_count": before.get(label, 0),
            "earlier_share": before.get(label, 0) / n_before if n_before else 0.0,
        }
        for label in shown
    ]
    if rest:
        other_now, other_before = sum(now.get(x, 0) for x in rest), sum(before.get(x, 0) for x in rest)
        shares.append(
            {
                "label": f"{len(rest)} other labels",
                "count": other_now,
                "share": other_now / n_now if n_now else 0.0,
                "earlier_count": other_before,
                "earlier_share": other_before / n_before if n_before else 0.0,
            }
        )
    scores = labelled[f"{task}_score"].to_numpy(zero_copy_only=False)
    earlier_scores = earlier[f"{task}_score"].to_numpy(zero_copy_only=False)
    return {
        "name": task,
        "labels": shares,
        "earlier_rows": n_before,
        "threshold": threshold,
        "review_count": review_count,
        "histogram": png_data_uri(plot_score_histogram, scores, earlier_scores, threshold, task),
        "shift": png_data_uri(plot_label_shift, shares, task) if shares else None,
    }


def value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    counted = pc.value_counts(column.drop_null()) if len(column) else []
    return {entry["values"].as_py(): entry["counts"].as_py() for entry in counted}


def error_reasons(failed: pa.Table) -> list[dict]:
    """Failed rows by reason (the error's text before its first colon), most frequent first, with examples."""
    by_reason: dict[str, list[tuple[str, str]]] = {}
    counts: dict[str, int] = {}
    for uri, error in zip(failed["uri"].to_pylist(), failed["error"].to_pylist(), strict=True):
        reason = error.split(":", 1)[0].strip() or "unknown"
        counts[reason] = counts.get(reason, 0) + 1
        examples = by_reason.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append((uri, error))
    ranked = sorted(counts, key=lambda r: (-counts[r], r))
    return [{"reason": r, "count": counts[r], "examples": by_reason[r]} for r in ranked[:MAX_REASONS]]


def review_queue(predictions: pads.Dataset, run_id: str, tasks: list[str]) -> list[dict]:
    """This run's predictions that need review, least confident (lowest score over the tasks) first."""
    columns = ["uri", *(f"{t}_score" for t in tasks), *(f"{t}_topk" for t in tasks)]
    where = (pc.field("run_id") == run_id) & pc.field("needs_review") & ~pc.field("error").is_valid()
    table = predictions.to_table(columns=columns, filter=where)
    if table.num_rows == 0:
        return []
    scores = np.column_stack([table[f"{t}_score"].to_numpy(zero_copy_only=False) for t in tasks])
    order = np.lexsort((np.array(table["uri"].to_pylist(), dtype=object), scores.min(axis=1)))
    picked = table.take(pa.array(order[:MAX_REVIEW_CARDS]))
    return [
        {
            "uri": row["uri"],
            "confidence": min(row[f"{t}_score"] for t in tasks),
            "tasks": [{"name": t, "score": row[f"{t}_score"], "topk": row[f"{t}_topk"]} for t in tasks],
        }
        for row in picked.to_pylist()
    ]


def duplicate_groups(rows: pa.Table, run_id: str) -> dict:
    """Identical content (same sha256) under more than one URI, in groups that include a row of this run."""
    hashed = rows.filter(pc.is_valid(rows["sha256"])).select(["sha256", "uri", "run_id"])
    if hashed.num_rows == 0:
        return {"total": 0, "groups": []}
    distinct = hashed.group_by(["sha256", "uri"]).aggregate([])
    sizes = distinct.group_by("sha256").aggregate([("uri", "count")])
    shared = sizes.filter(pc.greater(sizes["uri_count"], 1))
    touched = set(hashed.filter(pc.equal(hashed["run_id"], run_id))["sha256"].to_pylist())
    shared = shared.filter(pc.is_in(shared["sha256"], pa.array(sorted(touched), pa.string())))
    ranked = shared.sort_by([("uri_count", "descending"), ("sha256", "ascending")])
    groups = []
    for entry in ranked.slice(0, MAX_DUPLICATE_GROUPS).to_pylist():
        uris = sorted(distinct.filter(pc.equal(distinct["sha256"], entry["sha256"]))["uri"].to_pylist())
        groups.append({"sha256": entry["sha256"], "count": entry["uri_count"], "uris": uris[:MAX_URIS_PER_GROUP]})
    return {"total": shared.num_rows, "groups": groups}


def fetch_thumbnails(uris: list[str], cfg: Config) -> dict[str, str]:
    """uri -> a small JPEG data: URI; objects that cannot be read or decoded any more get none."""
    unique = list(dict.fromkeys(uris))
    with ThreadPoolExecutor(READ_THREADS) as pool:
        made = pool.map(lambda uri: thumbnail(uri, cfg), unique)
        return {uri: data for uri, data in zip(unique, made, strict=True) if data}


def thumbnail(uri: str, cfg: Config) -> str | None:
    try:
        data = storage.read_bytes(uri, cfg.storage)
    except Exception as e:  # noqa: BLE001 - an object gone since labelling costs its thumbnail, not the report
        log.warning("no thumbnail for %s: %s", uri, e)
        return None
    jpeg = preview_jpeg(data, THUMBNAIL_PX, max_pixels=cfg.data.max_pixels, quality=THUMBNAIL_QUALITY)
    if jpeg is None:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def png_data_uri(plot, *args) -> str:
    buffer = io.BytesIO()
    plot(*args, buffer)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
