"""IIIF input: manifests and collections (v3, v2) -> one input per canvas at the model's size; HTTP(S) reads with
retries, a timeout and a per-server limit; `artfuse label` over a manifest served by a real IIIF Image API server.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from iiif_server import image_server, requests_logged
from PIL import Image

from artfuse import cli
from artfuse.bench.label import save_untrained_package
from artfuse.config import ConfigError, DataConfig, StorageConfig, load_config
from artfuse.data import http, iiif, storage
from artfuse.data.catalog import load_collection
from artfuse.data.iiif import image_request, list_canvases
from artfuse.data.preprocess import Preprocess
from artfuse.models.package import read_manifest

TINY = ["model.img_size=64", "model.d_model=32", "model.depth=1", "model.pretrained=none"]
# A tiny model needs little memory: the default 4 GiB reservation cannot be scheduled on a busy 24 GiB machine.
FAST = ["label.batch_size=16", "label.decode_batch_size=4", "label.rows_per_file=16", "label.actor_memory_mb=1024"]
QUICK_RETRIES = StorageConfig(http_retries=2, http_backoff_s=0.01, http_timeout_s=10)
IMAGES = {"still_life": (320, 240), "portrait": (240, 320), "harbour": (400, 300), "square": (300, 300),
          "tall": (200, 280)}  # fmt: skip
LABEL = "Still life with test images"


def picture(seed: int, size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC).save(buffer, fmt)
    return buffer.getvalue()


class Museum(BaseHTTPRequestHandler):
    """A museum's web server: serves its manifests, and its second image server is broken (500 to everything)."""

    documents: dict[str, bytes] = {}
    seen: Counter = Counter()
    active = peak = 0
    lock = threading.Lock()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        with self.lock:
            self.seen[self.path] += 1
            Museum.active += 1
            Museum.peak = max(Museum.peak, Museum.active)
        if self.path.startswith("/slow/"):
            time.sleep(0.05)
        with self.lock:  # before answering: a client that has its answer may send its next request at once
            Museum.active -= 1
        if self.path in self.documents:
            self._answer(200, self.documents[self.path], "application/json")
        elif self.path.startswith("/flaky/") and self.seen[self.path] <= 2:
            self._answer(503, b"busy", "text/plain")
        elif self.path.startswith(("/flaky/", "/slow/")):
            self._answer(200, picture(0, (64, 48)), "image/jpeg")
        elif self.path.startswith("/page/"):
            self._answer(200, b"<html>a login page, not an image</html>", "text/html")
        elif self.path.startswith("/big/"):
            self._answer(200, b"\xff" * 5000, "image/jpeg")
        elif self.path.startswith("/gone/"):
            self._answer(404, b"no such image", "text/plain")
        else:
            self._answer(500, b"internal error", "text/plain")

    def _answer(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def museum() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Museum)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def iiif_images(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """(base URL, access log) of a IIIF Image API server over a folder of IMAGES (one of them a PNG)."""
    folder = tmp_path_factory.mktemp("iiif-images")
    for seed, (name, size) in enumerate(IMAGES.items()):
        fmt = "PNG" if name == "tall" else "JPEG"
        (folder / f"{name}.{fmt.lower().replace('jpeg', 'jpg')}").write_bytes(picture(seed, size, fmt))
    log = folder.parent / f"{folder.name}-server.log"
    with image_server(folder, log) as base:
        yield base, log


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> str:
    return save_untrained_package(str(tmp_path_factory.mktemp("pkg") / "model"), load_config(None, TINY), {"label": 6})


def canvas3(canvas_id: str, service: str, width: int, height: int) -> dict:
    body = {"id": f"{service}/full/max/0/default.jpg", "type": "Image", "format": "image/jpeg", "width": width,
            "height": height, "service": [{"id": service, "type": "ImageService3", "profile": "level1"}]}  # fmt: skip
    painting = {"id": f"{canvas_id}/a", "type": "Annotation", "motivation": "painting", "body": body,
                "target": canvas_id}  # fmt: skip
    page = {"id": f"{canvas_id}/p", "type": "AnnotationPage", "items": [painting]}
    return {"id": canvas_id, "type": "Canvas", "width": width, "height": height, "items": [page]}


def manifest3(manifest_id: str, label: str, canvases: list[dict]) -> dict:
    return {"@context": "http://iiif.io/api/presentation/3/context.json", "id": manifest_id, "type": "Manifest",
            "label": {"nl": ["Stilleven"], "en": [label]}, "items": canvases}  # fmt: skip


def images_fetched(log: Path) -> list[str]:
    return [path for path, _ in requests_logged(log) if "/full/" in path]


def reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (out / "_reports").glob("*.json")]


