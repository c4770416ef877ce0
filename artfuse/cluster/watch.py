"""One pass of a Ray Data pipeline under watch: stopped when it truly stalls, never for waiting.

A pass runs inside a `PassRunner` actor of its own (no CPU, on the driver's node), which then owns every actor and
task the pipeline starts: killing the runner stops the whole pass at once (Ray ends what a dead owner leaves behind).
Ray Data's own stop (`execution_no_progress_timeout_s`) counts every second without output, and cannot be told that
the pipeline is only waiting; this watch can. The model actors tell the runner how many rows they labelled (`tick`)
and the driver polls that count. A poll without new rows is classed with Ray's state API (`ray.util.state`), over
the actors and tasks this pass started:

- an actor placed on a node but not yet ALIVE (its worker starting, imports, loading the package): *starting*;
- where nodes may still join (`cluster.autoscaling`), an actor not placed yet or a task waiting for a node:
  *waiting for nodes*;
- anything else: *no progress*, which counts towards the stall timeout.

Starting and waiting never count towards the stall timeout; a stretch of them longer than `wait_timeout_s` fails the
run naming the wait. After a pass is stopped nothing of it may still write: `stop` waits until every task the pass ran
on a worker has ended or lost its worker, since the next pass reads what the output holds and a late write would
double a row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.util import state as ray_state
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from artfuse.cluster.runtime import alive_node_ids

log = logging.getLogger(__name__)

STARTING = ("DEPENDENCIES_UNREADY", "PENDING_CREATION")  # with a pid: placed, its worker or constructor running
UNPLACED = ("DEPENDENCIES_UNREADY", "PENDING_CREATION", "RESTARTING")  # without a pid (RESTARTING: not placed again)
# A pass that fails with these lost part of the cluster (a node, an actor, blocks): a new pass may finish the work.
LOST = (
    ray.exceptions.RayActorError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.WorkerCrashedError,
)
STATE_LIMIT = 10_000  # rows one state API call returns (its own maximum)
STOP_TIMEOUT_S = 60.0  # how long a stopped pass's tasks may take to end before the run gives up on a next pass
LOG_EVERY_S = 30.0
# A runner whose pass completed, per (job, node): the process's next pass uses it instead of starting one (a runner's
# start, mostly importing torch with the label pipeline, takes seconds).
_IDLE: dict[tuple[str, str], Any] = {}


class WaitedTooLong(RuntimeError):
    """A pass waited longer than `wait_timeout_s` for nodes or for its actors to start."""


class StateUnavailable(RuntimeError):
    """Ray's state API (served by the dashboard) did not answer."""


@dataclass(frozen=True)
class Limits:
    stall_timeout_s: float  # seconds without progress, not waiting, before the pass is stopped; 0 = never
    wait_timeout_s: float  # seconds of one stretch of starting or waiting for nodes before the run fails; 0 = never
    may_grow: bool  # whether nodes may still join: then waiting for them is waiting, not stalling


@dataclass
class Outcome:
    """How a pass ended: `complete` (with `result`), `stalled` or `lost` (with `cause`)."""

    ended: str
    result: Any = None
    cause: str = ""
    rows: int = 0  # rows through the model actors
    seconds: float = 0.0
    waited_s: float = 0.0  # seconds without progress spent starting or waiting for nodes
    nodes: int = 0  # alive nodes when the pass started
    nodes_lost: int = 0  # of those, gone when it ended
    stop_unconfirmed: str = ""  # why a stopped pass could not be seen to end (then no further pass may start)


