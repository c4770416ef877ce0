"""Recovery inside one label run, without a cluster: how passes follow one another, what the report lists, when the
run gives up and what it says; and which failures of a pass count as a lost part of the cluster."""

from __future__ import annotations

import pyarrow as pa
import pytest
import ray

from artfuse.cluster.requests import PoolSize
from artfuse.cluster.watch import Outcome, _lost
from artfuse.config import load_config
from artfuse.pipelines.label_passes import LabelStalled, run_passes

POOL = PoolSize(min=1, max=2, initial=2)


def inputs(n: int) -> pa.Table:
    return pa.table({"uri": [f"s3://a/{i:03}.jpg" for i in range(n)], "etag": ["e"] * n, "size": [1] * n})


class Night:
    """Stand-in passes: each call to `start` ends as the next outcome says; `missing` gives what is left."""

    def __init__(self, outcomes: list[Outcome], left: list[int]):
        self.outcomes, self.left, self.started = outcomes, left, []

    def start(self, todo: pa.Table) -> tuple[Outcome, PoolSize]:
        self.started.append(todo.num_rows)
        return self.outcomes.pop(0), POOL

    def missing(self) -> pa.Table:
        return inputs(self.left.pop(0))


def test_a_stalled_pass_is_followed_by_one_on_what_is_missing():
    lc = load_config(None, []).label
    stalled = Outcome(ended="stalled", cause="nothing moved for 900 s (2 actors ALIVE)", nodes=2, nodes_lost=1)
    night = Night([stalled, Outcome(ended="complete", rows=40, nodes=1)], left=[40])
    passes: list[dict] = []
    run_passes(inputs(96), lc, passes, night.start, night.missing)
    assert night.started == [96, 40]
    assert [(p["pass"], p["inputs"], p["ended"], p["nodes_lost"]) for p in passes] == [
        (1, 96, "stalled", 1),
        (2, 40, "complete", 0),
    ]
    assert passes[0]["cause"].startswith("nothing moved") and passes[1]["actors"] == {"min": 1, "max": 2}


def test_no_further_pass_when_the_stopped_one_wrote_everything():
    lc = load_config(None, []).label
    night = Night([Outcome(ended="lost", cause="ActorDiedError: gone")], left=[0])
    passes: list[dict] = []
    run_passes(inputs(8), lc, passes, night.start, night.missing)
    assert night.started == [8] and [p["ended"] for p in passes] == ["lost"]


def test_when_every_pass_stalls_the_run_fails_naming_the_setting_and_saying_to_rerun():
    lc = load_config(None, ["label.stall_timeout_s=15", "label.max_attempts=3"]).label
    outcomes = [Outcome(ended="stalled", cause=f"nothing moved for 15 s ({i})", nodes=2 - bool(i)) for i in range(3)]
    outcomes[0].nodes_lost = 1
    night = Night(outcomes, left=[50, 50])
    passes: list[dict] = []
    with pytest.raises(LabelStalled) as stopped:
        run_passes(inputs(96), lc, passes, night.start, night.missing)
    message = str(stopped.value)
    assert message.startswith("labelling moved nothing for 15 s (label.stall_timeout_s) and was stopped")
    assert (
        "in each of its 3 passes (label.max_attempts=3)" in message
        and "the last: nothing moved for 15 s (2)" in message
    )
    assert "1 of the 2 nodes it started on left the cluster" in message and "Rerun the same command" in message
    assert len(passes) == 3 and night.started == [96, 50, 50]


def test_a_stopped_pass_not_seen_to_end_gets_no_successor():
    """A second pass beside a first one still writing could write a row twice: the run stops instead."""
    lc = load_config(None, []).label
    unseen = Outcome(ended="stalled", cause="nothing moved", stop_unconfirmed="Ray's state API did not answer")
    night = Night([unseen], left=[10])
    with pytest.raises(LabelStalled, match="could not be seen to end .*state API.* no further pass"):
        run_passes(inputs(10), lc, [], night.start, night.missing)
    assert night.started == [10] and night.left == [10]


def test_lost_nodes_and_actors_are_told_from_the_jobs_own_errors():
    died = ray.exceptions.ActorDiedError()
    wrapped = ray.exceptions.RayTaskError("run", "traceback", died)
    assert _lost(wrapped) is died
    try:
        try:
            raise ray.exceptions.ObjectLostError("ab" * 14, "owner", "call site")
        except ray.exceptions.RayError as e:
            raise RuntimeError("Ray Data: a block could not be rebuilt") from e
    except RuntimeError as chained:
        assert isinstance(_lost(chained), ray.exceptions.ObjectLostError)
    assert _lost(ValueError("a bad image setting")) is None
    assert _lost(ray.exceptions.RayTaskError("run", "traceback", KeyError("x"))) is None