def test_artfuse_label_on_a_iiif_manifest(iiif_images, museum, package, tmp_path, ray_local):
    base, log = iiif_images
    manifest_url = f"{museum}/objects/1/manifest.json"
    canvases = [canvas3(f"{museum}/objects/1/canvas/{name}", f"{base}/3.0_pil/{name}", *size)
                for name, size in IMAGES.items()]  # fmt: skip
    canvases.append(canvas3(f"{museum}/objects/1/canvas/missing", f"{base}/3.0_pil/missing", 400, 300))
    canvases.append(canvas3(f"{museum}/objects/1/canvas/broken", f"{museum}/iiif-broken/b1", 400, 300))
    Museum.documents["/objects/1/manifest.json"] = json.dumps(manifest3(manifest_url, LABEL, canvases)).encode()
    out = tmp_path / "predictions"
    args = ["label", "--model", package, "--input", manifest_url, "--out", str(out), *sum((["--set", s] for s in (
        *TINY, *FAST, "storage.http_retries=2", "storage.http_backoff_s=0.01")), [])]  # fmt: skip
    size = Preprocess.from_dict(read_manifest(package)["preprocess"]).resize

    assert cli.main(args) == 0
    (first,) = reports(out)
    assert (first["listed"], first["labelled"], first["errors"]) == (7, 5, 2)
    rows = {r["canvas_id"].rsplit("/", 1)[1]: r for r in pads.dataset(out, partitioning="hive",
            ignore_prefixes=["_", "."]).to_table().to_pylist()}  # fmt: skip
    assert sorted(rows) == sorted([*IMAGES, "missing", "broken"])
    for name, row in rows.items():
        assert row["object_id"] == manifest_url and row["object_label"] == LABEL, name
    assert rows["missing"]["error"].startswith("missing: HTTP 404") and rows["missing"]["label"] is None
    assert rows["broken"]["error"].startswith("unreadable: HTTP 500") and "after 3 tries" in rows["broken"]["error"]
    assert Museum.seen[f"/iiif-broken/b1/full/,{size}/0/default.jpg"] == 3  # 1 + 2 retries; sized from the manifest
    for name, (width, height) in IMAGES.items():
        row = rows[name]
        assert row["error"] is None and row["label"] is not None and row["etag"], name
        # fetched at the model's size: the server scaled the shorter side to the decode size, once per image
        assert min(row["width"], row["height"]) == size and (row["width"] > row["height"]) == (width > height)
    fetched = images_fetched(log)
    expected = {f"/3.0_pil/{n}/full/{f'{size},' if w <= h else f',{size}'}/0/default.jpg"
                for n, (w, h) in IMAGES.items()}  # fmt: skip
    assert sorted(fetched) == sorted([*expected, f"/3.0_pil/missing/full/,{size}/0/default.jpg"])

    assert cli.main(args) == 0
    (again,) = [r for r in reports(out) if r["run_id"] != first["run_id"]]
    assert (again["listed"], again["skipped"], again["labelled"], again["errors"]) == (7, 7, 0, 0)
    assert pads.dataset(out, partitioning="hive", ignore_prefixes=["_", "."]).count_rows() == 7
    assert images_fetched(log) == fetched  # no image fetched again