@ray.remote(num_cpus=0, max_concurrency=4)
class PassRunner:
    """Runs one pass (`run`, in one thread) and counts the rows its model actors report (`tick`, in others)."""

    def __init__(self) -> None:
        self.rows = 0

    def run(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        self.rows = 0
        return fn(*args, progress=ray.get_runtime_context().current_actor, **kwargs)

    def tick(self, rows: int) -> None:
        self.rows += rows

    def progress(self) -> int:
        return self.rows


def run_watched(
    fn: Callable,
    args: tuple,
    kwargs: dict,
    limits: Limits,
    on_progress: Callable[[int, float], None] | None = None,
) -> Outcome:
    """Run `fn(*args, progress=<the runner>, **kwargs)` as one watched pass; `fn` hands `progress` to its model actors,
    which call `progress.tick.remote(rows)` per batch. Returns the pass's outcome (a stopped pass's says whether it
    was seen to end: `stop_unconfirmed`); raises `WaitedTooLong`, and what `fn` raised unless it lost part of the
    cluster. `on_progress(rows, seconds)` is called whenever rows move."""
    job = ray.get_runtime_context().get_job_id()
    known = _known_tasks(job)
    known_actors = _live_actors(job)
    nodes = alive_node_ids()
    here = (job, ray.get_runtime_context().get_node_id())
    runner = (
        _idle_runner(here)
        or PassRunner.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here[1], soft=False)).remote()
    )
    outcome = Outcome(ended="stalled", nodes=len(nodes))
    try:
        _watch(runner, fn, args, kwargs, limits, on_progress, outcome, job, known, known_actors)
    except BaseException:
        stop(runner, job, known, confirm=False)  # the run fails: no further pass to protect
        raise
    if outcome.ended == "complete":
        _IDLE[here] = runner  # nothing of its pass is left: the process's next pass may use it
    else:
        try:
            stop(runner, job, known)
        except StateUnavailable as e:
            outcome.stop_unconfirmed = str(e)
    outcome.nodes_lost = len(nodes - alive_node_ids())
    return outcome


def _watch(runner, fn, args, kwargs, limits: Limits, on_progress, outcome: Outcome, job, known, known_actors) -> None:
    """`run_watched`'s loop: fills in `outcome` until the pass ends or stalls."""
    started = last = logged = time.monotonic()
    idle = waiting = 0.0
    reason_logged, state_warned = "", False
    done_ref = runner.run.remote(fn, args, kwargs)
    probe = runner.progress.remote()
    poll = min(5.0, max(0.5, limits.stall_timeout_s / 20)) if limits.stall_timeout_s else 5.0
    while True:
        finished, _ = ray.wait([done_ref], timeout=poll)
        now = time.monotonic()
        step, last = now - last, now
        outcome.seconds = now - started
        if finished:
            _finished(done_ref, outcome)
            if outcome.ended == "complete":
                outcome.rows = ray.get(runner.progress.remote(), timeout=30)
                if on_progress:
                    on_progress(outcome.rows, outcome.seconds)
            return
        answered, _ = ray.wait([probe], timeout=0)
        if answered:
            try:
                rows = ray.get(answered[0])
            except ray.exceptions.RayError:  # the runner is gone: `done_ref` says how, at the next poll
                rows = outcome.rows
            probe = runner.progress.remote()
            if rows != outcome.rows:
                outcome.rows, idle, waiting, reason_logged = rows, 0.0, 0.0, ""
                if on_progress:
                    on_progress(rows, outcome.seconds)
                if now - logged >= LOG_EVERY_S:
                    log.info("%d rows through the model in %.0f s", rows, outcome.seconds)
                    logged = now
                continue
        try:
            reason = waiting_for(job, known, known_actors, limits.may_grow)
        except StateUnavailable as e:
            if not state_warned:
                log.warning("%s: every second without progress counts towards the stall timeout", e)
                state_warned = True
            reason = ""
        if reason:
            waiting += step
            outcome.waited_s += step
            if reason != reason_logged:
                log.info("no new rows, but not stalled: %s", reason)
                reason_logged = reason
            if limits.wait_timeout_s and waiting >= limits.wait_timeout_s:
                raise WaitedTooLong(
                    f"waited {waiting:.0f} s ({reason}) without a row labelled (label.wait_timeout_s="
                    f"{limits.wait_timeout_s:g}): check that the cluster can still add the nodes the job asks for"
                )
            continue
        idle += step
        if limits.stall_timeout_s and idle >= limits.stall_timeout_s:
            outcome.cause = f"nothing moved for {idle:.0f} s ({describe_pass(job, known, known_actors)})"
            return


def _idle_runner(here: tuple[str, str]):
    """The idle runner kept for this job and node, if there is one and it still answers."""
    runner = _IDLE.pop(here, None)
    if runner is None:
        return None
    try:
        ray.get(runner.progress.remote(), timeout=10)
        return runner
    except ray.exceptions.RayError:
        return None


def _finished(done_ref, outcome: Outcome) -> None:
    try:
        outcome.result = ray.get(done_ref)
        outcome.ended = "complete"
    except Exception as e:  # noqa: BLE001 - sorted below: a lost part of the cluster, or the job's own failure
        lost = _lost(e)
        if lost is None:
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, Exception) else e) from e
        outcome.ended = "lost"
        outcome.cause = f"{type(lost).__name__}: {str(lost).splitlines()[0] if str(lost) else ''}".rstrip(": ")


