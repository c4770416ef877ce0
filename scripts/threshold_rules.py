"""The review threshold fitted by each rule (label.threshold_rule: point, wilson) on a package's validation logits
(val_logits.npz, written by training; under `ablate --folds`, the held fold's), then measured on its test split,
which chose nothing: the share of predictions accepted and their accuracy, with a 95 % bootstrap interval.

    python scripts/threshold_rules.py --model /tmp/folds/fusion/seed0/fold0 \
        --data ../shared/data/paintings/chinese-genre

The temperature is the package's own (fitted on the same validation logits); only the threshold differs by rule.
"""

from __future__ import annotations

import argparse
import io
import json

import numpy as np

from artfuse.config import load_config
from artfuse.data import storage
from artfuse.models.calibration import fit_task
from artfuse.pipelines.evaluate import score
from artfuse.pipelines.train import VAL_LOGITS
from artfuse.reporting.calibration import accepted_accuracy
from artfuse.reporting.metrics import accuracy_interval

RULES = ("point", "wilson")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(None, args.set)
    held = np.load(io.BytesIO(storage.read_bytes(storage.join(args.model, VAL_LOGITS), cfg.storage)))
    tested = score(args.model, args.data, cfg, held_out="test")  # probabilities at the package's temperature
    assert tested.split == "test", f"{args.model} has no test split to measure on"
    result = {}
    for task in tested.manifest["tasks"]:
        logits, labels = held[f"logits/{task}"], held[f"labels/{task}"]
        known = tested.truth[task] >= 0
        confidence = tested.probabilities[task][known].max(1)
        correct = tested.probabilities[task][known].argmax(1) == tested.truth[task][known]
        result[task] = {"fitted_on": len(labels), "test_n": int(known.sum()), "test_accuracy": float(correct.mean())}
        for rule in RULES:
            fit = fit_task(logits, labels, cfg.label.target_accuracy, rule)
            threshold = np.inf if fit["review_threshold"] is None else fit["review_threshold"]
            on_test = accepted_accuracy(confidence, correct, threshold)
            n_accepted = int((confidence >= threshold).sum())
            result[task][rule] = {
                "threshold": fit["review_threshold"],
                "fit_accepted_share": round(fit["accepted_share"], 3),
                "fit_accepted_accuracy": fit["accepted_accuracy"] and round(fit["accepted_accuracy"], 3),
                "test_accepted_share": round(on_test["coverage"], 3),
                "test_accepted": n_accepted,
                "test_accepted_accuracy": on_test["accuracy"] and round(on_test["accuracy"], 3),
                "test_accepted_accuracy_ci": accuracy_interval(int(correct[confidence >= threshold].sum()), n_accepted),
            }
        # the same logits give the package's own temperature: the thresholds apply to its probabilities
        result[task]["temperature"] = {"package": temperature_of(tested.manifest, task), "refit": fit["temperature"]}
    print(json.dumps(result, indent=1))


def temperature_of(manifest: dict, task: str) -> float:
    return float(manifest.get("calibration", {}).get("tasks", {}).get(task, {}).get("temperature", 1.0))


if __name__ == "__main__":
    main()
