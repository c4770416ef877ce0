"""Search fusion hyperparameters with Ray Tune; every trial is a Ray Train run.

The driver decodes the collection once (`train.prepare_inputs`) and hands the datasets to every trial. A trial is
a function trainable that builds its `Config` from the sampled parameters and runs a `TorchTrainer`, whose
per-epoch reports reach Tune through `TuneReportCallback` (the Ray Train V2 pattern); ASHA stops weak trials on
validation macro-F1. The trials' parameters come from Ray Tune's random sampling of the space (tune.search=random) or
from Optuna's TPE (tune.search=optuna: `OptunaSearch` under a `ConcurrencyLimiter`), which proposes each trial from the
results so far; both are seeded by tune.seed. Rerunning with the same `--out` restores the search (`Tuner.restore`,
the searcher's state included): finished trials stay finished, interrupted ones continue from their last Ray Train
checkpoint. Under `--out`:

    _tune/                   the Tune experiment
    _trials/<trial id>/      each trial's Ray Train run (checkpoints) and attempts.json
    search_config.yaml       the config the search runs with (a rerun must match it)
    results.parquet/.csv     one row per trial
    best_config.yaml         the best trial's full config (`artfuse train --config`)
    best/                    the best trial's model package
    macro_f1_by_param.png    val macro-F1 against each searched parameter
    tune_report.json         the run summary
    mlflow_run.json          with tracking on: the search's MLflow run (each trial's run id is in _trials/<trial id>/)
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray
import ray.train
import yaml
from ray import tune as ray_tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.sample import Categorical, Domain, Float, LogUniform

from artfuse.cluster.requests import check_trial
from artfuse.cluster.runtime import ensure_ray
from artfuse.cluster.trial_resources import RecordPlacementGroup, ReleasePlacementGroups, record_uri, release_all
from artfuse.config import Config, ConfigError, to_dict, validate
from artfuse.data import storage
from artfuse.pipelines.train import (
    TrainInputs,
    best_epoch,
    export_package,
    log_package,
    make_trainer,
    prepare_inputs,
)
from artfuse.reporting import tracking
from artfuse.reporting.plots import plot_metric_by_param

log = logging.getLogger(__name__)

METRIC = "val_macro_f1"
# A trial's own process only waits on its Ray Train controller; its workers hold the real resources. It asks for
# memory, not CPU: Tune rejects an all-zero request, and even a sliver of CPU per trial would leave Ray Data's
# one-CPU tasks short of a whole core on a small node.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 128 * 1024**2}
# On a fixed-size (local) cluster, concurrent trials must leave this many CPUs to Ray Data, or its augment
# stage never gets scheduled and every trial hangs (docs/architecture.md, CPU starvation).
DATA_RESERVED_CPUS = 1.0

SEARCH_SECTIONS = ("model", "data", "train", "tune")  # what a resumed search must be run with again

# TuneConfig search-space field -> the config field it sets (the `--set` name, also the results column).
SEARCH_FIELDS = {
    "fusion": "model.fusion",
    "depth": "model.depth",
    "d_model": "model.d_model",
    "num_heads": "model.num_heads",
    "feature_stride": "model.feature_stride",
    "dropout": "model.dropout",
    "label_smoothing": "train.label_smoothing",
    "lr_range": "train.lr",
    "backbone_lr_scale": "train.backbone_lr_scale",
    "weight_decay_range": "train.weight_decay",
}


# The searched model fields an arch has no use for: cnn_only takes the backbone, the heads and dropout only, a ViT
# has no CNN tokens and no fusion head. Searching them would spend trials on copies of one model.
UNUSED_BY_ARCH = {
    "fusion": set(),
    "cnn_only": {"model.fusion", "model.depth", "model.d_model", "model.num_heads", "model.feature_stride"},
    "transformer_only": {"model.fusion", "model.feature_stride"},
}


def search_space(cfg: Config) -> dict[str, Any]:
    """Tune's param_space: a choice per list with several values, log-uniform per [low, high] *_range.

    One value fixes the parameter for every trial; an empty list leaves the base config's value, as does a model field
    that model.arch has no use for.
    """
    space: dict[str, Any] = {}
    for name, key in SEARCH_FIELDS.items():
        values = list(getattr(cfg.tune, name))
        if not values or key in UNUSED_BY_ARCH[cfg.model.arch]:
            continue
        if name.endswith("_range"):
            if len(values) > 2 or min(values) <= 0 or values[0] > values[-1]:
                raise ConfigError(f"tune.{name} must be [low, high] with 0 < low <= high (log-uniform); got {values}")
            space[key] = values[0] if values[0] == values[-1] else ray_tune.loguniform(values[0], values[-1])
        else:
            space[key] = values[0] if len(set(values)) == 1 else ray_tune.choice(values)
    return space


def optuna_space(cfg: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """The search space as Optuna's distributions, and the parameters it fixes (which Tune's param_space keeps).

    A choice is a CategoricalDistribution (TPE models each option apart: the lists are options, not a scale), a
    [low, high] *_range a FloatDistribution with log=True, the log-uniform range random search samples."""
    try:
        from optuna.distributions import CategoricalDistribution, FloatDistribution
    except ImportError:
        raise ConfigError("tune.search=optuna needs Optuna: install artfuse's `tracking` extra") from None
    distributions, fixed = {}, {}
    for key, value in search_space(cfg).items():
        if isinstance(value, Categorical):
            distributions[key] = CategoricalDistribution(list(dict.fromkeys(value.categories)))
        elif isinstance(value, Float) and isinstance(value.get_sampler(), LogUniform):
            distributions[key] = FloatDistribution(value.lower, value.upper, log=True)
        elif isinstance(value, Domain):
            raise ConfigError(f"tune.search=optuna: no Optuna distribution for {key} ({type(value).__name__})")
        else:
            fixed[key] = value
    return distributions, fixed


def make_searcher(cfg: Config, concurrency: int) -> tuple[Searcher | BasicVariantGenerator, dict[str, Any]]:
    """tune.search's search algorithm, at most `concurrency` trials at once, and the param_space Tune gets with it."""
    t = cfg.tune
    if t.search == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        distributions, fixed = optuna_space(cfg)
        # TPE seeded by tune.seed: the same first trials for one seed. Tune ignores max_concurrent_trials next to a
        # search algorithm; the limiter also keeps TPE from proposing many trials before any has a result.
        sampler = TPESampler(n_startup_trials=t.startup_trials, seed=t.seed)
        optuna = OptunaSearch(space=distributions, metric=METRIC, mode="max", sampler=sampler)
        return ConcurrencyLimiter(optuna, max_concurrent=concurrency), fixed
    # The generator itself limits concurrency: Tune ignores max_concurrent_trials next to a search_alg.
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=t.seed), search_space(cfg)


