"""Batched inference with a model package: uint8 images in, per-task probabilities (and embeddings) out.

The probabilities are calibrated: each task's logits are divided by the package's temperature for that task.

Used by the labelling actors, `evaluate` and `bench`, so all three run the model the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys

import numpy as np
import torch

from artfuse.config import CHOICES, ConfigError
from artfuse.models.calibration import temperatures
from artfuse.models.package import Package

log = logging.getLogger(__name__)
TTA_MODES = CHOICES["label.tta"]


def pick_device(use_gpu: bool | None = None) -> torch.device:
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
KEPT_BLOCK_BYTES = 1 << 30  # freed blocks up to this size stay in the process for the next batch
# For a process that runs the model on CPU outside its main thread (a Ray Data actor): glibc gives other threads
# arenas of their own, which map and unmap each large block whatever `keep_freed_memory` says; with one arena,
# every thread gets the main one. OpenMP threads that wait for work sleep instead of spinning, which leaves the
# cycles to the decode workers that share the cores (2-core bench: the model alone uses 1.89 instead of 1.98 cores
# at the same speed; the pipeline went from 57-70 img/s in 7 runs to 67-78 in 8). Both must be in the environment
# when the process starts.
CPU_INFERENCE_ENV = {"MALLOC_ARENA_MAX": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles), as PyTorch's CPU kernels see it."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, check, lambda: False)() for check in checks)


def keep_freed_memory() -> None:
    """Make glibc keep large freed blocks for reuse instead of returning each one to the OS.

    By default every allocation above 32 MB is its own mmap, so each CPU forward pass page-faults all of its
    activations in again: half the CPU time went to the kernel and the model ran at a third of its speed
    (2-core VM, EfficientNet-Lite0 fusion at 224 px: 57 -> 200 img/s). The price: the process keeps its peak heap.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(_M_MMAP_THRESHOLD, KEPT_BLOCK_BYTES)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)


class Predictor:
    def __init__(
        self,
        package: Package,
        device: torch.device | str = "cpu",
        *,
        compile: bool = False,
        cpu_bf16: bool = False,
        tta: str = "none",
    ):
        if tta not in TTA_MODES:
            raise ConfigError(f"label.tta must be one of {', '.join(TTA_MODES)}; got {tta!r}")
        self.tta = tta
        self.package = package
        self.device = torch.device(device)
        self.cpu_bf16 = cpu_bf16 and self.device.type == "cpu"
        if self.cpu_bf16 and not native_cpu_bf16():
            log.warning("bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) is usually slower than fp32")
        if self.device.type == "cpu":
            keep_freed_memory()
        model = package.model.to(self.device).eval()
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._forward = torch.compile(self._features_and_logits) if compile else self._features_and_logits
        self.tasks = package.tasks
        self.temperatures = temperatures(package.meta)

    def _features_and_logits(self, x: torch.Tensor):
        features = self.model.forward_features(x)
        return features, self.model.forward_head(features)

    def _autocast(self):
        # bf16 on GPU halves memory traffic; on CPU it pays only where the CPU has bf16 instructions (opt-in).
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if self.cpu_bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def __call__(
        self, images: np.ndarray | torch.Tensor, *, embeddings: bool = False
    ) -> dict[str, np.ndarray]:
        """images: uint8 (N, H, W, 3) at the package's resize (centre-cropped here) or img_size, on the host or
        already on the model's device (GPU decode).

        Returns {task: float32 probabilities (N, n_labels)} plus "embedding" (float16, N x D) when asked.
        """
        if images.shape[1] != self.package.preprocess.img_size:
            images = self.package.preprocess.center_crop(images)
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type == "cuda" and images.device.type == "cpu":
            # a pinned source lets the host->device copy run asynchronously (DMA) instead of staging it
            images = images.contiguous().pin_memory()
        x = self.package.preprocess.to_tensor(images, self.device)
        with self._autocast():
            features, logits = self._forward(x)
            if self.tta == "flip":  # the mirror image too: average the two embeddings and logits (2x the compute)
                flipped_features, flipped_logits = self._forward(x.flip(3))
                features = (features + flipped_features) / 2
                logits = {task: (logits[task] + flipped_logits[task]) / 2 for task in logits}
        out = {
            task: torch.softmax(logits[task].float() / self.temperatures[task], dim=1).cpu().numpy()
            for task in self.tasks
        }
        if embeddings:
            out["embedding"] = features.to(torch.float16).cpu().numpy()
        return out
