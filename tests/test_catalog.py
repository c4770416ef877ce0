"""catalog: collections from folder trees and manifests, locally and on S3, with their splits and errors."""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from artfuse.config import ConfigError, DataConfig
from artfuse.data import storage
from artfuse.data.catalog import list_inputs, load_collection
from artfuse.data.images import decode_image

COUNTS = {"cubism": 6, "impressionism": 5, "ukiyo-e": 3}
GARBAGE = b"<html>upload failed</html>"


def image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), (seed * 40 % 256, 90, 200)).save(buffer, fmt)
    return buffer.getvalue()


def tree_files() -> dict[str, bytes]:
    """A folder-per-label collection with the usual clutter beside the images."""
    files = {}
    for label, count in COUNTS.items():
        for i in range(count):
            files[f"{label}/{label}_{i}.jpg"] = image_bytes(i)
    files["cubism/scans/deep.JPG"] = image_bytes(9)  # nested below its label folder: still cubism
    files["impressionism/really_a_png.jpg"] = image_bytes(3, "PNG")
    files["impressionism/.hidden.jpg"] = b"resource fork"
    files["ukiyo-e/broken.jpg"] = GARBAGE
    files["README.md"] = b"# notes"
    files["labels.csv"] = b"path,label\n"
    files["stray.jpg"] = image_bytes(1)  # in the root, outside any label folder
    return files


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return root


def write_manifest(root: Path, text: str, name: str = "manifest.csv") -> str:
    (root / name).write_text(text)
    return str(root / name)


def labelled_tree(root: Path) -> None:
    write_tree(root, {f"img/{i}.jpg": image_bytes(i) for i in range(6)})


def test_folder_tree(tmp_path: Path) -> None:
    write_tree(tmp_path, tree_files())
    collection = load_collection(str(tmp_path), DataConfig())
    table = collection.table
    assert collection.root == str(tmp_path)
    assert collection.tasks == ["label"]
    assert collection.vocabs == {"label": ["cubism", "impressionism", "ukiyo-e"]}
    assert table.column_names == ["uri", "size", "etag", "label", "split"]
    assert table.column("uri").to_pylist() == sorted(table.column("uri").to_pylist())
    assert Counter(table.column("label").to_pylist()) == {"cubism": 7, "impressionism": 6, "ukiyo-e": 4}
    uris = set(table.column("uri").to_pylist())
    assert str(tmp_path / "cubism/scans/deep.JPG") in uris
    assert not any(u.endswith(("stray.jpg", ".hidden.jpg", ".md", ".csv")) for u in uris)
    sizes = dict(zip(table.column("uri").to_pylist(), table.column("size").to_pylist(), strict=True))
    assert sizes[str(tmp_path / "ukiyo-e/broken.jpg")] == len(GARBAGE)
    for split in ("val", "test"):  # round(0.15 n) and round(0.2 n), at least 1
        assert Counter(collection.subset(split).column("label").to_pylist()) == {
            "cubism": 1,
            "impressionism": 1,
            "ukiyo-e": 1,
        }
    assert sum(collection.subset(split).num_rows for split in ("train", "val", "test")) == table.num_rows
    with pytest.raises(ValueError, match="split must be one of"):
        collection.subset("holdout")


def test_split_is_deterministic_and_follows_the_seed(tmp_path: Path) -> None:
    write_tree(tmp_path, {f"{label}/{i}.jpg": image_bytes(i) for label in "ab" for i in range(40)})
    first = load_collection(str(tmp_path), DataConfig(seed=0, val_fraction=0.25, test_fraction=0.2))
    again = load_collection(str(tmp_path), DataConfig(seed=0, val_fraction=0.25, test_fraction=0.2))
    reseeded = load_collection(str(tmp_path), DataConfig(seed=1, val_fraction=0.25, test_fraction=0.2))
    assert first.table.equals(again.table)
    assert Counter(first.subset("val").column("label").to_pylist()) == {"a": 10, "b": 10}
    assert Counter(first.subset("test").column("label").to_pylist()) == {"a": 8, "b": 8}
    for split in ("val", "test"):
        assert first.subset(split).column("uri").to_pylist() != reseeded.subset(split).column("uri").to_pylist()


