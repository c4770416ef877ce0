"""The paper's ablation on any collection: every architecture on the same split at the same budget, for N seeds, or
cross-validated over K folds.

Under `--out`:
  <arch>/seed<k>/          the package of that run, plus its record (ablation_run.json) and scores (metrics.json);
                           kept, so each can be evaluated elsewhere
  <arch>/seed<k>/fold<f>/  with --folds: the run that held out fold f (its validation split; data.folds, data.fold)
  _train/<arch>-seed<k>/   its Ray Train checkpoints while it runs (a run killed midway resumes from its last epoch)
  runs.csv                 one row per finished (arch, seed[, fold])
  ablation.md / .json      per architecture: mean and std of accuracy and macro-F1, and the recall of the minority
                           classes, with a 95 % t-interval of the mean over the runs; on the test split (the validation
                           split only chose the best epoch), or with --folds on each run's held fold (which also chose
                           its best epoch; the test split is left out of every fold run, so nothing is chosen on it)

A rerun with the same `--out` skips every finished run, after checking that it was trained on the same collection with
the same configuration apart from the seed and fold, so a long ablation can be run in pieces (`--first-folds N` stops
after the first N folds of every arch: a cross-validation that is cut short still compares like with like). A run's
small files are the whole of what a rerun and `calibrate --out-of-fold` read: ablation_run.json, metrics.json,
artfuse.json and val_logits.npz (a few kB; the weights are not needed), so a folder of them alone, copied to another
machine or committed to git, resumes there; the collection is recognised by its content, not its path.
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
    log_package,
    make_trainer,
    mean_over_tasks,
    prepare_inputs,
    preprocess_for,
)
from artfuse.reporting import tracking
from artfuse.reporting.metrics import mean_interval

log = logging.getLogger(__name__)
ARCHS = CHOICES["model.arch"]
RUN_RECORD = "ablation_run.json"  # in each run's package folder: its row, configuration and collection
METRICS = "metrics.json"  # beside it: the scores the row sums up (the held fold's, the test split's or val's)
SCORES = ("accuracy", "macro_f1")


def ablate(
    data_uri: str,
    out_uri: str,
    cfg: Config,
    archs: tuple[str, ...] = ARCHS,
    seeds: int = 1,
    folds: int = 0,
    first_folds: int | None = None,
) -> dict:
    """Train every arch in `archs` for training seeds train.seed .. train.seed + seeds - 1, and with `folds` = K once
    per fold (the first `first_folds` of them only, when given); returns the summary (also written to ablation.json /
    ablation.md, and each run's row to runs.csv)."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1; got {seeds}")
    if folds == 1 or folds < 0 or (first_folds is not None and not 1 <= first_folds <= max(folds, 1)):
        raise ConfigError(
            f"--folds must be 0 (none) or at least 2, --first-folds 1 .. folds; got {folds}, {first_folds}"
        )
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise ConfigError(f"unknown architecture(s) {unknown}: choose from {', '.join(ARCHS)}")
    # A run per (seed, fold): fold None is the plain split. Fold by fold within a seed, so an ablation stopped early
    # has every architecture at the same folds and seeds.
    plan = [
        (seed, fold)
        for seed in range(cfg.train.seed, cfg.train.seed + seeds)
        for fold in (range(first_folds or folds) if folds else [None])
    ]
    collection = load_collection(data_uri, dataclasses.replace(cfg.data, folds=0), cfg.storage)
    budget = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, folds=folds, fold=0))  # what the table says
    # One MLflow run for the ablation, one nested under it per (arch, seed[, fold]) trained; a rerun logs on to it.
    tags = {"artfuse.fingerprint": collection.fingerprint, "artfuse.data": data_uri, "artfuse.archs": ",".join(archs)}
    parent = tracking.start(
        budget, "ablate", f"ablate {out_uri}", record=storage.join(out_uri, tracking.RECORD), tags=tags
    )
    runs = []
    for seed, fold in plan:
        data_cfg = cfg.data if fold is None else dataclasses.replace(cfg.data, folds=folds, fold=fold)
        run_collection = collection if fold is None else load_collection(data_uri, data_cfg, cfg.storage)
        inputs: TrainInputs | None = None  # decoded once per split, only if some run is still to do
        for arch in archs:
            run_cfg = dataclasses.replace(
                cfg,
                model=dataclasses.replace(cfg.model, arch=arch),
                data=data_cfg,
                train=dataclasses.replace(cfg.train, seed=seed),
            )
            package_uri = storage.join(out_uri, arch, f"seed{seed}", *([] if fold is None else [f"fold{fold}"]))
            record = finished_run(package_uri, run_cfg, run_collection)
            if record:
                log.info("%s seed %d fold %s: finished in an earlier run, skipped", arch, seed, fold)
            else:
                inputs = inputs or prepare_inputs(data_uri, dataclasses.replace(cfg, data=data_cfg))
                record = train_run(inputs, run_cfg, out_uri, package_uri, parent)
            runs.append(record["row"])
            # Rewritten after every run, so a long ablation shows its finished runs while it goes on.
            summary = summarize_runs(runs, collection, data_uri, budget)
            write_outputs(out_uri, runs, summary, cfg)
    for arch, scores in summary["archs"].items():
        parent.log_metrics({f"{arch}.{column}_mean": scores[column]["mean"] for column in SCORES})
    parent.log_files(out_uri, ["ablation.md", "ablation.json", "runs.csv"], cfg)
    parent.end()
    return summary


