"""`artfuse annotate`: predictions as IIIF Presentation 3 annotations. What each annotation says (body, target,
provenance, a curator's decision over the model's), which rows become annotations, that every document written
validates against the IIIF project's JSON Schema, manifest copies with their annotations inside their canvases, and
reruns that write the same bytes. Mirador showing them: test_annotate_mirador.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from artfuse import cli
from artfuse.config import ConfigError, LabelConfig, load_config
from artfuse.data import corrections, storage
from artfuse.data import iiif_annotations as ia
from artfuse.pipelines.annotate import AnnotationInvalid, annotate, image_target, image_url_mapping, load_vocabulary
from artfuse.pipelines.label import prediction_rows

TASKS = {"genre": ["history", "landscape", "portrait", "stillife"], "period": ["modern", "old"]}
THRESHOLDS = {"genre": 0.6, "period": 0.6}
MUSEUM = "https://museum.test/iiif"
BASE = "https://labels.museum.test/artfuse"
A, B, V2 = f"{MUSEUM}/a/manifest", f"{MUSEUM}/b/manifest", f"{MUSEUM}/c/manifest"
R1, R2 = "20261201T020000-0000aaaa", "20261202T020000-0000bbbb"
AAT_PORTRAITS, AAT_LANDSCAPES = "http://vocab.getty.edu/aat/300015637", "http://vocab.getty.edu/aat/300015636"


def one_hot(task: str, label: str, score: float) -> list[float]:
    """Probabilities whose best is `label` at `score`, the rest shared."""
    vocab = TASKS[task]
    rest = (1.0 - score) / (len(vocab) - 1)
    return [score if v == label else rest for v in vocab]


def image(name: str, **objects) -> dict:
    return {"uri": f"{MUSEUM}/image/{name}/full/,329/0/default.jpg", "sha256": f"sha-{name}", **objects}


def canvas_row(manifest: str, canvas: str, sha: str, genre: tuple[str, float], period: tuple[str, float]) -> dict:
    return image(
        sha,
        object_id=manifest,
        object_label="An object",
        canvas_id=f"{manifest}/canvas/{canvas}",
        probs={"genre": one_hot("genre", *genre), "period": one_hot("period", *period)},
    )


def write_night(out: Path, rows: list[dict], run_id: str, at: datetime) -> None:
    """One label run's output through `prediction_rows` (the one place a prediction row is built)."""
    n = len(rows)
    ok = [r.get("error") is None for r in rows]
    batch = {
        "uri": np.array([r["uri"] for r in rows], dtype=object),
        "size": np.zeros(n, np.int64),
        "etag": np.array([f"etag-{r['sha256']}" for r in rows], dtype=object),
        "sha256": np.array([r["sha256"] for r in rows], dtype=object),
        "width": np.full(n, 329, np.int32),
        "height": np.full(n, 329, np.int32),
        "format": np.array(["JPEG"] * n, dtype=object),
        "error": np.array([r.get("error") for r in rows], dtype=object),
        **{
            name: np.array([r.get(name) for r in rows], dtype=object)
            for name in ("object_id", "object_label", "canvas_id")
        },
    }
    outputs = {
        task: np.array([r["probs"][task] for r, good in zip(rows, ok, strict=True) if good], np.float32)
        for task in TASKS
    }
    table = prediction_rows(
        batch,
        outputs,
        tasks=TASKS,
        cfg=LabelConfig(),
        review_thresholds=THRESHOLDS,
        model_id="model-7f3a",
        run_id=run_id,
        labelled_at=at,
    )
    partition = out / f"run_date={at:%Y-%m-%d}"
    partition.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, partition / f"artfuse-{run_id}_000000_000000-0.parquet")


