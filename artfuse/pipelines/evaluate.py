"""Evaluate a model package on a labelled collection: metrics.json (its fields: docs/reference.md), confusion PNGs, and
how far its scores can be trusted: ECE before and after the package's temperature, a reliability diagram and a
risk-coverage curve per task, and what the review threshold lets through. `artfuse calibrate` fits that
temperature and threshold (on the training collection, its validation split: never the test split; or on the
out-of-fold predictions of an `ablate --folds` cross-validation).

When the collection is the one the package was trained on (same fingerprint), only its test split is scored (the
images that chose nothing), split exactly as in training; a package trained without a test split (data.test_fraction
0, or one from before test splits existed) is scored on its validation split, and metrics.json's `split` says which.
Any other collection is scored whole.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from artfuse.cluster.runtime import ensure_ray
from artfuse.config import Config, ConfigError, DataConfig
from artfuse.data import corrections, storage
from artfuse.data.catalog import Collection, load_collection
from artfuse.data.preprocess import Preprocess
from artfuse.models.calibration import (
    fit_calibration,
    logits_from_probabilities,
    review_thresholds,
    softmax,
    temperatures,
)
from artfuse.models.package import read_manifest, set_calibration
from artfuse.pipelines.ablate import RUN_RECORD
from artfuse.pipelines.label import prediction_dataset
from artfuse.pipelines.train import VAL_LOGITS
from artfuse.reporting import tracking
from artfuse.reporting.calibration import (
    RISK_COVERAGE_THRESHOLDS,
    accepted_accuracy,
    expected_calibration_error,
    reliability,
    risk_coverage,
)
from artfuse.reporting.metrics import confusion_matrix, summarize
from artfuse.reporting.plots import plot_confusion, plot_reliability, plot_risk_coverage

log = logging.getLogger(__name__)


def trained_split(data: DataConfig, training: dict, tasks: list[str]) -> DataConfig:
    """`data` with the split of the training run (seed, fractions), so "test" and "val" mean the images they meant
    there; a package from before test splits has no test_fraction: it was split into train and val only."""
    trained = training.get("data_config", {})
    return dataclasses.replace(
        data,
        tasks=tasks,
        seed=trained.get("seed", data.seed),
        val_fraction=trained.get("val_fraction", data.val_fraction),
        test_fraction=trained.get("test_fraction", 0.0),
    )


@dataclass
class Scored:
    """A package's predictions on a labelled collection, per task over the rows that decoded."""

    manifest: dict
    # "test" or "val" (that split of the training run), "all", or "corrections" (the decisions alone)
    split: str
    errors: int  # rows that could not be labelled
    truth: dict[str, np.ndarray]  # class index, -1 for a label the model was never taught
    probabilities: dict[str, np.ndarray]  # (n, n_labels) as the package predicts them (calibrated)
    fingerprint: str = ""  # the scored collection's


def score(model_uri: str, data_uri: str | None, cfg: Config, held_out: str = "test") -> Scored:
    """Run the package over the collection with the labelling pipeline, keeping every label's probability. On the
    collection it was trained on, only the training run's `held_out` split is scored (test: what chose nothing; val:
    what calibration may fit on); a package trained without a test split is scored on its val split."""
    manifest = read_manifest(model_uri, cfg.storage)
    vocabs: dict[str, list[str]] = manifest["tasks"]
    training = manifest.get("training", {})
    data_cfg = trained_split(cfg.data, training, list(vocabs))
    decode_size = Preprocess.from_dict(manifest["preprocess"]).resize  # IIIF images are fetched at this size
    collection = truth_collection(data_uri, data_cfg, list(vocabs), cfg, image_size=decode_size)
    if not data_uri:  # the hard cases alone: the tasks a reviewer decided
        vocabs = {task: vocabs[task] for task in collection.tasks}
    missing = [t for t in vocabs if t not in collection.tasks]
    if missing:
        raise ConfigError(f"{data_uri} has no label column for task(s) {missing}; the model predicts {list(vocabs)}")
    split = "all" if data_uri else "corrections"
    if collection.fingerprint == training.get("fingerprint"):
        split = held_out if collection.subset(held_out).num_rows else "val"
    truth = collection.subset(split) if split in ("test", "val") else collection.table
    log.info("evaluating on %d images (%s)", truth.num_rows, split)

    ensure_ray()
    # top-k over every label: the rows then carry each task's whole probability vector
    every_label = dataclasses.replace(cfg, label=dataclasses.replace(cfg.label, topk=max(map(len, vocabs.values()))))
    ds = prediction_dataset(truth, model_uri, every_label, run_id="evaluate", labelled_at=datetime.now(UTC))
    topk = [f"{t}_topk" for t in vocabs]
    predicted = pa.concat_tables(ray.get(ds.select_columns(["uri", *topk, "error"]).to_arrow_refs()))
    by_uri = {row["uri"]: row for row in predicted.to_pylist()}
    rows = [by_uri[uri] for uri in truth["uri"].to_pylist()]
    ok = np.array([row["error"] is None for row in rows], dtype=bool)
    scored = Scored(manifest | {"tasks": vocabs}, split, int((~ok).sum()), {}, {}, collection.fingerprint)
    for task, vocab in vocabs.items():
        index = {label: i for i, label in enumerate(vocab)}
        labels = np.asarray(truth[task].to_pylist(), object)[ok]
        scored.truth[task] = np.array([index.get(label, -1) for label in labels], np.int64)
        probabilities = np.zeros((len(labels), len(vocab)), np.float64)
        for i, row in enumerate(r for r, good in zip(rows, ok, strict=True) if good):
            for entry in row[f"{task}_topk"]:
                probabilities[i, index[entry["label"]]] = entry["score"]
        scored.probabilities[task] = probabilities
    return scored


