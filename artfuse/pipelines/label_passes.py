"""Recovery inside one label run: the run labels in passes, each a watched Ray Data pipeline (`cluster/watch.py`).

A pass that stalls (nothing moved for `label.stall_timeout_s`, not counting time spent waiting for nodes or for
actors to start) or loses part of the cluster (a node, an actor, blocks) is stopped whole. The next pass labels only
what the output does not hold yet, read back from the output exactly as a rerun would (files cut short set aside),
with an actor pool fitted to the nodes left; up to `label.max_attempts` passes. Each pass and how it ended goes into
the run report (`passes`). When the last pass stalls too, the run fails with LabelStalled, which says to rerun.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pyarrow as pa

from artfuse.cluster.requests import PoolSize
from artfuse.cluster.watch import Outcome
from artfuse.config import LabelConfig

log = logging.getLogger(__name__)


class LabelStalled(RuntimeError):
    """Labelling moved nothing for `label.stall_timeout_s` (or lost part of the cluster) in every pass and was
    stopped; what it wrote stays (a rerun labels the rest)."""


def run_passes(
    todo: pa.Table,
    lc: LabelConfig,
    passes: list[dict],
    start: Callable[[pa.Table], tuple[Outcome, PoolSize]],
    missing: Callable[[], pa.Table],
) -> None:
    """Label `todo` in passes: `start(inputs)` runs one (returning its outcome and pool), `missing()` says what the
    output still lacks of `todo` after a pass was stopped. Appends each pass's record to `passes`; returns once a pass
    completes (or nothing is missing), raises LabelStalled when the passes run out."""
    remaining = todo
    for number in range(1, lc.max_attempts + 1):
        if number > 1:
            remaining = missing()
            if not remaining.num_rows:
                log.info("the stopped pass had written every row: no pass %d", number)
                return
            log.warning("pass %d of at most %d: %d inputs still to label", number, lc.max_attempts, remaining.num_rows)
        outcome, pool = start(remaining)
        passes.append(pass_record(number, remaining.num_rows, pool, outcome))
        if outcome.ended == "complete":
            return
        log.warning("pass %d %s: %s", number, outcome.ended, outcome.cause)
        if outcome.stop_unconfirmed:
            raise LabelStalled(
                f"{stopped(lc, outcome)}, and the stopped pass could not be seen to end ({outcome.stop_unconfirmed}): "
                "no further pass, which could write a row twice. Rerun the same command: it labels only what this "
                "run did not write"
            )
    raise LabelStalled(out_of_passes(lc, passes))


def pass_record(number: int, inputs: int, pool: PoolSize, outcome: Outcome) -> dict:
    """One pass as the run report lists it."""
    return {
        "pass": number,
        "inputs": inputs,
        "actors": {"min": pool.min, "max": pool.max},
        "nodes": outcome.nodes,
        "nodes_lost": outcome.nodes_lost,
        "ended": outcome.ended,  # complete, stalled or lost
        "cause": outcome.cause,
        "rows_through_model": outcome.rows,  # a stopped pass's rows may not all have been written
        "seconds": round(outcome.seconds, 2),
        "waited_s": round(outcome.waited_s, 2),  # without progress, starting or waiting for nodes (not stalled)
    }


def stopped(lc: LabelConfig, outcome: Outcome) -> str:
    if outcome.ended == "stalled":
        return f"labelling moved nothing for {lc.stall_timeout_s:g} s (label.stall_timeout_s) and was stopped"
    return f"labelling lost part of the cluster ({outcome.cause}) and was stopped"


def out_of_passes(lc: LabelConfig, passes: list[dict]) -> str:
    """Why the run failed: how its last pass ended, in how many passes, the nodes lost, and what to do."""
    last = passes[-1]
    outcome = Outcome(ended=last["ended"], cause=last["cause"])
    message = f"{stopped(lc, outcome)}, in each of its {len(passes)} passes (label.max_attempts={lc.max_attempts})"
    if last["ended"] == "stalled":
        message += f"; the last: {last['cause']}"
    lost = sum(p["nodes_lost"] for p in passes)
    if lost:
        message += (
            f". {lost} of the {passes[0]['nodes']} nodes it started on left the cluster meanwhile: the model actors "
            "restarted on the nodes left can hold every CPU there while they wait for blocks lost with the node"
        )
    return f"{message}. Rerun the same command: it labels only what this run did not write"
