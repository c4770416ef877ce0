"""Pause points: a job blocks at a known point, so that a fault test kills it there instead of racing it.

Off unless `pause.point` is set. The job's processes (Train workers, trials, model actors on one machine) count
their passes of the point together, one file a pass in the local folder `pause.dir`; from the `pause.after`-th
pass on, a process writes `paused` there and blocks until a file `release` appears beside it. A kill test waits
for `paused` and kills; a test that wants the job to go on creates `release`. The points:

    epoch   train: rank 0, once an epoch's checkpoint is reported and more epochs remain
    batch   label: a model actor, before it labels a batch (so `after - 1` batches were labelled first)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from artfuse.config import PauseConfig

PAUSED = "paused"
RELEASE = "release"
POLL_S = 0.1


def pause_point(cfg: PauseConfig | None, point: str) -> None:
    """Count one pass of `point`; from the cfg.after-th pass on, block until `release` exists."""
    if cfg is None or cfg.point != point:
        return
    folder = Path(cfg.dir)
    folder.mkdir(parents=True, exist_ok=True)
    if count_pass(folder, point) < cfg.after:
        return
    (folder / PAUSED).touch()
    while not (folder / RELEASE).exists():
        time.sleep(POLL_S)


def count_pass(folder: Path, point: str) -> int:
    """This pass's number (1, 2, ...), unique across processes: the first `<point>.<n>` that this one creates."""
    n = 1
    while True:
        try:
            os.close(os.open(folder / f"{point}.{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return n
        except FileExistsError:
            n += 1