def evaluate(model_uri: str, data_uri: str | None, cfg: Config, out_dir: str | Path | None = None) -> dict:
    scored = score(model_uri, data_uri, cfg)
    vocabs: dict[str, list[str]] = scored.manifest["tasks"]
    temperature = temperatures(scored.manifest)
    thresholds = review_thresholds(scored.manifest, cfg.label)
    metrics: dict = {
        "n": len(next(iter(scored.truth.values()))),
        "split": scored.split,
        "errors": scored.errors,
        "tasks": {},
    }
    curves = {}
    for task, vocab in vocabs.items():
        y_true, probabilities = scored.truth[task], scored.probabilities[task]
        y_pred = probabilities.argmax(1)
        known = y_true >= 0
        summary = summarize(confusion_matrix(y_true[known], y_pred[known], len(vocab)), vocab)
        summary["unknown_labels"] = int((~known).sum())  # labels the model was never taught
        # calibration is judged on the taught labels: an unknown one is wrong whatever the score says
        correct, confidence = y_pred[known] == y_true[known], probabilities[known].max(1)
        raw = softmax(logits_from_probabilities(probabilities[known], temperature[task])).max(1)
        curves[task] = {
            "calibrated": reliability(confidence, correct),
            "uncalibrated": reliability(raw, correct),
            "risk_coverage": risk_coverage(confidence, correct),
        }
        summary |= {
            "temperature": temperature[task],
            "ece": expected_calibration_error(confidence, correct),
            "ece_uncalibrated": expected_calibration_error(raw, correct),
            "risk_coverage": risk_coverage(confidence, correct, RISK_COVERAGE_THRESHOLDS),
            # what label.review_threshold lets through here; an unreachable target (inf) accepts nothing
            "auto_accept": accepted_accuracy(confidence, correct, thresholds[task])
            | {"threshold": thresholds[task] if np.isfinite(thresholds[task]) else None},
        }
        metrics["tasks"][task] = summary
    if out_dir:
        out = str(out_dir)
        storage.write_bytes(storage.join(out, "metrics.json"), json.dumps(metrics, indent=1).encode(), cfg.storage)
        for task, summary in metrics["tasks"].items():
            plots = {
                f"confusion_{task}.png": (plot_confusion, summary, task),
                f"reliability_{task}.png": (plot_reliability, curves[task], summary, task),
                f"risk_coverage_{task}.png": (
                    plot_risk_coverage,
                    curves[task]["risk_coverage"],
                    summary["auto_accept"],
                    task,
                ),
            }
            for name, (plot, *args) in plots.items():
                png = io.BytesIO()
                plot(*args, png)
                storage.write_bytes(storage.join(out, name), png.getvalue(), cfg.storage)
    log_evaluation(metrics, scored, model_uri, data_uri, cfg, out_dir)
    return metrics


def log_evaluation(
    metrics: dict, scored: Scored, model_uri: str, data_uri: str | None, cfg: Config, out_dir: str | Path | None
) -> None:
    """The evaluation as an MLflow run (with tracking on): the scores with their intervals and calibration, and
    metrics.json and the plots."""
    tags = {
        "artfuse.package": model_uri,
        "artfuse.model_id": scored.manifest.get("model_id"),
        "artfuse.data": data_uri or cfg.data.corrections,
        "artfuse.fingerprint": scored.fingerprint,
        "artfuse.split": scored.split,
    }
    with tracking.start(cfg, "evaluate", f"evaluate {model_uri}", tags=tags) as run:
        run.log_scores(metrics, prefix=scored.split)
        run.log_metrics({"errors": metrics["errors"]})
        if out_dir:
            names = ["metrics.json"] + [f"{kind}_{task}.png" for task in metrics["tasks"]
                                        for kind in ("confusion", "reliability", "risk_coverage")]  # fmt: skip
            run.log_files(str(out_dir), names, cfg)
        else:
            run.log_json(metrics, "metrics.json")


