"""Experiment tracking through MLflow: each job's run with its configuration, per-epoch metrics, scores, tags and files.

Off unless `tracking.uri` or MLFLOW_TRACKING_URI names a tracking server or database; only then is mlflow imported,
so with tracking off it need not be installed. A tracker that fails (a server that is down, a wrong URI, a database
that cannot be written) costs one warning per process, after which that process logs nothing more to it: the job
never fails for its tracker. How long the first failed call waits is MLflow's own HTTP retry policy
(MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_TIMEOUT).

Runs are made through `MlflowClient` with explicit run ids rather than MLflow's fluent active-run stack, because a
run is logged to from more than one process: the driver starts it and logs the configuration, scores and files; the
rank-0 Ray Train worker logs each epoch from inside the training function (Ray Train v2 takes no Tune logger
callbacks); a Tune trial starts its own run, nested under the search's through the `mlflow.parentRunId` tag. A run
whose `record` is given is written down there (`mlflow_run.json`), so a resumed job goes on logging to the same run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artfuse.config import Config, TrackingConfig, to_dict, tracking_uri_ok
from artfuse.data import storage

log = logging.getLogger(__name__)

RECORD = "mlflow_run.json"  # where a resumable job keeps the id of its MLflow run
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag for a nested run: the UI shows it under its parent
EXPERIMENT_KIND = "mlflow.experimentKind"
STATUS = {"completed": "FINISHED", "stopped_early": "KILLED", "error": "FAILED"}  # a Tune trial's end in MLflow
_BATCH = 100  # MLflow takes at most 100 params or tags per request
_MAX_PARAM = 6000  # characters of a param value MLflow keeps

_failed: set[str] = set()  # tracking URIs that failed in this process: warned about once, then left alone
_clients: dict[str, Any] = {}


@dataclass(frozen=True)
class RunRef:
    """What another process needs to log to a run: plain strings, cheap to send to Ray workers and Tune trials."""

    uri: str
    experiment_id: str
    run_id: str


def resolve_uri(cfg: TrackingConfig) -> str | None:
    """The tracking URI in force (tracking.uri, else MLFLOW_TRACKING_URI), or None: tracking off.

    A relative sqlite:/// path is made absolute: Ray's workers do not run in the driver's directory."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return None
    if not tracking_uri_ok(uri):
        _warn_once(uri, f"MLFLOW_TRACKING_URI {uri!r} is MLflow's deprecated file store: nothing is logged (give "
                        "sqlite:///path/mlflow.db or an MLflow server's http:// URI)")  # fmt: skip
        return None
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri.removeprefix("sqlite:///")
        if path and not path.startswith(":memory:"):
            return "sqlite:///" + Path(path).resolve().as_posix()
    return uri


def start(
    cfg: Config,
    job: str,
    name: str,
    *,
    record: str | None = None,
    parent: RunRef | None = None,
    tags: dict[str, Any] | None = None,
) -> Run:
    """Start a run of `job` with the whole configuration as params, or none where tracking is off or failing.

    `record`: a URI where the run's id is kept; a later start with the same record, tracking URI and configuration
    reopens that run instead of starting another (a resumed job). `parent`: the run this one is nested under (its
    tracking URI and experiment are the parent's)."""
    uri = parent.uri if parent else resolve_uri(cfg.tracking)
    if not uri or uri in _failed:
        return Run(None)
    params = flatten(to_dict(cfg))
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    run = _guarded(uri, f"starting the {job} run", _open_run, uri, cfg, job, name, record, parent, digest)
    if run is None:
        return Run(None)
    run.set_tags({"artfuse.job": job, **context_tags(), **(tags or {})})
    run.log_params(params)
    return run


def _open_run(
    uri: str, cfg: Config, job: str, name: str, record: str | None, parent: RunRef | None, digest: str
) -> Run:
    client = _client(uri)
    if record and storage.exists(record, cfg.storage):
        kept = json.loads(storage.read_bytes(record, cfg.storage))
        if kept.get("uri") == uri and kept.get("config") == digest:
            existing = client.get_run(kept["run_id"])
            if existing.info.lifecycle_stage == "active":
                client.update_run(kept["run_id"], status="RUNNING")
                log.info("MLflow: going on with run %s at %s", kept["run_id"], uri)
                return Run(RunRef(uri, existing.info.experiment_id, kept["run_id"]))
    experiment_id = parent.experiment_id if parent else _experiment(client, uri, cfg.tracking.experiment)
    tags = {PARENT_TAG: parent.run_id} if parent else {}
    created = client.create_run(experiment_id, run_name=name, tags=tags)
    ref = RunRef(uri, experiment_id, created.info.run_id)
    if record:
        kept = {"uri": uri, "run_id": ref.run_id, "config": digest}
        storage.write_bytes(record, json.dumps(kept).encode(), cfg.storage)
    log.info("MLflow: %s run %s in experiment %s at %s", job, ref.run_id, experiment_id, uri)
    return Run(ref)