def uris(collection, split: str) -> set[str]:
    return set(collection.subset(split).column("uri").to_pylist())


def test_test_split_depends_only_on_seed_and_test_fraction(tmp_path: Path) -> None:
    write_tree(tmp_path, {f"{label}/{i}.jpg": image_bytes(i) for label in "ab" for i in range(20)})
    narrow = load_collection(str(tmp_path), DataConfig(val_fraction=0.1, test_fraction=0.2))
    wide = load_collection(str(tmp_path), DataConfig(val_fraction=0.3, test_fraction=0.2))
    assert uris(narrow, "test") == uris(wide, "test") and len(uris(wide, "test")) == 8
    assert uris(narrow, "val") < uris(wide, "val")  # more val images come from train, never from test
    # test_fraction=0: the train / val split, whose val images are the ones ranked first
    two_way = load_collection(str(tmp_path), DataConfig(val_fraction=0.2, test_fraction=0.0))
    assert set(two_way.table.column("split").to_pylist()) == {"train", "val"}
    assert uris(two_way, "val") == uris(narrow, "test")


def test_a_label_too_small_for_three_splits_is_a_clear_error(tmp_path: Path) -> None:
    write_tree(tmp_path, {f"{label}/{i}.jpg": image_bytes(i) for label, n in (("a", 6), ("b", 2)) for i in range(n)})
    with pytest.raises(ConfigError, match="label 'b' .* has 2 image.*train, val and test.*data.test_fraction=0"):
        load_collection(str(tmp_path), DataConfig())
    two_way = load_collection(str(tmp_path), DataConfig(test_fraction=0.0))
    assert Counter(two_way.subset("val").column("label").to_pylist()) == {"a": 1, "b": 1}


def test_fingerprint_tracks_content_and_labels(tmp_path: Path) -> None:
    write_tree(tmp_path, {f"{label}/{i}.jpg": image_bytes(i) for label in "ab" for i in range(4)})
    before = load_collection(str(tmp_path), DataConfig()).fingerprint
    assert before == load_collection(str(tmp_path), DataConfig(seed=5)).fingerprint
    assert len(before) == 16 and int(before, 16) >= 0
    (tmp_path / "a/0.jpg").write_bytes(image_bytes(7))
    os.utime(tmp_path / "a/0.jpg", ns=(1, 1))  # a changed object gets a new mtime, hence etag
    changed = load_collection(str(tmp_path), DataConfig()).fingerprint
    assert changed != before
    (tmp_path / "a/1.jpg").rename(tmp_path / "b/1.jpg")  # same bytes, new label
    assert load_collection(str(tmp_path), DataConfig()).fingerprint not in (before, changed)


def test_manifest_with_several_tasks(tmp_path: Path) -> None:
    write_tree(tmp_path, {f"img/{i}.jpg": image_bytes(i) for i in range(8)})
    rows = "\n".join(f"img/{i}.jpg,{'AB'[i % 2]},0{i % 4},JPEG,12x10,{i}" for i in range(8))
    manifest = write_manifest(tmp_path, "path,artist,period,format,size,Unnamed: 0\n" + rows + "\n")
    collection = load_collection(manifest, DataConfig())
    assert collection.tasks == ["artist", "period"]  # format, size and pandas' index are not tasks
    assert collection.root == str(tmp_path)
    assert collection.vocabs == {
        "artist": ["A", "B"],
        "period": ["00", "01", "02", "03"],
    }  # "01" stays a string
    table = collection.table
    assert table.column_names == ["uri", "size", "etag", "artist", "period", "split"]
    assert table.column("uri")[0].as_py() == str(tmp_path / "img/0.jpg")
    assert table.column("size")[0].as_py() == len(image_bytes(0))
    assert Counter(collection.subset("val").column("artist").to_pylist()) == {"A": 1, "B": 1}
    only_period = load_collection(manifest, DataConfig(tasks=["period"], test_fraction=0.0))  # 2 images a period
    assert only_period.tasks == ["period"] and "artist" not in only_period.table.column_names
    with pytest.raises(ConfigError, match="unknown label column 'style'.*artist, period"):
        load_collection(manifest, DataConfig(tasks=["style"]))


