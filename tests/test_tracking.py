"""MLflow tracking, read back with MLflow's own client from a SQLite store: a training's params, per-epoch metrics,
test scores, tags and files; an ablation's run per (arch, seed) nested under its own; a search's run per trial nested
under its own (slow), also seen in MLflow's UI in a real browser (slow). A tracker that is down costs one warning and
the job goes on; with tracking off nothing is logged and mlflow is never imported. Optuna's search is seeded."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_train import TINY as TRAIN_TINY
from test_tune import TINY as TUNE_TINY

from artfuse.config import ConfigError, load_config
from artfuse.data.samples import generate_samples
from artfuse.reporting import tracking

TRACKER_LOG = "artfuse.reporting.tracking"
# MLflow's documented HTTP retry settings, short: a tracker that does not answer is given up on in seconds
QUICK_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
}


@pytest.fixture(autouse=True)
def no_tracking_from_outside(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    generate_samples(str(out), n=48, seed=1)
    return out


def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def client_for(uri: str):
    mlflow = pytest.importorskip("mlflow", reason="mlflow (the tracking extra) is not installed")
    return mlflow.MlflowClient(tracking_uri=uri)


def runs_of(uri: str, experiment: str = "artfuse") -> list:
    client = client_for(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} at {uri}"
    return client.search_runs([found.experiment_id], max_results=1000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracking_off_logs_nothing_and_never_imports_mlflow(tmp_path):
    code = """
