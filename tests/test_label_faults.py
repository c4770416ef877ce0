"""The labelling job under failure: a driver killed mid-run, a node lost mid-job, the model actor killed, the S3
endpoint gone for a while. Nothing lost, nothing twice."""

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

from artfuse.bench.label import save_untrained_package
from artfuse.config import load_config
from artfuse.data import storage
from artfuse.data.catalog import list_inputs
from artfuse.data.samples import generate_samples
from artfuse.pipelines.label import LabelStalled, label, read_output
from artfuse.pipelines.label_output import OutputLocked
from artfuse.pipelines.pause import PAUSED, RELEASE

pytestmark = pytest.mark.slow

TINY = ["model.img_size=64", "model.d_model=32", "model.depth=1", "model.pretrained=none"]
# Small batches and files, so that a run is many files and there is a middle to interrupt. The tiny model needs a
# sliver of the actor's default 4 GB reservation, and Ray would not place the actor on a node with less free.
SMALL_STEPS = ["label.batch_size=8", "label.decode_batch_size=8", "label.rows_per_file=8", "label.actor_memory_mb=0"]
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
    # The model actor blocks before its third batch: two batches (two files) are labelled, the rest never are.
    pause = tmp_path / "pause"
    pausing = ["pause.point=batch", "pause.after=3", f"pause.dir={pause}"]
    settings = [arg for s in (*TINY, *SMALL_STEPS, *pausing) for arg in ("--set", s)]
    command = [sys.executable, "-m", "artfuse.cli", "label", "--model", str(model)]
    command += ["--input", str(collection), "--out", str(out), *settings]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, not the tests' one
    with open(tmp_path / "first.log", "wb") as log:
        driver = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        # No deadline to race: the run cannot finish before the pause (pytest's timeout ends one that never pauses).
        while not ((pause / PAUSED).exists() and len(complete_files(out)) >= 2) and driver.poll() is None:
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

    # The killed run left its lock: the rerun is told that run is dead, as README's Guarantees say to do.
    dead = json.loads((out / "_lock.json").read_text())["run_id"]
    with pytest.raises(OutputLocked, match=f"label.break_lock={dead}"):
        label(str(model), str(collection), str(out), load_config(None, [*TINY, *SMALL_STEPS]))
    cfg = load_config(None, [*TINY, *SMALL_STEPS, f"label.break_lock={dead}"])
    report = label(str(model), str(collection), str(out), cfg)
    assert report["lock_taken_over_from"]["run_id"] == dead and not (out / "_lock.json").exists()
    assert not torn.exists(), "the torn file must be set aside, its inputs labelled again"
    assert str(torn) in [moved["file"] for moved in report["set_aside"]]
    assert (report["listed"], report["skipped"]) == (240, kept_rows)
    assert report["labelled"] + report["errors"] == 240 - kept_rows
    assert_one_row_per_input(out, collection)


def test_a_run_that_moves_nothing_stops_then_a_rerun_ends_complete(tmp_path, ray_local):
    """A model actor that never returns its batch: the run stops after label.stall_timeout_s, naming the setting,
    instead of waiting for ever; a rerun labels every input once."""
    collection, out, model = tmp_path / "archive", tmp_path / "predictions", tmp_path / "model"
    generate_samples(str(collection), n=32, size_range=SMALL)
    save_untrained_package(str(model), load_config(None, TINY), {"label": 6})
    pause = tmp_path / "pause"
    pause.mkdir()  # the stall may come before the actor's first batch (decode done, the actor still starting)
    stuck = ["pause.point=batch", "pause.after=1", f"pause.dir={pause}", "label.stall_timeout_s=5"]
    try:
        with pytest.raises(LabelStalled, match=r"moved nothing for 5 s \(label\.stall_timeout_s\)"):
            label(str(model), str(collection), str(out), load_config(None, [*TINY, *SMALL_STEPS, *stuck]))
    finally:
        (pause / RELEASE).touch()  # the actor, if still alive, goes on and gives its CPU back
    report = label(str(model), str(collection), str(out), load_config(None, [*TINY, *SMALL_STEPS]))
    assert (report["skipped"] + report["labelled"], report["errors"]) == (report["listed"], 0)
    assert_one_row_per_input(out, collection)