def test_manifest_split_column_and_parquet(tmp_path: Path) -> None:
    write_tree(tmp_path / "images", {f"{i}.png": image_bytes(i, "PNG") for i in range(4)})
    table = pa.table(
        {
            "path": [f"images/{i}.png" for i in range(4)],
            "year": pa.array([1900, 1900, 1901, 1901], pa.int64()),
            "split": ["train", "val", "test", "VAL"],
        }
    )
    pq.write_table(table, tmp_path / "manifest.parquet")
    collection = load_collection(str(tmp_path / "manifest.parquet"), DataConfig())
    assert collection.tasks == ["year"] and collection.vocabs == {"year": ["1900", "1901"]}
    assert collection.table.column("split").to_pylist() == ["train", "val", "test", "val"]
    pq.write_table(
        table.set_column(2, "split", pa.array(["train", "holdout", "val", "val"])), tmp_path / "bad.parquet"
    )
    with pytest.raises(ConfigError, match="split column .* says 'holdout' for .*1.png.*train, val or test"):
        load_collection(str(tmp_path / "bad.parquet"), DataConfig())


def test_manifest_absolute_paths_outside_the_root(tmp_path: Path) -> None:
    labelled_tree(tmp_path / "elsewhere")
    (tmp_path / "meta").mkdir()
    rows = "".join(f"file://{tmp_path}/elsewhere/img/{i}.jpg,{'xy'[i % 2]}\n" for i in range(4))
    manifest = write_manifest(tmp_path / "meta", "path,label\n" + rows)
    collection = load_collection(manifest, DataConfig(test_fraction=0.0))  # 2 images a label: train and val only
    assert collection.table.column("uri").to_pylist() == [
        f"{tmp_path}/elsewhere/img/{i}.jpg" for i in range(4)
    ]
    assert collection.table.column("size").to_pylist() == [len(image_bytes(i)) for i in range(4)]


@pytest.mark.parametrize(
    ("manifest_text", "message"),
    [
        (
            "path,label\nimg/0.jpg,a\nimg/1.jpg,a\nimg/404.jpg,b\nimg/2.jpg,b\n",
            r"1 path\(s\) .* not found: .*img/404.jpg",
        ),
        ("path,label\nimg/0.jpg,a\n../outside.jpg,a\n", r"'../outside.jpg' on row 2 .* escapes"),
        ("path,label\nimg/0.jpg,a\nimg/../../x.jpg,a\n", "escapes the manifest's folder"),
        ("path,label\nimg/0.jpg,a\nimg/1.jpg,a\nimg/2.jpg,b\n", "label 'b' of task 'label' has 1 image"),
        ("path,label\nimg/0.jpg,a\nimg/1.jpg,\n", "have no 'label' label, e.g. .*img/1.jpg"),
        ("path,label\nimg/0.jpg,a\nimg/0.jpg,b\n", "lists .*img/0.jpg more than once"),
        ("file,label\nimg/0.jpg,a\n", "has no 'path' column"),
        ("path,format,size\nimg/0.jpg,JPEG,12x10\n", "has no label columns"),
        ("path,label\n", "is empty"),
        ('path,label\n"img/0.jpg,a\n', "cannot be read"),
    ],
)
def test_manifest_errors(tmp_path: Path, manifest_text: str, message: str) -> None:
    labelled_tree(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_collection(write_manifest(tmp_path, manifest_text), DataConfig())


def test_collection_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"not found: {tmp_path}/absent"):
        load_collection(str(tmp_path / "absent"), DataConfig())
    with pytest.raises(ConfigError, match="manifest not found"):
        load_collection(str(tmp_path / "absent.csv"), DataConfig())
    write_tree(tmp_path / "clutter", {"README.md": b"#", "label/notes.txt": b"x"})
    with pytest.raises(ConfigError, match="is empty"):
        load_collection(str(tmp_path / "clutter"), DataConfig())
    write_tree(
        tmp_path / "tree", {f"a/{i}.jpg": image_bytes(i) for i in range(2)} | {"b/0.jpg": image_bytes(0)}
    )
    with pytest.raises(ConfigError, match="label 'b' of task 'label' has 1 image"):
        load_collection(str(tmp_path / "tree"), DataConfig())
    with pytest.raises(ConfigError, match="one task is 'label'"):
        load_collection(str(tmp_path / "tree"), DataConfig(tasks=["style"]))