def _experiment(client: Any, uri: str, name: str) -> str:
    """The experiment's id, created where missing. On a SQLite store its files go beside the database (MLflow's
    default would be ./mlruns in whatever directory the job ran from)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:////"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    try:
        # a model-training experiment: MLflow's UI opens it on its runs, not on the GenAI pages
        return client.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND: "custom_model_development"}
        )
    except Exception:  # another process created it meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class Run:
    """One MLflow run, or none (`ref` None): then, and after a failure of its tracker, every method does nothing."""

    def __init__(self, ref: RunRef | None):
        self.ref = ref
        self._ended = False

    @property
    def active(self) -> bool:
        return self.ref is not None and self.ref.uri not in _failed

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.end("FINISHED")
        else:
            self.set_tags({"artfuse.error": f"{kind.__name__}: {error}"[:_MAX_PARAM]})
            self.end("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")

    @contextmanager
    def failing(self) -> Iterator[Run]:
        """Ends the run FAILED (KILLED on Ctrl-C) if the block raises; leaves it running otherwise."""
        try:
            yield self
        except BaseException as e:
            self.__exit__(type(e), e, None)
            raise

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return None
        ref = self.ref
        return _guarded(ref.uri, what, lambda: getattr(_client(ref.uri), method)(ref.run_id, *args, **kwargs))

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(key, str(value)[:_MAX_PARAM]) for key, value in params.items()]
        for i in range(0, len(items), _BATCH):
            self._call("logging params", "log_batch", params=items[i : i + _BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        items = [RunTag(key, str(value)[:_MAX_PARAM]) for key, value in tags.items() if value is not None]
        for i in range(0, len(items), _BATCH):
            self._call("setting tags", "log_batch", tags=items[i : i + _BATCH])

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """The numbers among `metrics` (other values are skipped), at `step` where given."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(metric_key(key), float(value), now, step or 0)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ]
        for i in range(0, len(items), 1000):
            self._call("logging metrics", "log_batch", metrics=items[i : i + 1000])

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        """One epoch's metrics as the training loop reports them, at step = the epoch."""
        self.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=int(metrics["epoch"]))

    def log_scores(self, scores: dict | None, prefix: str = "test") -> None:
        """Scores in metrics.json's shape ({"n", "tasks": {task: {accuracy, accuracy_ci, macro_f1, ...}}}): per task,
        and the mean over tasks as `<prefix>_accuracy` / `<prefix>_macro_f1` (with the one task's 95 % interval)."""
        if not scores or not self.active:
            return
        tasks = scores["tasks"]
        metrics: dict[str, Any] = {f"{prefix}_n": scores.get("n")}
        for task, s in tasks.items():
            for name in ("accuracy", "macro_f1", "ece", "ece_uncalibrated"):
                metrics[f"{prefix}.{task}.{name}"] = s.get(name)
            low, high = s.get("accuracy_ci") or (None, None)
            metrics |= {f"{prefix}.{task}.accuracy_ci_low": low, f"{prefix}.{task}.accuracy_ci_high": high}
        for name in ("accuracy", "macro_f1"):
            metrics[f"{prefix}_{name}"] = sum(s[name] for s in tasks.values()) / len(tasks)
        if len(tasks) == 1:
            (task,) = tasks
            metrics[f"{prefix}_accuracy_ci_low"] = metrics[f"{prefix}.{task}.accuracy_ci_low"]
            metrics[f"{prefix}_accuracy_ci_high"] = metrics[f"{prefix}.{task}.accuracy_ci_high"]
        self.log_metrics(metrics)

    def log_files(self, folder_uri: str, names: list[str], cfg: Config, artifact_path: str | None = None) -> None:
        """The files `names` under `folder_uri` (any storage URI) that exist, as artifacts."""
        if not self.active:
            return
        with tempfile.TemporaryDirectory() as tmp:
            found = 0
            for name in names:
                uri = storage.join(folder_uri, name)
                if _guarded(self.ref.uri, f"reading {uri}", storage.exists, uri, cfg.storage):
                    (Path(tmp) / name).write_bytes(storage.read_bytes(uri, cfg.storage))
                    found += 1
            if found:
                self._call("uploading files", "log_artifacts", tmp, artifact_path)

    def log_json(self, value: Any, name: str) -> None:
        self._call(f"uploading {name}", "log_text", json.dumps(value, indent=1, default=str), name)

    def child(self, cfg: Config, job: str, name: str, **kwargs: Any) -> Run:
        """A run nested under this one (none where this one is none)."""
        return start(cfg, job, name, parent=self.ref, **kwargs) if self.active else Run(None)

    def end(self, status: str = "FINISHED") -> None:
        if not self._ended:
            self._ended = True
            self._call("ending the run", "set_terminated", status=status)


