"""Submit a jobs/ entrypoint to a Ray cluster through the Ray Jobs API, and follow it to the end.

The cluster is assumed to have artfuse's dependencies in its image (see cluster/README.md); the job ships
only the project source, as the runtime_env `working_dir`, so `python jobs/<job>.py` runs the code that
was submitted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

from artfuse.cluster import JOBS
from artfuse.config import ConfigError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Never upload environments, history or outputs; .gitignore'd files are skipped by Ray as well.
RUNTIME_ENV_EXCLUDES = (
    ".venv",
    ".git",
    "demo-out",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "tests",
)
# Where to find storage, not who may read it: these travel with every job.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
# Credentials travel only when the caller opts in; a cluster should have its own (IAM role, IRSA, a Secret).
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
AUTH_MODE_ENV = "RAY_AUTH_MODE"
DEFAULT_TOKEN_PATH = Path("~/.ray/auth_token")
POLL_SECONDS = 1.0


def build_entrypoint(job: str, job_args: list[str] | tuple[str, ...] = ()) -> str:
    """The shell command the cluster runs, e.g. `python jobs/label.py --model s3://...` (every arg quoted)."""
    if job not in JOBS:
        raise ConfigError(f"unknown job '{job}'; valid jobs: {', '.join(JOBS)}")
    return shlex.join(["python", f"jobs/{job}.py", *job_args])


def check_address(address: str) -> None:
    """The Jobs API is at the dashboard's HTTP URL; Ray reads a bare host:port as a GCS address and times out."""
    try:
        parsed = urllib.parse.urlsplit(address)
        port_ok = parsed.port is None or parsed.port > 0
    except ValueError:  # a port that is not a number, or out of range
        parsed, port_ok = None, False
    if not (parsed and parsed.scheme in ("http", "https") and parsed.hostname and port_ok):
        raise ConfigError(
            f"--address must be the URL of the cluster's dashboard, e.g. http://127.0.0.1:8265; got '{address}'"
        )


def build_runtime_env(
    working_dir: str | Path = PROJECT_ROOT,
    env: Mapping[str, str] | None = None,
    *,
    forward_credentials: bool = False,
) -> dict:
    """The job's runtime_env: the project source as working_dir, and the storage settings of this shell."""
    names = FORWARDED_ENV + (CREDENTIAL_ENV if forward_credentials else ())
    env_vars = {name: os.environ[name] for name in names if os.environ.get(name)}
    if forward_credentials and any(name in env_vars for name in CREDENTIAL_ENV):
        log.warning(
            "--forward-credentials: this shell's AWS keys go into the job's runtime_env, which Ray stores with the "
            "job and shows in its dashboard; give the cluster its own credentials instead (IRSA, instance profile)"
        )
    env_vars.update(env or {})
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": list(RUNTIME_ENV_EXCLUDES)}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return runtime_env


def enable_token_auth_if_available() -> bool:
    """Switch this process's Ray client to token auth when a token is at hand and no mode was chosen.

    The same rule `ray start` and `ray.init()` apply for a local cluster (Ray's
    `maybe_enable_token_auth_if_token_available`): RAY_AUTH_MODE wins when set; otherwise a token in
    RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token turns token mode on. `ray job submit` itself
    does not do this, which is why it is refused by a `ray start --head` cluster unless RAY_AUTH_MODE=token.
    """
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is not None:
        return mode.lower() == "token"
    has_token = (
        os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or DEFAULT_TOKEN_PATH.expanduser().is_file()
    )
    if not has_token:
        return False
    # Private, and on purpose: Ray caches its config (auth mode included) on first read, and Ray 2.60 has no public
    # call to re-read it; its own ray.init does exactly this (ray._private.authentication's _enable_token_auth).
    from ray._raylet import Config

    os.environ[AUTH_MODE_ENV] = "token"
    Config.initialize("")
    return True


def submit_job(
    job: str,
    address: str,
    job_args: list[str] | tuple[str, ...] = (),
    *,
    working_dir: str | Path = PROJECT_ROOT,
    wait: bool = True,
    env: Mapping[str, str] | None = None,
    forward_credentials: bool = False,
    out: TextIO | None = None,
) -> int:
    """Submit `python jobs/<job>.py <job_args>` to the cluster at `address` (its dashboard, e.g.
    http://127.0.0.1:8265); with `wait`, stream its logs and return 0 if it succeeded, else 1.

    Args:
        job: one of JOBS.
        address: the cluster's dashboard URL; it wins over RAY_ADDRESS / RAY_API_SERVER_ADDRESS.
        job_args: arguments for the job's command line, as `artfuse <job>` takes them.
        working_dir: the project folder shipped with the job (defaults to this checkout).
        wait: follow the job to its end; otherwise return 0 once it is accepted.
        env: extra environment variables for the job.
        forward_credentials: also pass this shell's AWS credentials to the job (off: the cluster has its own).
        out: where the job's logs go (stdout).
    """
    out = out or sys.stdout
    check_address(address)
    entrypoint = build_entrypoint(job, job_args)
    if not (Path(working_dir) / "jobs" / f"{job}.py").is_file():
        raise ConfigError(
            f"{working_dir} has no jobs/{job}.py: the working dir must be the root of an artfuse checkout"
        )
    runtime_env = build_runtime_env(working_dir, env, forward_credentials=forward_credentials)
    enable_token_auth_if_available()
    try:
        client = _client(address)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    except AuthenticationError as e:
        log.error(
            "the Ray cluster at %s refused the job (%s): give this shell the cluster's token in RAY_AUTH_TOKEN "
            "or ~/.ray/auth_token (see cluster/README.md)",
            address,
            _first_line(e),
        )
        return 1
    except (ConnectionError, RuntimeError) as e:
        log.error("could not submit to the Ray cluster at %s: %s", address, _first_line(e))
        return 1
    log.info("submitted %s as %s", entrypoint, job_id)
    if not wait:
        log.info("follow it with: ray job logs --follow %s --address %s", job_id, address)
        return 0
    try:
        _follow_logs(client, job_id, out)
        status = _wait_until_done(client, job_id)
    except KeyboardInterrupt:
        log.warning(
            "stopped following; %s keeps running. Stop it with: ray job stop %s --address %s",
            job_id,
            job_id,
            address,
        )
        return 130
    if status == JobStatus.SUCCEEDED:
        log.info("%s succeeded", job_id)
        return 0
    # The job's message repeats its last logs, already streamed above: its first line says enough.
    message = client.get_job_info(job_id).message or ""
    reason = message.splitlines()[0].split(", last available logs")[0] if message else ""
    log.error("%s ended %s%s", job_id, status, f": {reason}" if reason else "")
    return 1


def _client(address: str) -> JobSubmissionClient:
    # Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS silently override the address argument; ours was explicit.
    with _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        return JobSubmissionClient(address)


def _follow_logs(client: JobSubmissionClient, job_id: str, out: TextIO) -> None:
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the log stream dropped; the job's status still tells how it ended
        log.warning("log stream for %s closed early (%s); waiting for the job to finish", job_id, _first_line(e))


def _wait_until_done(client: JobSubmissionClient, job_id: str) -> JobStatus:
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(POLL_SECONDS)
    return status


@contextmanager
def _without_env(*names: str) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _first_line(error: BaseException) -> str:  # Ray's errors carry pages of advice after the first line
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