NIGHT_1 = [
    canvas_row(A, "c1", "a1", ("portrait", 0.85), ("old", 0.8)),  # accepted
    canvas_row(A, "c2", "a2", ("history", 0.4), ("old", 0.5)),  # needs review; a curator decides its genre
    canvas_row(B, "c1", "b1", ("stillife", 0.9), ("old", 0.9)),  # accepted
    {
        "uri": "s3://archive/images/x.jpg",
        "sha256": "sha-x",
        "probs": {"genre": one_hot("genre", "landscape", 0.9), "period": one_hot("period", "old", 0.9)},
    },
    {
        "uri": "/data/images/y.jpg",
        "sha256": "sha-y",
        "probs": {"genre": one_hot("genre", "portrait", 0.5), "period": one_hot("period", "old", 0.9)},
    },
    {"uri": "s3://archive/images/gone.jpg", "sha256": None, "error": "missing: no such object"},
]
# The next night A's first canvas has a new image, labelled again.
NIGHT_2 = [canvas_row(A, "c1", "a1-new", ("history", 0.95), ("old", 0.7))]


def manifest3(manifest_id: str, canvases: list[str]) -> dict:
    items = []
    for name in canvases:
        canvas_id = f"{manifest_id}/canvas/{name}"
        body = {
            "id": f"{MUSEUM}/image/{name}/full/max/0/default.jpg",
            "type": "Image",
            "format": "image/jpeg",
            "width": 400,
            "height": 300,
            "service": [{"id": f"{MUSEUM}/image/{name}", "type": "ImageService3", "profile": "level1"}],
        }
        painting = {
            "id": f"{canvas_id}/painting",
            "type": "Annotation",
            "motivation": "painting",
            "body": body,
            "target": canvas_id,
        }
        items.append(
            {
                "id": canvas_id,
                "type": "Canvas",
                "width": 400,
                "height": 300,
                "items": [{"id": f"{canvas_id}/page", "type": "AnnotationPage", "items": [painting]}],
            }
        )
    return {
        "@context": ia.IIIF_CONTEXT,
        "id": manifest_id,
        "type": "Manifest",
        "label": {"en": [manifest_id]},
        "items": items,
    }


@pytest.fixture
def museum(tmp_path) -> dict:
    """Two nights of predictions, a curator's decision, a vocabulary, and the collection they came from."""
    predictions = tmp_path / "predictions"
    write_night(predictions, NIGHT_1, R1, datetime(2026, 12, 1, 2, 0, 5, tzinfo=UTC))
    write_night(predictions, NIGHT_2, R2, datetime(2026, 12, 2, 2, 0, 5, tzinfo=UTC))
    decisions = tmp_path / "corrections"
    a2 = NIGHT_1[1]
    corrections.append(
        str(decisions),
        [
            {
                "uri": a2["uri"],
                "sha256": a2["sha256"],
                "size": 0,
                "etag": "etag-a2",
                "task": "genre",
                "label": "landscape",
                "previous_label": "history",
                "previous_score": 0.4,
                "model_id": "model-7f3a",
                "run_id": R1,
                "reviewer": "ann",
                "decided_at": datetime(2026, 12, 3, 9, 30, tzinfo=UTC),
            }
        ],
    )
    vocabulary = tmp_path / "vocabulary.csv"
    vocabulary.write_text(f"task,label,uri\ngenre,portrait,{AAT_PORTRAITS}\ngenre,landscape,{AAT_LANDSCAPES}\n")
    collection = tmp_path / "collection.json"
    (tmp_path / "a.json").write_text(json.dumps(manifest3(A, ["c1", "c2"])))
    (tmp_path / "b.json").write_text(json.dumps(manifest3(B, ["c1"])))
    v2 = {
        "@context": "http://iiif.io/api/presentation/2/context.json",
        "@id": V2,
        "@type": "sc:Manifest",
        "label": "v2",
        "sequences": [{"canvases": []}],
    }
    (tmp_path / "c.json").write_text(json.dumps(v2))
    collection.write_text(
        json.dumps(
            {
                "@context": ia.IIIF_CONTEXT,
                "id": f"{MUSEUM}/collection",
                "type": "Collection",
                "label": {"en": ["all"]},
                "items": [{"id": str(tmp_path / name), "type": "Manifest"} for name in ("a.json", "b.json", "c.json")],
            }
        )
    )
    return {
        "predictions": str(predictions),
        "corrections": str(decisions),
        "vocabulary": str(vocabulary),
        "manifests": str(collection),
        "out": tmp_path / "annotations",
    }


