"""Classification metrics from a confusion matrix: accuracy with its 95 % interval, macro-F1, per class (the
metrics.json contract), and the t-interval of a mean over runs."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows are true labels, columns predictions."""
    idx = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def summarize(confusion: np.ndarray, labels: list[str]) -> dict:
    confusion = np.asarray(confusion, dtype=np.int64)
    tp = np.diag(confusion).astype(float)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = (support > 0) | (predicted > 0)  # as scikit-learn's macro average: labels seen in truth or predictions
    total = int(confusion.sum())
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "accuracy_ci": accuracy_interval(int(tp.sum()), total),  # 95 %, bootstrap over the images
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
        },
        "confusion": confusion.tolist(),
        "labels": list(labels),
    }


BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed: the same predictions always get the same interval


def accuracy_interval(correct: int, n: int, level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval of an accuracy over the images: `correct` right out of `n`; None when n is 0.

    Resampling n images with replacement and counting the right ones is a draw from Binomial(n, correct / n), so the
    resamples are drawn as that: the same bootstrap distribution, at a cost that does not grow with n.
    """
    if not n:
        return None
    draws = np.random.default_rng(BOOTSTRAP_SEED).binomial(n, correct / n, size=BOOTSTRAP_RESAMPLES) / n
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return [round(float(low), 4), round(float(high), 4)]


def mean_interval(values: list[float], level: float = 0.95) -> list[float] | None:
    """Student's t interval of the mean of `values` (runs over folds or seeds); None for fewer than two."""
    n = len(values)
    if n < 2:
        return None
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    half = t_quantile((1 + level) / 2, n - 1) * sd / float(np.sqrt(n))
    return [round(mean - half, 4), round(mean + half, 4)]


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with integer `df`, by bisection on its closed-form CDF (numpy has no
    t distribution, and scipy is not a dependency of artfuse)."""
    low, high = 0.0, 1.0
    while t_central(high, df) < 2 * p - 1:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if t_central(mid, df) < 2 * p - 1 else (low, mid)
    return (low + high) / 2


def t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer `df` (Abramowitz and Stegun 26.7.3 and 26.7.4)."""
    theta = np.arctan(t / np.sqrt(df))
    c2, term, total = np.cos(theta) ** 2, 1.0, 1.0
    if df % 2:  # odd: 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), up to cos^(df-2)
        if df == 1:
            return float(2 * theta / np.pi)
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return float(2 / np.pi * (theta + np.sin(theta) * np.cos(theta) * total))
    for k in range(1, df // 2):  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), up to cos^(df-2)
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return float(np.sin(theta) * total)
