"""`artfuse bench`: on this machine, in one run, the model alone, decode alone and the whole label pipeline.

Figures are images/s plus `ratio` = pipeline / min(model, decode): how close the Ray Data pipeline comes to its
slowest stage running alone (docs/performance.md, the performance model). Each stage alone runs where and as
it runs in the pipeline: in Ray workers (same resources, threads and process priority), on the same Ray.

- model alone: `LabelModel.predict` (the label actor's model step: host->device copy, normalise, forward,
  softmax) on random uint8 batches at the package's resize, in a Ray task with the actor's CPUs and GPUs;
- decode alone: `decode_image` of the generated JPEGs in memory, one Ray task per CPU (the CPU stage's work
  without storage or Ray Data); with GPU decode, nvJPEG alone (in the model's task) is reported beside it;
- pipeline: `label.label` over the same JPEGs as files into a temporary folder (start-up included, listing
  excluded), as many as min(model, decode) gets through in `bench.pipeline_seconds`, so start-up weighs little.

Each stage alone is timed before and after the pipeline; the figures are the means (both are in bench.json).

`artfuse bench --memory N [N ...]` instead labels collections of each size N on the same local Ray and reports
the job's peak memory for each: PSS (shared pages split between their processes, so the object store counts once)
summed over this process and every process it started (the local Ray node: raylet, GCS, workers), sampled every
MEMORY_SAMPLE_S. If the pipeline streams, the peak does not grow with N.

Without `--model`, a freshly built model of the configured architecture (random weights) is packaged in a
temporary folder: speed does not depend on the weights. Files live in a local temporary folder, so the bench
runs on one machine.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import platform
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psutil
import ray
import torch
from PIL import Image

from artfuse.cluster.runtime import ensure_ray, node_cpus
from artfuse.config import Config, ConfigError
from artfuse.data import storage
from artfuse.data.gpudecode import decode_jpegs
from artfuse.data.images import bench_decode
from artfuse.data.preprocess import Preprocess
from artfuse.models import create_model, data_config
from artfuse.models.package import read_manifest, save_package
from artfuse.pipelines.label import (
    LabelModel,
    actor_resources,
    actor_runtime_env,
    label,
    uses_gpu_decode,
)

log = logging.getLogger(__name__)
DISTINCT_IMAGES = 16  # generated once, then repeated as files: decode cost does not depend on repetition
WARMUP_BATCHES = 2
MEMORY_SAMPLE_S = 0.5


def bench(cfg: Config, model_uri: str | None = None, out: str | None = None) -> dict:
    """Measure the three figures in one run and return (and, with `out`, write) bench.json's content."""
    ensure_ray()
    if ray.cluster_resources().get("GPU", 0) and cfg.label.num_gpus_per_actor <= 0:
        log.info("a GPU is present: benchmarking with label.num_gpus_per_actor=1")
        cfg = dataclasses.replace(cfg, label=dataclasses.replace(cfg.label, num_gpus_per_actor=1.0))
    b, lc = cfg.bench, cfg.label
    with tempfile.TemporaryDirectory(prefix="artfuse-bench-") as tmp:
        model_uri = model_uri or save_untrained_package(str(Path(tmp, "model")), cfg, {"label": 10})
        manifest = read_manifest(model_uri, cfg.storage)
        size = Preprocess.from_dict(manifest["preprocess"]).resize
        jpegs = synthetic_jpegs(DISTINCT_IMAGES, b.width, b.height)

        on_actor = model_alone.options(runtime_env=actor_runtime_env(lc), **actor_resources(lc))
        submitted_at = time.time()
        alone = ray.get(on_actor.remote(model_uri, cfg, jpegs if uses_gpu_decode(lc) else [], b.n_images))
        decode_before = decode_alone(jpegs, b.n_images, size)
        # Start-up (actors loading the model) is included, so the run must be long enough to weigh little.
        n_pipeline = max(b.n_images, math.ceil(b.pipeline_seconds * min(alone["model_img_s"], decode_before)))
        inputs = Path(tmp, "input")
        write_collection(inputs, jpegs, n_pipeline)
        log.info("bench: labelling %d images", n_pipeline)
        report = label(model_uri, str(inputs), str(Path(tmp, "predictions")), cfg)
        # A shared machine's speed drifts by 10 % over tens of seconds: each stage alone is timed before and after
        # the pipeline, and the ratio uses their mean, the best estimate of each stage's speed during it.
        model_after = ray.get(on_actor.remote(model_uri, cfg, [], 0))["model_img_s"]
        decode_after = decode_alone(jpegs, b.n_images, size)

    model_runs, decode_runs = [alone["model_img_s"], model_after], [decode_before, decode_after]
    model_img_s, decode_img_s, pipeline_img_s = np.mean(model_runs), np.mean(decode_runs), report["img_s"]
    result = {
        "model_img_s": round(model_img_s, 1),
        "decode_img_s": round(decode_img_s, 1),
        "pipeline_img_s": round(pipeline_img_s, 1),
        "ratio": round(pipeline_img_s / min(model_img_s, decode_img_s), 3),
        "model_img_s_before_after": [round(x, 1) for x in model_runs],
        "decode_img_s_before_after": [round(x, 1) for x in decode_runs],
        "gpu_decode_img_s": alone["gpu_decode_img_s"],
        # A fresh worker with the actor's environment until its model is loaded: what a label job waits before its
        # first model batch (worker start, imports, package load). Clocks of one machine, or of a cluster's nodes.
        "model_startup_s": round(alone["model_ready_at"] - submitted_at, 2),
        "machine": machine() | alone["machine"],
        "batch_size": lc.batch_size,
        "decode_batch_size": lc.decode_batch_size,
        "image_size": {"width": b.width, "height": b.height, "jpeg_kb": round(np.mean([len(j) for j in jpegs]) / 1e3)},
        "model_input": {"resize": size, "arch": manifest["architecture"]["arch"]},
        "counts": {
            "decoded_alone": b.n_images,
            "model_batches": b.model_batches,
            "pipeline_images": report["listed"],
            "labelled": report["labelled"],
            "errors": report["errors"],
        },
        "label": dataclasses.asdict(lc),
        "pipeline_durations_s": report["durations_s"],
    }
    if out:
        storage.write_bytes(out, json.dumps(result, indent=1).encode(), cfg.storage)
    return result


