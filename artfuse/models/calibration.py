"""Scores a curator can trust: a temperature per task and a review threshold per task, fitted on held-out data.

Temperature scaling (Guo et al. 2017) divides a task's logits by one number fitted to minimise the negative
log-likelihood on the validation split: the ranking (and so the predicted label) is unchanged, only how sure
the scores say the model is. The review threshold is the lowest calibrated score at which the validation
predictions at or above it are right at least `label.target_accuracy` of the time; predictions below it go
to a person. Both are stored in the package (`calibration` in artfuse.json) and used by every prediction.

A package without them (trained before calibration existed) predicts with temperature 1 and, under
`label.review_threshold: auto`, reviews below FALLBACK_REVIEW_THRESHOLD; `artfuse calibrate` adds them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch

from artfuse.config import LabelConfig
from artfuse.reporting.calibration import expected_calibration_error, lowest_threshold

log = logging.getLogger(__name__)
FALLBACK_REVIEW_THRESHOLD = 0.5  # `auto` on a package without a fitted threshold: the old fixed rule
TEMPERATURE_RANGE = (0.05, 20.0)  # a perfectly separated validation split would drive the fit to 0 or infinity


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def logits_from_probabilities(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Logits (up to a per-row constant, which softmax ignores) behind probabilities made at `temperature`."""
    with np.errstate(divide="ignore"):
        return temperature * np.log(np.asarray(probabilities, np.float64))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the mean NLL of softmax(logits / T) for `labels` (L-BFGS on log T)."""
    z = torch.as_tensor(np.nan_to_num(np.asarray(logits, np.float64), neginf=-1e4))
    y = torch.as_tensor(np.asarray(labels, np.int64))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    low, high = (float(np.log(b)) for b in TEMPERATURE_RANGE)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.clamp(low, high).exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(np.exp(np.clip(log_t.item(), low, high)))


def fit_task(logits: np.ndarray, labels: np.ndarray, target_accuracy: float, rule: str = "point") -> dict:
    """Temperature and review threshold for one task (lowest_threshold's `rule`), with the figures that justify them."""
    labels = np.asarray(labels, np.int64)
    temperature = fit_temperature(logits, labels)
    raw, calibrated = softmax(logits), softmax(logits, temperature)
    correct = raw.argmax(1) == labels
    accepted = lowest_threshold(calibrated.max(1), correct, target_accuracy, rule)
    return {
        "temperature": temperature,
        "review_threshold": accepted["threshold"],
        "target_accuracy": target_accuracy,
        "threshold_rule": rule,
        "accepted_share": accepted["coverage"],  # of the fitting data, at the threshold
        "accepted_accuracy": accepted["accuracy"],
        "ece": expected_calibration_error(calibrated.max(1), correct),
        "ece_uncalibrated": expected_calibration_error(raw.max(1), correct),
        "n": len(labels),
    }


def fit_calibration(
    logits: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray],
    target_accuracy: float,
    fitted_on: str,
    rule: str = "point",
) -> dict:
    """The package's `calibration` entry: per task `fit_task`'s dict; `fitted_on` says which data."""
    tasks = {task: fit_task(logits[task], labels[task], target_accuracy, rule) for task in logits}
    for task, fit in tasks.items():
        log.info(
            "calibration %s: temperature %.3f, ECE %.3f -> %.3f, review below %s (%.0f%% accepted at %.3f accuracy)",
            task,
            fit["temperature"],
            fit["ece_uncalibrated"],
            fit["ece"],
            "everything" if fit["review_threshold"] is None else f"{fit['review_threshold']:.3f}",
            100 * fit["accepted_share"],
            fit["accepted_accuracy"] or 0.0,
        )
    return {"method": "temperature", "fitted_on": fitted_on, "tasks": tasks}


def temperatures(manifest: dict) -> dict[str, float]:
    """Each task's temperature from a package manifest; 1 (the raw softmax) where none was fitted."""
    fitted = manifest.get("calibration", {}).get("tasks", {})
    return {task: float(fitted.get(task, {}).get("temperature", 1.0)) for task in manifest["tasks"]}


def review_thresholds(manifest: dict, cfg: LabelConfig) -> dict[str, float]:
    """Per task, the score below which a prediction needs review: a number in `label.review_threshold` for
    every task, else (auto) the package's fitted threshold, else FALLBACK_REVIEW_THRESHOLD.

    A task whose fitted threshold is None (no score reached the target accuracy) sends everything to review.
    """
    if cfg.review_threshold != "auto":
        return {task: float(cfg.review_threshold) for task in manifest["tasks"]}
    fitted = manifest.get("calibration", {}).get("tasks", {})
    thresholds = {}
    for task in manifest["tasks"]:
        if task not in fitted:
            log.warning(
                "package %s has no fitted review threshold for %s (run `artfuse calibrate`): reviewing below %s",
                manifest.get("model_id"),
                task,
                FALLBACK_REVIEW_THRESHOLD,
            )
            thresholds[task] = FALLBACK_REVIEW_THRESHOLD
        else:
            threshold = fitted[task]["review_threshold"]
            thresholds[task] = float("inf") if threshold is None else float(threshold)
    return thresholds


@torch.inference_mode()
def dataset_logits(
    model: torch.nn.Module, dataset, preprocess, label_columns: Mapping[str, str], batch_size: int = 64
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Logits and true class indices per task over a decoded, centre-cropped Ray Dataset (image + label columns)."""
    model.eval()
    logits: dict[str, list] = {task: [] for task in label_columns}
    labels: dict[str, list] = {task: [] for task in label_columns}
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        out = model(preprocess.to_tensor(batch["image"], torch.device("cpu")))
        for task, column in label_columns.items():
            logits[task].append(out[task].float().numpy())
            labels[task].append(batch[column])
    return (
        {task: np.concatenate(v) for task, v in logits.items()},
        {task: np.concatenate(v) for task, v in labels.items()},
    )
