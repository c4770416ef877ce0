"""Similar works: the nearest artworks by cosine similarity of the model's embeddings (`label.embeddings=true`).

Exact search by one matrix product over every embedding (numpy). `scripts/similar_bench.py` measures how its
queries per second fall with the number of artworks; docs/measurements.md gives the figures and where they
stop being fine.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from artfuse.config import Config, ConfigError
from artfuse.data import storage
from artfuse.review.predictions import load_latest, prediction_tasks


class NearestNeighbours:
    """Exact cosine nearest neighbours over rows of `embeddings` (N x D); rows without one are never returned."""

    def __init__(self, embeddings: np.ndarray, present: np.ndarray | None = None):
        vectors = np.asarray(embeddings, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self.present = (norms[:, 0] > 0) if present is None else (present & (norms[:, 0] > 0))
        self.absent = np.flatnonzero(~self.present)
        self.vectors = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)

    @classmethod
    def from_column(cls, column: pa.ChunkedArray | pa.Array) -> NearestNeighbours:
        """From a predictions table's `embedding` column (fixed-size lists of float16; null where an error)."""
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        present = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        dim = column.type.list_size
        flat = column.flatten().to_numpy(zero_copy_only=False)  # nulls hold no values: place the rows that exist
        vectors = np.zeros((len(column), dim), dtype=np.float32)
        vectors[present] = flat.reshape(-1, dim)
        return cls(vectors, present)

    def query(self, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The `k` rows most similar to row `row` (itself excluded), most similar first, and their similarities."""
        if not self.present[row]:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        similarity = self.vectors @ self.vectors[row]
        similarity[self.absent] = -np.inf
        similarity[row] = -np.inf
        k = min(k, int(self.present.sum()) - 1)
        if k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        nearest = np.argpartition(-similarity, k - 1)[:k]
        nearest = nearest[np.argsort(-similarity[nearest], kind="stable")]
        return nearest, similarity[nearest]


def similar(predictions_uri: str, uri: str, k: int, cfg: Config) -> dict:
    """The `k` artworks of a predictions dataset nearest to the one at `uri`, with their predicted labels."""
    table = load_latest(predictions_uri, cfg.storage, embeddings="required")
    wanted = storage.canonical_uri(uri)
    uris = table["uri"].to_pylist()
    if wanted not in uris:
        raise ConfigError(f"{uri} is not in the predictions at {predictions_uri}: give the uri of a labelled object")
    row = uris.index(wanted)
    index = NearestNeighbours.from_column(table["embedding"])
    if not index.present[row]:
        raise ConfigError(f"{uri} has no embedding (its prediction row is an error: {table['error'][row].as_py()})")
    tasks = prediction_tasks(table.schema)
    rows, similarity = index.query(row, k)
    return {
        "uri": wanted,
        **{task: table[task][row].as_py() for task in tasks},
        "neighbours": [
            {"uri": uris[r], "similarity": round(float(s), 4), **{task: table[task][r].as_py() for task in tasks}}
            for r, s in zip(rows.tolist(), similarity.tolist(), strict=True)
        ],
    }