def searched_params(cfg: Config) -> list[str]:
    """The config fields that vary between trials."""
    return [key for key, value in search_space(cfg).items() if isinstance(value, Domain)]


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """`base` with a trial's sampled parameters applied (num_heads fixed up to divide d_model), validated."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    cfg = dataclasses.replace(
        base, **{s: dataclasses.replace(getattr(base, s), **fields) for s, fields in sections.items()}
    )
    if cfg.model.d_model % cfg.model.num_heads:
        # d_model and heads are sampled independently; take the listed head count nearest the sampled one
        # that divides d_model (check_space guarantees there is one).
        heads = [h for h in cfg.tune.num_heads if cfg.model.d_model % h == 0]
        nearest = min(heads, key=lambda h: (abs(h - cfg.model.num_heads), h))
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_heads=nearest))
    validate(cfg)
    return cfg


def check_space(cfg: Config) -> None:
    """Every value of the space gives a valid trial config; fails before any trial starts."""
    space = search_space(cfg)
    if not space:
        raise ConfigError("the tune search space is empty: set at least one of tune." + ", tune.".join(SEARCH_FIELDS))
    for key in ("model.d_model", "model.num_heads", "model.depth"):
        if any(v < 1 for v in _options(space.get(key, 1))):
            raise ConfigError(f"tune: every {key} value must be at least 1")
    heads = cfg.tune.num_heads or [cfg.model.num_heads]
    for d_model in cfg.tune.d_model or [cfg.model.d_model]:
        if not any(d_model % h == 0 for h in heads):
            raise ConfigError(f"tune: no head count in {heads} divides d_model {d_model}; add one to tune.num_heads")
    probe = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_heads=1))  # heads checked above
    for key, value in space.items():
        for option in _options(value) if key != "model.num_heads" else []:
            try:
                trial_config(probe, {key: option})
            except ConfigError as e:
                raise ConfigError(f"tune search space, {key}={option!r}: {e}") from None
    if not 1 <= cfg.tune.grace_period <= cfg.train.epochs:
        raise ConfigError(f"tune.grace_period must be between 1 and train.epochs ({cfg.train.epochs})")
    if cfg.tune.reduction_factor < 2 or cfg.tune.num_samples < 1 or cfg.tune.max_concurrent_trials < 1:
        raise ConfigError("tune.reduction_factor must be at least 2, tune.num_samples and max_concurrent_trials 1")
    if cfg.tune.startup_trials < 1:
        raise ConfigError(f"tune.startup_trials must be at least 1; got {cfg.tune.startup_trials}")
    if cfg.tune.search == "optuna":
        optuna_space(cfg)  # Optuna installed, and every parameter has a distribution: before anything is decoded
    if cfg.tune.cpus_per_trial <= 0:
        raise ConfigError(f"tune.cpus_per_trial must be positive; got {cfg.tune.cpus_per_trial}")
    if cfg.tune.gpus_per_trial not in (0, cfg.train.num_workers):
        raise ConfigError(
            f"tune.gpus_per_trial must be 0 or train.num_workers ({cfg.train.num_workers}: one GPU per worker);"
            f" got {cfg.tune.gpus_per_trial}"
        )


def with_trial_resources(cfg: Config, concurrency: int, cluster_cpus: float | None) -> Config:
    """Each trial's Train workers share tune.cpus_per_trial / gpus_per_trial; on a fixed-size cluster of
    `cluster_cpus`, the concurrent trials also share its cores for torch threads instead of oversubscribing them."""
    t, workers = cfg.tune, cfg.train.num_workers
    train = dataclasses.replace(cfg.train, cpus_per_worker=t.cpus_per_trial / workers, use_gpu=t.gpus_per_trial > 0)
    if cluster_cpus and not train.torch_threads:
        train = dataclasses.replace(train, torch_threads=max(1, int(cluster_cpus) // (concurrency * workers)))
    return dataclasses.replace(cfg, train=train)


def fit_concurrency(requested: int, cluster: dict[str, float], cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials a fixed-size cluster can run at once while Ray Data keeps DATA_RESERVED_CPUS."""
    cpus = cluster.get("CPU", 0.0) - DATA_RESERVED_CPUS
    fits = math.floor(cpus / cpus_per_trial + 1e-9)
    if gpus_per_trial:
        fits = min(fits, math.floor(cluster.get("GPU", 0.0) / gpus_per_trial))
    if fits < 1:
        raise ConfigError(
            f"one trial needs {cpus_per_trial} CPUs and {gpus_per_trial} GPUs (plus {DATA_RESERVED_CPUS} CPU kept for"
            f" Ray Data), but the Ray cluster has {cluster.get('CPU', 0)} CPUs and {cluster.get('GPU', 0)} GPUs:"
            " lower tune.cpus_per_trial / gpus_per_trial"
        )
    return min(requested, fits)


