"""jobs/: each entrypoint hands its arguments to `artfuse <job>`, and every example config is valid."""

from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

import pytest

from artfuse.cluster.submit import JOBS
from artfuse.config import load_config

JOBS_DIR = Path(__file__).resolve().parent.parent / "jobs"


@pytest.mark.parametrize("job", JOBS)
def test_entrypoint_runs_the_cli_command_and_exits_with_its_code(job, monkeypatch):
    calls = []
    fake_cli = types.ModuleType("artfuse.cli")
    fake_cli.main = lambda argv: calls.append(argv) or 3
    monkeypatch.setitem(sys.modules, "artfuse.cli", fake_cli)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", [f"jobs/{job}.py", "--data", "s3://bucket/x y", "--set", "a.b=1"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(JOBS_DIR / f"{job}.py"), run_name="__main__")
    assert exit_.value.code == 3
    assert calls == [[job, "--data", "s3://bucket/x y", "--set", "a.b=1"]]
    assert sys.path[0] == str(JOBS_DIR.parent)  # the shipped source comes first


def test_every_example_config_loads():
    paths = sorted((JOBS_DIR / "configs").glob("*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        load_config(path)


def test_wikiart_training_is_multi_gpu_with_style_and_artist_heads():
    cfg = load_config(JOBS_DIR / "configs" / "wikiart-train.yaml")
    assert cfg.train.use_gpu and cfg.train.num_workers >= 2
    assert set(cfg.data.tasks) == {"style", "artist"}
    assert (cfg.model.feature_stride, cfg.model.d_model, cfg.model.depth) == (16, 384, 4)


def test_nightly_labelling_uses_gpu_actors_and_writes_embeddings():
    label = load_config(JOBS_DIR / "configs" / "nightly-label.yaml").label
    assert label.num_gpus_per_actor >= 1 and label.gpu_decode
    assert label.max_actors > 1 and label.batch_size >= 128
    assert label.review_threshold == "auto" and label.embeddings