def run(museum: dict, cfg=None, **kwargs) -> dict:
    options = {
        "manifests": museum["manifests"],
        "corrections": museum["corrections"],
        "vocabulary": museum["vocabulary"],
        "image_urls": ["s3://archive/images/=https://images.museum.test/"],
    }
    return annotate(museum["predictions"], str(museum["out"]), BASE, cfg or load_config(), **(options | kwargs))


def read(out: Path, relative: str) -> dict:
    return json.loads((out / relative).read_text())


def by_target_and_task(page: dict) -> dict[tuple[str, str], dict]:
    return {(item["target"].rsplit("/", 1)[-1], item["artfuse:task"]): item for item in page["items"]}


def test_each_annotation_says_the_label_its_canvas_and_who_said_it(museum):
    result = run(museum)
    out = museum["out"]
    assert (result["rows_read"], result["rows_iiif"], result["rows_other"]) == (7, 4, 2)  # the error row: none
    assert result["annotations"] == {"machine": 6, "curator": 1}

    page_a = read(out, ia.page_path(A))
    assert page_a["id"] == f"{BASE}/{ia.page_path(A)}" and page_a["type"] == "AnnotationPage"
    assert page_a["@context"] == [f"{BASE}/context.json", ia.IIIF_CONTEXT]
    items = by_target_and_task(page_a)
    # The latest prediction of each canvas (night 2's for c1); c2 needed review: only its decided task is there.
    assert sorted(items) == [("c1", "genre"), ("c1", "period"), ("c2", "genre")]

    machine = items[("c1", "genre")]
    assert machine["target"] == f"{A}/canvas/c1" and machine["motivation"] == "tagging"
    assert machine["body"] == [
        {"type": "TextualBody", "value": "history", "language": "en", "format": "text/plain", "purpose": "tagging"}
    ]
    assert machine["creator"] == {"type": "Software", "name": f"artfuse model model-7f3a, run {R2}"}
    assert machine["generator"] == {"type": "Software", "name": "artfuse annotate"}
    assert machine["created"] == "2026-12-02T02:00:05Z"
    assert machine["artfuse:score"] == 0.95 and machine["artfuse:needsReview"] is False
    assert (machine["artfuse:model"], machine["artfuse:run"], machine["artfuse:machineLabel"]) == (
        "model-7f3a",
        R2,
        "history",
    )
    assert machine["id"] == ia.annotation_id(page_a["id"], f"{A}/canvas/c1", "genre")

    # The curator's decision overrides the model's label, and names the curator as its creator.
    decided = items[("c2", "genre")]
    assert decided["body"][0]["value"] == "landscape" and decided["creator"] == {"type": "Person", "name": "ann"}
    assert decided["created"] == "2026-12-03T09:30:00Z"
    assert (decided["artfuse:machineLabel"], decided["artfuse:score"], decided["artfuse:needsReview"]) == (
        "history",
        0.4,
        True,
    )
    # ... and the vocabulary maps the decided label: a second body, and Mirador still sees a tag
    assert decided["body"][1] == {"type": "SpecificResource", "source": AAT_LANDSCAPES, "purpose": "classifying"}
    assert decided["motivation"] == ["tagging", "classifying"]

    page_b = read(out, ia.page_path(B))
    assert {item["body"][0]["value"] for item in page_b["items"]} == {"stillife", "old"}

    # Files and S3 objects: one page per run, each annotation targeting the image's URL.
    run_page = read(out, ia.run_page_path(R1))
    assert run_page["id"] == f"{BASE}/runs/{R1}.json"
    assert sorted((i["target"], i["body"][0]["value"]) for i in run_page["items"]) == [
        ("https://images.museum.test/x.jpg", "landscape"),
        ("https://images.museum.test/x.jpg", "old"),
    ]
    assert not (out / ia.run_page_path(R2)).exists()  # night 2 labelled no files

    # The manifest copies: each canvas carries its own annotations; v2 manifests are not copied.
    copy = read(out, ia.manifest_path(A))
    assert copy["id"] == f"{BASE}/{ia.manifest_path(A)}" and copy["@context"][0] == f"{BASE}/context.json"
    embedded = {c["id"].rsplit("/", 1)[-1]: c["annotations"] for c in copy["items"]}
    assert [len(pages) for pages in embedded.values()] == [1, 1]
    assert {i["artfuse:task"] for i in embedded["c1"][0]["items"]} == {"genre", "period"}
    assert all(i["target"] == f"{A}/canvas/c1" for i in embedded["c1"][0]["items"])
    assert [i["body"][0]["value"] for i in embedded["c2"][0]["items"]] == ["landscape"]
    assert copy["items"][0]["items"] == manifest3(A, ["c1"])["items"][0]["items"]  # the painting left as it was
    assert not (out / ia.manifest_path(V2)).exists()
    assert result["unchanged"]["manifest (not Presentation 3, not copied)"] == 1
    assert json.loads((out / "context.json").read_text()) == json.loads(ia.context_document())


