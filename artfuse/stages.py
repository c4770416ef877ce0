"""Ray Data stages shared by the jobs: read + decode (CPU), training augmentation, centre crop.

Stateless functions over numpy batches, resources declared where the jobs call `map_batches`.
Every input row comes out with an `error` (None or a reason): nothing is dropped here, jobs decide.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import pyarrow as pa
import ray.data
import torch
from torchvision.transforms import v2

from artfuse import storage
from artfuse.config import StorageConfig
from artfuse.images import decode_image
from artfuse.preprocess import center_crop_batch

READ_THREADS = 8  # object-store reads are latency-bound; a few threads per decode task hide it


def dataset_from_table(table: pa.Table, rows_per_block: int) -> ray.data.Dataset:
    """Split into blocks so the decode stage runs as parallel tasks (one block is one task)."""
    n = table.num_rows
    step = max(1, rows_per_block)
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, max(n, 1), step)])


def _read(
    uri: str, size: int, max_bytes: int, storage_config: StorageConfig | None
) -> tuple[bytes | None, str | None]:
    if size > max_bytes:
        return None, f"too_large: {size} bytes, above data.max_bytes={max_bytes}"
    try:
        data = storage.read_bytes(uri, storage_config)
    except FileNotFoundError:
        return None, "missing: the object disappeared after listing"
    except Exception as e:  # noqa: BLE001 - any read failure becomes this row's error, never the job's
        return None, f"unreadable: {type(e).__name__}: {e}"
    return data, None


def read_and_decode(
    batch: dict[str, np.ndarray],
    *,
    size: int,
    max_pixels: int,
    max_bytes: int,
    storage_config: StorageConfig | None = None,
    with_hash: bool = False,
) -> dict[str, np.ndarray]:
    """uri -> image (N, size, size, 3) uint8 plus width, height, format, error (and sha256 when asked)."""
    uris = batch["uri"]
    n = len(uris)
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    widths = np.zeros(n, dtype=np.int32)
    heights = np.zeros(n, dtype=np.int32)
    formats = np.empty(n, dtype=object)
    errors = np.empty(n, dtype=object)
    hashes = np.empty(n, dtype=object)
    with ThreadPoolExecutor(min(READ_THREADS, max(n, 1))) as pool:
        reads = list(pool.map(lambda u, s: _read(u, int(s), max_bytes, storage_config), uris, batch["size"]))
    for i, (data, read_error) in enumerate(reads):
        if read_error:
            errors[i] = read_error
            continue
        hashes[i] = hashlib.sha256(data).hexdigest() if with_hash else None
        decoded = decode_image(data, size, max_pixels=max_pixels)
        widths[i], heights[i], formats[i] = decoded.width, decoded.height, decoded.format or None
        if decoded.error:
            errors[i] = f"{decoded.error}: {decoded.message}" if decoded.message else decoded.error
        else:
            images[i] = decoded.array
    out = dict(batch)
    out.update(image=images, width=widths, height=heights, format=formats, error=errors)
    if with_hash:
        out["sha256"] = hashes
    return out


def decoded_ok(errors: np.ndarray) -> np.ndarray:
    """Rows without an error. An all-null error column comes back from Arrow as float NaN, so test for text."""
    return np.array([not isinstance(e, str) for e in errors], dtype=bool)


def drop_failed(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ok = decoded_ok(batch["error"])
    return {k: v[ok] for k, v in batch.items()}


@lru_cache(maxsize=4)
def _augmenter(img_size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomResizedCrop(img_size, scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        ]
    )


def augment(batch: dict[str, np.ndarray], *, img_size: int) -> dict[str, np.ndarray]:
    """Random resized crop + flip + colour jitter per image, uint8 in and out (fresh randomness every epoch)."""
    augmenter = _augmenter(img_size)
    images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2)
    out = torch.stack([augmenter(image) for image in images]).permute(0, 2, 3, 1)
    return {**batch, "image": out.contiguous().numpy()}


def center_crop(batch: dict[str, np.ndarray], *, img_size: int) -> dict[str, np.ndarray]:
    return {**batch, "image": np.ascontiguousarray(center_crop_batch(batch["image"], img_size))}
