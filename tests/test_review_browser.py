"""The curator's loop end to end in a real browser (Debian's headless Chromium, driven by Playwright): label a
sample collection, correct three predictions with clicks and two with keys, skip one; the corrections dataset holds
exactly those five decisions, and a training run on the collection with them learns those five images with their
human labels."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from test_train import TINY as TRAIN_TINY

from artfuse.config import load_config
from artfuse.data import corrections, stages
from artfuse.data.catalog import list_inputs, load_collection
from artfuse.data.preprocess import Preprocess
from artfuse.data.samples import generate_samples
from artfuse.models import create_model, data_config
from artfuse.models.package import read_manifest, save_package
from artfuse.pipelines.evaluate import evaluate
from artfuse.pipelines.label import LabelModel
from artfuse.pipelines.train import export_package, make_trainer, prepare_inputs
from artfuse.review.app import review_server, serve_in_thread

TINY = [*TRAIN_TINY, "train.epochs=1"]
LABEL = ["label.embeddings=true", "label.review_threshold=0.5"]


def untrained_package(uri: str, vocab: list[str]) -> str:
    """A tiny package of random weights whose vocabulary is the collection's: every prediction is unsure."""
    cfg = load_config(None, TINY)
    model = create_model(cfg.model, {"label": len(vocab)}, load_pretrained=False)
    dc = data_config(cfg.model)
    save_package(uri, model, cfg.model, {"label": vocab}, Preprocess.for_model(64, dc["mean"], dc["std"]))
    return uri


def label_in_process(package: str, folder: Path, out: Path) -> pa.Table:
    """What the labelling job's model actor writes for every input under `folder`, without starting Ray Data
    (test_label.py covers the job): decode, predict, one prediction row each."""
    cfg = load_config(None, [*TINY, *LABEL])
    inputs = list_inputs(str(folder))
    batch = {name: inputs[name].to_numpy(zero_copy_only=False) for name in inputs.column_names}
    resize = read_manifest(package)["preprocess"]["resize"]
    decoded = stages.read_and_decode(batch, size=resize, max_pixels=10**7, max_bytes=10**7, with_hash=True)
    rows = LabelModel(package, cfg.label, cfg.storage, "run-1", datetime.now(UTC))(decoded)
    (out / "run_date=2026-12-01").mkdir(parents=True)
    pq.write_table(rows, out / "run_date=2026-12-01" / "part-0.parquet")
    return rows


def current(page) -> dict:
    """The item on screen once its image has loaded: uri, predicted label and top-k labels."""
    page.wait_for_function(
        "() => { const i = document.getElementById('image'); return i.complete && i.naturalWidth > 0 }"
    )
    return {
        "uri": page.get_attribute("#item", "data-uri"),
        "predicted": page.inner_text("#predicted"),
        "topk": page.eval_on_selector_all("#topk button", "buttons => buttons.map(b => b.dataset.label)"),
    }


def wait_for_next(page, uri: str) -> None:
    page.wait_for_function(
        "uri => { const item = document.getElementById('item'); return item.dataset.uri !== uri || item.hidden }",
        arg=uri,
    )


def test_review_in_a_browser_then_train_on_the_corrections(browser, tmp_path, ray_local):
    samples = tmp_path / "samples"
    generate_samples(str(samples), n=18, seed=5, size_range=(64, 96))
    vocab = load_collection(str(samples), load_config().data).vocabs["label"]
    package = untrained_package(str(tmp_path / "untrained"), vocab)
    predictions, store = tmp_path / "predictions", tmp_path / "corrections"
    assert label_in_process(package, samples, predictions).num_rows == 18

    server, url = review_server(
        str(predictions), str(store), load_config(), port=0, reviewer="tester", model_uri=package
    )
    serve_in_thread(server)
    expected: dict[str, str] = {}
    try:
        page = browser.new_page()
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.goto(url)
        for _ in range(3):  # three corrections with clicks, each to a top-k label other than the prediction
            item = current(page)
            choice = next(label for label in item["topk"] if label != item["predicted"])
            page.click(f"#topk button[data-label='{choice}']")
            expected[item["uri"]] = choice
            wait_for_next(page, item["uri"])
        page.wait_for_selector("#similar li.neighbour >> nth=4")  # the five most similar works beside the image
        assert page.locator("#similar li.neighbour").count() == 5

        item = current(page)  # a correction with a key: the second of the top-k
        page.keyboard.press("2")
        expected[item["uri"]] = item["topk"][1]
        wait_for_next(page, item["uri"])

        item = current(page)  # a correction typed: "/" opens any label of the vocabulary
        choice = next(label for label in vocab if label not in item["topk"])
        page.keyboard.press("/")
        page.keyboard.type(choice)
        page.keyboard.press("Enter")
        expected[item["uri"]] = choice
        wait_for_next(page, item["uri"])

        skipped = current(page)["uri"]
        page.click("#skip")
        wait_for_next(page, skipped)
        current(page)
        assert not errors, errors
    finally:
        server.shutdown()

    saved = corrections.read(str(store))
    assert saved.num_rows == 5
    assert dict(zip(saved["uri"].to_pylist(), saved["label"].to_pylist(), strict=True)) == expected
    assert skipped not in expected and set(saved["reviewer"].to_pylist()) == {"tester"}
    assert set(saved["previous_label"].to_pylist()) <= set(vocab) and saved["previous_score"].null_count == 0

    # The next model: the five images join the training table with their human labels.
    cfg = load_config(None, [*TINY, f"data.corrections={store}"])
    inputs = prepare_inputs(str(samples), cfg)
    trained_on = {
        uri: inputs.vocabs["label"][index]
        for uri, index in zip(
            inputs.train_table["uri"].to_pylist(), inputs.train_table["y_label"].to_pylist(), strict=True
        )
    }
    assert {uri: trained_on.get(uri) for uri in expected} == expected
    assert inputs.n_train == inputs.train_table.num_rows
    out = tmp_path / "model"
    summary = export_package(make_trainer(inputs, cfg, str(out / "_train")).fit(), inputs, cfg, str(out))
    recorded = read_manifest(str(out))["training"]["corrections"]
    assert recorded["decisions"] == 5 and recorded["uri"] == str(store)
    assert summary["corrections"] == recorded

    # The hard cases alone: the new package scored on the five decided images.
    metrics = evaluate(str(out), None, load_config(None, [f"data.corrections={store}"]))
    assert metrics["n"] == 5 and metrics["split"] == "corrections"
    json.dumps(metrics)
    shutil.rmtree(out / "_train", ignore_errors=True)
