"""Ray Train: a killed worker is replaced from the last checkpoint; a killed run resumes at the next epoch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from artfuse.config import ConfigError, load_config
from artfuse.data.samples import generate_samples
from artfuse.pipelines import train as train_module
from artfuse.pipelines.pause import PAUSED, RELEASE
from artfuse.pipelines.train import build_train_step, load_checkpoint, train, trains_in_bf16

TINY = [
    "model.img_size=64",
    "model.d_model=32",
    "model.num_heads=2",
    "model.depth=1",
    "model.pretrained=none",
    "train.batch_size=16",
    "train.augment=false",
]


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    generate_samples(str(out), n=48, seed=1)
    return out


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / "_train" / "run").glob("checkpoint_*"))


def registered_epochs(out: Path) -> set[int]:
    """The epochs whose checkpoints Ray Train has registered: what a restart or a rerun resumes from."""
    snapshot = out / "_train" / "run" / "checkpoint_manager_snapshot.json"
    try:
        return {r["metrics"]["epoch"] for r in json.loads(snapshot.read_text())["checkpoint_results"]}
    except (OSError, ValueError, KeyError):  # not written yet, or being replaced right now
        return set()


def paused_at(out: Path, pause_dir: Path, epoch: int, running) -> bool:
    """Wait while the run is `running()` until it blocks at its pause point with `epoch`'s checkpoint registered
    (it cannot finish first, so no deadline races it; pytest's own timeout ends a run that never gets there)."""
    while running():
        if (pause_dir / PAUSED).exists() and epoch in registered_epochs(out):
            return True
        time.sleep(0.2)
    return False


def pause_after_epoch(pause_dir: Path, epoch: int) -> list[str]:
    return ["pause.point=epoch", f"pause.after={epoch}", f"pause.dir={pause_dir}"]


def kill_one_worker_when_paused(out: Path, pause_dir: Path, killed: list[int], training: threading.Event) -> None:
    try:
        if not paused_at(out, pause_dir, epoch=1, running=training.is_set):
            return
        # Only this test's cluster: its Ray processes descend from this (pytest) process.
        for proc in psutil.Process().children(recursive=True):
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                proc.send_signal(signal.SIGKILL)
                killed.append(proc.pid)
                return
    finally:
        (pause_dir / RELEASE).touch()  # the restarted workers go on (and train() never waits forever)


def test_killed_worker_is_replaced_from_last_checkpoint(samples, tmp_path, ray_local):
    out, pause_dir = tmp_path / "model", tmp_path / "pause"
    cfg = load_config(
        None, [*TINY, "train.epochs=2", "train.num_workers=2", "train.max_failures=2", *pause_after_epoch(pause_dir, 1)]
    )
    pause_dir.mkdir()
    killed: list[int] = []
    training = threading.Event()
    training.set()
    killer = threading.Thread(target=kill_one_worker_when_paused, args=(out, pause_dir, killed, training), daemon=True)
    killer.start()
    try:
        summary = train(str(samples), str(out), cfg)
    finally:
        training.clear()
        killer.join(timeout=5)

    assert killed, "no training worker was found to kill"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]  # no epoch lost or repeated across the restart
    assert summary["epochs_run"] == 2
    assert (out / "model.safetensors").exists() and (out / "artfuse.json").exists()


def run_train_cli(samples: Path, out: Path, epochs: int, settings=(), **popen) -> subprocess.Popen:
    args = [sys.executable, "-m", "artfuse.cli", "train", "--data", str(samples), "--out", str(out)]
    for item in [*TINY, f"train.epochs={epochs}", *settings]:
        args += ["--set", item]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **popen)


@pytest.mark.slow  # two CLI runs, each with the local Ray it starts (and the first killed with it)
def test_interrupted_run_resumes_at_next_epoch(samples, tmp_path):
    out, pause_dir = tmp_path / "model", tmp_path / "pause"
    first = run_train_cli(samples, out, 3, pause_after_epoch(pause_dir, 1), start_new_session=True)
    try:
        paused = paused_at(out, pause_dir, epoch=1, running=lambda: first.poll() is None)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
        log, _ = first.communicate()
    assert paused, "the first run did not pause after epoch 1:\n" + log[-3000:]

    second = run_train_cli(samples, out, epochs=3)
    log, _ = second.communicate(timeout=400)
    assert second.returncode == 0, log[-3000:]
    assert "resuming from the checkpoint of epoch 1: starting epoch 2" in log
    reported = {
        json.loads(line[line.index("{") :])["epoch"]
        for line in log.splitlines()
        if '"train_loss"' in line and line.rstrip().endswith("}")
    }
    assert reported == {2, 3}, f"the rerun trained epochs {sorted(reported)}"
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_a_worker_with_an_empty_shard_still_reports_its_epochs(samples, tmp_path, ray_local):
    # One training image over two workers: at least one worker's shard has no batch at all.
    images = sorted(p for p in samples.rglob("*.jpg"))
    first_label = images[0].parent.name
    rows = [f"{images[0]},{first_label},train"]
    rows += [f"{p},{p.parent.name},val" for p in images[1:] if p.parent.name == first_label][:4]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    cfg = load_config(None, [*TINY, "train.epochs=2", "train.num_workers=2"])
    summary = train(str(manifest), str(tmp_path / "model"), cfg)
    history = json.loads((tmp_path / "model" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and summary["n_train"] == 1


def test_a_checkpoint_of_the_old_format_is_refused_by_name(tmp_path):
    """Checkpoints were once three files (weights, optimiser, state); resuming one says so instead of a bare
    FileNotFoundError from inside a Ray Train worker."""
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"{tmp_path} holds no checkpoint.pt.*new --out"):
        load_checkpoint(tmp_path)


def test_train_precision_auto_is_bf16_only_where_the_hardware_computes_it(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (True, False):
        monkeypatch.setattr(train_module, "native_cpu_bf16", lambda native=native: native)
        assert trains_in_bf16("auto", cpu) is native and trains_in_bf16("auto", cuda)
        assert trains_in_bf16("bf16", cpu) and not trains_in_bf16("fp32", cpu) and not trains_in_bf16("fp32", cuda)
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=fp16"])
    # the step's forward runs in the dtype it was given, its loss and optimiser in fp32
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        cfg = load_config(None, [*TINY, f"train.precision={precision}"])
        step = build_train_step(cfg, {"label": ["a", "b"]}, cpu, None, wrap=lambda model: model)
        seen = []
        step.raw_model.head["label"].register_forward_hook(lambda module, args, out, seen=seen: seen.append(out.dtype))
        loss = step(torch.randn(4, 3, 64, 64), {"label": torch.tensor([0, 1, 0, 1])}, 1.0, 0)
        assert step.precision == precision and seen == [dtype] and loss.dtype == torch.float32