def bench_memory(cfg: Config, sizes: list[int], model_uri: str | None = None, out: str | None = None) -> dict:
    """Peak memory of `label` over generated collections of each size, one after another on the same local Ray."""
    if os.environ.get("RAY_ADDRESS"):
        raise ConfigError("bench --memory measures the processes of a local Ray: unset RAY_ADDRESS")
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"bench --memory needs collection sizes of at least 1; got {sizes}")
    ensure_ray()
    b, runs = cfg.bench, []
    with tempfile.TemporaryDirectory(prefix="artfuse-bench-") as tmp:
        model_uri = model_uri or save_untrained_package(str(Path(tmp, "model")), cfg, {"label": 10})
        jpegs = synthetic_jpegs(DISTINCT_IMAGES, b.width, b.height)
        for n in sizes:
            inputs = Path(tmp, f"input-{n}")
            write_collection(inputs, jpegs, n)
            log.info("bench: labelling %d images, sampling memory", n)
            with PeakMemory() as peak:
                report = label(model_uri, str(inputs), str(Path(tmp, f"predictions-{n}")), cfg)
            runs.append(
                {
                    "images": n,
                    "peak_pss_mb": round(peak.bytes / 2**20),
                    "peak_processes": peak.processes,
                    "peak_largest_mb": peak.largest,
                    "labelled": report["labelled"],
                    "errors": report["errors"],
                    "img_s": round(report["img_s"], 1),
                }
            )
    result = {
        "runs": runs,
        "peak_growth": round(runs[-1]["peak_pss_mb"] / runs[0]["peak_pss_mb"], 3),
        "machine": machine(),
        "image_size": {"width": b.width, "height": b.height},
        "label": dataclasses.asdict(cfg.label),
    }
    if out:
        storage.write_bytes(out, json.dumps(result, indent=1).encode(), cfg.storage)
    return result


