"""artfuse.cluster.submit without a cluster: the entrypoint, the runtime env, token auth and the follow-the-job loop
against a stand-in for Ray's JobSubmissionClient. (The end-to-end test on a local cluster lives elsewhere.)"""

from __future__ import annotations

import io
import logging
import os
import shlex
from pathlib import Path

import pytest
from ray.job_submission import JobStatus

from artfuse.cluster import submit
from artfuse.cluster.submit import (
    JOBS,
    PROJECT_ROOT,
    build_entrypoint,
    build_runtime_env,
    enable_token_auth_if_available,
    submit_job,
)
from artfuse.config import ConfigError

AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "HOME")


@pytest.fixture
def clean_auth(tmp_path) -> Path:
    """No Ray auth settings and an empty HOME; afterwards the environment and Ray's cached config are restored
    (Ray reads RAY_AUTH_MODE once per process, so the restore must re-read it, after the env is back)."""
    # Private: Ray 2.60 has no public call that re-reads its cached config (see cluster/submit.py).
    from ray._raylet import Config

    saved = {name: os.environ.get(name) for name in AUTH_ENV}
    for name in AUTH_ENV:
        os.environ.pop(name, None)
    os.environ["HOME"] = str(tmp_path)
    yield tmp_path
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    Config.initialize("")


def test_entrypoint_runs_the_jobs_script_with_every_argument_quoted():
    args = ["--input", "s3://bucket/a b/", "--set", "label.run_date=2026-01-01; rm -rf /"]
    entrypoint = build_entrypoint("label", args)
    assert shlex.split(entrypoint) == ["python", "jobs/label.py", *args]
    assert all((PROJECT_ROOT / f"jobs/{job}.py").is_file() for job in JOBS)


def test_unknown_job_is_a_config_error_naming_the_valid_ones():
    with pytest.raises(ConfigError) as error:
        build_entrypoint("lable", [])
    assert "lable" in str(error.value)
    assert all(job in str(error.value) for job in JOBS)


def test_runtime_env_ships_the_source_and_storage_settings_but_not_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA")
    runtime_env = build_runtime_env("/src/artfuse", {"AWS_DEFAULT_REGION": "us-east-2", "EXTRA": "1"})
    assert runtime_env["working_dir"] == "/src/artfuse"
    assert {".venv", ".git", "demo-out", "*.egg-info"} <= set(runtime_env["excludes"])
    assert runtime_env["env_vars"] == {
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_DEFAULT_REGION": "us-east-2",
        "EXTRA": "1",
    }
    opted_in = build_runtime_env("/src/artfuse", forward_credentials=True)["env_vars"]
    assert opted_in["AWS_SECRET_ACCESS_KEY"] == "hunter2" and opted_in["AWS_ACCESS_KEY_ID"] == "AKIA"


def _ray_token_auth_enabled() -> bool:
    # Private: what Ray's own clients consult; no public API reports the auth mode a process will use.
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return is_token_auth_enabled()


def test_token_auth_stays_off_without_a_token(clean_auth):
    assert enable_token_auth_if_available() is False
    assert "RAY_AUTH_MODE" not in os.environ
    assert not _ray_token_auth_enabled()


def test_a_token_file_from_ray_start_turns_token_auth_on_for_rays_client(clean_auth):
    (clean_auth / ".ray").mkdir()
    (clean_auth / ".ray" / "auth_token").write_text("a" * 32)
    assert enable_token_auth_if_available() is True
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert _ray_token_auth_enabled()


def test_a_token_in_the_environment_turns_token_auth_on(clean_auth):
    os.environ["RAY_AUTH_TOKEN"] = "b" * 32
    assert enable_token_auth_if_available() is True
    assert _ray_token_auth_enabled()


def test_an_explicit_auth_mode_is_respected(clean_auth):
    (clean_auth / ".ray").mkdir()
    (clean_auth / ".ray" / "auth_token").write_text("a" * 32)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    assert enable_token_auth_if_available() is False
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