def run_trial(
    params: dict, *, inputs: TrainInputs, base: Config, runs_uri: str, parent: tracking.RunRef | None = None
) -> None:
    """The function trainable: one Ray Train run, resumed from its own checkpoints when Tune restarts it. With
    tracking on (`parent`: the search's MLflow run), an MLflow run nested under the search's, which the Train run's
    rank-0 worker logs each epoch to; the driver ends it when the search is over."""
    cfg = trial_config(base, params)
    # Concurrent trials' Ray Data progress bars interleave into noise under Tune's own trial table.
    ray.data.DataContext.get_current().enable_progress_bars = False
    trial_id = ray_tune.get_context().get_trial_id()
    record_attempt(storage.join(runs_uri, trial_id, "attempts.json"), cfg)
    run = tracking.Run(parent).child(
        cfg,
        "trial",
        trial_id,
        record=storage.join(runs_uri, trial_id, tracking.RECORD),
        tags={"artfuse.trial": trial_id},
    )
    finished = finished_run_metrics(storage.join(runs_uri, trial_id), cfg)
    if finished:
        # Trained every epoch before the search was killed, but Tune never saw the end: report it from here. A
        # report through Ray Train would race this function's return (TuneReportCallback hands reports over through
        # a queue actor, which Tune stops reading once the function returns) and the trial could end resultless.
        ray_tune.report(finished)
        return
    callbacks = [TuneReportCallback(), RecordPlacementGroup(record_uri(runs_uri, trial_id), cfg.storage)]
    make_trainer(inputs, cfg, runs_uri, name=trial_id, callbacks=callbacks, tracking_run=run.ref).fit()


