"""The labelling job under failure: a driver killed mid-run, a node lost mid-job. Nothing lost, nothing twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray

from artfuse.config import load_config
from artfuse.data.catalog import list_inputs
from artfuse.data.samples import generate_samples
from artfuse.pipelines.bench import save_untrained_package
from artfuse.pipelines.label import label

pytestmark = pytest.mark.slow

TINY = ["model.img_size=64", "model.d_model=32", "model.depth=1", "model.pretrained=none"]
# small batches and files, so that a run is many files and there is a middle to interrupt
SMALL_STEPS = ["label.batch_size=8", "label.decode_batch_size=8", "label.rows_per_file=8"]
SMALL = (96, 160)


def outputs(out: Path) -> pads.Dataset:
    return pads.dataset(out, format="parquet", partitioning="hive", ignore_prefixes=["_", "."])


def assert_one_row_per_input(out: Path, collection: Path) -> None:
    rows = outputs(out).to_table(columns=["uri", "etag"])
    listed = list_inputs(str(collection))
    assert rows.num_rows == listed.num_rows
    assert rows.group_by(["uri", "etag"]).aggregate([]).num_rows == rows.num_rows, "duplicate rows"
    assert sorted(rows["uri"].to_pylist()) == sorted(listed["uri"].to_pylist())


def complete_files(out: Path) -> list[Path]:
    found = []
    for path in out.rglob("*.parquet"):
        try:
            pq.read_metadata(path)
            found.append(path)
        except Exception:  # noqa: BLE001 - still being written
            pass
    return found


def test_driver_killed_mid_run_then_rerun_ends_complete(tmp_path, ray_local):
    import psutil  # shipped with Ray

    collection, out, model = tmp_path / "archive", tmp_path / "predictions", tmp_path / "model"
    generate_samples(str(collection), n=240, size_range=SMALL)
    save_untrained_package(str(model), load_config(None, TINY), {"label": 6})
    settings = [arg for s in (*TINY, *SMALL_STEPS) for arg in ("--set", s)]
    command = [sys.executable, "-m", "artfuse.cli", "label", "--model", str(model)]
    command += ["--input", str(collection), "--out", str(out), *settings]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, not the tests' one
    with open(tmp_path / "first.log", "wb") as log:
        driver = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.time() + 120
        while len(complete_files(out)) < 2 and driver.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None, "the first run ended before it could be killed:\n" + _tail(tmp_path / "first.log")
        ray_processes = psutil.Process(driver.pid).children(recursive=True)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started share its process group
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    # A few Ray helpers (agents) start in sessions of their own and outlive the group kill: end them too.
    _, alive = psutil.wait_procs(ray_processes, timeout=20)
    for proc in alive:
        proc.kill()
    psutil.wait_procs(alive, timeout=10)

    kept = complete_files(out)
    kept_rows = sum(pq.read_metadata(path).num_rows for path in kept)
    assert 0 < kept_rows < 240
    torn = kept[0]  # a write cut short: the file exists, its footer does not
    kept_rows -= pq.read_metadata(torn).num_rows
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])

    report = label(str(model), str(collection), str(out), load_config(None, [*TINY, *SMALL_STEPS]))
    assert not torn.exists(), "the torn file must be removed, its inputs labelled again"
    assert (report["listed"], report["skipped"]) == (240, kept_rows)
    assert report["labelled"] + report["errors"] == 240 - kept_rows
    assert_one_row_per_input(out, collection)


def test_node_removed_mid_job_still_writes_every_row(tmp_path):
    """On a two-node ray.cluster_utils.Cluster (its own Ray, in a subprocess): the worker node goes mid-job."""
    collection, out, model = tmp_path / "archive", tmp_path / "predictions", tmp_path / "model"
    generate_samples(str(collection), n=96, size_range=SMALL)
    save_untrained_package(str(model), load_config(None, TINY), {"label": 6})
    script = "import sys, test_label_faults as t; t.label_losing_a_node(*sys.argv[1:])"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", script, str(model), str(collection), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "failed" not in result, result["failed"]
    assert result["rows_before_removal"] < 96, "the node went after the job had finished"
    assert (result["report"]["labelled"], result["report"]["errors"]) == (96, 0)
    assert_one_row_per_input(out, collection)


def label_losing_a_node(model: str, collection: str, out: str) -> None:
    """Run in a subprocess: label on a head + worker node (1 CPU each), remove the worker once output appears."""
    from ray.cluster_utils import Cluster

    small_store = 100 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": small_store})
    worker = cluster.add_node(num_cpus=1, object_store_memory=small_store)
    ray.init(address=cluster.address, logging_level="WARNING")
    cluster.wait_for_nodes()
    # half a CPU per stage, so that decode tasks and the two model actors can run on both nodes
    settings = ["label.cpus_per_actor=0.5", "label.decode_cpus=0.5", "label.min_actors=2", "label.max_actors=2"]
    cfg = load_config(None, [*TINY, *SMALL_STEPS, *settings])
    result: dict = {}

    def run() -> None:
        try:
            result["report"] = label(model, collection, out, cfg)
        except Exception as e:  # noqa: BLE001 - reported to the test
            result["failed"] = f"{type(e).__name__}: {e}"

    job = threading.Thread(target=run)
    job.start()
    while not complete_files(Path(out)) and job.is_alive():
        time.sleep(0.05)
    result["rows_before_removal"] = sum(pq.read_metadata(p).num_rows for p in complete_files(Path(out)))
    cluster.remove_node(worker)
    job.join()
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(result, default=str))


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]