def test_which_rows_become_annotations(museum):
    everything = run(museum, rows=["all"], corrections=None, vocabulary=None)
    page_a = read(museum["out"], ia.page_path(A))
    assert sorted(by_target_and_task(page_a)) == [("c1", "genre"), ("c1", "period"), ("c2", "genre"), ("c2", "period")]
    unsure = by_target_and_task(page_a)[("c2", "genre")]
    assert unsure["artfuse:needsReview"] is True and unsure["body"][0]["value"] == "history"
    assert len(read(museum["out"], ia.run_page_path(R1))["items"]) == 4
    assert everything["annotations"] == {"machine": 10, "curator": 0}

    decided = run(museum, rows=["decided"])
    assert decided["annotations"] == {"machine": 0, "curator": 1}
    assert [i["target"] for i in read(museum["out"], ia.page_path(A))["items"]] == [f"{A}/canvas/c2"]
    # B has no decided canvas any more: its page empties rather than keep labels this selection leaves out
    assert read(museum["out"], ia.page_path(B))["items"] == []

    with pytest.raises(ConfigError, match="--rows decided needs --corrections"):
        run(museum, rows=["decided"], corrections=None)


def test_every_document_written_validates_against_the_iiif_schema(museum):
    result = run(museum, validate=True)
    assert result["validated"] > 0
    written = [p for p in museum["out"].rglob("*.json") if p.name != "context.json"]
    assert len(written) == 5  # two pages, two manifest copies, one run page
    for path in written:
        assert ia.schema_errors(json.loads(path.read_text())) == [], path

    # The schema is not a formality: an image target that is not http(s) is refused, and --validate says why.
    page = read(museum["out"], ia.run_page_path(R1))
    page["items"][0]["target"] = "s3://archive/images/x.jpg"
    assert any("target" in e for e in ia.schema_errors(page))
    with pytest.raises(AnnotationInvalid, match="must be http"):
        run(museum, validate=True, image_urls=[])
    manifest = read(museum["out"], ia.manifest_path(A))
    del manifest["label"]
    assert ia.schema_errors(manifest)