def train_run(run_uri: str, cfg: Config) -> ray.train.Result | None:
    """The Ray Train run at `run_uri` as its checkpoints record it, or None before it has registered one."""
    fs, run_path = storage.arrow_filesystem(run_uri, cfg.storage)
    try:
        return ray.train.Result.from_path(run_path, storage_filesystem=fs)
    except RuntimeError:  # no run there yet, or none that has registered a checkpoint
        return None


def finished_run_metrics(run_uri: str, cfg: Config) -> dict | None:
    """The last epoch's metrics of the Ray Train run at `run_uri` if it has checkpointed every epoch, else None."""
    run = train_run(run_uri, cfg)
    metrics = (run.metrics if run else None) or {}
    return metrics if metrics.get("epoch", 0) >= cfg.train.epochs else None


def record_attempt(uri: str, cfg: Config) -> None:
    """Append this start to the trial's attempts log: the results table shows which trials were resumed."""
    attempts = json.loads(storage.read_bytes(uri, cfg.storage)) if storage.exists(uri, cfg.storage) else []
    attempts.append({"started_at": time.time(), "pid": os.getpid()})
    storage.write_bytes(uri, json.dumps(attempts).encode(), cfg.storage)


def tune(data_uri: str, out_uri: str, cfg: Config) -> dict:
    """Run (or resume) the search; write the results table, best config, best package and plot under `out_uri`."""
    started = time.time()
    check_space(cfg)
    experiment_uri, runs_uri = storage.join(out_uri, "_tune"), storage.join(out_uri, "_trials")
    fs, experiment_path = storage.arrow_filesystem(experiment_uri, cfg.storage)
    resuming = ray_tune.Tuner.can_restore(experiment_path, storage_filesystem=fs)
    check_same_search(storage.join(out_uri, "search_config.yaml"), cfg, resuming)

    ensure_ray()
    check_trial(cfg, TRIAL_DRIVER_RESOURCES)
    concurrency, fixed_cpus = cfg.tune.max_concurrent_trials, None
    if not os.environ.get("RAY_ADDRESS"):  # a local cluster cannot grow; a remote one may autoscale
        cluster = ray.cluster_resources()
        concurrency = fit_concurrency(concurrency, cluster, cfg.tune.cpus_per_trial, cfg.tune.gpus_per_trial)
        fixed_cpus = cluster.get("CPU")
        if concurrency < cfg.tune.max_concurrent_trials:
            log.warning(
                "running %d trials at a time, not %d: that is what fits", concurrency, cfg.tune.max_concurrent_trials
            )
    base = with_trial_resources(cfg, concurrency, fixed_cpus)
    inputs = prepare_inputs(data_uri, base)
    tags = {"artfuse.fingerprint": inputs.collection.fingerprint, "artfuse.data": data_uri}
    tags["artfuse.search"] = cfg.tune.search
    record = storage.join(out_uri, tracking.RECORD)  # a resumed search logs on to the same run
    with tracking.start(cfg, "tune", f"tune {out_uri}", record=record, tags=tags) as run:
        trainable = ray_tune.with_resources(
            ray_tune.with_parameters(run_trial, inputs=inputs, base=base, runs_uri=runs_uri, parent=run.ref),
            TRIAL_DRIVER_RESOURCES,
        )
        if resuming:
            # Tune keeps the search's own settings (space, samples, concurrency, scheduler) from its first run.
            log.info("resuming the search in %s", experiment_uri)
            tuner = ray_tune.Tuner.restore(experiment_path, trainable, resume_errored=True, storage_filesystem=fs)
        else:
            tuner = new_tuner(trainable, base, concurrency, experiment_path, fs, runs_uri)
        searching = time.time()
        grid = tuner.fit()
        searched_s = time.time() - searching

        rows = trial_rows(grid, base, runs_uri)
        tracking.end_trials(run, rows, runs_uri, base)
        release_all(runs_uri, [row["trial_id"] for row in rows], base.storage)
        summary, package = write_outputs(rows, inputs, cfg, base, out_uri, runs_uri)
        summary |= {
            "resumed": resuming,
            "duration_s": round(time.time() - started, 1),
            "time_budget_s": cfg.tune.time_budget_s,
            # Tune stopped whatever still ran: those trials count as stopped_early too.
            "time_budget_reached": bool(cfg.tune.time_budget_s) and searched_s >= cfg.tune.time_budget_s,
        }
        report = json.dumps(summary, indent=1).encode()
        storage.write_bytes(storage.join(out_uri, "tune_report.json"), report, cfg.storage)
        log_search(run, summary, package, out_uri, cfg)
    return summary