def calibrate(model_uri: str, data_uri: str, cfg: Config) -> dict:
    """Fit each task's temperature and review threshold (at label.target_accuracy) for the package at `model_uri`
    on a labelled collection (its training run's validation split when it is that one), and store them in it.

    For packages trained before calibration existed, or to recalibrate on fresh labelled data."""
    scored = score(model_uri, data_uri, cfg, held_out="val")  # never the test split: it must choose nothing
    temperature = temperatures(scored.manifest)
    logits, labels = {}, {}
    for task in scored.manifest["tasks"]:
        known = scored.truth[task] >= 0
        logits[task] = logits_from_probabilities(scored.probabilities[task][known], temperature[task])
        labels[task] = scored.truth[task][known]
    fitted_on = {"val": "validation split", "all": data_uri, "corrections": cfg.data.corrections}[scored.split]
    calibration = fit_calibration(logits, labels, cfg.label.target_accuracy, fitted_on, cfg.label.threshold_rule)
    model_id = set_calibration(model_uri, calibration, cfg.storage)
    return {"package": model_uri, "model_id": model_id, **calibration}


def calibrate_out_of_fold(model_uri: str, runs_uri: str, cfg: Config) -> dict:
    """Fit each task's temperature and review threshold for the package at `model_uri` on the out-of-fold predictions of
    an `ablate --folds K` configuration (`runs_uri`: its `<out>/<arch>/seed<k>`, holding fold0 .. fold<K-1>): every
    image outside the test split, each predicted by the one run that never trained on it, instead of one validation
    split. Meant for the package refitted on every labelled image once cross-validation has decided its configuration.
    """
    first = storage.join(runs_uri, "fold0", RUN_RECORD)
    if not storage.exists(first, cfg.storage):
        raise ConfigError(f"{runs_uri} holds no finished fold run (no fold0/{RUN_RECORD}): give an `ablate --folds` "
                          "run's <out>/<arch>/seed<k>, once its folds are finished")  # fmt: skip
    k = json.loads(storage.read_bytes(first, cfg.storage))["config"]["data"]["folds"]
    runs = [storage.join(runs_uri, f"fold{fold}") for fold in range(k)]
    missing = [run for run in runs if not storage.exists(storage.join(run, VAL_LOGITS), cfg.storage)]
    if missing:
        raise ConfigError(f"{len(missing)} of the {k} fold runs under {runs_uri} are not finished ({missing[0]}): "
                          "finish the ablation (rerun it with the same --out) first")  # fmt: skip
    tasks = read_manifest(model_uri, cfg.storage)["tasks"]
    held = [np.load(io.BytesIO(storage.read_bytes(storage.join(run, VAL_LOGITS), cfg.storage))) for run in runs]
    for run in runs:
        if read_manifest(run, cfg.storage)["tasks"] != tasks:
            raise ConfigError(f"{run} predicts other tasks or labels than {model_uri}: calibrate on its own folds")
    logits = {task: np.concatenate([h[f"logits/{task}"] for h in held]) for task in tasks}
    labels = {task: np.concatenate([h[f"labels/{task}"] for h in held]) for task in tasks}
    fitted_on = f"out-of-fold predictions of {runs_uri} ({k} folds)"
    calibration = fit_calibration(logits, labels, cfg.label.target_accuracy, fitted_on, cfg.label.threshold_rule)
    model_id = set_calibration(model_uri, calibration, cfg.storage)
    return {"package": model_uri, "model_id": model_id, **calibration}


def truth_collection(
    data_uri: str | None, data_cfg: DataConfig, tasks: list[str], cfg: Config, *, image_size: int | None = None
) -> Collection:
    """What to score against: a collection (with a corrections dataset's decisions applied, as training applies
    them), or with no collection the objects of the corrections dataset alone."""
    if not data_uri:
        if not cfg.data.corrections:
            raise ConfigError(
                "evaluate needs a labelled collection (--data), a corrections dataset (--corrections), or both"
            )
        return corrections.as_collection(cfg.data.corrections, tasks, cfg.storage)
    collection = load_collection(data_uri, data_cfg, cfg.storage, image_size=image_size)
    if cfg.data.corrections:
        collection, _ = corrections.apply(collection, cfg.data.corrections, cfg.storage)
    return collection
