"""The label job's counters, in the cluster's own monitoring: Ray's metrics API (`ray.util.metrics`) exports them on
each node's Prometheus endpoint beside Ray's own metrics, with Ray's `ray_` prefix (a Counter also gets `_total`):

    ray_artfuse_label_rows_written_total{output}      rows this run wrote (every input's one row)
    ray_artfuse_label_error_rows_total{output}        of those, rows with an `error`
    ray_artfuse_label_review_rows_total{output}       of those, rows flagged `needs_review`
    ray_artfuse_label_passes_total{output}            passes started (more than one: a pass stalled or lost actors)
    ray_artfuse_label_images_per_second{output}       gauge: inputs labelled per second of labelling, so far
    ray_artfuse_label_runs_total{output, end_state}   1 when the run ends: success, finished_with_errors or failed

Counters stay on the endpoint after the job's driver exits (for as long as the cluster lives); the gauge goes with the
driver. Ray refuses to add 0 to a counter, so a run that writes no row leaves no `rows_written` series: "labelled
nothing" is that series' absence. The PromQL and alert rules: cluster/README.md, cluster/label-alerts.yaml.
"""

from __future__ import annotations

import functools
import logging

import ray

log = logging.getLogger(__name__)

END_STATES = ("success", "finished_with_errors", "failed")
# key -> (kind, name, description, tag keys)
METRICS = {
    "rows": ("counter", "artfuse_label_rows_written", "Rows the label run wrote", ("output",)),
    "errors": ("counter", "artfuse_label_error_rows", "Rows the label run wrote with an error", ("output",)),
    "review": ("counter", "artfuse_label_review_rows", "Rows the label run flagged needs_review", ("output",)),
    "passes": ("counter", "artfuse_label_passes", "Passes the label run started", ("output",)),
    "img_s": ("gauge", "artfuse_label_images_per_second", "Inputs labelled per second of labelling", ("output",)),
    "runs": ("counter", "artfuse_label_runs", "Label runs ended, by end state", ("output", "end_state")),
}


def prometheus_names() -> set[str]:
    """The names Prometheus sees: Ray's `ray_` prefix, and `_total` after a counter's."""
    return {f"ray_{name}{'_total' if kind == 'counter' else ''}" for kind, name, _, _ in METRICS.values()}


@functools.cache
def _metrics() -> dict:
    from ray.util.metrics import Counter, Gauge

    kinds = {"counter": Counter, "gauge": Gauge}
    return {key: kinds[kind](name, description, tags) for key, (kind, name, description, tags) in METRICS.items()}


class LabelCounters:
    """One run's counters, tagged with its output; silent where this process is not connected to Ray."""

    def __init__(self, output: str):
        self.tags = {"output": output}

    def pass_started(self) -> None:
        if ray.is_initialized():
            _metrics()["passes"].inc(1, self.tags)
            _metrics()["img_s"].set(0.0, self.tags)

    def throughput(self, img_s: float) -> None:
        if ray.is_initialized():
            _metrics()["img_s"].set(img_s, self.tags)

    def ended(self, end_state: str, rows: int = 0, errors: int = 0, review: int = 0) -> None:
        """The run's end: its rows (a counter takes no 0) and its end state."""
        if end_state not in END_STATES:
            raise ValueError(f"end_state must be one of {END_STATES}; got {end_state!r}")
        if not ray.is_initialized():
            log.debug("not connected to Ray: the run's counters are not exported")
            return
        metrics = _metrics()
        for name, value in (("rows", rows), ("errors", errors), ("review", review)):
            if value:
                metrics[name].inc(value, self.tags)
        metrics["runs"].inc(1, self.tags | {"end_state": end_state})