def test_v2_manifests_and_collections_list_each_canvas_once(iiif_images, museum, tmp_path):
    base, _ = iiif_images
    v2 = {
        "@context": "http://iiif.io/api/presentation/2/context.json",
        "@id": f"{museum}/objects/2/manifest",
        "@type": "sc:Manifest",
        "label": [{"@value": "Portret", "@language": "nl"}, {"@value": "Portrait", "@language": "en"}],
        "sequences": [{"@type": "sc:Sequence", "canvases": [
            {"@id": f"{museum}/objects/2/canvas/{name}", "@type": "sc:Canvas", "width": 1, "height": 1, "images": [
                {"@type": "oa:Annotation", "motivation": "sc:painting", "resource": {
                    "@id": f"{base}/2.1_pil/{name}/full/full/0/default.jpg", "@type": "dctypes:Image",
                    "service": {"@context": "http://iiif.io/api/image/2/context.json",
                                "@id": f"{base}/2.1_pil/{name}", "profile": "http://iiif.io/api/image/2/level2.json"}}}]}
            for name in ("portrait", "harbour")]}],
    }  # fmt: skip
    square = canvas3(f"{museum}/c/sq", f"{base}/3.0_pil/square", 1, 1)
    one = manifest3(f"{museum}/objects/3/manifest", "Square", [square])
    (tmp_path / "objects-2.json").write_text(json.dumps(v2))
    collection = {
        "@context": "http://iiif.io/api/presentation/3/context.json",
        "id": f"{museum}/collection",
        "type": "Collection",
        "label": {"en": ["Everything"]},
        "items": [
            {"id": str(tmp_path / "objects-2.json"), "type": "Manifest"},  # by reference
            one,  # embedded
            {"id": str(tmp_path / "objects-2.json"), "type": "Manifest"},  # twice: listed once
            {"id": str(tmp_path / "absent.json"), "type": "Manifest"},  # a broken member is skipped, not fatal
        ],
    }
    (tmp_path / "collection.json").write_text(json.dumps(collection))

    table = list_canvases(str(tmp_path / "collection.json"), QUICK_RETRIES, image_size=100)
    rows = {r["canvas_id"].rsplit("/", 1)[1]: r for r in table.to_pylist()}
    assert sorted(rows) == ["harbour", "portrait", "sq"]
    assert table["uri"].to_pylist() == sorted(table["uri"].to_pylist())
    assert rows["portrait"]["uri"] == f"{base}/2.1_pil/portrait/full/100,/0/default.jpg"  # from info.json: 240 x 320
    assert rows["harbour"]["uri"] == f"{base}/2.1_pil/harbour/full/,100/0/default.jpg"
    assert rows["sq"]["uri"] == f"{base}/3.0_pil/square/full/100,/0/default.jpg"
    assert rows["portrait"]["object_label"] == "Portrait" and rows["sq"]["object_label"] == "Square"
    assert all(r["etag"].startswith("info:") and r["size"] == 0 for r in rows.values())
    assert storage.read_bytes(rows["portrait"]["uri"], QUICK_RETRIES)[:3] == b"\xff\xd8\xff"
    # the same listing again gives the same etags: nothing changed on the server
    assert list_canvases(str(tmp_path / "collection.json"), QUICK_RETRIES, image_size=100).equals(table)


def test_image_request_sizes_and_labels():
    assert image_request("https://s/iiif/x", 3, 4000, 3000, 329) == "https://s/iiif/x/full/,329/0/default.jpg"
    assert image_request("https://s/iiif/x/", 2, 3000, 4000, 329) == "https://s/iiif/x/full/329,/0/default.jpg"
    # never ask a server to upscale (v3 refuses without ^): the full image, and the decoder resizes it
    assert image_request("https://s/iiif/x", 3, 300, 200, 329) == "https://s/iiif/x/full/max/0/default.jpg"
    assert image_request("https://s/iiif/x", 2, 0, 0, 329) == "https://s/iiif/x/full/full/0/default.jpg"
    assert iiif.text({"fr": ["Nature morte"], "none": ["Stilleven"]}) == "Stilleven"
    assert iiif.text({"de": ["Stillleben", "Öl auf Leinwand"]}) == "Stillleben; Öl auf Leinwand"
    assert iiif.text("A title") == "A title" and iiif.text(None) is None


