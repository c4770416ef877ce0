"""`artfuse bench --train`: on this machine, in one run, a bare training step alone and the Ray Train loop.

- step alone: `TrainStep` (the loop's own step: forward with the branches' loss, backward, clip, AdamW, EMA) on
  random tensors already on the device, in a Ray task with one train worker's resources and threads, timed over
  `bench.model_batches` steps after WARMUP_STEPS; then the same step in fp32, so that train.precision's choice (bf16
  where the CPU computes it natively) is measured beside it: `precision_speedup` = step alone / the same in fp32;
- loop: `artfuse train` on a generated collection of `bench.train_images` images for `bench.train_epochs` epochs:
  the last epoch's img/s (Ray Data's feeding, augmentation and the host->device copy included, validation not),
  and the warm-up: seconds from the start of `train` to the first optimizer step (decoding the collection once,
  Ray Train's worker group, building the model, the first batches).

`ratio` = loop / step alone: how close the loop comes to what the device does with the data already there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import ray
import torch

from artfuse.bench.label import machine
from artfuse.cluster.runtime import ensure_ray, node_cpus
from artfuse.config import Config, ConfigError
from artfuse.data import storage
from artfuse.data.catalog import load_collection
from artfuse.data.samples import generate_samples
from artfuse.models.predict import keep_freed_memory, pick_device
from artfuse.pipelines.train import build_train_step, train

log = logging.getLogger(__name__)
WARMUP_STEPS = 2


def bench_train(cfg: Config, out: str | None = None) -> dict:
    """Time the step alone and the loop in one run; return (and, with `out`, write) the figures."""
    ensure_ray()
    if ray.cluster_resources().get("GPU", 0) and not cfg.train.use_gpu:
        log.info("a GPU is present: benchmarking with train.use_gpu=true")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, use_gpu=True))
    b = cfg.bench
    if b.train_epochs < 2:
        raise ConfigError(f"bench.train_epochs must be at least 2 (the first warms up); got {b.train_epochs}")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=b.train_epochs))
    with tempfile.TemporaryDirectory(prefix="artfuse-bench-train-") as tmp:
        collection = str(Path(tmp, "collection"))
        generate_samples(collection, b.train_images)
        vocabs = load_collection(collection, cfg.data, cfg.storage).vocabs
        step_img_s = timed_remotely(cfg, vocabs)
        fp32 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp32"))
        step_fp32_img_s = timed_remotely(fp32, vocabs)
        summary = train(collection, str(Path(tmp, "model")), cfg)
    loop_img_s = summary["train_img_s"]
    result = {
        "step_img_s": round(step_img_s, 2),  # the precision of loop_img_s (train's own figure), its ratio's other half
        "loop_img_s": loop_img_s,
        "ratio": round(loop_img_s / step_img_s, 3),
        "precision": summary["precision"],  # train.precision as the loop resolved it
        # the same step in fp32, timed right after: what train.precision's choice gives on this machine
        "step_fp32_img_s": round(step_fp32_img_s, 2),
        "precision_speedup": round(step_img_s / step_fp32_img_s, 3),
        "warmup_s": summary["first_step_s"][0],
        "loop_img_s_by_epoch": summary["train_img_s_by_epoch"],
        "train_duration_s": summary["duration_s"],
        "images": summary["n_train"],
        "config": {
            "batch_size": cfg.train.batch_size,
            "img_size": cfg.model.img_size,
            "arch": cfg.model.arch,
            "use_gpu": cfg.train.use_gpu,
            "epochs": cfg.train.epochs,
        },
        "machine": machine(),
    }
    if out:
        storage.write_bytes(out, json.dumps(result, indent=1).encode(), cfg.storage)
    return result


def timed_remotely(cfg: Config, vocabs: dict[str, list[str]]) -> float:
    """`step_alone` in a Ray task holding what one train worker holds."""
    task = ray.remote(step_alone).options(num_cpus=cfg.train.cpus_per_worker, num_gpus=int(cfg.train.use_gpu))
    return ray.get(task.remote(cfg, vocabs))


def step_alone(cfg: Config, vocabs: dict[str, list[str]]) -> float:
    """img/s of the training step on random tensors already on the device, with the loop's threads."""
    device = pick_device(cfg.train.use_gpu)
    if device.type == "cpu":
        torch.set_num_threads(cfg.train.torch_threads or node_cpus())  # as train_loop, one worker a node
        keep_freed_memory()
    step_fn = build_train_step(cfg, vocabs, device, None, wrap=lambda model: model)
    step_fn.model.train()
    n, size = cfg.train.batch_size, cfg.model.img_size
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=generator).to(device, memory_format=torch.channels_last)
    targets = {task: torch.randint(len(vocab), (n,), generator=generator).to(device) for task, vocab in vocabs.items()}
    for step in range(WARMUP_STEPS):
        step_fn(x, targets, 1.0, step).item()
    started = time.perf_counter()
    for step in range(WARMUP_STEPS, WARMUP_STEPS + cfg.bench.model_batches):
        loss = step_fn(x, targets, 1.0, step)
    loss.item()  # waits for the device
    return n * cfg.bench.model_batches / (time.perf_counter() - started)


def format_train_bench(result: dict) -> str:
    return (
        f"train step alone {result['step_img_s']:.1f} img/s, Ray Train loop {result['loop_img_s']:.1f} img/s"
        f" (ratio {result['ratio']:.2f}), warm-up {result['warmup_s']:.1f} s to the first optimizer step;"
        f" {result['precision']}: x{result['precision_speedup']:.2f} the step alone in fp32"
        f" ({result['step_fp32_img_s']:.1f} img/s)"
    )
