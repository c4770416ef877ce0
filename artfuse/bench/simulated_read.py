"""The CPU stage's stand-in for `bench --simulate`, in a module of its own: its Ray workers import numpy alone, as the
real decode workers import no torch (16 of them a simulated node, on a machine that is not one)."""

from __future__ import annotations

import time

import numpy as np


def simulated_read(
    batch: dict[str, np.ndarray], *, seconds_per_image: float, row_bytes: int, gpu_decode: bool
) -> dict[str, np.ndarray]:
    """The CPU stage's stand-in: sleeps what the card's CPUs take for this batch, then emits the real stage's columns
    (decoded pixels, or with GPU decode each JPEG's bytes) at their real sizes / `Timings.shrink`."""
    n = len(batch["uri"])
    time.sleep(n * seconds_per_image)
    out = dict(batch)
    out.update(
        width=np.full(n, 1024, np.int32),
        height=np.full(n, 768, np.int32),
        format=np.full(n, "JPEG", dtype=object),
        error=np.full(n, None, dtype=object),
        sha256=np.full(n, "0" * 64, dtype=object),
    )
    if gpu_decode:
        out.update(encoded=np.full(n, bytes(row_bytes), dtype=object), encoding=np.full(n, "jpeg", dtype=object))
    else:
        out["image"] = np.zeros((n, row_bytes), np.uint8)
    return out