def log_search(run: tracking.Run, summary: dict, package: dict, out_uri: str, cfg: Config) -> None:
    """The search's MLflow run: how its trials ended, the best trial and its figures, its package (test scores, small
    files, under best/) and the search's own files."""
    run.set_tags({"artfuse.best_trial": summary["best"]["trial_id"]})
    run.log_metrics({key: summary[key] for key in ("trials", "completed", "stopped_early", "error", "not_run")})
    log_package(run, package, storage.join(out_uri, "best"), cfg, artifact_path="best")
    run.log_files(out_uri, ["results.csv", "best_config.yaml", "macro_f1_by_param.png", "tune_report.json"], cfg)


def new_tuner(
    trainable: Any, cfg: Config, concurrency: int, experiment_path: str, fs: Any, runs_uri: str
) -> ray_tune.Tuner:
    t = cfg.tune
    searcher, param_space = make_searcher(cfg, concurrency)
    return ray_tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray_tune.TuneConfig(
            metric=METRIC,
            mode="max",
            num_samples=t.num_samples,
            time_budget_s=t.time_budget_s or None,
            search_alg=searcher,
            scheduler=ASHAScheduler(
                time_attr="epoch",  # the epoch a trial reached, right even after a resume
                max_t=cfg.train.epochs,
                grace_period=t.grace_period,
                reduction_factor=t.reduction_factor,
            ),
        ),
        run_config=ray_tune.RunConfig(
            name=Path(experiment_path).name,
            storage_path=Path(experiment_path).parent.as_posix(),
            storage_filesystem=fs,
            callbacks=[ReleasePlacementGroups(runs_uri, cfg.storage)],
            verbose=1,
        ),
    )


def check_same_search(uri: str, cfg: Config, resuming: bool) -> None:
    """A restored search keeps its trials' configs and space; a rerun with other settings would mix two searches."""
    current = {k: v for k, v in to_dict(cfg).items() if k in SEARCH_SECTIONS}
    if resuming and storage.exists(uri, cfg.storage):
        saved = yaml.safe_load(storage.read_bytes(uri, cfg.storage)) or {}
        changed = sorted(
            f"{section}.{key}"
            for section, fields in current.items()
            for key, value in fields.items()
            if (saved.get(section) or {}).get(key) != value
        )
        if changed:
            raise ConfigError(
                f"this --out holds a search run with other settings ({', '.join(changed)}): rerun with the same"
                " config to resume it, or use a new --out"
            )
    else:
        storage.write_bytes(uri, yaml.safe_dump(current, sort_keys=False).encode(), cfg.storage)


