"""Optuna's TPE against random search on the same budget: `artfuse tune` once per search with the same config, seed and
number of trials, each logged to one MLflow SQLite store, then a Markdown table with a row per search, read back from
MLflow (the search's run: trial counts, the best trial's validation figures, its package's test scores).

    python scripts/compare_searches.py --data $ARTFUSE_PAINTINGS/western-genre --out /tmp/searches \
        --config jobs/configs/tune-paintings-cpu.yaml --samples 8

Rerunning with the same --out resumes an unfinished search and only reads a finished one (its minutes are then
those of its last attempt).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SEARCHES = ("random", "optuna")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the collection both searches train on")
    parser.add_argument("--out", required=True, type=Path, help="a folder: <search>/ per search and mlflow.db")
    parser.add_argument("--config", help="the search's config file (artfuse tune --config)")
    parser.add_argument("--samples", type=int, default=8, help="trials per search")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(args.out / 'mlflow.db').resolve()}"
    for search in SEARCHES:
        if (args.out / search / "tune_report.json").exists():
            continue  # finished: read, not run again
        command = [sys.executable, "-m", "artfuse.cli", "tune", "--data", args.data, "--out", str(args.out / search)]
        command += ["--samples", str(args.samples), *(["--config", args.config] if args.config else [])]
        for item in [*args.set, f"tune.search={search}", f"tracking.uri={uri}", "tracking.experiment=searches"]:
            command += ["--set", item]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    print(table(uri, args.out))
    return 0


def table(uri: str, out: Path) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("searches")
    lines = [
        "| search | trials (completed / stopped early) | best val macro-F1 | its val accuracy "
        "| its test accuracy [95 % CI] | its test macro-F1 | minutes (last attempt) |",
        "|---|---|---|---|---|---|---|",
    ]
    for search in SEARCHES:
        (run,) = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`artfuse.job` = 'tune' and tags.`artfuse.search` = '{search}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        m = run.data.metrics
        report = json.loads((out / search / "tune_report.json").read_text())
        low, high = m.get("test_accuracy_ci_low"), m.get("test_accuracy_ci_high")
        ci = f"[{low:.3f}, {high:.3f}]" if low is not None else ""
        lines.append(
            f"| {search} | {m['trials']:.0f} ({m['completed']:.0f} / {m['stopped_early']:.0f}) "
            f"| {m['best_val_macro_f1']:.3f} | {m['best_val_accuracy']:.3f} | {m['test_accuracy']:.3f} {ci} "
            f"| {m['test_macro_f1']:.3f} | {report['duration_s'] / 60:.1f}{' (resumed)' if report['resumed'] else ''} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
