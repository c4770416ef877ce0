"""Ray Data stages shared by the jobs: read + decode (CPU, or read only for GPU decode), augmentation, centre crop.

Stateless functions over numpy batches, resources declared where the jobs call `map_batches`.
Every input row comes out with an `error` (None or a reason): nothing is dropped here, jobs decide.
The decode stages do not import torch: a decode worker stays a few hundred MB lighter.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import ray.data

from artfuse.config import StorageConfig
from artfuse.data import http, images, storage
from artfuse.data.gpudecode import GPU_JPEG, RAW, gpu_decodable
from artfuse.data.images import Decoded, decode_image

if TYPE_CHECKING:
    from torchvision.transforms import v2

READ_THREADS = 8  # object-store reads are latency-bound; a few threads per decode task hide it
READ_AHEAD = 2 * READ_THREADS  # objects read but not yet decoded: bounds a decode task's memory on large scans


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
        data = storage.read_bytes(uri, storage_config, max_bytes=max_bytes)
    except FileNotFoundError as e:
        if http.is_http(uri):
            return None, f"missing: {e}"
        return None, "missing: no such object (deleted since it was listed, or never there)"
    except http.TooLarge as e:
        return None, f"too_large: {e}"
    except http.Unreachable as e:  # like an S3 outage: the run fails naming the server, a rerun labels the object
        raise storage.StorageUnavailable(f"{e} reading {uri}") from e
    except http.HTTPFailure as e:
        return None, f"unreadable: {e}"
    except storage.StorageUnavailable:
        raise  # an outage is the job's failure, never this object's error row (a rerun labels it)
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
    niceness: int = 0,
) -> dict[str, np.ndarray]:
    """uri -> image (N, size, size, 3) uint8 plus width, height, format, error (and sha256 when asked).

    niceness > 0 lowers this worker process's CPU priority to it (for good: Ray reuses the worker), so that where
    decode shares cores with a CPU model, the model runs and decode takes the cycles it leaves.
    """
    if niceness > os.getpriority(os.PRIO_PROCESS, 0):
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    n = len(batch["uri"])
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    out = _described(batch, with_hash)
    for i, data in _read_all(batch, max_bytes, storage_config, out):
        decoded = decode_image(data, size, max_pixels=max_pixels)
        _describe(out, i, decoded)
        if decoded.ok:
            images[i] = decoded.array
    out["image"] = images
    return out


def read_for_gpu_decode(
    batch: dict[str, np.ndarray],
    *,
    size: int,
    max_pixels: int,
    max_bytes: int,
    gpu_max_pixels: int,
    storage_config: StorageConfig | None = None,
    with_hash: bool = False,
) -> dict[str, np.ndarray]:
    """As `read_and_decode`, but JPEGs the GPU can decode leave as their bytes (`encoded`, `encoding` "jpeg");
    other inputs are decoded here and leave as raw pixels (`encoding` "raw"). No `image` column."""
    n = len(batch["uri"])
    encoded = np.full(n, b"", dtype=object)
    encoding = np.empty(n, dtype=object)
    out = _described(batch, with_hash)
    for i, data in _read_all(batch, max_bytes, storage_config, out):
        header = gpu_decodable(data, min(gpu_max_pixels, max_pixels))
        if header:
            (out["width"][i], out["height"][i]), out["format"][i] = header, "JPEG"
            encoded[i], encoding[i] = data, GPU_JPEG
            continue
        decoded = decode_image(data, size, max_pixels=max_pixels)
        _describe(out, i, decoded)
        if decoded.ok:
            encoded[i], encoding[i] = decoded.array.tobytes(), RAW
    out.update(encoded=encoded, encoding=encoding)
    return out


def _described(batch: dict[str, np.ndarray], with_hash: bool) -> dict[str, np.ndarray]:
    """The batch plus empty width, height, format, error (and sha256) columns."""
    n = len(batch["uri"])
    out = dict(batch)
    out.update(
        width=np.zeros(n, dtype=np.int32),
        height=np.zeros(n, dtype=np.int32),
        format=np.empty(n, dtype=object),
        error=np.empty(n, dtype=object),
    )
    if with_hash:
        out["sha256"] = np.empty(n, dtype=object)
    return out


def _read_all(
    batch: dict[str, np.ndarray], max_bytes: int, storage_config: StorageConfig | None, out: dict[str, np.ndarray]
) -> Iterator[tuple[int, bytes]]:
    """(row, bytes) for each readable row, in order; read failures become the row's error in `out`."""
    uris = batch["uri"]
    ahead: deque[tuple[int, Future]] = deque()
    with ThreadPoolExecutor(min(READ_THREADS, max(len(uris), 1))) as pool:
        for i, (uri, size) in enumerate(zip(uris, batch["size"], strict=True)):
            ahead.append((i, pool.submit(_read, uri, int(size), max_bytes, storage_config)))
            if len(ahead) > READ_AHEAD:
                yield from _arrived(*ahead.popleft(), out)
        while ahead:
            yield from _arrived(*ahead.popleft(), out)


def _arrived(i: int, read: Future, out: dict[str, np.ndarray]) -> Iterator[tuple[int, bytes]]:
    data, read_error = read.result()
    if read_error:
        out["error"][i] = read_error
        return
    if "sha256" in out:
        out["sha256"][i] = hashlib.sha256(data).hexdigest()
    yield i, data


def _describe(out: dict[str, np.ndarray], i: int, decoded: Decoded) -> None:
    out["width"][i], out["height"][i], out["format"][i] = decoded.width, decoded.height, decoded.format or None
    if decoded.error:
        out["error"][i] = f"{decoded.error}: {decoded.message}" if decoded.message else decoded.error


def decoded_ok(errors: np.ndarray) -> np.ndarray:
    """Rows without an error. An all-null error column comes back from Arrow as float NaN, so test for text."""
    return np.array([not isinstance(e, str) for e in errors], dtype=bool)


def drop_failed(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ok = decoded_ok(batch["error"])
    return {k: v[ok] for k, v in batch.items()}


@lru_cache(maxsize=4)
def _augmenter(img_size: int) -> v2.Compose:
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(img_size, scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        ]
    )


def augment(batch: dict[str, np.ndarray], *, img_size: int) -> dict[str, np.ndarray]:
    """Random resized crop + flip + colour jitter per image, uint8 in and out (fresh randomness every epoch)."""
    import torch

    augmenter = _augmenter(img_size)
    images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2)
    out = torch.stack([augmenter(image) for image in images]).permute(0, 2, 3, 1)
    return {**batch, "image": out.contiguous().numpy()}


def center_crop(batch: dict[str, np.ndarray], *, img_size: int) -> dict[str, np.ndarray]:
    return {**batch, "image": np.ascontiguousarray(images.center_crop(batch["image"], img_size))}
