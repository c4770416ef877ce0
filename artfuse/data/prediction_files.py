"""How the label job's Parquet files are named, so that the job (and whoever reads its output) knows them again.

Every file a label run writes is `artfuse-<run_id>_<write id>_<task>-<i>.parquet`, `<run_id>` being
`YYYYMMDDTHHMMSS-<8 hex digits>`. The name is the whole fact: a file named so is ours, whatever it holds.
"""

from __future__ import annotations

import re

from ray.data.datasource import FilenameProvider

OWN_FILE = re.compile(r"^artfuse-(?P<run_id>\d{8}T\d{6}-[0-9a-f]{8})_.+\.parquet$")


def filename_provider(run_id: str) -> FilenameProvider:
    """Ray Data names this run's files `artfuse-<run_id>_...parquet`: the job knows its own files by name."""
    return FilenameProvider(dataset_uuid=f"artfuse-{run_id}", file_format="parquet")


def is_own_file(path: str, run_id: str | None = None) -> bool:
    """Whether `path` is named as the label job names its files (by the run `run_id`, when given)."""
    match = OWN_FILE.match(path.rsplit("/", 1)[-1])
    return bool(match) and (run_id is None or match["run_id"] == run_id)
