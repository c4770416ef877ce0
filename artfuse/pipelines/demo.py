"""`artfuse demo`: the whole pipeline on generated data, locally: samples -> train -> evaluate -> label."""

from __future__ import annotations

import time
from pathlib import Path

from artfuse.config import load_config
from artfuse.data.samples import generate_samples
from artfuse.pipelines.evaluate import evaluate
from artfuse.pipelines.label import label
from artfuse.pipelines.train import train

# Small enough to finish in a few minutes on 2 cores; still the real fusion model on a pretrained backbone.
DEMO_SETTINGS = [
    "model.img_size=128",
    "model.d_model=128",
    "model.depth=2",
    "train.epochs=6",
    "train.batch_size=32",
    "label.batch_size=64",
]


def demo(out_dir: str, overrides: list[str] = (), n_samples: int = 240) -> dict:
    started = time.time()
    out = Path(out_dir).resolve()
    cfg = load_config(None, [*DEMO_SETTINGS, *overrides])
    samples = out / "samples"
    generate_samples(str(samples), n=n_samples, seed=0)
    trained = train(str(samples), str(out / "model"), cfg)
    metrics = evaluate(str(out / "model"), str(samples), cfg, out / "evaluation")
    report = label(str(out / "model"), str(samples), str(out / "predictions"), cfg)
    summary = {
        "held_out_accuracy": round(metrics["tasks"]["label"]["accuracy"], 3),
        "held_out_macro_f1": round(metrics["tasks"]["label"]["macro_f1"], 3),
        "chance": round(1 / len(metrics["tasks"]["label"]["labels"]), 3),
        "rows_written": report["labelled"] + report["errors"],
        "minutes": round((time.time() - started) / 60, 1),
    }
    print("\nartfuse demo finished")
    print(
        f"  held-out accuracy {summary['held_out_accuracy']}, macro-F1 {summary['held_out_macro_f1']}"
        f" (chance {summary['chance']}) on {metrics['n']} images"
    )
    print(f"  predictions: {summary['rows_written']} rows in {out / 'predictions'}")
    print(f"  model package: {out / 'model'} (curves.png, history.json)")
    print(f"  evaluation: {out / 'evaluation'} (metrics.json, confusion_label.png)")
    print(f"  samples: {samples}; took {summary['minutes']} min")
    return summary | {"train": trained, "label": report}
