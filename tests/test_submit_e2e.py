"""End to end, as a user runs it: `ray start --head` with token auth, then `artfuse submit label` (the CLI, in a
subprocess) ships this checkout to the cluster, and the job labels a collection on a local S3 server into Parquet.

The head runs in a HOME of its own, where `ray get-auth-token --generate` put a token; the submitting shell has
RAY_AUTH_MODE unset and finds the same token there, as a newcomer following cluster/README.md would. The head's
processes live in a session (and process group) of their own, and only that group is stopped afterwards: other
Ray clusters on this machine are left alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from artfuse.config import ModelConfig
from artfuse.data import storage
from artfuse.data.preprocess import Preprocess
from artfuse.data.samples import MOVEMENTS, generate_samples
from artfuse.models import create_model, data_config
from artfuse.models.package import read_manifest, save_package
from artfuse.pipelines.label import prediction_schema

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

BIN = Path(sys.executable).parent  # the venv's bin: ray, artfuse, python
REPO = Path(__file__).resolve().parent.parent
N_SAMPLES = 24


@dataclass
class Head:
    address: str  # the dashboard / Jobs API, http://127.0.0.1:PORT
    env: dict[str, str]  # the environment of a shell on this machine that holds the cluster's token
    pgid: int
    log: Path


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    members.append(int(entry))
            except ProcessLookupError:
                pass
    return members


def _stop_group(pgid: int, grace_s: float = 5.0) -> None:
    """What `ray stop` does (SIGTERM, then SIGKILL after a grace period), but only to this head's process group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@pytest.fixture
def ray_head(tmp_path: Path, s3_server: str) -> Iterator[Head]:
    """A real `ray start --head` (2 CPUs, dashboard on, token auth on) whose workers can reach the local S3 server.

    Its environment is a copy of this one (AWS_ENDPOINT_URL and the fake credentials included: the cluster's own
    credentials, as a cluster's IAM role would give them) with a private HOME and no Ray auth settings.
    """
    home = tmp_path / "home"
    home.mkdir()
    # No RAY_* from this process (conftest's RAY_AUTH_MODE=disabled, an in-process Ray's RAY_ADDRESS ...).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {
        "HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
    }
    generated = subprocess.run(
        [BIN / "ray", "get-auth-token", "--generate"], env=env, capture_output=True, text=True, timeout=60
    )
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert generated.returncode == 0 and token and token not in generated.stderr

    # Unix socket paths (temp dir + session_<date>_<pid>/sockets/plasma_store) must stay under ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="afray-", dir="/tmp"))
    gcs, dashboard, client_server, agent = _free_ports(4)
    log = tmp_path / "ray-start.log"
    command = [
        BIN / "ray",
        "start",
        "--head",
        f"--port={gcs}",
        f"--dashboard-port={dashboard}",
        "--num-cpus=2",
        "--include-dashboard=true",
        # Ports with fixed defaults that another cluster on this machine may hold; workers take random ones.
        f"--ray-client-server-port={client_server}",
        f"--dashboard-agent-listen-port={agent}",
        "--min-worker-port=0",
        "--max-worker-port=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    with log.open("w") as out:
        # A new session: every process the head starts shares this group, and only this group is stopped later.
        starter = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    pgid = starter.pid
    try:
        try:
            code = starter.wait(timeout=120)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"ray start --head failed ({code}):\n{_tail(log)}"
        yield Head(f"http://127.0.0.1:{dashboard}", env, pgid, log)
    finally:
        _stop_group(pgid)
        assert not _group_members(pgid), "the head's processes outlived SIGKILL"
        shutil.rmtree(temp_dir, ignore_errors=True)


def _make_package(uri: str) -> str:
    """A tiny untrained fusion model over the sample movements, saved at `uri`; returns its model_id."""
    cfg = ModelConfig(pretrained="none", img_size=64, d_model=32, depth=1, num_heads=4)
    tasks = {"label": list(MOVEMENTS)}
    model = create_model(cfg, {task: len(vocab) for task, vocab in tasks.items()})
    return save_package(uri, model, cfg, tasks, Preprocess.for_model(**data_config(cfg)))


def _jobs_api_status(address: str) -> int:
    try:
        with urllib.request.urlopen(f"{address}/api/jobs/", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_artfuse_submit_label_runs_on_a_token_auth_head_and_writes_one_row_per_input(ray_head: Head, s3_bucket: str):
    base = f"s3://{s3_bucket}"
    model_id = _make_package(f"{base}/model")
    generate_samples(f"{base}/in", n=N_SAMPLES, seed=0, size_range=(64, 128))
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="in/broken/not-an-image.jpg", Body=b"this is not a JPEG")
    inputs = {f"{base}/{o['Key']}" for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="in/")["Contents"]}
    assert len(inputs) == N_SAMPLES + 1

    # The cluster requires its token: a client without one is turned away.
    assert _jobs_api_status(ray_head.address) in (401, 403)

    command = [
        BIN / "artfuse",
        "submit",
        "label",
        "--address",
        ray_head.address,
        "--model",
        f"{base}/model",
        "--input",
        f"{base}/in",
        "--out",
        f"{base}/out",
    ]
    started = time.monotonic()
    run = subprocess.run(command, cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"artfuse submit exited {run.returncode}:\n{output[-6000:]}\n{_tail(ray_head.log)}"
    assert "succeeded" in run.stderr, output[-3000:]
    print(f"artfuse submit label took {time.monotonic() - started:.1f} s")

    fs, root = storage.arrow_filesystem(f"{base}/out")
    table = pads.dataset(
        root, filesystem=fs, format="parquet", partitioning="hive", ignore_prefixes=["_", "."]
    ).to_table()
    expected = set(prediction_schema({"label": list(MOVEMENTS)}, None).names)
    assert expected <= set(table.column_names)
    assert "run_date" in table.column_names  # hive partition
    rows = table.to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted(inputs)  # exactly one row per input
    broken = [r for r in rows if r["uri"].endswith("not-an-image.jpg")]
    assert broken[0]["error"] and broken[0]["label"] is None and broken[0]["needs_review"]
    good = [r for r in rows if r is not broken[0]]
    assert all(r["error"] is None and r["label"] in MOVEMENTS and r["width"] >= 64 for r in good)
    assert pc.unique(table["model_id"]).to_pylist() == [model_id] == [read_manifest(f"{base}/model")["model_id"]]
    assert len(pc.unique(table["run_id"])) == 1
    reports = s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/_reports/").get("KeyCount", 0)
    assert reports == 1