def test_not_a_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "thing.json").write_text(json.dumps({"type": "Annotation"}))
    with pytest.raises(ConfigError, match="not a IIIF manifest or collection"):
        list_canvases(str(tmp_path / "thing.json"))
    with pytest.raises(ConfigError, match="not found"):
        list_canvases(str(tmp_path / "nothing.json"))


def test_http_reads_retry_limit_per_server_and_name_each_failure(museum):
    assert http.get(f"{museum}/flaky/a.jpg", QUICK_RETRIES).body[:3] == b"\xff\xd8\xff"  # 503 twice, then 200
    assert Museum.seen["/flaky/a.jpg"] == 3
    with pytest.raises(FileNotFoundError, match="HTTP 404"):
        http.get(f"{museum}/gone/a.jpg", QUICK_RETRIES)
    with pytest.raises(http.HTTPFailure, match="HTTP 500 .* after 3 tries"):
        http.get(f"{museum}/down/a.jpg", QUICK_RETRIES)
    with pytest.raises(http.TooLarge, match="above data.max_bytes=1000"):
        http.get(f"{museum}/big/a.jpg", QUICK_RETRIES, max_bytes=1000)
    with pytest.raises(http.Unreachable, match="no answer from 127.0.0.1:9 after 1 try"):
        http.get("http://127.0.0.1:9/x.jpg", StorageConfig(http_retries=0, http_timeout_s=2))
    from artfuse.data.stages import _read

    with pytest.raises(storage.StorageUnavailable, match="no answer from 127.0.0.1:9"):  # an outage fails the run
        _read("http://127.0.0.1:9/x.jpg", 0, 1000, StorageConfig(http_retries=0, http_timeout_s=2))
    assert _read(f"{museum}/page/a.jpg", 0, 10**6, QUICK_RETRIES)[0].startswith(b"<html>")  # decode names it
    assert _read(f"{museum}/big/b.jpg", 0, 1000, QUICK_RETRIES)[1].startswith("too_large:")

    limited = StorageConfig(http_max_per_server=2)
    Museum.peak = 0
    threads = [threading.Thread(target=http.get, args=(f"{museum}/slow/{i}.jpg", limited)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Museum.peak <= 2 and all(Museum.seen[f"/slow/{i}.jpg"] == 1 for i in range(8))


def test_a_collection_manifest_row_can_name_a_iiif_object(iiif_images, tmp_path):
    base, _ = iiif_images
    objects = {"a": ["still_life", "portrait"], "b": ["harbour"], "c": ["square", "tall"]}
    for obj, names in objects.items():
        canvases = [canvas3(f"{base}/objects/{obj}/canvas/{n}", f"{base}/3.0_pil/{n}", *IMAGES[n]) for n in names]
        (tmp_path / f"{obj}.json").write_text(json.dumps(manifest3(f"{base}/objects/{obj}", obj, canvases)))
    (tmp_path / "local.jpg").write_bytes(picture(9, (120, 90)))
    rows = ["iiif_manifest,path,genre", "a.json,,still", "b.json,,still", "c.json,,other", ",local.jpg,other"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")

    collection = load_collection(str(tmp_path / "labels.csv"), DataConfig(), QUICK_RETRIES, image_size=100)
    rows = collection.table.to_pylist()
    assert collection.tasks == ["genre"] and len(rows) == 6
    by_image = {r["uri"].split("/3.0_pil/")[-1].split("/")[0]: r for r in rows}
    assert {n: by_image[n]["genre"] for n in IMAGES} == {
        "still_life": "still", "portrait": "still", "harbour": "still", "square": "other", "tall": "other"
    }  # fmt: skip
    assert by_image["portrait"]["uri"] == f"{base}/3.0_pil/portrait/full/100,/0/default.jpg"
    assert by_image["portrait"]["split"] == by_image["still_life"]["split"]  # one object, one split
    assert by_image["square"]["split"] == by_image["tall"]["split"]
    (tmp_path / "bad.csv").write_text("iiif_manifest,path,genre\na.json,local.jpg,still\n")
    with pytest.raises(ConfigError, match="exactly one of 'path' and 'iiif_manifest'"):
        load_collection(str(tmp_path / "bad.csv"), DataConfig(), QUICK_RETRIES)