def trial_rows(grid: ray_tune.ResultGrid, base: Config, runs_uri: str) -> list[dict]:
    """One row per trial: status, its parameters, its best epoch's validation figures, epochs run, attempts.

    The figures come from the trial's Ray Train run, the record the best package is exported from, not from Tune's
    own log of the reports: a trial resumed after a kill reports only its last epoch to Tune, and its best epoch may
    be an earlier one that Tune's log of the first attempt never kept.
    """
    params = list(search_space(base))
    analysis = ray_tune.ExperimentAnalysis(grid.experiment_path, storage_filesystem=grid.filesystem)
    results = {result.path: result for result in grid}
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        result = results.get(trial.path)
        cfg = trial_config(base, {k: v for k, v in trial.config.items() if k in params})
        run = train_run(storage.join(runs_uri, trial.trial_id), base)
        reported = run is not None and bool(run.metrics)
        best = best_epoch(run)[1] if reported else None
        epochs_run = int(run.metrics["epoch"]) if reported else 0
        error = result.error if result is not None else None
        attempts_uri = storage.join(runs_uri, trial.trial_id, "attempts.json")
        attempts = (
            len(json.loads(storage.read_bytes(attempts_uri, base.storage)))
            if storage.exists(attempts_uri, base.storage)
            else 0
        )
        if error is not None:
            status = "error"
        elif not reported:
            status = "not_run"
        else:
            status = "completed" if epochs_run >= base.train.epochs else "stopped_early"
        rows.append(
            {
                "trial_id": trial.trial_id,
                "status": status,
                "stopped_early": status == "stopped_early",
                **{key: _field(cfg, key) for key in params},
                "val_macro_f1": float(best[METRIC]) if reported else None,
                "val_accuracy": float(best["val_accuracy"]) if reported else None,
                "best_epoch": int(best["epoch"]) if reported else None,
                "epochs_run": epochs_run,
                "epochs": base.train.epochs,
                "attempts": attempts,
                "train_img_s": float(run.metrics["train_img_s"]) if reported else None,
                "error": str(error).strip().splitlines()[-1][:500] if error is not None else None,
            }
        )
    return rows


def write_outputs(
    rows: list[dict], inputs: TrainInputs, cfg: Config, base: Config, out_uri: str, runs_uri: str
) -> tuple[dict, dict]:
    """Results table, plot, best config and best package. `cfg` is the user's config, `base` the trials' one.
    Returns the summary and the best package's (export_package's)."""
    table = pa.Table.from_pylist(rows)
    for name, write in (("results.parquet", pq.write_table), ("results.csv", pacsv.write_csv)):
        buffer = io.BytesIO()
        write(table, buffer)
        storage.write_bytes(storage.join(out_uri, name), buffer.getvalue(), base.storage)
    counts = {status: sum(r["status"] == status for r in rows) for status in ("completed", "stopped_early", "error")}
    summary: dict[str, Any] = {"trials": len(rows), **counts, "not_run": len(rows) - sum(counts.values())}
    scored = [r for r in rows if r["val_macro_f1"] is not None]
    if not scored:
        raise RuntimeError(f"no trial reported a validation result; see {storage.join(out_uri, 'results.csv')}")

    params = searched_params(base)
    with tempfile.TemporaryDirectory() as tmp:
        plot = Path(tmp) / "plot.png"
        plot_metric_by_param(scored, params, METRIC, plot)
        storage.write_bytes(storage.join(out_uri, "macro_f1_by_param.png"), plot.read_bytes(), base.storage)

    best = max(scored, key=lambda r: (r[METRIC], r["val_accuracy"]))
    best_params = {key: best[key] for key in search_space(base)}
    # The YAML is for training the winner on its own, so it keeps the user's resources, not the trials' shares.
    header = f"# best trial {best['trial_id']}: val macro-F1 {best[METRIC]:.4f}, accuracy {best['val_accuracy']:.4f}\n"
    body = yaml.safe_dump(to_dict(trial_config(cfg, best_params)), sort_keys=False)
    storage.write_bytes(storage.join(out_uri, "best_config.yaml"), (header + body).encode(), base.storage)
    fs, runs_path = storage.arrow_filesystem(runs_uri, base.storage)
    result = ray.train.Result.from_path(f"{runs_path}/{best['trial_id']}", storage_filesystem=fs)
    package = export_package(result, inputs, trial_config(base, best_params), storage.join(out_uri, "best"))
    return summary | {
        "best": {
            "trial_id": best["trial_id"],
            **{key: best[key] for key in params},
            "val_macro_f1": best[METRIC],
            "val_accuracy": best["val_accuracy"],
            "best_epoch": best["best_epoch"],
        },
        "package": package["package"],
        "model_id": package["model_id"],
        "results": storage.join(out_uri, "results.parquet"),
    }, package


def _options(value: Any) -> list:
    if isinstance(value, Categorical):
        return list(value.categories)
    if isinstance(value, Domain):
        return [value.lower, value.upper]
    return [value]


def _field(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)