def _lost(error: BaseException) -> BaseException | None:
    """The error in `error`'s chain (causes and Ray's wrapped causes) that says part of the cluster was lost."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, LOST):
            return error
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return None


def waiting_for(job: str, known: set[str], known_actors: set[str], may_grow: bool) -> str:
    """What this pass waits for, if it waits (empty: nothing, so no progress is a stall): actors of the pass starting,
    or, where nodes may join, its actors or tasks waiting for a node."""
    actors = _pass_actors(job, known_actors)
    starting = [a for a in actors if a.state in STARTING and a.pid]
    if starting:
        return f"{len(starting)} actor{'s' if len(starting) > 1 else ''} starting"
    if not may_grow:
        return ""
    unplaced = [a for a in actors if a.state in UNPLACED]
    if unplaced:
        return f"{len(unplaced)} actor{'s' if len(unplaced) > 1 else ''} waiting for a node to join"
    tasks = _state(ray_state.list_tasks, job, ("state", "=", "PENDING_NODE_ASSIGNMENT"))
    pending = [t for t in tasks if t.task_id not in known]
    if pending:
        return f"{len(pending)} task{'s' if len(pending) > 1 else ''} waiting for a node to join"
    return ""


def describe_pass(job: str, known: set[str], known_actors: set[str]) -> str:
    """The pass's actors and tasks by state, for the stall message (e.g. `2 actors ALIVE, 3 tasks waiting for a
    CPU`)."""
    try:
        actors = _pass_actors(job, known_actors)
        tasks = _state(ray_state.list_tasks, job, ("state", "=", "PENDING_NODE_ASSIGNMENT"))
    except StateUnavailable:
        return "the state of its actors unknown"
    states: dict[str, int] = {}
    for actor in actors:
        states[actor.state] = states.get(actor.state, 0) + 1
    parts = [f"{n} actor{'s' if n > 1 else ''} {state}" for state, n in sorted(states.items())]
    pending = sum(t.task_id not in known for t in tasks)
    parts.append(f"{pending} task{'s' if pending != 1 else ''} waiting for a free node")
    return ", ".join(parts)


def stop(runner, job: str, known: set[str], confirm: bool = True, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Kill the pass's runner (and so everything it owns); with `confirm`, wait until no task of the pass still runs
    on a live worker. Raises StateUnavailable when that cannot be seen within `timeout_s`."""
    ray.kill(runner, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while confirm:
        try:
            busy, error = _still_running(job, known), None
        except StateUnavailable as e:
            busy, error = {"?"}, e
        if not busy:
            return
        if time.monotonic() > deadline:
            raise StateUnavailable(
                f"the stopped pass's tasks did not end within {timeout_s:g} s ({error or f'{len(busy)} still running'})"
            )
        time.sleep(0.5)


def _still_running(job: str, known: set[str]) -> set[str]:
    """The live workers still running a task this pass started."""
    tasks = _state(ray_state.list_tasks, job, ("state", "!=", "FINISHED"))
    workers = {t.worker_id for t in tasks if t.state != "FAILED" and t.worker_id and t.task_id not in known}
    if not workers:
        return set()
    alive = ray_state.list_workers(filters=[("is_alive", "=", True)], limit=STATE_LIMIT, raise_on_missing_output=False)
    return workers & {w.worker_id for w in alive}


def _pass_actors(job: str, known_actors: set[str]) -> list:
    """The actors of this job that are not dead and were not there before the pass."""
    return [a for a in _state(ray_state.list_actors, job, ("state", "!=", "DEAD")) if a.actor_id not in known_actors]


def _known_tasks(job: str) -> set[str]:
    """The tasks of this job not finished before the pass starts (none but in a process that ran other work)."""
    try:
        return {t.task_id for t in _state(ray_state.list_tasks, job, ("state", "!=", "FINISHED"))}
    except StateUnavailable:
        return set()


def _live_actors(job: str) -> set[str]:
    try:
        return {a.actor_id for a in _state(ray_state.list_actors, job, ("state", "!=", "DEAD"))}
    except StateUnavailable:
        return set()


def _state(listing: Callable, job: str, *filters: tuple) -> list:
    try:
        return listing(
            filters=[("job_id", "=", job), *filters], limit=STATE_LIMIT, raise_on_missing_output=False, timeout=30
        )
    except Exception as e:  # noqa: BLE001 - no dashboard, or it did not answer
        raise StateUnavailable(f"Ray's state API did not answer ({type(e).__name__}: {e})") from e