def test_node_removed_mid_job_still_writes_every_row(tmp_path):
    """On a two-node ray.cluster_utils.Cluster (its own Ray, in a subprocess): the worker node goes mid-job, with
    decode tasks still to come. The two model actors fit on the head alone but leave no decode task room there. The
    run either ends complete (the pool shrank), or, where the actors wait on the head for blocks lost with the node,
    stops after label.stall_timeout_s naming the lost node, never hangs; a rerun then labels the rest. One row per
    input either way."""
    collection, out, model = tmp_path / "archive", tmp_path / "predictions", tmp_path / "model"
    generate_samples(str(collection), n=96, size_range=SMALL)
    save_untrained_package(str(model), load_config(None, TINY), {"label": 6})
    script = "import sys, test_label_faults as t; t.label_losing_a_node(*sys.argv[1:])"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", script, str(model), str(collection), str(out), str(tmp_path / "batches")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    (tmp_path / "result.json").write_text(json.dumps(result, indent=1))  # which way it went, for a look afterwards
    assert 0 < result["batches_before_removal"] < 96 // 8, "the node went mid-job"
    if "failed" in result:
        assert result["failed"].startswith("LabelStalled: "), result["failed"]
        assert "1 of the 2 nodes it started on left the cluster" in result["failed"]
    report = result.get("rerun") or result["report"]
    assert (report["skipped"] + report["labelled"], report["errors"]) == (96, 0)
    assert_one_row_per_input(out, collection)


def label_losing_a_node(model: str, collection: str, out: str, batches: str) -> None:
    """Run in a subprocess: label on a head + worker node (1 CPU each), remove the worker once the model actors have
    labelled two batches (counted by the pause point, which never blocks here); where the run stops without progress,
    rerun it on the head alone.

    Not when the first file appears: Ray Data may write files only once the actors are done, and the node would go
    after the labelling."""
    from ray.cluster_utils import Cluster

    small_store = 100 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": small_store})
    worker = cluster.add_node(num_cpus=1, object_store_memory=small_store)
    ray.init(address=cluster.address, logging_level="WARNING")
    cluster.wait_for_nodes()
    # half a CPU per stage, so that decode tasks and the two model actors can run on both nodes
    settings = ["label.cpus_per_actor=0.5", "label.decode_cpus=0.5", "label.min_actors=2", "label.max_actors=2"]
    counting = ["pause.point=batch", f"pause.after={10**6}", f"pause.dir={batches}"]
    # Far shorter than a real cluster's stall allowance: either way is accepted, and the stalled way (most runs on a
    # 2-core machine) then costs the test 15 s of waiting instead of 40 (93 -> 66 s).
    stall = ["label.stall_timeout_s=15"]
    cfg = load_config(None, [*TINY, *SMALL_STEPS, *settings, *counting, *stall])
    result: dict = {}

    def run() -> None:
        try:
            result["report"] = label(model, collection, out, cfg)
        except Exception as e:  # noqa: BLE001 - reported to the test
            result["failed"] = f"{type(e).__name__}: {e}"

    job = threading.Thread(target=run)
    job.start()
    while len(list(Path(batches).glob("batch.*"))) < 2 and job.is_alive():
        time.sleep(0.05)
    result["batches_before_removal"] = len(list(Path(batches).glob("batch.*")))
    started = time.time()
    cluster.remove_node(worker)
    job.join()
    result["after_removal_s"] = round(time.time() - started, 1)
    if "failed" in result:
        result["rerun"] = label(model, collection, out, cfg)
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(result, default=str))


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


