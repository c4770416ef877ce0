"""`artfuse bench`: the three figures, measured in one run on generated JPEGs, and bench.json's keys."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from artfuse.bench.label import gpu_decode_alone, synthetic_jpegs
from artfuse.cli import main
from artfuse.config import ConfigError, load_config
from artfuse.models.predict import native_cpu_bf16

TINY = ["model.img_size=64", "model.d_model=32", "model.depth=1", "model.pretrained=none"]
SMALL_BENCH = ["bench.n_images=24", "bench.width=160", "bench.height=120", "bench.model_batches=2"]


def test_bench_writes_the_three_figures_and_their_ratio(tmp_path, ray_local, capsys):
    settings = [*TINY, *SMALL_BENCH, "bench.pipeline_seconds=0", "label.batch_size=8", "label.decode_batch_size=8"]
    code = main(["bench", "--out", str(tmp_path / "bench.json"), *(arg for s in settings for arg in ("--set", s))])
    assert code == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    for key in ("model_img_s", "decode_img_s", "pipeline_img_s"):
        assert result[key] > 0, key
    assert result["ratio"] == pytest.approx(
        result["pipeline_img_s"] / min(result["model_img_s"], result["decode_img_s"]), abs=0.01
    )
    # Each stage alone is timed before and after the pipeline; its figure is the mean of the two.
    for stage in ("model", "decode"):
        before, after = result[f"{stage}_img_s_before_after"]
        assert before > 0 and after > 0
        assert result[f"{stage}_img_s"] == pytest.approx((before + after) / 2, abs=0.1)
    assert result["counts"]["pipeline_images"] == result["counts"]["labelled"] == 24
    assert result["batch_size"] == 8 and result["image_size"]["width"] == 160
    assert result["machine"]["cpus"] >= 1 and result["gpu_decode_img_s"] is None
    assert result["model_startup_s"] > 0
    assert "ratio pipeline / min(model, decode)" in capsys.readouterr().out


def test_gpu_decode_alone_runs_on_any_device():
    jpegs = synthetic_jpegs(2, 96, 64)
    assert gpu_decode_alone(jpegs, 8, 32, torch.device("cpu"), batch_size=4) > 0


def test_bench_memory_labels_each_size_and_reports_its_peak(tmp_path, ray_local, capsys):
    settings = [*TINY, "bench.width=96", "bench.height=64", "label.batch_size=8", "label.decode_batch_size=8"]
    out = tmp_path / "memory.json"
    code = main(["bench", "--memory", "12", "30", "--out", str(out), *(arg for s in settings for arg in ("--set", s))])
    assert code == 0
    result = json.loads(out.read_text())
    assert [(r["images"], r["labelled"], r["errors"]) for r in result["runs"]] == [(12, 12, 0), (30, 30, 0)]
    # The local Ray node's processes are counted, not only this one.
    assert all(r["peak_pss_mb"] > 100 and r["peak_processes"] > 2 for r in result["runs"])
    small, large = (r["peak_pss_mb"] for r in result["runs"])
    assert result["peak_growth"] == pytest.approx(large / small, abs=0.01)
    assert "peak growth" in capsys.readouterr().out


def test_bench_memory_rejects_empty_sizes(capsys):
    assert main(["bench", "--memory", "0"]) == 2
    assert "collection sizes" in capsys.readouterr().err


def test_bench_nightly_labels_exactly_the_new_objects_of_an_archive(tmp_path, ray_local, capsys):
    settings = [*TINY, "bench.width=48", "bench.height=32", "label.batch_size=8", "label.decode_batch_size=8"]
    settings.append("label.actor_memory_mb=256")  # a tiny model: schedulable on a busy machine
    out, archive = tmp_path / "nightly.json", tmp_path / "archive"
    args = ["bench", "--nightly", "60", "--new", "7", "--archive", str(archive), "--out", str(out)]
    assert main([*args, "--delete-archive", *(arg for s in settings for arg in ("--set", s))]) == 0
    result = json.loads(out.read_text())
    assert (result["n_objects"], result["n_new"], result["labelled"], result["rows_written"]) == (60, 7, 7, 7)
    assert result["exactly_the_new_objects"] and result["rows_in_output"] == 60
    assert result["previous_output"]["rows"] == 53 and "written by this bench" in capsys.readouterr().out
    for key in ("listing_s", "done_set_s", "planning_s", "labelling_s", "total_s"):
        assert 0 <= result[key] <= result["total_s"], key
    assert result["driver_peak_mb"] > 100
    assert not archive.exists() and not Path(f"{archive}.ready").exists()


def test_bench_nightly_refuses_an_archive_the_disk_cannot_hold(tmp_path, monkeypatch):
    """The free-space check runs before anything is written, naming what is needed and what is free."""
    from artfuse.bench import nightly as bench_nightly

    real = os.statvfs(tmp_path)
    small = os.statvfs_result((real.f_bsize, real.f_frsize, 0, 0, 1000, 0, 0, 500, 0, real.f_namemax))
    monkeypatch.setattr(bench_nightly.os, "statvfs", lambda path: small)
    jpegs = [b"x" * 1000] * 16
    archive, output = str(tmp_path / "archive"), str(tmp_path / "out")
    with pytest.raises(ConfigError, match=r"need about .* GiB and .* inodes under .* which has 0.0 GiB and 500 free"):
        bench_nightly.check_free_space(archive, output, jpegs, 10_000_000, 1000, load_config(None, []))
    assert not Path(archive).exists() and not Path(output).exists()
    monkeypatch.undo()
    bench_nightly.check_free_space(archive, output, jpegs, 1000, 10, load_config(None, []))


def test_bench_train_times_the_bare_step_and_the_ray_train_loop(tmp_path, ray_local, capsys):
    settings = [*TINY, "bench.train_images=30", "bench.model_batches=2", "train.batch_size=4"]
    out = tmp_path / "train.json"
    code = main(["bench", "--train", "--out", str(out), *(arg for s in settings for arg in ("--set", s))])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["step_img_s"] > 0 and result["loop_img_s"] > 0
    assert result["ratio"] == pytest.approx(result["loop_img_s"] / result["step_img_s"], abs=0.01)
    # The warm-up runs from the start of `train` to the first optimizer step: within the run's own duration.
    assert 0 < result["warmup_s"] < result["train_duration_s"]
    assert len(result["loop_img_s_by_epoch"]) == 2 and result["loop_img_s"] == result["loop_img_s_by_epoch"][-1]
    assert result["config"]["batch_size"] == 4
    # the step in fp32 beside it: what train.precision's choice gives here
    assert result["precision"] == ("bf16" if native_cpu_bf16() else "fp32") and result["step_fp32_img_s"] > 0
    assert result["precision_speedup"] == pytest.approx(result["step_img_s"] / result["step_fp32_img_s"], abs=0.01)
    assert "Ray Train loop" in capsys.readouterr().out
