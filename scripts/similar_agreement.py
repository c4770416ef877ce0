"""Do similar works share a label? For random held-out images of a labelled collection, the share of their k nearest
neighbours (artfuse.review.neighbours, over every image of the predictions) whose true label is the image's own,
beside the share a random pick of k other images would give.

    python scripts/similar_agreement.py --predictions P --data COLLECTION --model PACKAGE [--queries 20] [-k 5]

P is `artfuse label --set label.embeddings=true` over COLLECTION with PACKAGE; queries come from the validation split
PACKAGE was trained with (images it never learned from), neighbours from the whole collection.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from artfuse.config import load_config
from artfuse.data.catalog import load_collection
from artfuse.models.package import read_manifest
from artfuse.pipelines.evaluate import trained_split
from artfuse.review.neighbours import NearestNeighbours
from artfuse.review.predictions import load_latest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--predictions", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = load_config()
    training = read_manifest(args.model)["training"]
    collection = load_collection(args.data, trained_split(cfg.data, training, cfg.data.tasks))
    task = collection.tasks[0]
    truth = dict(zip(collection.table["uri"].to_pylist(), collection.table[task].to_pylist(), strict=True))
    held_out = collection.subset("val")["uri"].to_pylist()

    table = load_latest(args.predictions, embeddings="required")
    uris = table["uri"].to_pylist()
    index = NearestNeighbours.from_column(table["embedding"])
    labels = np.array([truth.get(u) for u in uris], dtype=object)
    candidates = [uris.index(u) for u in held_out if u in truth and index.present[uris.index(u)]]
    rows = np.random.default_rng(args.seed).choice(candidates, size=min(args.queries, len(candidates)), replace=False)
    known = index.present & (labels != None)  # noqa: E711 - elementwise over an object array
    results = []
    for row in rows.tolist():
        nearest, _ = index.query(row, args.k)
        same = float(np.mean(labels[nearest] == labels[row]))
        others = known.copy()
        others[row] = False
        chance = float(np.mean(labels[others] == labels[row]))
        results.append({"uri": uris[row], "label": labels[row], "same_label_share": same, "chance": round(chance, 3)})
    print(json.dumps(results, indent=1))
    print(
        json.dumps(
            {
                "queries": len(results),
                "k": args.k,
                "mean_same_label_share": round(float(np.mean([r["same_label_share"] for r in results])), 3),
                "mean_chance": round(float(np.mean([r["chance"] for r in results])), 3),
                "top1_prediction_accuracy_of_queries": round(
                    float(np.mean([table[task][uris.index(r["uri"])].as_py() == r["label"] for r in results])), 3
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
