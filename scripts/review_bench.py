"""How the review page holds up on a large predictions dataset: time to first image, per decision, per queue page.

    python scripts/review_bench.py [--n 100000] [--work DIR] [--keep]

Writes N predictions (rows built by `prediction_rows`, random scores over five labels, 192-wide embeddings as the
default model writes them) for N image files (64 distinct 1024 x 768 JPEGs, the rest hard links), starts
`artfuse review` on them in this process and opens the page in Debian's headless Chromium (Playwright). Reports:
server start (reading the predictions, building the queue and the similar-works index), the page's time to first
image (navigation start to the first image decoded, from the page's own clock), a decision (click to the next image
shown), a queue page through the API, and the server's memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq

from artfuse.bench.label import synthetic_jpegs, write_collection
from artfuse.config import LabelConfig, load_config
from artfuse.data.catalog import list_inputs
from artfuse.pipelines.label import prediction_rows
from artfuse.review.app import review_server, serve_in_thread

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
VOCAB = ["genre", "history", "landscape", "portrait", "stillife"]
CHUNK = 10_000


def write_predictions(images: Path, out: Path, dim: int = 192) -> int:
    inputs = list_inputs(str(images))
    rng = np.random.default_rng(0)
    digests = {}
    for i in range(inputs.num_rows):  # hard links share bytes, so they share a sha256
        path = inputs["uri"][i].as_py()
        digests[path] = f"{int(Path(path).name.split('.')[0]) % 64:064x}"
    cfg = LabelConfig(embeddings=True)
    out.mkdir(parents=True)
    for start in range(0, inputs.num_rows, CHUNK):
        part = inputs.slice(start, CHUNK)
        n = part.num_rows
        uris = part["uri"].to_pylist()
        batch = {
            "uri": np.array(uris, dtype=object),
            "size": part["size"].to_numpy(),
            "etag": np.array(part["etag"].to_pylist(), dtype=object),
            "sha256": np.array([digests[u] for u in uris], dtype=object),
            "width": np.full(n, 1024, np.int32),
            "height": np.full(n, 768, np.int32),
            "format": np.array(["JPEG"] * n, dtype=object),
            "error": np.array([None] * n, dtype=object),
        }
        outputs = {
            "label": rng.dirichlet(np.ones(len(VOCAB)) * 0.7, n).astype(np.float32),
            "embedding": rng.standard_normal((n, dim)).astype(np.float16),
        }
        table = prediction_rows(
            batch, outputs, tasks={"label": VOCAB}, cfg=cfg, review_thresholds={"label": 0.6}, model_id="bench",
            run_id="bench-run", labelled_at=datetime.now(UTC),
        )  # fmt: skip
        pq.write_table(table, out / f"part-{start // CHUNK:04d}.parquet")
    return inputs.num_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--work", help="folder for the images and predictions (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--decisions", type=int, default=10)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    work = Path(args.work or tempfile.mkdtemp(prefix="review-bench-"))
    try:
        images, predictions = work / "images", work / "predictions" / "run_date=2026-12-01"
        if not predictions.exists():
            write_collection(images, synthetic_jpegs(64, 1024, 768), args.n)
            write_predictions(images, predictions)
        process = psutil.Process()
        rss_before = process.memory_info().rss
        started = time.perf_counter()
        server, url = review_server(str(predictions.parent), str(work / "corrections"), load_config(), port=0)
        start_s = time.perf_counter() - started
        serve_in_thread(server)
        queue_ms = []
        for _ in range(5):
            t = time.perf_counter()
            page = json.load(urllib.request.urlopen(url + "api/queue?task=label&limit=20"))
            queue_ms.append((time.perf_counter() - t) * 1000)
        first_image_ms, decision_ms = [], []
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            for _ in range(3):
                tab = browser.new_page()
                tab.goto(url)
                tab.wait_for_function("() => window.firstImageAt")
                first_image_ms.append(tab.evaluate("() => window.firstImageAt"))
                tab.close()
            tab = browser.new_page()
            tab.goto(url)
            tab.wait_for_function("() => window.firstImageAt")
            for _ in range(args.decisions):
                uri = tab.get_attribute("#item", "data-uri")
                t = time.perf_counter()
                tab.click("#topk button >> nth=0")
                tab.wait_for_function(
                    "uri => { const i = document.getElementById('image'); const item = document.getElementById('item');"
                    " return item.dataset.uri !== uri && i.complete && i.naturalWidth > 0 }",
                    arg=uri,
                )
                decision_ms.append((time.perf_counter() - t) * 1000)
            browser.close()
        server.shutdown()
        print(
            json.dumps(
                {
                    "rows": args.n,
                    "in_queue": page["remaining"],
                    "server_start_s": round(start_s, 2),
                    "server_memory_mb": round((process.memory_info().rss - rss_before) / 2**20),
                    "first_image_ms": [round(v) for v in first_image_ms],
                    "decision_to_next_image_ms_median": round(statistics.median(decision_ms)),
                    "queue_page_ms_median": round(statistics.median(queue_ms), 1),
                },
                indent=1,
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