class FakeClient:
    """Stands in for ray.job_submission.JobSubmissionClient; records what submit_job asked of it."""

    instances: list[FakeClient] = []
    final_status = JobStatus.SUCCEEDED
    log_chunks = ("epoch 1\n", "epoch 2\n")

    def __init__(self, address: str):
        self.address = address
        self.ray_address_seen = os.environ.get("RAY_ADDRESS")
        self.submitted: dict = {}
        self.statuses = [JobStatus.RUNNING, self.final_status]
        FakeClient.instances.append(self)

    def submit_job(self, *, entrypoint: str, runtime_env: dict) -> str:
        self.submitted = {"entrypoint": entrypoint, "runtime_env": runtime_env}
        return "raysubmit_test"

    async def tail_job_logs(self, job_id: str):
        for chunk in self.log_chunks:
            yield chunk

    def get_job_status(self, job_id: str) -> JobStatus:
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def get_job_info(self, job_id: str):
        class Info:
            message = "Job entrypoint command failed with exit code 1"

        return Info()


@pytest.fixture
def fake_client(monkeypatch, clean_auth):
    FakeClient.instances = []
    monkeypatch.setattr(submit, "JobSubmissionClient", FakeClient)
    monkeypatch.setattr(submit, "POLL_SECONDS", 0.0)
    return FakeClient


def test_submit_streams_logs_and_returns_0_when_the_job_succeeds(fake_client, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://elsewhere:8265")
    out = io.StringIO()
    code = submit_job("train", "http://127.0.0.1:8265", ["--data", "/d", "--out", "/o"], out=out)
    assert code == 0
    assert out.getvalue() == "epoch 1\nepoch 2\n"
    (client,) = fake_client.instances
    assert client.address == "http://127.0.0.1:8265" and client.ray_address_seen is None
    assert os.environ["RAY_ADDRESS"] == "http://elsewhere:8265"
    assert client.submitted["entrypoint"] == "python jobs/train.py --data /d --out /o"
    assert client.submitted["runtime_env"]["working_dir"] == str(PROJECT_ROOT)


def test_submit_returns_1_and_says_why_when_the_job_fails(fake_client, monkeypatch, caplog):
    monkeypatch.setattr(FakeClient, "final_status", JobStatus.FAILED)
    with caplog.at_level(logging.ERROR, logger="artfuse.cluster.submit"):
        assert submit_job("label", "http://127.0.0.1:8265", [], out=io.StringIO()) == 1
    assert "FAILED" in caplog.text and "exit code 1" in caplog.text


def test_submit_without_wait_returns_once_accepted(fake_client):
    out = io.StringIO()
    assert submit_job("evaluate", "http://127.0.0.1:8265", [], wait=False, out=out) == 0
    assert out.getvalue() == ""
    assert fake_client.instances[0].submitted["entrypoint"] == "python jobs/evaluate.py"


def test_an_unreachable_cluster_is_a_clear_failure(monkeypatch, clean_auth, caplog):
    def refuse(address):
        raise ConnectionError(f"Failed to connect to Ray at address: {address}.")

    monkeypatch.setattr(submit, "JobSubmissionClient", refuse)
    with caplog.at_level(logging.ERROR, logger="artfuse.cluster.submit"):
        assert submit_job("label", "http://10.0.0.1:8265", []) == 1
    assert "http://10.0.0.1:8265" in caplog.text


def test_bad_job_or_working_dir_fails_before_contacting_the_cluster(fake_client, tmp_path):
    with pytest.raises(ConfigError, match="valid jobs"):
        submit_job("predict", "http://127.0.0.1:8265", [])
    with pytest.raises(ConfigError, match="jobs/label.py"):
        submit_job("label", "http://127.0.0.1:8265", [], working_dir=tmp_path)
    assert fake_client.instances == []


def test_forward_credentials_warns_that_ray_keeps_them(monkeypatch, caplog, capsys):
    """Hole 8: the keys land in the job's runtime_env (stored by Ray, shown in its dashboard): --help, the log and
    cluster/README.md say so and point to the cluster's own credentials."""
    from artfuse.cli import main

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA")
    build_runtime_env("/src/artfuse")
    assert "dashboard" not in caplog.text
    build_runtime_env("/src/artfuse", forward_credentials=True)
    assert "runtime_env" in caplog.text and "dashboard" in caplog.text and "IRSA" in caplog.text
    with pytest.raises(SystemExit):
        main(["submit", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--forward-credentials puts this shell's AWS keys into the job's runtime_env" in help_text
    assert "IRSA" in help_text and "instance profile" in help_text
    readme = " ".join((Path(__file__).parents[1] / "cluster" / "README.md").read_text().split())
    assert "Do not use `artfuse submit --forward-credentials` on a shared cluster" in readme
