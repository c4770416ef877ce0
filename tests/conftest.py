"""Shared fixtures: a local S3 server and the real painting sets."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PAINTINGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "paintings"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; .ci/run installs it
# Headless, no sandbox (containers), nothing that reaches the network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# Tests only: local clusters started by the tests skip Ray's token auth (cluster configs keep it on).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train, for every run the tests start (in-process or through the CLI): no preemption watcher (an actor, so one
# more Ray worker process per run, watching for spot-instance notices no local cluster gets), and the controller
# polls its workers every 0.5 s instead of 2 s (a tiny run otherwise waits up to 2 s for each step to be noticed).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def ray_local(s3_server: str) -> Iterator[None]:
    """One local Ray instance for the tests that run jobs in-process (2 CPUs, like this machine).

    Started after the local S3 server, so that Ray's workers inherit its endpoint and fake credentials.
    """
    import ray

    if not ray.is_initialized():
        # With the dashboard, as artfuse starts its own (cluster/runtime.py): Ray Train's placement-group cleanup
        # for stopped Tune trials needs its state API.
        ray.init(address="local", num_cpus=2, include_dashboard=True, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 endpoint on 127.0.0.1 (moto's ThreadedMotoServer on a free port); yields its URL.

    For the session, AWS_ENDPOINT_URL points at it and fake credentials replace any real ones, so nothing
    can reach AWS itself.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
            env.delenv(name, raising=False)
        yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A new empty bucket on the local S3 server; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def paintings() -> Path:
    """../shared/data/paintings (or $ARTFUSE_PAINTINGS); skips the test where it is absent."""
    path = Path(os.environ.get("ARTFUSE_PAINTINGS") or PAINTINGS)
    if not path.is_dir():
        pytest.skip(f"the real painting sets are absent ({path})")
    return path


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium driven by Playwright, one per test module (Playwright's sync API keeps an event
    loop running while it is open); skips the test where either is absent."""
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM}); .ci/run installs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