def test_list_inputs_keeps_every_candidate(tmp_path: Path) -> None:
    write_tree(tmp_path, tree_files() | {"incoming/no_suffix": b"?", "export.json": b"{}"})
    listed = list_inputs(str(tmp_path))
    names = {u.removeprefix(f"{tmp_path}/") for u in listed.column("uri").to_pylist()}
    assert "ukiyo-e/broken.jpg" in names and "stray.jpg" in names and "incoming/no_suffix" in names
    assert not names & {"README.md", "labels.csv", "export.json", "impressionism/.hidden.jpg"}
    assert listed.column_names == ["uri", "size", "etag"]
    manifest = write_manifest(tmp_path, "path\nukiyo-e/broken.jpg\ncubism/cubism_0.jpg\n", "batch.csv")
    assert list_inputs(manifest).column("uri").to_pylist() == [
        f"{tmp_path}/cubism/cubism_0.jpg",
        f"{tmp_path}/ukiyo-e/broken.jpg",
    ]


def test_s3_collection_matches_the_local_one(tmp_path: Path, s3_bucket: str) -> None:
    files = tree_files()
    local = load_collection(str(write_tree(tmp_path, files)), DataConfig())
    base = f"s3://{s3_bucket}/archive/collection"
    for relative, data in files.items():
        storage.write_bytes(storage.join(base, relative), data)
    remote = load_collection(base + "/", DataConfig())
    assert remote.root == base and remote.tasks == local.tasks and remote.vocabs == local.vocabs
    assert remote.table.column("uri").to_pylist() == [
        u.replace(str(tmp_path), base) for u in local.table.column("uri").to_pylist()
    ]
    for column in ("size", "label", "split"):  # the split hashes paths below the root: copies agree
        assert remote.table.column(column).equals(local.table.column(column))
    decoded = {
        row["uri"]: decode_image(storage.read_bytes(row["uri"]), 8) for row in remote.table.to_pylist()
    }
    assert {u for u, d in decoded.items() if not d.ok} == {f"{base}/ukiyo-e/broken.jpg"}
    assert decoded[f"{base}/ukiyo-e/broken.jpg"].error == "not_an_image"
    assert decoded[f"{base}/impressionism/really_a_png.jpg"].format == "PNG"

    storage.write_bytes(f"{base}/labels.csv", b"path,label\ncubism/cubism_0.jpg,c\ncubism/cubism_1.jpg,c\n")
    from_manifest = load_collection(f"{base}/labels.csv", DataConfig(test_fraction=0.0))
    assert from_manifest.table.column("uri").to_pylist() == [
        f"{base}/cubism/cubism_{i}.jpg" for i in range(2)
    ]
    assert from_manifest.table.column("etag").to_pylist() == [
        remote.table.filter(pc.equal(remote.table.column("uri"), u)).column("etag")[0].as_py()
        for u in from_manifest.table.column("uri").to_pylist()
    ]
    assert list_inputs(base).num_rows == list_inputs(str(tmp_path)).num_rows


@pytest.mark.paintings
@pytest.mark.parametrize("name", ["western-genre", "chinese-genre"])
def test_paintings_load_and_decode_without_errors(paintings: Path, name: str) -> None:
    folder = load_collection(str(paintings / name), DataConfig())
    manifest = load_collection(str(paintings / name / "labels.csv"), DataConfig())
    assert manifest.tasks == ["label"]  # labels.csv's format and size columns are not tasks
    assert folder.table.equals(manifest.table) and folder.fingerprint == manifest.fingerprint
    assert folder.table.num_rows > 800
    recorded = pacsv.read_csv(paintings / name / "labels.csv").to_pylist()  # path,label,format,size
    suffix_format = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}
    lying = 0
    for row in recorded:
        decoded = decode_image(storage.read_bytes(str(paintings / name / row["path"])), 64)
        assert decoded.ok, f"{row['path']}: {decoded.error}: {decoded.message}"
        assert (decoded.format, f"{decoded.width}x{decoded.height}") == (row["format"], row["size"])
        lying += suffix_format[row["path"].rsplit(".", 1)[1].lower()] != decoded.format
    assert len(recorded) == folder.table.num_rows
    assert lying == (94 if name == "western-genre" else 0)  # by content; the README says 95