def train_run(
    inputs: TrainInputs, cfg: Config, out_uri: str, package_uri: str, parent: tracking.Run | None = None
) -> dict:
    arch, seed, fold = cfg.model.arch, cfg.train.seed, cfg.data.fold if cfg.data.folds else None
    started = time.time()
    arch_inputs = dataclasses.replace(inputs, preprocess=preprocess_for(cfg))  # each backbone's mean/std
    runs_uri, name = storage.join(out_uri, "_train"), f"{arch}-seed{seed}" + ("" if fold is None else f"-fold{fold}")
    tags = {"artfuse.arch": arch, "artfuse.seed": seed, "artfuse.fold": fold}
    run = (parent or tracking.Run(None)).child(
        cfg, "ablate_run", name, record=storage.join(runs_uri, name, tracking.RECORD), tags=tags
    )
    with run.failing():
        result = make_trainer(arch_inputs, cfg, runs_uri, name=name, tracking_run=run.ref).fit()
        trained = export_package(result, arch_inputs, cfg, package_uri)
    split = "test" if trained["test"] else "held fold" if fold is not None else "val"
    scores = trained["test"] or read_manifest(package_uri, cfg.storage)["metrics"]
    model = create_model(cfg.model, {t: len(v) for t, v in inputs.vocabs.items()}, load_pretrained=False)
    row = {
        "arch": arch,
        "seed": seed,
        **({} if fold is None else {"fold": fold}),
        "split": split,
        "n": scores["n"],
        **{score: round(mean_over_tasks(scores, score), 4) for score in SCORES},
        "val_accuracy": round(trained["val_accuracy"], 4),
        "best_epoch": trained["best_epoch"],
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "train_img_s": round(statistics.median(trained["train_img_s_by_epoch"]), 1),
        "precision": trained["precision"],
        "minutes": round((time.time() - started) / 60, 1),
        **single_task_interval(scores),  # the run's own 95 % bootstrap interval over its images
        **{
            recall_column(task, label): round(per_class["recall"], 4)
            for task, task_scores in scores["tasks"].items()
            for label, per_class in task_scores["per_class"].items()
        },
    }
    record = {
        "row": row,
        "config": comparable_config(cfg),
        "fingerprint": inputs.collection.fingerprint,
        "content_fingerprint": inputs.collection.content_fingerprint,  # what a copy elsewhere is checked against
    }
    storage.write_bytes(storage.join(package_uri, METRICS), json.dumps(scores, indent=1).encode(), cfg.storage)
    # The record last: a run folder that has it is finished (a rerun skips it), whatever machine the folder is on.
    storage.write_bytes(storage.join(package_uri, RUN_RECORD), json.dumps(record, indent=1).encode(), cfg.storage)
    run.set_tags({"artfuse.split": split})  # what the scores below were measured on: test, held fold or val
    log_package(run, trained | {"test": scores}, package_uri, cfg)
    run.log_files(package_uri, [RUN_RECORD], cfg)
    run.end()
    # Finished and packaged: its checkpoints (weights, EMA and optimiser state; about 150 MB a run at the default
    # budget) are only needed to resume an unfinished run.
    storage.remove_tree(storage.join(runs_uri, name), cfg.storage)
    return record


def single_task_interval(scores: dict) -> dict:
    """accuracy_low / accuracy_high: a one-task run's 95 % bootstrap interval over its images (for a mean over tasks
    it would take each image's answers to every task, which a confusion matrix does not keep)."""
    ci = next(iter(scores["tasks"].values())).get("accuracy_ci") if len(scores["tasks"]) == 1 else None
    return {"accuracy_low": ci[0], "accuracy_high": ci[1]} if ci else {}


def interval(rows: list[dict], column: str) -> list[float] | None:
    """95 %: Student's t for the mean over the runs; for one run, its bootstrap over images (accuracy only)."""
    if len(rows) > 1:
        return mean_interval([row[column] for row in rows])
    if column == "accuracy" and "accuracy_low" in rows[0]:
        return [rows[0]["accuracy_low"], rows[0]["accuracy_high"]]
    return None


