"""The review queue: predictions that need a person, least confident first, and the decisions taken on them.

One queue per task over the latest prediction of each object: rows with `needs_review` and a prediction for
that task (an input that could not be decoded has nothing to show), sorted by that task's score, then uri.
The order is fixed for the queue's life, so a position in it is a cursor that pages stay valid against; an
object leaves the queue when a decision for it (its uri, or identical bytes elsewhere) is in the corrections
dataset, whoever wrote it: every page first reads the decision files written since the last one.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from artfuse.config import ConfigError, StorageConfig
from artfuse.data import corrections
from artfuse.review.predictions import TOPK_SUFFIX, prediction_tasks


class ReviewQueue:
    def __init__(
        self,
        predictions: pa.Table,
        corrections_uri: str,
        storage_config: StorageConfig | None = None,
        vocabs: dict[str, list[str]] | None = None,
    ):
        self.table = predictions
        self.tasks = prediction_tasks(predictions.schema)
        self.corrections_uri = corrections_uri
        self.storage_config = storage_config
        self.reader = corrections.CorrectionsReader(corrections_uri, storage_config)
        self.uris = predictions["uri"].to_numpy(zero_copy_only=False)
        self.row_of_uri = {u: i for i, u in enumerate(self.uris.tolist())}
        self.rows_of_sha: dict[str, list[int]] = {}
        for i, sha in enumerate(predictions["sha256"].to_pylist()):
            if sha:
                self.rows_of_sha.setdefault(sha, []).append(i)
        self.run_codes, self.runs = _codes(predictions["run_id"])
        needs = predictions["needs_review"].fill_null(False).to_numpy(zero_copy_only=False)
        ok = predictions["error"].is_null().to_numpy(zero_copy_only=False)
        self.order: dict[str, np.ndarray] = {}
        self.label_codes: dict[str, np.ndarray] = {}
        self.labels: dict[str, list[str]] = {}
        self.decided = {task: np.zeros(predictions.num_rows, dtype=bool) for task in self.tasks}
        self.vocabs: dict[str, list[str]] = {}
        for task in self.tasks:
            self.label_codes[task], self.labels[task] = _codes(predictions[task])
            scores = predictions[f"{task}_score"].fill_null(np.inf).to_numpy(zero_copy_only=False)
            rows = np.flatnonzero(needs & ok & predictions[task].is_valid().to_numpy(zero_copy_only=False))
            by_score = np.lexsort((np.arange(len(rows)), scores[rows]))  # rows are sorted by uri already
            self.order[task] = rows[by_score]
            seen = pc.list_flatten(predictions[f"{task}{TOPK_SUFFIX}"]).combine_chunks()
            topk_labels = set(seen.field("label").to_pylist()) if len(seen) else set()
            self.vocabs[task] = sorted((vocabs or {}).get(task) or topk_labels | set(self.labels[task]))
        self._lock = threading.Lock()
        self.sync()

    def sync(self) -> None:
        """Take in the decisions written since the last call, by this process or any other reviewer's."""
        with self._lock:
            new = self.reader.refresh()
        for d in new.select(["uri", "sha256", "task"]).to_pylist():
            self._mark(d["uri"], d["sha256"], d["task"])

    def _mark(self, uri: str, sha256: str | None, task: str) -> None:
        if task not in self.decided:
            return
        rows = list(self.rows_of_sha.get(sha256, ())) if sha256 else []
        if uri in self.row_of_uri:
            rows.append(self.row_of_uri[uri])
        self.decided[task][rows] = True

    def _positions(self, task: str, label: str | None, run: str | None) -> np.ndarray:
        order = self.order[task]
        keep = ~self.decided[task][order]
        if label:
            code = self.labels[task].index(label) if label in self.labels[task] else -2
            keep &= self.label_codes[task][order] == code
        if run:
            keep &= self.run_codes[order] == (self.runs.index(run) if run in self.runs else -2)
        return np.flatnonzero(keep)

    def page(self, task: str, *, label: str | None = None, run: str | None = None, after: int = -1, limit: int = 20):
        """Up to `limit` undecided items after queue position `after`, and how many remain under these filters."""
        self._check_task(task)
        self.sync()
        positions = self._positions(task, label, run)
        chosen = positions[np.searchsorted(positions, after, side="right") :][:limit]
        return {
            "task": task,
            "remaining": int(len(positions)),
            "items": [self.item(int(self.order[task][p]), task, int(p)) for p in chosen],
        }

    def item(self, row: int, task: str, position: int | None = None) -> dict:
        values = self.table.slice(row, 1).select(["uri", "sha256", "run_id", "model_id", task, f"{task}_score"])
        record = values.to_pylist()[0]
        return {
            "position": position,
            "uri": record["uri"],
            "sha256": record["sha256"],
            "run_id": record["run_id"],
            "model_id": record["model_id"],
            "label": record[task],
            "score": record[f"{task}_score"],
            "topk": self.table[f"{task}{TOPK_SUFFIX}"][row].as_py() or [],
        }

    def facets(self, task: str) -> dict:
        """What the filters can choose: the predicted labels and the runs, with how many undecided items each."""
        self._check_task(task)
        self.sync()
        order = self.order[task][~self.decided[task][self.order[task]]]
        label_counts = _counts(self.label_codes[task][order], len(self.labels[task]))
        run_counts = _counts(self.run_codes[order], len(self.runs))
        return {
            "tasks": self.tasks,
            "labels": {label: int(n) for label, n in zip(self.labels[task], label_counts, strict=True) if n},
            "runs": {run: int(n) for run, n in sorted(zip(self.runs, run_counts, strict=True), reverse=True) if n},
            "vocab": self.vocabs[task],
        }

    def decide(self, uri: str, task: str, label: str, reviewer: str) -> dict:
        """Append one decision to the corrections dataset; the object leaves the queue."""
        self._check_task(task)
        if uri not in self.row_of_uri:
            raise ConfigError(f"{uri} is not in the predictions under review")
        if label not in self.vocabs[task]:
            raise ConfigError(f"'{label}' is not a label of task '{task}' (labels: {', '.join(self.vocabs[task])})")
        row = self.row_of_uri[uri]
        record = self.table.slice(row, 1).to_pylist()[0]
        decision = {
            "uri": uri,
            "sha256": record["sha256"],
            "size": record["size"],
            "etag": record["etag"],
            "task": task,
            "label": label,
            "previous_label": record[task],
            "previous_score": record[f"{task}_score"],
            "model_id": record["model_id"],
            "run_id": record["run_id"],
            "reviewer": reviewer or "anonymous",
            "decided_at": datetime.now(UTC),
        }
        corrections.append(self.corrections_uri, [decision], self.storage_config)
        self._mark(uri, record["sha256"], task)
        return decision

    def _check_task(self, task: str) -> None:
        if task not in self.order:
            raise ConfigError(f"unknown task '{task}' (tasks: {', '.join(self.tasks)})")


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Integer codes (-1 for null) and the distinct values of a string column."""
    encoded = pc.dictionary_encode(column.combine_chunks())
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, encoded.dictionary.to_pylist()


def _counts(codes: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(codes[codes >= 0], minlength=n)