def test_a_rerun_writes_the_same_bytes_and_a_new_night_rewrites_only_its_pages(museum):
    first = run(museum)
    out = museum["out"]
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}

    again = run(museum)
    assert again["written"] == {}
    assert sum(again["unchanged"].values()) == sum(first["written"].values()) + 1  # + the v2 manifest, not copied
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before  # nothing even rewritten

    # A smaller spill (every manifest in a bucket of its own, a row a batch) gives the same documents.
    small = load_config(None, ["annotate.bucket_rows=1", "annotate.batch_rows=1", "annotate.write_threads=1"])
    assert run(museum, small)["written"] == {}

    # A new night labels B's canvas again: B's page and copy change, nothing else is touched.
    write_night(
        Path(museum["predictions"]),
        [canvas_row(B, "c1", "b1-new", ("portrait", 0.9), ("modern", 0.8))],
        "20261204T020000-0000cccc",
        datetime(2026, 12, 4, 2, 0, tzinfo=UTC),
    )
    later = run(museum)
    assert later["written"] == {"manifest": 1, "page": 1}
    changed = {p for p in files if p.read_bytes() != before[p][0]}
    assert changed == {out / ia.page_path(B), out / ia.manifest_path(B)}
    assert all(p.stat().st_mtime_ns == before[p][1] for p in files if p not in changed)
    body = read(out, ia.page_path(B))["items"][0]["body"]
    assert body == [
        {"type": "TextualBody", "value": "portrait", "language": "en", "format": "text/plain", "purpose": "tagging"},
        {"type": "SpecificResource", "source": AAT_PORTRAITS, "purpose": "classifying"},
    ]


def test_annotate_writes_to_s3_through_storage(museum, s3_bucket):
    out = f"s3://{s3_bucket}/annotations"
    first = annotate(museum["predictions"], out, BASE, load_config(), manifests=museum["manifests"])
    assert first["written"] == {"context": 1, "manifest": 2, "page": 2, "run page": 1}
    page = json.loads(storage.read_bytes(storage.join(out, ia.page_path(A))))
    assert page["items"] and page["items"][0]["target"].startswith(f"{A}/canvas/")
    again = annotate(museum["predictions"], out, BASE, load_config(), manifests=museum["manifests"])
    assert again["written"] == {} and again["unchanged"]["run page"] == 1


def test_the_command_and_its_errors(museum, tmp_path, capsys):
    args = ["annotate", "--predictions", museum["predictions"], "--out", str(museum["out"]), "--base-url", BASE]
    assert cli.main([*args, "--rows", "all", "--set", "annotate.language=nl"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["written"]["page"] == 2 and printed["tasks"] == ["genre", "period"]
    assert read(museum["out"], ia.page_path(B))["items"][0]["body"][0]["language"] == "nl"

    assert cli.main([*args[:-1], "s3://not-a-web-address"]) == 2
    assert "--base-url must be the http(s) URL" in capsys.readouterr().err
    assert cli.main([*args, "--set", "annotate.language=not a tag"]) == 2
    assert (
        cli.main(
            ["annotate", "--predictions", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--base-url", BASE]
        )
        == 2
    )
    assert "no predictions at" in capsys.readouterr().err


def test_vocabulary_files_and_image_urls(tmp_path):
    (tmp_path / "v.yaml").write_text(f"genre:\n  portrait: {AAT_PORTRAITS}\n")
    assert load_vocabulary(str(tmp_path / "v.yaml")) == {("genre", "portrait"): AAT_PORTRAITS}
    (tmp_path / "bad.csv").write_text("task,label,uri\ngenre,portrait,aat:300015637\n")
    with pytest.raises(ConfigError, match="line 2: 'aat:300015637' is not an http"):
        load_vocabulary(str(tmp_path / "bad.csv"))
    with pytest.raises(ConfigError, match="needs the columns task,label,uri"):
        (tmp_path / "cols.csv").write_text("label,uri\n")
        load_vocabulary(str(tmp_path / "cols.csv"))

    mapping = image_url_mapping(["s3://b/img/=https://cdn.test/a/", "s3://b/img/old/=https://old.test/"])
    assert image_target("s3://b/img/old/x y.jpg", mapping) == "https://old.test/x%20y.jpg"  # the longest prefix
    assert image_target("s3://b/img/z.jpg", mapping) == "https://cdn.test/a/z.jpg"
    assert image_target("s3://other/z.jpg", mapping) == "s3://other/z.jpg"
    assert image_target("/data/a b.jpg", []) == "file:///data/a%20b.jpg"
    with pytest.raises(ConfigError, match="PREFIX=URL"):
        image_url_mapping(["s3://b/img/"])
