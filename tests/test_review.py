"""The curator's loop without a browser: the corrections dataset, how it joins training, the review queue and its
app, and similar works. The browser end to end is in test_review_browser.py."""

from __future__ import annotations

import hashlib
import shutil
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from artfuse.config import ConfigError, LabelConfig, load_config
from artfuse.data import corrections
from artfuse.data.catalog import list_inputs, load_collection
from artfuse.data.samples import generate_samples
from artfuse.pipelines.label import prediction_rows
from artfuse.review.app import create_app, open_review
from artfuse.review.neighbours import NearestNeighbours, similar
from artfuse.review.queue import ReviewQueue

VOCAB = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    generate_samples(str(out), n=12, seed=3, size_range=(64, 96))
    return out


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_predictions(
    out: Path, folder: Path, *, seed: int = 0, run_id: str = "run-1", at: datetime | None = None, dim: int = 8
) -> list[dict]:
    """Predictions for every input under `folder` through `prediction_rows` (random scores: all below 0.5)."""
    inputs = list_inputs(str(folder))
    n = inputs.num_rows
    rng = np.random.default_rng(seed)
    uris = inputs["uri"].to_pylist()
    batch = {
        "uri": np.array(uris, dtype=object),
        "size": inputs["size"].to_numpy(),
        "etag": np.array(inputs["etag"].to_pylist(), dtype=object),
        "sha256": np.array([sha256(u) for u in uris], dtype=object),
        "width": np.full(n, 64, np.int32),
        "height": np.full(n, 64, np.int32),
        "format": np.array(["JPEG"] * n, dtype=object),
        "error": np.array([None] * n, dtype=object),
    }
    outputs = {
        "style": rng.dirichlet(np.ones(len(VOCAB)) * 3, n).astype(np.float32),
        "embedding": rng.normal(size=(n, dim)).astype(np.float16),
    }
    table = prediction_rows(
        batch,
        outputs,
        tasks={"style": VOCAB},
        cfg=LabelConfig(embeddings=True),
        review_thresholds={"style": 0.5},
        model_id="model-1",
        run_id=run_id,
        labelled_at=at or datetime.now(UTC),
    )
    partition = out / "run_date=2026-12-01"
    partition.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, partition / f"{run_id}.parquet")
    return table.to_pylist()


def decision(uri: str, label: str, task: str = "label", **extra) -> dict:
    return {"uri": uri, "sha256": sha256(uri), "size": Path(uri).stat().st_size, "etag": "e", "task": task,
            "label": label, "previous_label": "x", "previous_score": 0.3, "model_id": "m", "run_id": "r",
            "reviewer": "ann", **extra}  # fmt: skip


