"""Ray Train: a killed worker is replaced from the last checkpoint; a killed run resumes at the next epoch."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from artfuse.config import load_config
from artfuse.data.samples import generate_samples
from artfuse.pipelines.train import CHECKPOINT, load_checkpoint, train

pytestmark = pytest.mark.slow
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


def kill_one_worker_after_first_checkpoint(out: Path, killed: list[int], timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not checkpoints(out):
        time.sleep(0.2)
    # Only this test's cluster: its Ray processes descend from this (pytest) process.
    for proc in psutil.Process().children(recursive=True):
        if "RayTrainWorker" in " ".join(proc.cmdline()):
            proc.send_signal(signal.SIGKILL)
            killed.append(proc.pid)
            return


def test_killed_worker_is_replaced_from_last_checkpoint(samples, tmp_path, ray_local):
    out = tmp_path / "model"
    cfg = load_config(None, [*TINY, "train.epochs=4", "train.num_workers=2", "train.max_failures=2"])
    killed: list[int] = []
    killer = threading.Thread(target=kill_one_worker_after_first_checkpoint, args=(out, killed), daemon=True)
    killer.start()
    summary = train(str(samples), str(out), cfg)
    killer.join(timeout=5)

    assert killed, "no training worker was found to kill"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]  # no epoch lost or repeated across the restart
    assert summary["epochs_run"] == 4
    assert (out / "model.safetensors").exists() and (out / "artfuse.json").exists()


def run_train_cli(samples: Path, out: Path, epochs: int, **popen) -> subprocess.Popen:
    args = [sys.executable, "-m", "artfuse.cli", "train", "--data", str(samples), "--out", str(out)]
    for item in [*TINY, f"train.epochs={epochs}"]:
        args += ["--set", item]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **popen)


def test_interrupted_run_resumes_at_next_epoch(samples, tmp_path):
    out = tmp_path / "model"
    first = run_train_cli(samples, out, epochs=4, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(checkpoints(out)) < 2 and first.poll() is None:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
    first.wait()
    states = [load_checkpoint(c) for c in checkpoints(out) if (c / CHECKPOINT).exists()]
    done = max(s["epoch"] for s in states) + 1  # epochs completed before the kill
    assert 1 <= done < 4, "the first run should have been interrupted mid-way"

    second = run_train_cli(samples, out, epochs=4)
    log, _ = second.communicate(timeout=400)
    assert second.returncode == 0, log[-3000:]
    # Ray registers a checkpoint only once its report completes: the kill may land between the two.
    resumed = re.search(r"resuming from the checkpoint of epoch (\d+): starting epoch (\d+)", log)
    assert resumed, "the rerun did not resume from a checkpoint"
    restored = int(resumed.group(1))
    assert 1 <= restored <= done and int(resumed.group(2)) == restored + 1
    reported = {
        json.loads(line[line.index("{") :])["epoch"]
        for line in log.splitlines()
        if '"train_loss"' in line and line.rstrip().endswith("}")
    }
    assert reported == set(range(restored + 1, 5)), f"the rerun trained epochs {sorted(reported)}"
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


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
