"""The paper's ablation on any collection: every architecture on the same split at the same budget, for N seeds.

Under `--out`:
  <arch>/seed<k>/          the package of that run (plus ablation_run.json); kept, so each can be evaluated elsewhere
  _train/<arch>-seed<k>/   its Ray Train checkpoints while it runs (a run killed midway resumes from its last epoch)
  runs.csv                 one row per finished (arch, seed)
  ablation.md / .json      per architecture: mean and std of accuracy and macro-F1, and the recall of the minority
                           classes, on the test split (the validation split only chose the best epoch)

A rerun with the same `--out` skips every finished (arch, seed) run, after checking that it was trained on the same
collection with the same configuration apart from the seed, so a long ablation can be run in pieces.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import statistics
import time
from collections import Counter

from artfuse.config import CHOICES, Config, ConfigError, to_dict
from artfuse.data import storage
from artfuse.data.catalog import Collection, load_collection
from artfuse.models import create_model
from artfuse.models.package import read_manifest
from artfuse.pipelines.train import (
    TrainInputs,
    export_package,
    make_trainer,
    mean_over_tasks,
    prepare_inputs,
    preprocess_for,
)

log = logging.getLogger(__name__)
ARCHS = CHOICES["model.arch"]
RUN_RECORD = "ablation_run.json"  # in each run's package folder: its row, configuration and collection
SCORES = ("accuracy", "macro_f1")


def ablate(data_uri: str, out_uri: str, cfg: Config, archs: tuple[str, ...] = ARCHS, seeds: int = 1) -> dict:
    """Train every arch in `archs` for training seeds train.seed .. train.seed + seeds - 1; returns the summary
    (also written to ablation.json / ablation.md, and each run's row to runs.csv)."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1; got {seeds}")
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise ConfigError(f"unknown architecture(s) {unknown}: choose from {', '.join(ARCHS)}")
    collection = load_collection(data_uri, cfg.data, cfg.storage)
    inputs: TrainInputs | None = None  # decoded once, only if some run is still to do, then shared by every run
    runs = []
    # Seed by seed, so an ablation stopped early has every architecture at the same number of seeds.
    for seed in range(cfg.train.seed, cfg.train.seed + seeds):
        for arch in archs:
            run_cfg = dataclasses.replace(
                cfg,
                model=dataclasses.replace(cfg.model, arch=arch),
                train=dataclasses.replace(cfg.train, seed=seed),
            )
            package_uri = storage.join(out_uri, arch, f"seed{seed}")
            record = finished_run(package_uri, run_cfg, collection)
            if record:
                log.info("%s seed %d: finished in an earlier run, skipped", arch, seed)
            else:
                inputs = inputs or prepare_inputs(data_uri, cfg)
                record = train_run(inputs, run_cfg, out_uri, package_uri)
            runs.append(record["row"])
            # Rewritten after every run, so a long ablation shows its finished runs while it goes on.
            summary = summarize_runs(runs, collection, data_uri, cfg)
            write_outputs(out_uri, runs, summary, cfg)
    return summary


def train_run(inputs: TrainInputs, cfg: Config, out_uri: str, package_uri: str) -> dict:
    arch, seed = cfg.model.arch, cfg.train.seed
    started = time.time()
    arch_inputs = dataclasses.replace(inputs, preprocess=preprocess_for(cfg))  # each backbone's mean/std
    runs_uri, name = storage.join(out_uri, "_train"), f"{arch}-seed{seed}"
    result = make_trainer(arch_inputs, cfg, runs_uri, name=name).fit()
    trained = export_package(result, arch_inputs, cfg, package_uri)
    split = "test" if trained["test"] else "val"
    scores = trained["test"] or read_manifest(package_uri, cfg.storage)["metrics"]
    model = create_model(cfg.model, {t: len(v) for t, v in inputs.vocabs.items()}, load_pretrained=False)
    row = {
        "arch": arch,
        "seed": seed,
        "split": split,
        "n": scores["n"],
        **{score: round(mean_over_tasks(scores, score), 4) for score in SCORES},
        "val_accuracy": round(trained["val_accuracy"], 4),
        "best_epoch": trained["best_epoch"],
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "train_img_s": round(statistics.median(trained["train_img_s_by_epoch"]), 1),
        "minutes": round((time.time() - started) / 60, 1),
        **{
            recall_column(task, label): round(per_class["recall"], 4)
            for task, task_scores in scores["tasks"].items()
            for label, per_class in task_scores["per_class"].items()
        },
    }
    record = {"row": row, "config": comparable_config(cfg), "fingerprint": inputs.collection.fingerprint}
    storage.write_bytes(storage.join(package_uri, RUN_RECORD), json.dumps(record, indent=1).encode(), cfg.storage)
    # Finished and packaged: its checkpoints (weights, EMA and optimiser state; about 150 MB a run at the default
    # budget) are only needed to resume an unfinished run.
    storage.remove_tree(storage.join(runs_uri, name), cfg.storage)
    return record


def finished_run(package_uri: str, cfg: Config, collection: Collection) -> dict | None:
    """The record of a finished run at `package_uri`, or None; a run made differently is an error, not a skip."""
    path = storage.join(package_uri, RUN_RECORD)
    if not storage.exists(path, cfg.storage):
        return None
    record = json.loads(storage.read_bytes(path, cfg.storage))
    if record["fingerprint"] != collection.fingerprint:
        raise ConfigError(f"{package_uri} was trained on another collection (or a changed one): use a new --out")
    if record["config"] != comparable_config(cfg):
        theirs, ours = record["config"], comparable_config(cfg)
        changed = sorted(
            f"{section}.{key}"
            for section in ours
            for key in ours[section]
            if theirs.get(section, {}).get(key) != ours[section][key]
        )
        raise ConfigError(
            f"{package_uri} was trained with other settings ({', '.join(changed)}): use a new --out for a new budget"
        )
    return record


def comparable_config(cfg: Config) -> dict:
    """What makes two runs of one (arch, seed) the same run: the model, data and training settings."""
    return {"model": to_dict(cfg.model), "data": to_dict(cfg.data), "train": to_dict(cfg.train)}


def recall_column(task: str, label: str) -> str:
    return f"recall[{task}={label}]"


def minority_columns(collection: Collection) -> list[str]:
    """Recall columns of each task's minority classes: fewer training images than the task's mean per class (the
    smallest class where all are equal)."""
    columns = []
    train = collection.subset("train")
    for task in collection.tasks:
        counts = Counter(train.column(task).to_pylist())
        mean = statistics.fmean(counts.values())
        minority = sorted(label for label, n in counts.items() if n < mean) or [min(sorted(counts), key=counts.get)]
        columns += [recall_column(task, label) for label in minority]
    return columns


def summarize_runs(runs: list[dict], collection: Collection, data_uri: str, cfg: Config) -> dict:
    """Per arch: runs, mean and sample std of each score and minority-class recall, parameters, speed, minutes."""
    measured = [*SCORES, *minority_columns(collection)]
    archs = {}
    for arch in dict.fromkeys(row["arch"] for row in runs):
        rows = [row for row in runs if row["arch"] == arch]
        archs[arch] = {
            "runs": len(rows),
            "seeds": [row["seed"] for row in rows],
            "split": rows[0]["split"],
            "n": rows[0]["n"],
            **{
                column: {
                    "mean": round(statistics.fmean(row[column] for row in rows), 4),
                    "std": round(statistics.stdev(row[column] for row in rows), 4) if len(rows) > 1 else None,
                }
                for column in measured
            },
            "val_accuracy_mean": round(statistics.fmean(row["val_accuracy"] for row in rows), 4),
            "params_m": rows[0]["params_m"],
            "train_img_s": round(statistics.median(row["train_img_s"] for row in rows), 1),
            "minutes_per_run": round(statistics.fmean(row["minutes"] for row in rows), 1),
        }
    return {
        "data": data_uri,
        "measured": measured,
        "archs": archs,
        "minutes_total": round(sum(row["minutes"] for row in runs), 1),
        "budget": {"model": to_dict(cfg.model), "data": to_dict(cfg.data), "train": to_dict(cfg.train)},
    }


def write_outputs(out_uri: str, runs: list[dict], summary: dict, cfg: Config) -> None:
    files = {
        "runs.csv": to_csv(runs),
        "ablation.json": json.dumps(summary, indent=1),
        "ablation.md": to_markdown(summary),
    }
    for name, text in files.items():
        storage.write_bytes(storage.join(out_uri, name), text.encode(), cfg.storage)


def to_csv(runs: list[dict]) -> str:
    columns = list(dict.fromkeys(column for row in runs for column in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(runs)
    return buffer.getvalue()


def to_markdown(summary: dict) -> str:
    m, d, t = (summary["budget"][section] for section in ("model", "data", "train"))
    splits = sorted({arch["split"] for arch in summary["archs"].values()})
    lines = [
        f"# Ablation on {summary['data']}",
        "",
        f"Split seed {d['seed']} (val {d['val_fraction']}, test {d['test_fraction']}), the same for every run; "
        f"{t['epochs']} epochs, batch {t['batch_size']}, {m['img_size']} px, backbone {m['backbone']} "
        f"({m['pretrained']}, frozen to stride {m['freeze_stride']}), fusion {m['fusion']}, d_model {m['d_model']}, "
        f"depth {m['depth']}, branch_loss {m['branch_loss']}. Best epoch chosen on val; figures from the "
        f"{' / '.join(splits)} split, mean ± sample "
        f"std over the seeds. {summary['minutes_total']} min of training in all.",
        "",
    ]
    header = ["arch", "seeds", "n", *summary["measured"], "val accuracy", "params (M)", "train img/s", "min/run"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, arch in summary["archs"].items():
        cells = [name, str(arch["runs"]), str(arch["n"])]
        cells += [mean_std(arch[column]) for column in summary["measured"]]
        cells += [f"{arch['val_accuracy_mean']:.3f}", str(arch["params_m"]), str(arch["train_img_s"])]
        cells.append(str(arch["minutes_per_run"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mean_std(value: dict) -> str:
    return f"{value['mean']:.3f}" + (f" ± {value['std']:.3f}" if value["std"] is not None else "")