def finished_run(package_uri: str, cfg: Config, collection: Collection) -> dict | None:
    """The record of a finished run at `package_uri`, or None; a run made differently is an error, not a skip."""
    path = storage.join(package_uri, RUN_RECORD)
    if not storage.exists(path, cfg.storage):
        return None
    record = json.loads(storage.read_bytes(path, cfg.storage))
    # Records from before content_fingerprint carry the location-bound one only.
    theirs = record.get("content_fingerprint") or record["fingerprint"]
    if theirs not in (collection.content_fingerprint, collection.fingerprint):
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
            "seeds": sorted({row["seed"] for row in rows}),
            **({"folds": sorted({row["fold"] for row in rows})} if "fold" in rows[0] else {}),
            "split": rows[0]["split"],
            # held folds are disjoint: together they hold every image they scored; other runs score one split
            "n": sum(row["n"] for row in rows if row["seed"] == rows[0]["seed"]) if "fold" in rows[0] else rows[0]["n"],
            **{
                column: {
                    "mean": round(statistics.fmean(row[column] for row in rows), 4),
                    "std": round(statistics.stdev(row[column] for row in rows), 4) if len(rows) > 1 else None,
                    "ci": interval(rows, column),
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
        "paired": paired_differences(runs),
        "minutes_total": round(sum(row["minutes"] for row in runs), 1),
        "budget": {"model": to_dict(cfg.model), "data": to_dict(cfg.data), "train": to_dict(cfg.train)},
    }


def paired_differences(runs: list[dict], column: str = "accuracy") -> dict:
    """Per arch after the first: the first arch's `column` minus its own, on each (seed, fold) both have (the same
    held images), with the mean and its 95 % t-interval: the comparison a decision between two archs is made on."""
    archs = list(dict.fromkeys(row["arch"] for row in runs))
    if len(archs) < 2:
        return {}
    first = {(row["seed"], row.get("fold")): row[column] for row in runs if row["arch"] == archs[0]}
    paired = {}
    for arch in archs[1:]:
        theirs = {(row["seed"], row.get("fold")): row[column] for row in runs if row["arch"] == arch}
        shared = sorted(set(first) & set(theirs), key=lambda key: (key[0], key[1] if key[1] is not None else -1))
        differences = [round(first[key] - theirs[key], 4) for key in shared]
        paired[arch] = {
            "against": archs[0],
            "column": column,
            "runs": len(differences),
            "differences": differences,
            "mean": round(statistics.fmean(differences), 4) if differences else None,
            "ci": mean_interval(differences),
        }
    return paired


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
    if d.get("folds"):
        split = (
            f"{d['folds']}-fold cross-validation over the images outside the test split (split seed {d['seed']}, test "
            f"{d['test_fraction']}, left out of every run): each run trains on the other folds"
        )
    else:
        split = f"Split seed {d['seed']} (val {d['val_fraction']}, test {d['test_fraction']}), the same for every run"
    chosen = (
        "Best epoch chosen on each run's held fold, which also gives its figures"
        if d.get("folds")
        else f"Best epoch chosen on val; figures from the {' / '.join(splits)} split"
    )
    lines = [
        f"# Ablation on {summary['data']}",
        "",
        f"{split}; "
        f"{t['epochs']} epochs, batch {t['batch_size']}, {m['img_size']} px, backbone {m['backbone']} "
        f"({m['pretrained']}, frozen to stride {m['freeze_stride']}), fusion {m['fusion']}, d_model {m['d_model']}, "
        f"depth {m['depth']}, branch_loss {m['branch_loss']}. {chosen}: the mean over the runs ± the half-width of "
        "its 95 % t-interval (one run: its "
        f"95 % bootstrap interval over the images). {summary['minutes_total']} min of training in all.",
        "",
    ]
    header = ["arch", "runs", "n", *summary["measured"], "val accuracy", "params (M)", "train img/s", "min/run"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, arch in summary["archs"].items():
        cells = [name, str(arch["runs"]), str(arch["n"])]
        cells += [mean_ci(arch[column]) for column in summary["measured"]]
        cells += [f"{arch['val_accuracy_mean']:.3f}", str(arch["params_m"]), str(arch["train_img_s"])]
        cells.append(str(arch["minutes_per_run"]))
        lines.append("| " + " | ".join(cells) + " |")
    for arch, pair in summary.get("paired", {}).items():
        ci = f" [{pair['ci'][0]:+.3f}, {pair['ci'][1]:+.3f}]" if pair["ci"] else ""
        mean = f"{pair['mean']:+.3f}" if pair["mean"] is not None else "none"
        lines += [
            "",
            f"{pair['against']} - {arch}, {pair['column']}, paired over the {pair['runs']} runs both have (same held "
            f"images): {mean}{ci} (mean, 95 % t-interval); each: {', '.join(f'{d:+.3f}' for d in pair['differences'])}",
        ]
    return "\n".join(lines) + "\n"


def mean_ci(value: dict) -> str:
    """The mean ± its t-interval's half-width (symmetric), or a single run's bootstrap interval [low, high]."""
    mean, ci = value["mean"], value.get("ci")
    if not ci:
        return f"{mean:.3f}"
    if value["std"] is not None:
        return f"{mean:.3f} ± {(ci[1] - ci[0]) / 2:.3f}"
    return f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
