"""How far a score can be trusted: expected calibration error, reliability bins, risk-coverage.

All take per-prediction `confidence` (the top score) and `correct` (whether that top label was right).
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017 ("On Calibration of Modern Neural Networks")
# Thresholds of the risk-coverage table in metrics.json (the PNG draws every distinct score).
RISK_COVERAGE_THRESHOLDS = (*np.round(np.arange(0.0, 0.951, 0.05), 2).tolist(), 0.99)


def reliability(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width bin of confidence: its bounds, how many predictions, their mean confidence and accuracy."""
    confidence, correct = np.asarray(confidence, float), np.asarray(correct, bool)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 goes to the first bin
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    bins = []
    for i in range(n_bins):
        members = index == i
        count = int(members.sum())
        bins.append(
            {
                "lower": float(edges[i]),
                "upper": float(edges[i + 1]),
                "count": count,
                "confidence": float(confidence[members].mean()) if count else None,
                "accuracy": float(correct[members].mean()) if count else None,
            }
        )
    return bins


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Sum over bins of |accuracy - mean confidence|, weighted by the bin's share of predictions."""
    n = len(confidence)
    if not n:
        return 0.0
    bins = [b for b in reliability(confidence, correct, n_bins) if b["count"]]
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins))


def accepted_accuracy(confidence: np.ndarray, correct: np.ndarray, threshold: float) -> dict:
    """The predictions scoring at least `threshold`: their share of all (coverage) and their accuracy."""
    confidence, correct = np.asarray(confidence, float), np.asarray(correct, bool)
    accepted = confidence >= threshold
    n = int(accepted.sum())
    return {
        "threshold": float(threshold),
        "coverage": n / len(confidence) if len(confidence) else 0.0,
        "accuracy": float(correct[accepted].mean()) if n else None,
    }


def risk_coverage(
    confidence: np.ndarray, correct: np.ndarray, thresholds: tuple[float, ...] | None = None
) -> list[dict]:
    """Coverage and accuracy of the predictions at or above each threshold (default: every distinct score)."""
    if thresholds is None:
        thresholds = tuple(np.unique(np.asarray(confidence, float))[::-1])
    return [accepted_accuracy(confidence, correct, t) for t in thresholds]


def lowest_threshold(confidence: np.ndarray, correct: np.ndarray, target_accuracy: float, rule: str = "point") -> dict:
    """The lowest score whose accepted predictions (score >= it) are right at least `target_accuracy` of the time:
    by their accuracy (rule point), or by its 95 % one-sided Wilson lower bound (rule wilson).

    Returns accepted_accuracy's dict at that threshold, or threshold None (nothing can be accepted) when no
    threshold reaches the target.
    """
    confidence, correct = np.asarray(confidence, float), np.asarray(correct, bool)
    order = np.argsort(-confidence, kind="stable")
    sorted_conf, hits = confidence[order], np.cumsum(correct[order])
    # The accepted set at threshold c is every prediction with confidence >= c: the prefix up to c's last tie.
    last_of_tie = np.flatnonzero(np.append(sorted_conf[1:] != sorted_conf[:-1], True))
    accuracy = hits[last_of_tie] / (last_of_tie + 1)
    if rule == "wilson":
        accuracy = wilson_lower_bound(hits[last_of_tie], last_of_tie + 1)
    reaching = np.flatnonzero(accuracy >= target_accuracy)
    if not len(reaching):
        return {"threshold": None, "coverage": 0.0, "accuracy": None}
    return accepted_accuracy(confidence, correct, sorted_conf[last_of_tie[reaching[-1]]])


WILSON_Z = 1.6449  # the standard normal's 95 % quantile: a one-sided 95 % bound


def wilson_lower_bound(successes: np.ndarray, n: np.ndarray, z: float = WILSON_Z) -> np.ndarray:
    """Wilson's score-interval lower bound of a proportion (successes out of n, n >= 1)."""
    p, n = np.asarray(successes, float) / n, np.asarray(n, float)
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)