def test_appends_from_many_writers_at_once_lose_nothing_and_the_latest_decision_wins(samples, tmp_path):
    uris = sorted(str(p) for p in samples.rglob("*.jpg"))[:4]
    store = str(tmp_path / "corrections")
    start = datetime(2026, 12, 1, tzinfo=UTC)

    def reviewer(name: str, offset: int) -> None:
        for i in range(10):
            at = start + timedelta(seconds=10 * i + offset)
            corrections.append(store, [decision(uris[i % 4], f"{name}{i}", reviewer=name, decided_at=at)])

    threads = [threading.Thread(target=reviewer, args=(name, k)) for k, name in enumerate("xyz")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = corrections.read(store)
    assert everything.num_rows == 30
    assert sorted(everything["reviewer"].to_pylist()) == sorted(list("xyz") * 10)
    latest = corrections.latest(everything)
    assert latest.num_rows == 4  # four objects, one task
    by_uri = dict(zip(latest["uri"].to_pylist(), latest["label"].to_pylist(), strict=True))
    assert by_uri[uris[1]] == "z9" and by_uri[uris[0]] == "z8"  # z wrote last, at the highest offsets


def test_corrections_override_by_uri_or_sha256_and_extend_the_training_collection(samples, tmp_path):
    cfg = load_config(None, ["data.test_fraction=0"])  # 2 images a movement: train and val only
    collection = load_collection(str(samples), cfg.data)
    table = collection.table.to_pylist()
    in_val = next(r for r in table if r["split"] == "val")
    in_train = next(r for r in table if r["split"] == "train" and r["uri"] != in_val["uri"])
    copy = tmp_path / "elsewhere" / "same_bytes.jpg"  # the bytes of `in_train` under another uri
    copy.parent.mkdir()
    shutil.copy(in_train["uri"], copy)
    outside = tmp_path / "elsewhere" / "new.png"
    outside.write_bytes(Path(table[-1]["uri"]).read_bytes() + b"\0")  # new bytes, new object
    store = str(tmp_path / "corrections")
    corrections.append(store, [decision(in_val["uri"], "hand_label")])
    corrections.append(store, [decision(str(copy), "same_bytes_label")])
    corrections.append(store, [decision(str(outside), "hand_label"), decision(str(outside), "x", task="artist")])

    merged, learned = corrections.apply(collection, store)
    rows = {r["uri"]: r for r in merged.table.to_pylist()}
    assert rows[in_val["uri"]]["label"] == "hand_label" and rows[in_val["uri"]]["split"] == "train"
    assert rows[in_train["uri"]]["label"] == "same_bytes_label"  # matched by sha256
    assert rows[str(outside)] == {**rows[str(outside)], "label": "hand_label", "split": "train"}
    assert merged.table.num_rows == collection.table.num_rows + 1
    assert "hand_label" in merged.vocabs["label"]
    assert learned.to_dict() == dict(uri=store, decisions=3, relabelled=2, added=1, left_out=1)
    assert merged.fingerprint != collection.fingerprint
    alone = corrections.as_collection(store, ["label"])
    assert alone.table.num_rows == 3 and alone.tasks == ["label"]
    with pytest.raises(ConfigError, match="not found"):
        corrections.apply(collection, str(tmp_path / "nothing"))


def test_queue_least_confident_first_pages_filters_and_two_reviewers(samples, tmp_path):
    rows = write_predictions(tmp_path / "pred", samples)
    cfg = load_config()
    store = str(tmp_path / "corrections")
    first, _ = open_review(str(tmp_path / "pred"), store, cfg)
    second, _ = open_review(str(tmp_path / "pred"), store, cfg)  # another reviewer's server on the same data
    unsure = sorted((r for r in rows if r["needs_review"]), key=lambda r: (r["style_score"], r["uri"]))
    assert len(unsure) >= 8
    page = first.page("style", limit=5)
    assert [i["uri"] for i in page["items"]] == [r["uri"] for r in unsure[:5]]
    assert page["remaining"] == len(unsure)
    rest = first.page("style", after=page["items"][-1]["position"], limit=100)
    assert [i["uri"] for i in rest["items"]] == [r["uri"] for r in unsure[5:]]
    label = unsure[0]["style"]
    assert {i["label"] for i in first.page("style", label=label, limit=100)["items"]} == {label}
    assert first.page("style", run="another-run")["items"] == []

    first.decide(unsure[0]["uri"], "style", "b", "ann")
    second.decide(unsure[1]["uri"], "style", "c", "bob")
    for queue in (first, second):  # each sees the other's decision
        page = queue.page("style", limit=100)
        assert page["remaining"] == len(unsure) - 2
        assert {i["uri"] for i in page["items"]}.isdisjoint({unsure[0]["uri"], unsure[1]["uri"]})
    restarted, _ = open_review(str(tmp_path / "pred"), store, cfg)  # a restart resumes where the queue stands
    assert restarted.page("style", limit=1)["items"][0]["uri"] == unsure[2]["uri"]
    saved = corrections.read(store).sort_by("reviewer").to_pylist()
    assert [(d["uri"], d["label"], d["reviewer"]) for d in saved] == [
        (unsure[0]["uri"], "b", "ann"),
        (unsure[1]["uri"], "c", "bob"),
    ]
    assert saved[0]["previous_label"] == unsure[0]["style"] and saved[0]["sha256"] == unsure[0]["sha256"]
    assert saved[0]["previous_score"] == pytest.approx(unsure[0]["style_score"])
    with pytest.raises(ConfigError, match="not a label"):
        first.decide(unsure[3]["uri"], "style", "nonsense", "ann")


def test_a_newer_run_replaces_an_objects_older_prediction(samples, tmp_path):
    write_predictions(tmp_path / "pred", samples, seed=0, run_id="old", at=datetime(2026, 11, 1, tzinfo=UTC))
    newer = write_predictions(tmp_path / "pred", samples, seed=1, run_id="new", at=datetime(2026, 12, 1, tzinfo=UTC))
    queue, _ = open_review(str(tmp_path / "pred"), str(tmp_path / "c"), load_config())
    assert queue.table.num_rows == len(newer) and set(queue.table["run_id"].to_pylist()) == {"new"}


def test_app_serves_only_what_is_under_review_to_whom_it_may(samples, tmp_path):
    write_predictions(tmp_path / "pred", samples)
    cfg = load_config()
    queue, neighbours = open_review(str(tmp_path / "pred"), str(tmp_path / "c"), cfg)
    uri = queue.page("style", limit=1)["items"][0]["uri"]
    app = create_app(queue, cfg, neighbours=neighbours)
    app.config["ALLOWED_HOSTS"] = {"127.0.0.1:8765"}
    client = app.test_client()
    local = {"base_url": "http://127.0.0.1:8765"}
    assert client.get("/", **local).status_code == 200
    assert client.get("/", base_url="http://attacker.example:8765").status_code == 403  # DNS rebinding
    image = client.get("/image", query_string={"uri": uri}, **local)
    assert image.status_code == 200 and image.mimetype == "image/jpeg" and image.data[:2] == b"\xff\xd8"
    assert client.get("/image", query_string={"uri": "/etc/passwd"}, **local).status_code == 404
    form = client.post("/api/decide", data={"uri": uri, "task": "style", "label": "a"}, **local)
    assert form.status_code == 415  # a cross-site form cannot decide
    similar_works = client.get("/api/similar", query_string={"uri": uri}, **local).get_json()["neighbours"]
    assert len(similar_works) == 5 and uri not in {n["uri"] for n in similar_works}

    guarded = create_app(queue, cfg, token="s3cret").test_client()
    assert guarded.get("/api/facets").status_code == 403
    assert guarded.get("/", query_string={"token": "wrong"}).status_code == 403
    assert guarded.get("/", query_string={"token": "s3cret"}).status_code == 200
    assert guarded.get("/api/facets").status_code == 200  # the token is now a cookie


def test_nearest_neighbours_match_a_plain_search_and_skip_rows_without_embeddings(samples, tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 16)).astype(np.float32)
    present = np.ones(200, dtype=bool)
    present[[3, 7]] = False
    index = NearestNeighbours(vectors, present)
    rows, similarity = index.query(0, 10)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    expected = [r for r in np.argsort(-(unit @ unit[0])) if r not in (0, 3, 7)][:10]
    assert rows.tolist() == expected
    assert np.all(np.diff(similarity) <= 0) and similarity[0] == pytest.approx(float(unit[expected[0]] @ unit[0]))
    assert index.query(3, 5)[0].size == 0

    rows = write_predictions(tmp_path / "pred", samples)
    found = similar(str(tmp_path / "pred"), rows[0]["uri"], 3, load_config())
    assert found["uri"] == rows[0]["uri"] and len(found["neighbours"]) == 3
    assert {"uri", "similarity", "style"} <= set(found["neighbours"][0])
    with pytest.raises(ConfigError, match="not in the predictions"):
        similar(str(tmp_path / "pred"), "/nowhere.jpg", 3, load_config())


