"""Give a stopped Tune trial's Ray Train placement group back to the cluster.

When Tune stops a trial (ASHA, or the last epoch reached), it ends the trial's process and with it the Ray Train
controller, before the controller can remove the placement group that holds its workers' CPUs and GPUs. Ray frees
such a group only when the whole job ends, or through Ray Train's PlacementGroupCleaner. With the dashboard on,
that cleaner still left the groups of stopped trials in place on 2 cores (a clean-clone CI rehearsal on 2026-12-02:
the ASHA test stalled with 1.5 of 2 CPUs held by placement groups and a trial waiting for 1), so a search stalls once
they add up. So the controller
records its group's id beside the trial's checkpoints, and the Tune driver removes that group once the trial's
process has had time to go (removing it under a live controller would only make it start a new worker group).
"""

from __future__ import annotations

import time

import ray
from ray import tune

# Private Ray APIs, deliberately: Ray Train V2 offers no public hook on its worker group (WorkerGroupCallback) and
# no public way to name a placement group by id (PlacementGroupID); without them stopped Tune trials keep their CPUs.
from ray._raylet import PlacementGroupID
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from artfuse.config import StorageConfig
from artfuse.data import storage

RECORD = "placement_group.txt"
SETTLE_S = 1.0  # after a trial ends, before its group is removed: Tune stops the trial's process meanwhile
WATCH_S = 120.0  # keep removing whatever group an ended trial records for this long, in case a restart made one
SWEEP_EVERY_S = 1.0


def record_uri(runs_uri: str, trial_id: str) -> str:
    return storage.join(runs_uri, trial_id, RECORD)


class RecordPlacementGroup(WorkerGroupCallback):
    """Runs in the Ray Train controller (an internal callback, which RunConfig.callbacks accepts for workarounds)."""

    def __init__(self, uri: str, storage_config: StorageConfig):
        self.uri = uri
        self.storage_config = storage_config

    def after_worker_group_start(self, worker_group) -> None:
        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        storage.write_bytes(self.uri, pg.id.hex().encode(), self.storage_config)


def release(uri: str, storage_config: StorageConfig) -> bool:
    """Remove the placement group recorded at `uri` if it still exists; True when one was removed."""
    if not storage.exists(uri, storage_config):
        return False
    pg = PlacementGroup(PlacementGroupID.from_hex(storage.read_bytes(uri, storage_config).decode().strip()))
    if placement_group_table(pg).get("state") in (None, "REMOVED"):
        return False
    remove_placement_group(pg)
    return True


class ReleasePlacementGroups(tune.Callback):
    """Runs in the Tune driver: removes an ended trial's group SETTLE_S after it ends, and any later one."""

    def __init__(self, runs_uri: str, storage_config: StorageConfig):
        self.runs_uri = runs_uri
        self.storage_config = storage_config
        self._ended: dict[str, float] = {}
        self._last_sweep = 0.0

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended[trial.trial_id] = time.monotonic()

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended[trial.trial_id] = time.monotonic()

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        now = time.monotonic()
        if now - self._last_sweep < SWEEP_EVERY_S:
            return
        self._last_sweep = now
        for trial_id, ended in list(self._ended.items()):
            if now - ended >= SETTLE_S:
                release(record_uri(self.runs_uri, trial_id), self.storage_config)
            if now - ended > WATCH_S:
                del self._ended[trial_id]

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment; timings belong to this driver process only.
        return {"runs_uri": self.runs_uri, "storage_config": self.storage_config}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["runs_uri"], state["storage_config"])


def release_all(runs_uri: str, trial_ids: list[str], storage_config: StorageConfig) -> int:
    """After the search: every trial's process is gone, so every recorded group can go. Returns how many."""
    if not ray.is_initialized():
        return 0
    return sum(release(record_uri(runs_uri, trial_id), storage_config) for trial_id in trial_ids)
