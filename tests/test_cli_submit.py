"""`artfuse submit` on the command line, without a cluster: its help, usage errors (one line, exit 2, nothing
submitted) and how the job's arguments reach artfuse.cluster.submit.submit_job."""

from __future__ import annotations

import pytest

from artfuse.cli import main
from artfuse.cluster import JOBS, submit

URL = "http://127.0.0.1:8265"
LABEL_ARGS = ["--model", "s3://m/current", "--input", "s3://archive/", "--out", "s3://labels/"]


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's exits
        return e.code


@pytest.fixture
def no_cluster(monkeypatch):
    """Fails the test if anything tries to reach a cluster."""

    def refuse(address):
        raise AssertionError(f"a usage error reached the cluster at {address}")

    monkeypatch.setattr(submit, "JobSubmissionClient", refuse)


def test_help_explains_job_arguments_token_auth_and_exit_codes(capsys):
    assert run(["submit", "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: artfuse submit JOB --address URL")
    for needed in ("JOB ARGS", "artfuse JOB --help", "~/.ray/auth_token", "RAY_AUTH_TOKEN", "exit 0", "2 for a usage"):
        assert needed in text, needed
    assert all(job in text for job in JOBS)
    assert "artfuse submit label --address http://" in text  # an example to copy


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["submit", "label", *LABEL_ARGS], "--address"),
        (["submit", "lable", "--address", URL, *LABEL_ARGS], "lable"),
        (["submit", "label", "--address", URL, "--input", "s3://archive/", "--out", "s3://labels/"], "--model"),
        (["submit", "label", "--address", URL, *LABEL_ARGS, "--modle", "x"], "--modle"),
        (["submit", "tune", "--address", URL, "--data", "s3://d", "--out", "s3://o", "--samples", "two"], "two"),
        (["submit", "label", "--address", "127.0.0.1:8265", *LABEL_ARGS], "127.0.0.1:8265"),
        (["submit", "label", "--address", "ray://head:10001", *LABEL_ARGS], "ray://head:10001"),
        (["submit", "label", "--address", "http://head:port", *LABEL_ARGS], "http://head:port"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_anything_is_submitted(argv, named, no_cluster, capsys):
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert named in err and "error" in err


def test_everything_submit_does_not_know_goes_to_the_job(monkeypatch):
    calls = []

    def fake_submit_job(job, address, job_args, *, wait, forward_credentials):
        calls.append((job, address, job_args, wait, forward_credentials))
        return 1  # the job failed: the CLI exits with that

    monkeypatch.setattr(submit, "submit_job", fake_submit_job)
    extra = ["--set", "label.batch_size=8", "--config", "jobs/configs/nightly-label.yaml"]
    argv = ["submit", "label", *LABEL_ARGS[:2], "--no-wait", "--address", URL, *LABEL_ARGS[2:], *extra]
    assert run(argv) == 1
    assert calls == [("label", URL, [*LABEL_ARGS, *extra], False, False)]