def log_epoch(ref: RunRef | None, metrics: dict[str, Any]) -> None:
    """For the rank-0 Ray Train worker: one epoch's metrics to the run the driver started (nothing when none)."""
    if ref is not None:
        Run(ref).log_epoch(metrics)


def end_trials(parent: Run, rows: list[dict], runs_uri: str, cfg: Config) -> None:
    """After a search: each trial's run ends as the results table says (ASHA's early stops: status KILLED and the tag
    artfuse.stopped_early), with its best epoch's figures. A trial's own process cannot do it: Tune ends a trial that
    ASHA stops by ending its process."""
    if not parent.active:
        return
    for row in rows:
        record = storage.join(runs_uri, row["trial_id"], RECORD)
        if not storage.exists(record, cfg.storage):
            continue
        kept = json.loads(storage.read_bytes(record, cfg.storage))
        if kept.get("uri") != parent.ref.uri:
            continue
        run = Run(RunRef(parent.ref.uri, parent.ref.experiment_id, kept["run_id"]))
        run.set_tags({"artfuse.trial_status": row["status"], "artfuse.stopped_early": row["stopped_early"]})
        best = {"best_val_macro_f1": row["val_macro_f1"], "best_val_accuracy": row["val_accuracy"]}
        best["best_epoch"] = row["best_epoch"]
        run.log_metrics({**best, "epochs_run": row["epochs_run"]})
        run.end(STATUS.get(row["status"], "FAILED"))


def context_tags() -> dict[str, str]:
    """Where the run came from: the git commit of this checkout where there is one, the Ray job on a cluster."""
    tags = {"mlflow.source.name": "artfuse", "mlflow.source.type": "JOB"}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if os.environ.get("RAY_ADDRESS"):
        import ray

        if ray.is_initialized():
            tags["ray.job_id"] = ray.get_runtime_context().get_job_id()
    return tags


def git_commit() -> str | None:
    """HEAD of the checkout artfuse runs from, if it runs from one (a cluster's working_dir has no .git)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"arch": "fusion"}} -> {"model.arch": "fusion"}: the `--set` names."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def metric_key(key: str) -> str:
    """A metric name MLflow accepts: letters, digits and _ - . / : and spaces; anything else becomes _."""
    return re.sub(r"[^\w\-./: ]", "_", key)


def _client(uri: str) -> Any:
    if uri not in _clients:
        from mlflow import MlflowClient

        _clients[uri] = MlflowClient(tracking_uri=uri)
    return _clients[uri]


def _guarded(uri: str, what: str, fn: Any, *args: Any) -> Any:
    """fn(*args), or None after warning once (per process and URI) that the tracker failed; the job goes on."""
    if uri in _failed:
        return None
    try:
        return fn(*args)
    except ImportError:
        _warn_once(uri, f"MLflow tracking is on ({uri}) but mlflow is not installed: nothing is logged (install "
                        "artfuse's `tracking` extra)")  # fmt: skip
    except Exception as e:  # a tracker's failure, whatever it is, never fails the job
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        _warn_once(uri, f"MLflow tracking at {uri} failed while {what} ({type(e).__name__}: {reason}): nothing more "
                        "is logged to it from this process; the job goes on")  # fmt: skip
    return None


def _warn_once(uri: str, message: str) -> None:
    if uri not in _failed:
        _failed.add(uri)
        log.warning(message)