import sys
from artfuse.config import load_config
from artfuse.pipelines import ablate, evaluate, train, tune
from artfuse.reporting import tracking
run = tracking.start(load_config(), "train", "off")
run.log_metrics({"a": 1.0}); run.log_params({"b": 2}); run.log_scores({"n": 1, "tasks": {}}); run.end()
tracking.log_epoch(run.ref, {"epoch": 1, "train_loss": 0.5})
assert run.ref is None and not run.active
assert "mlflow" not in sys.modules and "optuna" not in sys.modules, "imported with tracking off"
"""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_file_store_is_refused_and_a_relative_sqlite_path_made_absolute(tmp_path, monkeypatch, caplog):
    for uri in ("./mlruns", "/tmp/mlruns", "file:///tmp/mlruns"):
        with pytest.raises(ConfigError, match="deprecated file store"):
            load_config(None, [f"tracking.uri={uri}"])
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["tracking.uri=sqlite:///runs/mlflow.db"])
    assert tracking.resolve_uri(cfg.tracking) == f"sqlite:///{tmp_path}/runs/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.resolve_uri(load_config().tracking) == "http://mlflow.example:5000"
    assert tracking.resolve_uri(cfg.tracking).startswith("sqlite:///")  # tracking.uri wins over the environment
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "old-file-store"))
    with caplog.at_level(logging.WARNING, logger=TRACKER_LOG):
        assert tracking.resolve_uri(load_config().tracking) is None
    assert "deprecated file store" in caplog.text


def test_optuna_search_is_seeded_resumable_and_searches_the_same_space(tmp_path):
    pytest.importorskip("optuna", reason="optuna (the tracking extra) is not installed")
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from artfuse.pipelines.tune import make_searcher, optuna_space, search_space, searched_params

    def first_trials(seed: int) -> list[dict]:
        cfg = load_config(None, ["model.arch=fusion", "tune.search=optuna", f"tune.seed={seed}", "tune.depth=[2]"])
        searcher, param_space = make_searcher(cfg, concurrency=4)
        assert param_space == {"model.depth": 2}  # fixed values stay in Tune's param_space
        return [searcher.suggest(f"trial-{i}") for i in range(4)]

    assert first_trials(0) == first_trials(0)
    assert first_trials(0) != first_trials(1)
    cfg = load_config(None, ["model.arch=fusion", "tune.search=optuna"])
    distributions, fixed = optuna_space(cfg)
    assert sorted(distributions) == sorted(searched_params(cfg)) and not fixed
    assert distributions["train.lr"] == FloatDistribution(*cfg.tune.lr_range, log=True)
    assert distributions["model.fusion"] == CategoricalDistribution(search_space(cfg)["model.fusion"].categories)
    for trial in first_trials(3):
        assert set(trial) == set(distributions) - {"model.depth"}  # fixed above
        assert cfg.tune.lr_range[0] <= trial["train.lr"] <= cfg.tune.lr_range[1]
        assert trial["model.d_model"] in cfg.tune.d_model and trial["model.fusion"] in cfg.tune.fusion

    # what Tuner.restore does with the searcher: its saved state proposes the trial the first run would have next
    searcher, _ = make_searcher(cfg, concurrency=4)
    [searcher.suggest(f"trial-{i}") for i in range(2)]
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored, _ = make_searcher(cfg, concurrency=4)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("trial-2") == searcher.suggest("trial-2")


@pytest.fixture(scope="module")
def trained(samples, tmp_path_factory, ray_local) -> tuple[str, Path, dict]:
    """One tiny training logged to a SQLite store: (its tracking URI, the package, the summary)."""
    root = tmp_path_factory.mktemp("tracked-train")
    from artfuse.pipelines.train import train

    uri = sqlite_uri(root)
    cfg = load_config(None, [*TRAIN_TINY, "train.epochs=2", f"tracking.uri={uri}", "tracking.experiment=trainings"])
    summary = train(str(samples), str(root / "model"), cfg)
    return uri, root / "model", summary


def test_a_training_run_has_the_config_the_epochs_the_test_scores_and_the_package_files(trained, samples):
    uri, package, summary = trained
    (run,) = runs_of(uri, "trainings")
    client = client_for(uri)
    assert run.info.status == "FINISHED" and run.info.run_name == f"train {package}"
    params = run.data.params
    assert (
        params["model.img_size"] == "64" and params["train.epochs"] == "2" and params["tracking.log_weights"] == "False"
    )
    assert len(params) > 100  # the whole typed configuration, flattened
    for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1"):
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [1, 2], name  # the rank-0 worker, once an epoch
    epochs = json.loads((package / "history.json").read_text())
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")}
    assert logged == {h["epoch"]: pytest.approx(h["val_accuracy"]) for h in epochs}
    metrics = run.data.metrics
    assert metrics["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    ci = summary["test"]["tasks"]["label"]["accuracy_ci"]
    assert (metrics["test_accuracy_ci_low"], metrics["test_accuracy_ci_high"]) == pytest.approx(tuple(ci))
    assert metrics["test.label.macro_f1"] == pytest.approx(summary["test_macro_f1"])
    tags = run.data.tags
    assert tags["artfuse.package"] == str(package) and tags["artfuse.model_id"] == summary["model_id"]
    assert tags["artfuse.fingerprint"] and tags["artfuse.job"] == "train"
    if (Path(__file__).resolve().parents[1] / ".git").exists():
        assert len(tags["mlflow.source.git.commit"]) == 40
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "history.json", "curves.png", "artfuse.json", "train_report.json"} <= files
    assert "model.safetensors" not in files  # never the weights unless tracking.log_weights
    # the files beside the SQLite file, not in whatever directory the job ran from
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(
        Path(uri.removeprefix("sqlite:///")).parent
    )


def test_a_tracker_that_is_down_costs_one_warning_and_the_job_goes_on(trained, samples, tmp_path, monkeypatch, caplog):
    from artfuse.pipelines.evaluate import evaluate

    for name, value in QUICK_HTTP.items():
        monkeypatch.setenv(name, value)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = load_config(None, [*TRAIN_TINY, f"tracking.uri={down}"])
    started = time.time()
    with caplog.at_level(logging.WARNING, logger=TRACKER_LOG):
        metrics = evaluate(str(trained[1]), str(samples), cfg, tmp_path / "eval")
    warnings = [r for r in caplog.records if r.name == TRACKER_LOG]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert down in warnings[0].getMessage() and "the job goes on" in warnings[0].getMessage()
    assert metrics["n"] == 12 and (tmp_path / "eval" / "metrics.json").exists()
    assert time.time() - started < 120


def test_evaluate_logs_its_scores_and_files(trained, samples, tmp_path):
    from artfuse.pipelines.evaluate import evaluate

    uri = sqlite_uri(tmp_path)
    metrics = evaluate(str(trained[1]), str(samples), load_config(None, [f"tracking.uri={uri}"]), tmp_path / "eval")
    (run,) = runs_of(uri)
    assert run.data.tags["artfuse.job"] == "evaluate" and run.data.tags["artfuse.split"] == "test"
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["tasks"]["label"]["accuracy"])
    assert run.data.metrics["test.label.ece"] == pytest.approx(metrics["tasks"]["label"]["ece"])
    files = {f.path for f in client_for(uri).list_artifacts(run.info.run_id)}
    assert {"metrics.json", "confusion_label.png", "reliability_label.png"} <= files


def test_an_ablation_is_a_run_with_a_child_per_arch_and_seed(samples, tmp_path, ray_local):
    from artfuse.pipelines.ablate import ablate

    uri = sqlite_uri(tmp_path)
    cfg = load_config(None, [*TRAIN_TINY, "train.epochs=1", f"tracking.uri={uri}"])
    summary = ablate(str(samples), str(tmp_path / "ablation"), cfg, archs=("cnn_only", "fusion"), seeds=1)
    runs = runs_of(uri)
    (parent,) = [r for r in runs if r.data.tags["artfuse.job"] == "ablate"]
    children = {r.data.tags["artfuse.arch"]: r for r in runs if r.data.tags.get(tracking.PARENT_TAG)}
    assert len(runs) == 3 and set(children) == {"cnn_only", "fusion"}
    for arch, child in children.items():
        assert child.data.tags[tracking.PARENT_TAG] == parent.info.run_id and child.info.status == "FINISHED"
        assert child.data.params["model.arch"] == arch and child.data.tags["artfuse.seed"] == "0"
        assert child.data.metrics["test_accuracy"] == pytest.approx(
            summary["archs"][arch]["accuracy"]["mean"], abs=1e-4
        )
        assert sorted(m.step for m in client_for(uri).get_metric_history(child.info.run_id, "val_loss")) == [1]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["fusion.accuracy_mean"] == pytest.approx(summary["archs"]["fusion"]["accuracy"]["mean"])
    assert {"ablation.md", "runs.csv"} <= {f.path for f in client_for(uri).list_artifacts(parent.info.run_id)}


SEARCH_TRIALS = 3


@pytest.fixture(scope="module")
def search(samples, tmp_path_factory, ray_local) -> tuple[str, Path, dict]:
    """A small Optuna search under ASHA, logged to a SQLite store: (its tracking URI, --out, the report)."""
    from artfuse.pipelines.tune import tune

    root = tmp_path_factory.mktemp("tracked-search")
    uri = sqlite_uri(root)
    settings = [*TUNE_TINY, "tune.search=optuna", "tune.max_concurrent_trials=1", "tune.reduction_factor=2"]
    cfg = load_config(None, [*settings, f"tune.num_samples={SEARCH_TRIALS}", f"tracking.uri={uri}"])
    report = tune(str(samples), str(root / "search"), cfg)
    return uri, root / "search", report


@pytest.mark.slow  # a three-trial search, about 90 s on a quiet 2-core machine
def test_a_search_is_a_run_with_a_nested_run_per_trial(search):
    import pyarrow.parquet as pq

    uri, out, report = search
    runs = runs_of(uri)
    (parent,) = [r for r in runs if r.data.tags["artfuse.job"] == "tune"]
    trials = {r.data.tags["artfuse.trial"]: r for r in runs if r.data.tags.get(tracking.PARENT_TAG)}
    rows = {row["trial_id"]: row for row in pq.read_table(out / "results.parquet").to_pylist()}
    assert len(runs) == SEARCH_TRIALS + 1 and set(trials) == set(rows)
    assert parent.data.tags["artfuse.search"] == "optuna" and parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_macro_f1"] == pytest.approx(report["best"]["val_macro_f1"])
    assert "test_accuracy" in parent.data.metrics  # the best package's test scores
    client = client_for(uri)
    for trial_id, run in trials.items():
        row = rows[trial_id]
        assert run.data.tags[tracking.PARENT_TAG] == parent.info.run_id
        # ASHA's early stops: status KILLED and the tag
        assert run.info.status == tracking.STATUS[row["status"]]
        assert run.data.tags["artfuse.stopped_early"] == str(row["stopped_early"])
        assert run.data.params["model.fusion"] == row["model.fusion"]
        # each epoch it reported (a trial stopped mid-epoch may have logged that epoch too)
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "val_macro_f1")}
        assert set(range(1, row["epochs_run"] + 1)) <= steps
    assert {"results.csv", "best"} <= {f.path for f in client.list_artifacts(parent.info.run_id)}


@pytest.mark.slow  # the search above, then MLflow's own server and UI in headless Chromium
def test_mlflow_ui_shows_the_search_with_its_trials_nested(search, browser, tmp_path):
    uri, _, _ = search
    runs = runs_of(uri)
    parent = next(r for r in runs if r.data.tags["artfuse.job"] == "tune")
    trial = next(r for r in runs if r.data.tags.get(tracking.PARENT_TAG))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=(tmp_path / "server.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/health", server, tmp_path / "server.log")
        page = browser.new_page()
        page.goto(f"{base}/#/experiments")
        page.get_by_text("artfuse", exact=True).first.wait_for(timeout=60_000)
        # the experiment's runs: the search's run, its trials folded under it
        page.goto(f"{base}/#/experiments/{parent.info.experiment_id}/runs")
        page.get_by_text(parent.info.run_name).first.wait_for(timeout=60_000)
        page.get_by_text(f"{len(runs)} matching runs").wait_for(timeout=30_000)
        # the search's run page names its trials as its child runs
        page.goto(f"{base}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}")
        page.get_by_text("Child runs").first.wait_for(timeout=60_000)
        for run in runs:
            if run.data.tags.get(tracking.PARENT_TAG):
                page.get_by_text(run.info.run_name).first.wait_for(timeout=30_000)
        # a trial's page: its metrics
        page.goto(f"{base}/#/experiments/{parent.info.experiment_id}/runs/{trial.info.run_id}")
        page.get_by_text("val_macro_f1").first.wait_for(timeout=60_000)
        page.get_by_text("train_accuracy").first.wait_for(timeout=30_000)
        page.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait_for(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow server did not answer at {url}:\n{log.read_text()[-3000:]}")
