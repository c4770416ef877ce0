"""Where a training step's time goes on this machine's CPU, and what each of the CPU fast path's parts gives.

    python scripts/profile_train_step.py [--arch fusion] [--rounds 3] [--steps 6] [--profile VARIANT] [--glibc-default]
                                         [--set key=value ...]

1. The profile: PyTorch's profiler over `--steps` steps of one variant (`--profile`, default the step as the loop now
   runs it; `TrainStep`, the loop's own: forward with the branches' loss, backward, clip, AdamW, EMA) on random
   tensors, the ops by their own CPU time.
2. The variants, each in turn, `--rounds` times (this machine drifts: compare within the run), median img/s:
   before     the step as it was: NCHW weights, timm's frozen norms (a multiply and an add), fp32; the input in
              channels_last memory, as Preprocess.to_tensor gives the loop (so the convolutions ran channels_last)
   +cl        channels_last weights too
   +cl+bn     and the frozen norms as one batch_norm kernel (what create_model builds now)
   +cl+bn+bf16  and bf16 autocast (train.precision=bf16; `auto` picks it on a CPU with native bf16)
Single process, the node's cores as torch threads, batch train.batch_size at model.img_size; glibc keeps freed
blocks for reuse as in the training loop (`keep_freed_memory`), unless --glibc-default.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from artfuse.cluster.runtime import node_cpus
from artfuse.config import load_config
from artfuse.models.fusion import SINGLE_KERNEL
from artfuse.models.predict import keep_freed_memory, native_cpu_bf16
from artfuse.pipelines.train import build_train_step

VARIANTS = ("before", "+cl", "+cl+bn", "+cl+bn+bf16")
WARMUP_STEPS = 2


def step_for(cfg, vocabs, variant: str):
    precision = "bf16" if variant.endswith("bf16") else "fp32"
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    step = build_train_step(cfg, vocabs, torch.device("cpu"), None, wrap=lambda model: model)
    if "+bn" not in variant:  # back to timm's and torchvision's own frozen norms
        originals = {fast: original for original, fast in SINGLE_KERNEL.items()}
        for module in step.raw_model.modules():
            if type(module) in originals:
                module.__class__ = originals[type(module)]
    if "+cl" not in variant:
        step.raw_model.to(memory_format=torch.contiguous_format)
    step.model.train()
    return step


def batch(cfg, vocabs):
    generator = torch.Generator().manual_seed(0)
    n, size = cfg.train.batch_size, cfg.model.img_size
    x = torch.randn(n, 3, size, size, generator=generator)
    targets = {task: torch.randint(len(vocab), (n,), generator=generator) for task, vocab in vocabs.items()}
    return x.to(memory_format=torch.channels_last), targets


def img_s(step, x, targets, steps: int) -> float:
    for i in range(WARMUP_STEPS):
        step(x, targets, 1.0, i)
    started = time.perf_counter()
    for i in range(WARMUP_STEPS, WARMUP_STEPS + steps):
        step(x, targets, 1.0, i)
    return len(x) * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="fusion")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--profile", choices=VARIANTS, default=VARIANTS[-1], help="the variant profiled")
    parser.add_argument("--glibc-default", action="store_true", help="leave glibc's mmap threshold as it is")
    args = parser.parse_args()
    if not args.glibc_default:
        keep_freed_memory()
    cfg = load_config(None, [f"model.arch={args.arch}", *args.overrides])
    vocabs = {"label": [f"class{i}" for i in range(5)]}
    torch.set_num_threads(cfg.train.torch_threads or node_cpus())
    print(f"{args.arch}, batch {cfg.train.batch_size} at {cfg.model.img_size} px, {torch.get_num_threads()} threads, "
          f"native bf16: {native_cpu_bf16()}")  # fmt: skip

    step = step_for(cfg, vocabs, args.profile)
    x, targets = batch(cfg, vocabs)
    img_s(step, x, targets, 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(args.steps):
            step(x, targets, 1.0, i)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

    figures: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            x, targets = batch(cfg, vocabs)
            figures[variant].append(img_s(step_for(cfg, vocabs, variant), x, targets, args.steps))
            print(f"  {variant:<12} {figures[variant][-1]:6.2f} img/s", flush=True)
    if args.rounds < 1:
        return
    before = statistics.median(figures["before"])
    for variant, values in figures.items():
        median = statistics.median(values)
        print(f"{variant:<12} median {median:6.2f} img/s ({min(values):.2f}-{max(values):.2f}), x{median / before:.2f}")


if __name__ == "__main__":
    main()
