"""The generated sample collection: deterministic, balanced, mixed formats and sizes, and learnable."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from artfuse.config import ConfigError
from artfuse.data.samples import MOVEMENTS, generate_samples

SMALL = (96, 160)  # small images keep the tests fast; the defaults are exercised by the size test


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    generate_samples(str(out), n=120, seed=0, size_range=SMALL)
    return out


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in _files(root)}


def test_same_seed_gives_same_bytes_and_another_seed_does_not(tmp_path):
    a, b, c = (tmp_path / name for name in "abc")
    generate_samples(str(a), n=24, seed=7, size_range=SMALL)
    generate_samples(str(b), n=24, seed=7, size_range=SMALL)
    generate_samples(str(c), n=24, seed=8, size_range=SMALL)
    assert _digest(a) == _digest(b)
    assert len(_digest(a)) == 24
    assert set(_digest(a).values()).isdisjoint(_digest(c).values())


def test_every_movement_present_and_balanced(collection):
    assert len(MOVEMENTS) >= 6
    folders = sorted(p.name for p in collection.iterdir() if p.is_dir())
    assert folders == sorted(MOVEMENTS)
    counts = {m: len(list((collection / m).iterdir())) for m in MOVEMENTS}
    assert set(counts.values()) == {120 // len(MOVEMENTS)}


def test_summary_names_what_was_written(tmp_path):
    summary = generate_samples(str(tmp_path), n=20, seed=0, size_range=SMALL)
    per_class = 20 // len(MOVEMENTS)
    assert summary == {"out": str(tmp_path), "n": per_class * len(MOVEMENTS), "classes": list(MOVEMENTS)}
    assert len(_files(tmp_path)) == summary["n"]


def test_mostly_jpeg_with_some_png_and_content_matches_extension(collection):
    formats = {}
    for path in _files(collection):
        with Image.open(path) as img:
            assert img.format == {".jpg": "JPEG", ".png": "PNG"}[path.suffix]
            formats[img.format] = formats.get(img.format, 0) + 1
    assert 0 < formats["PNG"] < formats["JPEG"]


def test_sizes_vary_within_range_and_are_not_square(tmp_path):
    generate_samples(str(tmp_path), n=60, seed=1)
    sizes = []
    for path in _files(tmp_path):
        with Image.open(path) as img:
            sizes.append(img.size)
    assert all(160 <= w <= 320 and 160 <= h <= 320 and w != h for w, h in sizes)
    assert len(set(sizes)) > len(sizes) // 2


def test_too_few_images_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--n"):
        generate_samples(str(tmp_path), n=len(MOVEMENTS) - 1)


def test_file_uri_writes_the_same_collection(tmp_path):
    generate_samples(f"file://{tmp_path / 'uri'}", n=12, seed=0, size_range=SMALL)
    generate_samples(str(tmp_path / "plain"), n=12, seed=0, size_range=SMALL)
    assert _digest(tmp_path / "uri") == _digest(tmp_path / "plain")


def _load(root: Path, side: int = 64) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for label, movement in enumerate(MOVEMENTS):
        for path in sorted((root / movement).iterdir()):
            with Image.open(path) as img:
                small = img.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
            images.append(np.asarray(small, np.float32) / 255)
            labels.append(label)
    return np.stack(images), np.array(labels)


def _colour_features(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x.mean((1, 2)), x.std((1, 2))], axis=1)


def _texture_layout_features(x: np.ndarray) -> np.ndarray:
    """Colour stats + gradient-magnitude histogram + 4x4 grids of gradient and brightness (the layout)."""
    n = len(x)
    gray = x.mean(-1)
    grad = np.abs(np.diff(gray, axis=2))[:, :-1] + np.abs(np.diff(gray, axis=1))[:, :, :-1]  # (N, 63, 63)

    def grid(a: np.ndarray) -> np.ndarray:
        return a[:, :60, :60].reshape(n, 4, 15, 4, 15).mean((2, 4)).reshape(n, -1)

    hist = np.stack([np.histogram(g, bins=8, range=(0, 1))[0] for g in grad]) / grad[0].size
    return np.concatenate([_colour_features(x), grid(grad), grid(gray), hist], axis=1)


def _logistic_regression_accuracy(features, labels, train, test, steps: int = 300, lr: float = 0.5) -> float:
    mean, std = features[train].mean(0), features[train].std(0) + 1e-6
    z = (features - mean) / std
    k = len(MOVEMENTS)
    weights, bias, onehot = np.zeros((z.shape[1], k)), np.zeros(k), np.eye(k)[labels[train]]
    for _ in range(steps):
        logits = z[train] @ weights + bias
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        grad = (probs - onehot) / len(train)
        weights -= lr * (z[train].T @ grad + 1e-3 * weights)
        bias -= lr * grad.sum(0)
    return float(((z[test] @ weights + bias).argmax(1) == labels[test]).mean())


def test_learnable_from_texture_and_layout_but_not_from_colour_alone(collection):
    x, labels = _load(collection)
    order = np.random.default_rng(0).permutation(len(labels))
    train, test = order[:80], order[80:]
    chance = 1 / len(MOVEMENTS)
    full = _logistic_regression_accuracy(_texture_layout_features(x), labels, train, test)
    colour = _logistic_regression_accuracy(_colour_features(x), labels, train, test)
    assert full > 4 * chance, f"held-out accuracy {full:.2f} on texture+layout features"
    # shared palettes: colour statistics alone must fall clearly short of what texture and layout give
    assert colour < 0.75 and full - colour > 0.15, f"colour-only {colour:.2f} vs full {full:.2f}"


def test_s3_uri_uploads_the_same_collection(tmp_path, s3_server, s3_bucket):
    import boto3

    generate_samples(f"s3://{s3_bucket}/samples", n=12, seed=0, size_range=SMALL)
    generate_samples(str(tmp_path), n=12, seed=0, size_range=SMALL)
    client = boto3.client("s3", endpoint_url=s3_server)
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="samples/")["Contents"]
    uploaded = {
        obj["Key"].removeprefix("samples/"): hashlib.sha256(
            client.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read()
        ).hexdigest()
        for obj in listed
    }
    assert uploaded == _digest(tmp_path)
