"""How calibration holds on data it was not fitted on: the package's validation split cut in two halves; the
temperature and review threshold are fitted on one half and measured on the other, both ways, and the two held-out
halves pooled (the package's own fit uses the whole split, so `evaluate` on that split is in-sample).

    python scripts/calibration_crossfit.py --model /tmp/cal-chinese-genre --data $ARTFUSE_PAINTINGS/chinese-genre

Prints JSON per task: ECE before and after on the held-out halves, and the share auto-accepted there with the
accuracy it reaches, next to the in-sample figures of the fit on the whole split.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from artfuse.config import load_config
from artfuse.models.calibration import fit_task, logits_from_probabilities, softmax, temperatures
from artfuse.pipelines.evaluate import score
from artfuse.reporting.calibration import expected_calibration_error


def crossfit(logits: np.ndarray, labels: np.ndarray, target_accuracy: float, seed: int) -> dict:
    order = np.random.default_rng(seed).permutation(len(labels))
    halves = (order[: len(order) // 2], order[len(order) // 2 :])
    raw_conf, conf, correct, accepted = [], [], [], []
    for fit_on, measure_on in (halves, halves[::-1]):
        fit = fit_task(logits[fit_on], labels[fit_on], target_accuracy)
        calibrated = softmax(logits[measure_on], fit["temperature"])
        right = calibrated.argmax(1) == labels[measure_on]
        threshold = np.inf if fit["review_threshold"] is None else fit["review_threshold"]
        raw_conf.append(softmax(logits[measure_on]).max(1))
        conf.append(calibrated.max(1))
        correct.append(right)
        accepted.append(calibrated.max(1) >= threshold)
    raw_conf, conf, correct, accepted = map(np.concatenate, (raw_conf, conf, correct, accepted))
    return {
        "n": len(labels),
        "ece_uncalibrated": expected_calibration_error(raw_conf, correct),
        "ece": expected_calibration_error(conf, correct),
        "accepted_share": float(accepted.mean()),
        "accepted_accuracy": float(correct[accepted].mean()) if accepted.any() else None,
        "accuracy": float(correct.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(None, args.set)
    scored = score(args.model, args.data, cfg, held_out="val")  # the split calibration is fitted on
    temperature = temperatures(scored.manifest)
    result = {}
    for task in scored.manifest["tasks"]:
        known = scored.truth[task] >= 0
        logits = logits_from_probabilities(scored.probabilities[task][known], temperature[task])
        labels = scored.truth[task][known]
        result[task] = {
            "in_sample": fit_task(logits, labels, cfg.label.target_accuracy),
            "held_out_halves": crossfit(logits, labels, cfg.label.target_accuracy, args.seed),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
