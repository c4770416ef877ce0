"""Calibration: ECE, risk-coverage and the review threshold's math, the temperature fit, and how packages and
label config choose each task's threshold."""

import numpy as np
import pytest

from artfuse.bench.label import save_untrained_package
from artfuse.config import ConfigError, LabelConfig, load_config
from artfuse.models.calibration import (
    FALLBACK_REVIEW_THRESHOLD,
    fit_task,
    fit_temperature,
    logits_from_probabilities,
    review_thresholds,
    softmax,
    temperatures,
)
from artfuse.models.package import load_package, set_calibration
from artfuse.models.predict import Predictor
from artfuse.reporting.calibration import expected_calibration_error, lowest_threshold, reliability, risk_coverage


def test_ece_is_the_weighted_gap_between_confidence_and_accuracy_per_bin():
    # bin (0.6, 0.667]: 3 at 0.65, 2 right -> |0.667 - 0.65|; bin (0.933, 1]: 2 at 0.95, both right -> 0.05
    confidence = np.array([0.65, 0.65, 0.65, 0.95, 0.95])
    correct = np.array([True, True, False, True, True])
    expected = 3 / 5 * abs(2 / 3 - 0.65) + 2 / 5 * 0.05
    assert expected_calibration_error(confidence, correct) == pytest.approx(expected)
    bins = reliability(confidence, correct)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 5
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([True, True])) == 0.0


def test_lowest_threshold_reaching_the_target_and_risk_coverage():
    confidence = np.array([0.99, 0.9, 0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([True, True, True, False, True, False, False])
    # accepted at >= 0.9: 3/3; >= 0.8: 3/4; >= 0.7: 4/5 = 0.8; >= 0.6: 4/6
    assert lowest_threshold(confidence, correct, 0.8) == {"threshold": 0.7, "coverage": 5 / 7, "accuracy": 0.8}
    assert lowest_threshold(confidence, correct, 0.95)["threshold"] == 0.9  # ties at 0.9 go in together
    assert lowest_threshold(confidence, ~correct, 0.95) == {"threshold": None, "coverage": 0.0, "accuracy": None}
    curve = risk_coverage(confidence, correct)
    assert [p["threshold"] for p in curve] == sorted(set(confidence), reverse=True)
    assert curve[-1] == {"threshold": 0.5, "coverage": 1.0, "accuracy": 4 / 7}


def test_temperature_fit_recovers_an_overconfident_models_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, size=(4000, 5))
    labels = np.array([rng.choice(5, p=p) for p in softmax(true_logits)])
    fitted = fit_temperature(3.0 * true_logits, labels)  # scores three times too sharp
    assert fitted == pytest.approx(3.0, rel=0.1)
    fit = fit_task(3.0 * true_logits, labels, target_accuracy=0.9)
    assert fit["ece"] < fit["ece_uncalibrated"] / 3
    # the accepted share is right at least 90 % of the time, and the threshold is the lowest that is
    assert fit["accepted_accuracy"] >= 0.9 and 0 < fit["accepted_share"] < 1
    calibrated = softmax(3.0 * true_logits, fit["temperature"])
    correct = calibrated.argmax(1) == labels
    below = calibrated.max(1) < fit["review_threshold"]
    assert correct[~below].mean() == pytest.approx(fit["accepted_accuracy"])


def test_logits_recovered_from_calibrated_probabilities():
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    probabilities = softmax(logits, 2.5).astype(np.float32)
    assert softmax(logits_from_probabilities(probabilities, 2.5)) == pytest.approx(softmax(logits), abs=1e-6)


def test_review_thresholds_auto_fitted_fallback_and_override(caplog):
    calibrated = {
        "model_id": "m",
        "tasks": {"style": ["a", "b"], "artist": ["x", "y"]},
        "calibration": {
            "tasks": {
                "style": {"temperature": 1.7, "review_threshold": 0.81},
                "artist": {"temperature": 0.9, "review_threshold": None},
            }
        },
    }
    assert review_thresholds(calibrated, LabelConfig()) == {"style": 0.81, "artist": float("inf")}
    assert review_thresholds(calibrated, LabelConfig(review_threshold=0.3)) == {"style": 0.3, "artist": 0.3}
    assert temperatures(calibrated) == {"style": 1.7, "artist": 0.9}
    old = {"model_id": "old", "tasks": {"style": ["a", "b"]}}  # a package from before calibration
    assert review_thresholds(old, LabelConfig()) == {"style": FALLBACK_REVIEW_THRESHOLD}
    assert "artfuse calibrate" in caplog.text
    assert temperatures(old) == {"style": 1.0}


def test_review_threshold_config_takes_auto_or_a_number():
    assert load_config().label.review_threshold == "auto"
    assert load_config(overrides=["label.review_threshold=0.7"]).label.review_threshold == 0.7
    for bad, message in [("abc", "auto or a number"), ("1.5", "between 0 and 1"), ("true", "a number or a string")]:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=[f"label.review_threshold={bad}"])
    with pytest.raises(ConfigError, match="target_accuracy"):
        load_config(overrides=["label.target_accuracy=0"])


def test_a_calibrated_package_rescales_every_prediction_and_keeps_the_labels(tmp_path):
    tiny = ["model.img_size=64", "model.d_model=32", "model.depth=1", "model.pretrained=none"]
    uri = save_untrained_package(str(tmp_path / "model"), load_config(None, tiny), {"label": 6})
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    old = load_package(uri)  # as trained before calibration: temperature 1, the fallback threshold
    before = Predictor(old)(images)["label"]
    fitted = {"tasks": {"label": {"temperature": 0.25, "review_threshold": 0.4}}}
    assert set_calibration(uri, fitted) != old.model_id  # the scores change, so does the id
    new = load_package(uri)
    after = Predictor(new)(images)["label"]
    assert (after.argmax(1) == before.argmax(1)).all()
    assert after == pytest.approx(softmax(np.log(before) / 0.25), abs=1e-5)
    assert review_thresholds(new.meta, LabelConfig()) == {"label": 0.4}