@pytest.fixture
def flaky_s3(s3_server):
    """A second local S3 endpoint that a test can take away and bring back on the same port. Both endpoints
    serve moto's one in-process store, so the objects survive the outage, and the session's endpoint (which
    stays up) can watch the bucket meanwhile."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    servers = [server]

    def outage(seconds: float) -> None:
        servers[-1].stop()
        time.sleep(seconds)
        servers.append(ThreadedMotoServer(ip_address=host, port=port, verbose=False))
        servers[-1].start()

    yield f"http://{host}:{port}", outage
    servers[-1].stop()


def test_s3_endpoint_gone_for_ten_seconds_mid_run(tmp_path, s3_server, s3_bucket, flaky_s3, ray_local):
    """The endpoint goes away for 10 s once the first predictions are written: the run rides it out or fails
    naming the endpoint, and a rerun ends with every input labelled once (an outage is never an error row)."""
    import boto3

    endpoint, outage = flaky_s3
    collection, out, model = f"s3://{s3_bucket}/archive", f"s3://{s3_bucket}/labels", tmp_path / "model"
    generate_samples(collection, n=64, size_range=SMALL)
    save_untrained_package(str(model), load_config(None, TINY), {"label": 6})
    cfg = load_config(None, [*TINY, *SMALL_STEPS, f"storage.endpoint_url={endpoint}"])

    went: dict = {}

    def first_files_then_outage() -> None:
        watch = boto3.client("s3", endpoint_url=s3_server)  # the endpoint that stays up
        deadline = time.time() + 300
        while time.time() < deadline:
            listed = watch.list_objects_v2(Bucket=s3_bucket, Prefix="labels/run_date=").get("Contents", [])
            if any(item["Key"].endswith(".parquet") for item in listed):
                went["at"] = time.time()
                outage(10)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=first_files_then_outage)
    watcher.start()
    try:
        first = label(str(model), collection, out, cfg)
    except Exception as e:  # noqa: BLE001 - allowed, if it names the endpoint
        assert endpoint in str(e), f"the failure does not name {endpoint}: {e}"
        first = None
    finally:
        ended = time.time()
        watcher.join()
    assert went and went["at"] < ended, "the endpoint did not go away while the job ran"
    rerun = label(str(model), collection, out, cfg)
    fs, root = storage.arrow_filesystem(out)
    rows = read_output(fs, root, ["uri", "etag", "error"])
    listed = list_inputs(collection)
    assert sorted(rows["uri"].to_pylist()) == sorted(listed["uri"].to_pylist()), "an input lost or repeated"
    assert rows["error"].null_count == rows.num_rows, "an outage became an error row"
    if first:  # it rode the outage out
        assert (first["labelled"], rerun["labelled"]) == (listed.num_rows, 0)


def test_model_actor_killed_mid_run_every_row_once(tmp_path, ray_local):
    """The model actor's process is killed once predictions start landing: Ray Data restarts it and retries its
    batches; the run ends with every row exactly once."""
    import psutil  # shipped with Ray

    collection, out, model = tmp_path / "archive", tmp_path / "predictions", tmp_path / "model"
    generate_samples(str(collection), n=96, size_range=SMALL)
    save_untrained_package(str(model), load_config(None, TINY), {"label": 6})
    result: dict = {}

    def run() -> None:
        try:
            result["report"] = label(str(model), str(collection), str(out), load_config(None, [*TINY, *SMALL_STEPS]))
        except Exception as e:  # noqa: BLE001 - reported below
            result["failed"] = f"{type(e).__name__}: {e}"

    job = threading.Thread(target=run)
    job.start()
    while not complete_files(out) and job.is_alive():
        time.sleep(0.05)
    rows_before_kill = sum(pq.read_metadata(p).num_rows for p in complete_files(out))
    # Our own Ray's processes only (the machine may run other Ray clusters): the actor's title names its class.
    actors = [p for p in psutil.Process().children(recursive=True) if "MapBatches(LabelModel)" in " ".join(_cmdline(p))]
    assert len(actors) == 1, "expected one model actor"
    actors[0].kill()
    job.join()
    assert "failed" not in result, result.get("failed")
    assert rows_before_kill < 96, "the actor was killed after the job had finished"
    assert (result["report"]["labelled"], result["report"]["errors"]) == (96, 0)
    assert_one_row_per_input(out, collection)


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:  # gone meanwhile
        return []
