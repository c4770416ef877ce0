"""`artfuse bench --simulate`: the label pipeline's scheduling on a GPU machine's logical resources, stages sleeping
for the H200's measured per-batch times. The goals of the GPU machine, kept on any machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from artfuse.bench.simulate import Timings
from artfuse.cli import main

# Short: 2 card-seconds of images each path, at 8x slowed time so that this machine's own work (the actor builds real
# prediction rows; the test suite runs beside it) weighs little against the card's. At 4x under load the nvJPEG path
# measured 3,545-4,190 img/s; at these settings on a quiet 2-core machine 0.918 (CPU path) and 4,850 img/s (nvJPEG),
# 81 s. Its own process: the simulation starts its own Ray.
SETTINGS = ["bench.pipeline_seconds=2", "bench.simulate_time_scale=8"]


def test_simulated_gpu_machine_keeps_decoding_and_overlaps_nvjpeg_with_the_model(tmp_path):
    out = tmp_path / "simulate.json"
    settings = [arg for s in SETTINGS for arg in ("--set", s)]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "artfuse.cli", "bench", "--simulate", "--out", str(out), *settings],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    cpu, gpu = result["cpu_decode"], result["gpu_decode"]
    # Every CPU the actor does not hold decodes: within 15 % of min(model alone, CPU decode alone). Steady state: the
    # start-up here is this machine's (an actor importing torch), not the card's; `ratio` includes it.
    assert cpu["steady_ratio"] >= 0.85, cpu
    # nvJPEG overlaps the forward pass: 1.5x what CPU decode can feed (back to back, both cap at about 2,690 img/s).
    assert gpu["steady_img_s"] >= 4000, gpu
    assert set(cpu["busy"]) == {"read", "model"}, cpu["busy"]  # each stage's share of its slots, from Ray Data
    assert "cpu_decode 1 node(s)" in done.stdout


def test_default_timings_are_the_h200_measurements():
    t = Timings.load()
    assert (t.cpus, t.gpus, t.batch_size) == (16, 1, 256)
    assert t.model_img_s == 5705 and t.gpu_decode_img_s == 5089
    assert t.cpu_decode_img_s == pytest.approx(2645, rel=0.001)


def test_a_timings_file_that_is_not_one_is_a_config_error(tmp_path, capsys):
    bad = tmp_path / "timings.json"
    bad.write_text(json.dumps({"machine": "x", "node": {"cpus": 16}}))
    assert main(["bench", "--simulate", str(bad)]) == 2
    assert "is not a timings file" in capsys.readouterr().err
    assert main(["bench", "--simulate", str(tmp_path / "missing.json")]) == 2
