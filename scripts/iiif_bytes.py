"""Bytes moved per image when labelling through IIIF, against reading the full-size file (docs/measurements.md).

Serves the first --n JPEG files of each painting set through a real IIIF Image API server (zimeon's `iiif`,
from the test extra) on 127.0.0.1, lists a v3 manifest of them with artfuse's IIIF listing at the decode size of
a model of --img-size, fetches each image as the label job would (artfuse.data.storage.read_bytes) and compares
with the files' own sizes. The images are linked from a temporary folder, never copied.

    python scripts/iiif_bytes.py $ARTFUSE_PAINTINGS/western-genre $ARTFUSE_PAINTINGS/chinese-genre
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from iiif_server import image_server  # noqa: E402 - the tests' server helper

from artfuse.config import StorageConfig  # noqa: E402
from artfuse.data import storage  # noqa: E402
from artfuse.data.iiif import list_canvases  # noqa: E402
from artfuse.data.images import decode_image  # noqa: E402
from artfuse.data.preprocess import Preprocess  # noqa: E402


def jpegs(folder: Path, n: int) -> list[Path]:
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.read_bytes()[:3] == b"\xff\xd8\xff":
            found.append(path)
            if len(found) == n:
                break
    return found


def manifest(base: str, names: list[str]) -> dict:
    """A v3 manifest with one canvas per served image (no declared sizes: the listing asks info.json)."""

    def canvas(name: str) -> dict:
        service = f"{base}/3.0_pil/{name}"
        body = {"id": f"{service}/full/max/0/default.jpg", "type": "Image"}
        body["service"] = [{"id": service, "type": "ImageService3"}]
        painting = {"id": f"{base}/a/{name}", "type": "Annotation", "motivation": "painting", "body": body}
        page = {"id": f"{base}/p/{name}", "type": "AnnotationPage", "items": [painting]}
        return {"id": f"{base}/c/{name}", "type": "Canvas", "items": [page]}

    items = [canvas(name) for name in names]
    return {"id": f"{base}/manifest", "type": "Manifest", "label": {"en": ["paintings"]}, "items": items}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sets", nargs="+", type=Path, help="painting set folders")
    parser.add_argument("--n", type=int, default=20, help="JPEG files per set")
    parser.add_argument("--img-size", type=int, default=288, help="the model's input size (decode size follows)")
    args = parser.parse_args()
    size = Preprocess.for_model(args.img_size, (0, 0, 0), (1, 1, 1)).resize
    files = [path for folder in args.sets for path in jpegs(folder, args.n)]
    with tempfile.TemporaryDirectory() as tmp:
        served = Path(tmp) / "images"
        served.mkdir()
        names = []
        for i, path in enumerate(files):
            names.append(f"p{i:04d}")
            (served / f"{names[-1]}.jpg").symlink_to(path.resolve())
        with image_server(served, Path(tmp) / "server.log") as base:
            (Path(tmp) / "manifest.json").write_text(json.dumps(manifest(base, names)))
            listed = list_canvases(str(Path(tmp) / "manifest.json"), StorageConfig(), image_size=size)
            fetched = {}
            for uri in listed["uri"].to_pylist():
                fetched[uri.split("/3.0_pil/")[1].split("/")[0]] = storage.read_bytes(uri)
    full = [path.stat().st_size for path in files]
    through_iiif = [len(fetched[name]) for name in names]
    originals = [decode_image(path.read_bytes(), 8) for path in files]
    full_pixels = [d.width * d.height for d in originals]
    shapes = [decode_image(fetched[name], size) for name in names]
    print(json.dumps({
        "images": len(files),
        "decode_size": size,
        "full_file_bytes_mean": round(statistics.mean(full)),
        "iiif_bytes_mean": round(statistics.mean(through_iiif)),
        "iiif_over_full": round(sum(through_iiif) / sum(full), 3),
        "full_megapixels_mean": round(statistics.mean(full_pixels) / 1e6, 3),
        "iiif_megapixels_mean": round(statistics.mean(d.width * d.height for d in shapes) / 1e6, 3),
        "scaled_by_the_server": sum("/full/max/" not in uri for uri in listed["uri"].to_pylist()),
        "served_whole": sum("/full/max/" in uri for uri in listed["uri"].to_pylist()),  # no larger than decode_size
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
