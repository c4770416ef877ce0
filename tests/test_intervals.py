"""Error bars: the bootstrap interval of one run's accuracy (metrics.json's accuracy_ci), the t-interval of a mean over
runs (ablate's table), and the review threshold chosen from a confidence bound."""

from __future__ import annotations

import math

import numpy as np
import pytest

from artfuse.reporting.calibration import lowest_threshold, wilson_lower_bound
from artfuse.reporting.metrics import accuracy_interval, confusion_matrix, mean_interval, summarize, t_quantile


def test_bootstrap_interval_of_an_accuracy_matches_the_known_cases():
    assert accuracy_interval(179, 179) == [1.0, 1.0]  # every image right: every resample is all right
    assert accuracy_interval(0, 50) == [0.0, 0.0] and accuracy_interval(0, 0) is None
    low, high = accuracy_interval(900, 1000)
    normal = 1.96 * math.sqrt(0.9 * 0.1 / 1000)  # 1.86 points
    assert low == pytest.approx(0.9 - normal, abs=0.002) and high == pytest.approx(0.9 + normal, abs=0.002)
    assert accuracy_interval(900, 1000) == [low, high]  # a fixed seed: the same figures every time
    m = summarize(confusion_matrix(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 0]), 2), ["a", "b"])
    assert m["accuracy"] == 0.75 and m["accuracy_ci"] == accuracy_interval(3, 4)


def test_t_interval_of_a_mean_over_runs():
    for df, table in [(1, 12.706), (4, 2.776), (9, 2.262), (30, 2.042)]:  # Student's t, 97.5 % quantiles
        assert t_quantile(0.975, df) == pytest.approx(table, abs=5e-4)
    values = [0.80, 0.82, 0.85, 0.79, 0.81]
    half = 2.776 * np.std(values, ddof=1) / math.sqrt(5)
    assert mean_interval(values) == pytest.approx([np.mean(values) - half, np.mean(values) + half], abs=2e-4)
    assert mean_interval([0.8]) is None


def test_a_threshold_from_the_wilson_bound_accepts_less_than_the_point_estimate():
    # 100 predictions by falling score: the top 60 right, then right and wrong by turns. The point estimate reaches 0.95
    # down to 67 accepted (64 right, 0.955); the Wilson lower bound only with the first 61, all right (0.957)
    confidence = np.linspace(0.99, 0.5, 100)
    correct = np.array([True] * 60 + [i % 2 == 0 for i in range(40)])
    point = lowest_threshold(confidence, correct, 0.95)
    wilson = lowest_threshold(confidence, correct, 0.95, rule="wilson")
    assert point["coverage"] == 0.67 and point["accuracy"] == pytest.approx(64 / 67)
    assert wilson["coverage"] == 0.61 and wilson["accuracy"] == 1.0 and wilson["threshold"] == confidence[60]
    assert wilson_lower_bound(np.array([95]), np.array([100]))[0] == pytest.approx(0.9000, abs=1e-3)