def test_review_queue_rejects_unknown_tasks(samples, tmp_path):
    write_predictions(tmp_path / "pred", samples)
    queue, _ = open_review(str(tmp_path / "pred"), str(tmp_path / "c"), load_config())
    assert isinstance(queue, ReviewQueue) and queue.tasks == ["style"]
    with pytest.raises(ConfigError, match="unknown task"):
        queue.page("artist")


def test_review_on_s3_images_predictions_and_corrections(samples, tmp_path, s3_bucket):
    """Images, predictions and the corrections dataset all in a bucket (the local S3 server)."""
    import boto3

    client = boto3.client("s3")
    for path in samples.rglob("*.jpg"):
        client.upload_file(str(path), s3_bucket, f"images/{path.relative_to(samples)}")
    rows = write_predictions(tmp_path / "pred", samples)
    prefix = str(samples) + "/"
    table = pq.read_table(next((tmp_path / "pred").rglob("*.parquet")))
    on_s3 = [u.replace(prefix, f"s3://{s3_bucket}/images/") for u in table["uri"].to_pylist()]
    table = table.set_column(table.schema.get_field_index("uri"), "uri", pa.array(on_s3, pa.string()))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    client.put_object(Bucket=s3_bucket, Key="pred/run_date=2026-12-01/p.parquet", Body=sink.getvalue().to_pybytes())

    cfg = load_config()
    queue, neighbours = open_review(f"s3://{s3_bucket}/pred", f"s3://{s3_bucket}/corrections", cfg)
    item = queue.page("style", limit=1)["items"][0]
    assert item["uri"].startswith(f"s3://{s3_bucket}/images/") and len(rows) == queue.table.num_rows
    client_app = create_app(queue, cfg, neighbours=neighbours).test_client()
    image = client_app.get("/image", query_string={"uri": item["uri"]})
    assert image.status_code == 200 and image.data[:2] == b"\xff\xd8"
    answer = client_app.post("/api/decide", json={"uri": item["uri"], "task": "style", "label": "d", "reviewer": "s3"})
    assert answer.status_code == 200
    assert client_app.post("/api/decide", json={"uri": item["uri"]}).status_code == 400
    saved = corrections.read(f"s3://{s3_bucket}/corrections").to_pylist()
    assert [(d["uri"], d["label"], d["reviewer"]) for d in saved] == [(item["uri"], "d", "s3")]