class PeakMemory:
    """Samples, in a thread, the PSS summed over this process and its descendants; keeps the largest sum."""

    def __init__(self, every_s: float = MEMORY_SAMPLE_S):
        self.every_s = every_s
        self.bytes = 0
        self.processes = 0
        # At the peak, the five largest processes: (PSS MB, USS MB, command line). USS is memory no other process
        # shares: the part of a process's PSS that is its own rather than object-store pages.
        self.largest: list[tuple[int, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def sample(self) -> None:
        me = psutil.Process()
        by_process = []
        for process in [me, *me.children(recursive=True)]:
            try:
                memory = process.memory_full_info()
                by_process.append((memory.pss, memory.uss, " ".join(process.cmdline())[:60]))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass  # ended between listing and reading
        total = sum(pss for pss, _, _ in by_process)
        if total > self.bytes:
            self.bytes, self.processes = total, len(by_process)
            largest = sorted(by_process, reverse=True)[:5]
            self.largest = [(round(pss / 2**20), round(uss / 2**20), name) for pss, uss, name in largest]


def save_untrained_package(uri: str, cfg: Config, tasks: dict[str, int]) -> str:
    """A package of a freshly built `cfg.model` (random weights, vocab "0".."n-1"); returns its URI."""
    model = create_model(cfg.model, tasks, load_pretrained=False)
    dc = data_config(cfg.model)
    preprocess = Preprocess.for_model(cfg.model.img_size, dc["mean"], dc["std"])
    vocabs = {task: [str(i) for i in range(n)] for task, n in tasks.items()}
    save_package(uri, model, cfg.model, vocabs, preprocess, storage_config=cfg.storage)
    return uri


def synthetic_jpegs(n: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    """`n` photo-like JPEGs (smooth colour fields with detail, quality 90; about 250 KB at 1024 x 768)."""
    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(n):
        coarse = Image.fromarray((rng.random((height // 8, width // 8, 3)) * 255).astype(np.uint8))
        buffer = io.BytesIO()
        coarse.resize((width, height), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def write_collection(folder: Path, jpegs: list[bytes], n: int) -> None:
    """Files 0..n-1 in `folder`: the distinct JPEGs, then hard links to them (no disk, many objects)."""
    folder.mkdir(parents=True)
    paths = [folder / f"{i:07d}.jpg" for i in range(n)]
    for i, path in enumerate(paths):
        if i < len(jpegs):
            path.write_bytes(jpegs[i])
        else:
            os.link(paths[i % len(jpegs)], path)


def decode_alone(jpegs: list[bytes], n: int, size: int) -> float:
    """Images/s of `decode_image` on every CPU: one Ray task per CPU, each timing its share of `n` images
    (`images.bench_decode`, after its bytes arrive); the tasks run side by side, so their rates add up."""
    workers = node_cpus()
    shares = [[jpegs[i % len(jpegs)] for i in range(w, n, workers)] for w in range(workers)]
    task = ray.remote(num_cpus=1)(bench_decode)
    ray.get([task.remote(share[:1], size) for share in shares])  # start the workers, untimed
    return float(sum(ray.get([task.remote(share, size) for share in shares])))


@ray.remote
def model_alone(model_uri: str, cfg: Config, gpu_jpegs: list[bytes], n: int) -> dict:
    """In a Ray task with the label actor's resources and environment: images/s of `LabelModel.predict` on random uint8
    batches at the package's resize, and of nvJPEG decode alone when `gpu_jpegs` are given."""
    model = LabelModel(model_uri, cfg.label, cfg.storage, "bench", datetime.now(UTC))
    model_ready_at = time.time()
    device, batch_size = model.predictor.device, cfg.label.batch_size
    images = np.random.default_rng(0).integers(0, 256, (batch_size, model.resize, model.resize, 3), dtype=np.uint8)
    for _ in range(WARMUP_BATCHES):
        model.predict(images)
    start = time.perf_counter()
    for _ in range(cfg.bench.model_batches):
        model.predict(images)  # returns numpy: the device work is finished when it does
    model_img_s = cfg.bench.model_batches * batch_size / (time.perf_counter() - start)
    return {
        "model_img_s": model_img_s,
        "model_ready_at": model_ready_at,
        "gpu_decode_img_s": gpu_decode_alone(gpu_jpegs, n, model.resize, device, batch_size) if gpu_jpegs else None,
        "machine": {
            "device": device.type,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch_threads": torch.get_num_threads(),
        },
    }


def gpu_decode_alone(jpegs: list[bytes], n: int, size: int, device: torch.device, batch_size: int) -> float:
    """Images/s of nvJPEG decode + resize on `device`, in batches of the model's batch size."""
    batch = [jpegs[i % len(jpegs)] for i in range(batch_size)]
    decode_jpegs(batch, size, device)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(max(1, n // batch_size)):
        decode_jpegs(batch, size, device)
    _synchronize(device)
    return round(max(1, n // batch_size) * batch_size / (time.perf_counter() - start), 1)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine() -> dict:
    return {
        "cpus": node_cpus(),
        "cpu": platform.processor() or platform.machine(),
        "hostname": platform.node(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def format_memory(result: dict) -> str:
    lines = [
        f"{r['images']:>8d} images: peak {r['peak_pss_mb']:>6d} MB PSS over {r['peak_processes']} processes,"
        f" {r['img_s']:.1f} img/s"
        for r in result["runs"]
    ]
    return "\n".join([*lines, f"peak growth, largest / smallest collection = {result['peak_growth']:.2f}"])


def format_bench(result: dict) -> str:
    """The figures as a few lines for people."""
    model_runs, decode_runs = result["model_img_s_before_after"], result["decode_img_s_before_after"]
    lines = [
        f"model alone     {result['model_img_s']:>9.1f} img/s  (batch {result['batch_size']};"
        f" {model_runs[0]:.1f} before, {model_runs[1]:.1f} after the pipeline)",
        f"decode alone    {result['decode_img_s']:>9.1f} img/s  ({result['machine']['cpus']} Ray tasks;"
        f" {decode_runs[0]:.1f} before, {decode_runs[1]:.1f} after)",
    ]
    if result["gpu_decode_img_s"] is not None:
        lines.append(f"nvJPEG alone    {result['gpu_decode_img_s']:>9.1f} img/s")
    lines += [
        f"label pipeline  {result['pipeline_img_s']:>9.1f} img/s  ({result['counts']['pipeline_images']} images;"
        f" a model actor takes {result['model_startup_s']:.1f} s to start)",
        f"ratio pipeline / min(model, decode) = {result['ratio']:.2f}",
    ]
    return "\n".join(lines)
