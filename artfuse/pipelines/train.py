"""Fine-tune a model package on a labelled collection with Ray Train.

The driver builds the Ray Datasets (decoded once, materialised; augmented by a Ray Data stage each epoch)
and a `TorchTrainer`; `train_loop` runs on every worker and reads top to bottom: restore, then per epoch
set the learning rate, forward/backward, clip, step, validate, checkpoint. Checkpoints go to
`<out>/_train/`; rerunning with the same `--out` resumes from the latest one, and the best epoch
(validation macro-F1) becomes the package at `<out>`, with a temperature and review threshold per task
fitted on the validation split (models/calibration.py). The test split never reaches the workers: the driver
scores the package on it once, after the best epoch is chosen.
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray.train
import torch
from ray.experimental.tqdm_ray import tqdm
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from timm.utils import ModelEmaV3

from artfuse.cluster.requests import check_train
from artfuse.cluster.runtime import ensure_ray, node_cpus
from artfuse.config import Config, ConfigError, to_dict
from artfuse.data import corrections, stages, storage
from artfuse.data.catalog import Collection, load_collection
from artfuse.data.mixing import mix_batch, mixed_loss
from artfuse.data.preprocess import Preprocess
from artfuse.models import create_model, data_config
from artfuse.models.calibration import dataset_logits, fit_calibration
from artfuse.models.fusion import BRANCHES
from artfuse.models.package import MANIFEST, WEIGHTS, save_package
from artfuse.models.predict import keep_freed_memory, native_cpu_bf16
from artfuse.pipelines.pause import pause_point
from artfuse.reporting import tracking
from artfuse.reporting.metrics import confusion_matrix, summarize
from artfuse.reporting.plots import plot_history

log = logging.getLogger(__name__)
DECODE_ROWS_PER_TASK = 32
VAL_LOGITS = "val_logits.npz"  # in the package folder, beside history.json


def label_column(task: str) -> str:
    return f"y_{task}"


def preprocess_for(cfg: Config) -> Preprocess:
    dc = data_config(cfg.model)
    return Preprocess.for_model(cfg.model.img_size, dc["mean"], dc["std"])


def with_label_indices(table: pa.Table, vocabs: dict[str, list[str]]) -> pa.Table:
    """Keep uri/size and add an int64 class-index column per task."""
    out = table.select(["uri", "size"])
    for task, vocab in vocabs.items():
        index = {label: i for i, label in enumerate(vocab)}
        out = out.append_column(label_column(task), pa.array([index[v] for v in table[task].to_pylist()], pa.int64()))
    return out


def decoded_dataset(table: pa.Table, size: int, crop: int | None, cfg: Config) -> tuple[ray.data.Dataset, int]:
    """Decode once at `size` (centre-cropped to `crop` when given), drop undecodable images, materialise.

    Returns (dataset, number dropped). The materialised blocks are the decode cache every epoch reads.
    """
    ds = stages.dataset_from_table(table, DECODE_ROWS_PER_TASK).map_batches(
        stages.read_and_decode,
        fn_kwargs=dict(
            size=size, max_pixels=cfg.data.max_pixels, max_bytes=cfg.data.max_bytes, storage_config=cfg.storage
        ),
        batch_size=DECODE_ROWS_PER_TASK,
    )
    ds = ds.map_batches(stages.drop_failed, batch_size=None)
    if crop:
        ds = ds.map_batches(stages.center_crop, fn_kwargs=dict(img_size=crop), batch_size=None)
    ds = ds.drop_columns(["uri", "size", "width", "height", "format", "error"]).materialize()
    return ds, table.num_rows - ds.count()


def class_weights(table: pa.Table, vocabs: dict[str, list[str]]) -> dict[str, list[float]]:
    """Inverse-frequency weights with mean 1 over the classes present (the paper's minority-class weak spot)."""
    weights = {}
    for task, vocab in vocabs.items():
        counts = np.bincount(table[label_column(task)].to_numpy(), minlength=len(vocab)).astype(float)
        w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 0.0)
        weights[task] = w.tolist()
    return weights


@dataclass
class TrainInputs:
    """What the driver prepares once per collection: reusable by every trial of a search at the same img_size."""

    data_uri: str
    collection: Collection
    vocabs: dict[str, list[str]]
    preprocess: Preprocess
    train: ray.data.Dataset  # decoded at preprocess.resize; augmented per epoch by make_trainer's stage
    val: ray.data.Dataset  # decoded and centre-cropped to preprocess.img_size
    test: ray.data.Dataset | None  # the same, for the test split; None when the collection has none
    n_train: int
    n_val: int
    n_test: int
    undecodable: int
    class_weights: dict[str, list[float]]
    train_table: pa.Table  # what `train` holds before decoding: uri, size, y_<task> (label indices into vocabs)
    corrections: dict | None = None  # what the run learned from a corrections dataset (data.corrections)


def prepare_inputs(data_uri: str, cfg: Config) -> TrainInputs:
    preprocess = preprocess_for(cfg)
    collection = load_collection(data_uri, cfg.data, cfg.storage, image_size=preprocess.resize)  # IIIF: at this size
    learned = None
    if cfg.data.corrections:
        collection, learned = corrections.apply(collection, cfg.data.corrections, cfg.storage)
    vocabs = {task: collection.vocabs[task] for task in collection.tasks}
    train_table = with_label_indices(collection.subset("train"), vocabs)
    val_table = with_label_indices(collection.subset("val"), vocabs)
    test_table = with_label_indices(collection.subset("test"), vocabs)
    log.info(
        "training on %d images, validating on %d, testing on %d, tasks %s",
        train_table.num_rows, val_table.num_rows, test_table.num_rows, vocabs,
    )  # fmt: skip
    ensure_ray()
    train_ds, dropped_train = decoded_dataset(train_table, preprocess.resize, None, cfg)
    val_ds, dropped_val = decoded_dataset(val_table, preprocess.resize, preprocess.img_size, cfg)
    test_ds, dropped_test = (
        decoded_dataset(test_table, preprocess.resize, preprocess.img_size, cfg) if test_table.num_rows else (None, 0)
    )
    if dropped_train or dropped_val or dropped_test:
        log.warning(
            "%d training, %d validation and %d test images could not be decoded; left out",
            dropped_train, dropped_val, dropped_test,
        )  # fmt: skip
    return TrainInputs(
        data_uri=data_uri,
        collection=collection,
        vocabs=vocabs,
        preprocess=preprocess,
        train=train_ds,
        val=val_ds,
        test=test_ds,
        n_train=train_table.num_rows - dropped_train,
        n_val=val_table.num_rows - dropped_val,
        n_test=test_table.num_rows - dropped_test,
        undecodable=dropped_train + dropped_val + dropped_test,
        class_weights=class_weights(train_table, vocabs),
        train_table=train_table,
        corrections=learned.to_dict() if learned else None,
    )


def make_trainer(
    inputs: TrainInputs,
    cfg: Config,
    runs_uri: str,
    *,
    name: str = "run",
    callbacks: list | None = None,
    started_at: float | None = None,
    tracking_run: tracking.RunRef | None = None,
) -> TorchTrainer:
    """A TorchTrainer whose checkpoints live under `runs_uri/name` (rerun with the same pair to resume)."""
    started_at = started_at or time.time()
    augmented = inputs.train.randomize_block_order()
    if cfg.train.augment:
        # Its own Ray Data stage, re-executed over the decoded cache every epoch: fresh crops each time.
        augmented = augmented.map_batches(
            stages.augment, fn_kwargs=dict(img_size=inputs.preprocess.img_size), batch_size=cfg.train.batch_size
        )
    else:
        augmented = augmented.map_batches(
            stages.center_crop, fn_kwargs=dict(img_size=inputs.preprocess.img_size), batch_size=None
        )
    fs, runs_path = storage.arrow_filesystem(runs_uri, cfg.storage)
    return TorchTrainer(
        train_loop,
        train_loop_config=dict(
            cfg=cfg,
            vocabs=inputs.vocabs,
            preprocess=inputs.preprocess,
            n_train=inputs.n_train,
            class_weights=inputs.class_weights if cfg.train.class_balance == "weighted" else None,
            # The driver draws the workers' bars; in a log (a RayJob's, CI's) a bar prints a line per update, so
            # there each epoch is its one metrics line only.
            progress_bars=sys.stderr.isatty(),
            started_at=started_at,
            tracking_run=tracking_run,  # the MLflow run the rank-0 worker logs each epoch to (None: tracking off)
        ),
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=runs_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # The best epoch by val macro-F1 is kept, and Ray always keeps the latest too (for resuming).
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_macro_f1", checkpoint_score_order="max"
            ),
            callbacks=callbacks,
        ),
        datasets={"train": augmented, "val": inputs.val},
        # Every worker validates on the whole (small) validation set, so no metric needs all-reducing.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def best_epoch(result: ray.train.Result) -> tuple[Checkpoint, dict]:
    """The checkpoint and reported metrics of the run's best epoch (by validation macro-F1, as make_trainer keeps)."""
    return max(result.best_checkpoints, key=lambda cm: cm[1]["val_macro_f1"])


def export_package(result: ray.train.Result, inputs: TrainInputs, cfg: Config, out_uri: str) -> dict:
    """The best epoch of `result` as a model package at `out_uri`, with history.json and curves.png beside it."""
    best_checkpoint, best_metrics = best_epoch(result)
    with best_checkpoint.as_directory() as best_dir:
        best = load_checkpoint(best_dir)
    with result.checkpoint.as_directory() as last_dir:
        history = load_checkpoint(last_dir)["history"]

    model = create_model(cfg.model, {t: len(v) for t, v in inputs.vocabs.items()}, load_pretrained=False)
    model.load_state_dict(packaged_weights(best))
    columns = {task: label_column(task) for task in inputs.vocabs}
    logits, labels = dataset_logits(model, inputs.val, inputs.preprocess, columns, cfg.train.batch_size)
    calibration = fit_calibration(
        logits, labels, cfg.label.target_accuracy, "validation split", cfg.label.threshold_rule
    )
    # Scored once, by the driver, after the epoch was chosen on val: the figure nothing was chosen on.
    test = None
    if inputs.test is not None:
        test = validate(model, inputs.test, inputs.preprocess, inputs.vocabs, torch.device("cpu"), cfg.train.batch_size)
    model_id = save_package(
        out_uri,
        model,
        cfg.model,
        inputs.vocabs,
        inputs.preprocess,
        training=dict(
            data=inputs.data_uri,
            fingerprint=inputs.collection.fingerprint,
            n_train=inputs.n_train,
            n_val=inputs.n_val,
            n_test=inputs.n_test,
            corrections=inputs.corrections,
            best_epoch=best_metrics["epoch"],
            epochs=cfg.train.epochs,
            data_config=to_dict(cfg.data),
            train_config=to_dict(cfg.train),
        ),
        metrics=best["val"],
        calibration=calibration,
        storage_config=cfg.storage,
    )
    storage.write_bytes(storage.join(out_uri, "history.json"), json.dumps(history, indent=1).encode(), cfg.storage)
    storage.write_bytes(storage.join(out_uri, VAL_LOGITS), logits_npz(logits, labels), cfg.storage)
    with tempfile.TemporaryDirectory() as tmp:
        plot_history(history, Path(tmp) / "curves.png")
        storage.write_bytes(storage.join(out_uri, "curves.png"), (Path(tmp) / "curves.png").read_bytes(), cfg.storage)
    return {
        "package": out_uri,
        "model_id": model_id,
        "best_epoch": best_metrics["epoch"],
        "val_accuracy": best_metrics["val_accuracy"],
        "val_macro_f1": best_metrics["val_macro_f1"],
        "test_accuracy": mean_over_tasks(test, "accuracy") if test else None,
        "test_macro_f1": mean_over_tasks(test, "macro_f1") if test else None,
        "test": test,  # per task: accuracy, macro_f1, per_class (recall...), confusion
        "n_train": inputs.n_train,
        "n_val": inputs.n_val,
        "n_test": inputs.n_test,
        "undecodable": inputs.undecodable,
        "corrections": inputs.corrections,
        "epochs_run": len(history),
        "train_img_s": history[-1]["train_img_s"] if history else None,
        "precision": history[-1].get("precision") if history else None,  # absent from older checkpoints' history
        "train_img_s_by_epoch": [h["train_img_s"] for h in history],
        # seconds from the start to the first optimizer step, per attempt (a resumed run has two)
        "first_step_s": [h["first_step_s"] for h in history if h.get("first_step_s") is not None],
    }


def logits_npz(logits: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> bytes:
    """The best epoch's logits and true class indices on the validation split, per task (`logits/<task>`,
    `labels/<task>`): under --folds, the held fold's out-of-fold predictions, which calibration can be fitted on."""
    buffer = io.BytesIO()
    np.savez(buffer, **{f"logits/{t}": v for t, v in logits.items()}, **{f"labels/{t}": v for t, v in labels.items()})
    return buffer.getvalue()


def train(data_uri: str, out_uri: str, cfg: Config) -> dict:
    """Train on `data_uri`, write the best epoch as a model package at `out_uri`; returns the run summary."""
    started = time.time()
    ensure_ray()
    check_train(cfg)  # before decoding anything: workers no node can hold would wait for ever
    inputs = prepare_inputs(data_uri, cfg)
    runs_uri = storage.join(out_uri, "_train")
    tags = {"artfuse.fingerprint": inputs.collection.fingerprint, "artfuse.data": data_uri, "artfuse.package": out_uri}
    record = storage.join(runs_uri, tracking.RECORD)  # a resumed training logs on to the same run
    with tracking.start(cfg, "train", f"train {out_uri}", record=record, tags=tags) as run:
        result = make_trainer(inputs, cfg, runs_uri, started_at=started, tracking_run=run.ref).fit()
        summary = export_package(result, inputs, cfg, out_uri)
        summary["duration_s"] = round(time.time() - started, 1)
        report = json.dumps(summary, indent=1).encode()
        storage.write_bytes(storage.join(out_uri, "train_report.json"), report, cfg.storage)
        log_package(run, summary, out_uri, cfg)
    return summary


PACKAGE_FILES = (MANIFEST, "history.json", "curves.png")  # what a package's MLflow run keeps of it (not the weights)


def log_package(
    run: tracking.Run, summary: dict, package_uri: str, cfg: Config, artifact_path: str | None = None
) -> None:
    """A trained package (`summary`: export_package's) in its MLflow run: the chosen epoch's figures, the test scores
    with their 95 % intervals (also as metrics.json), the package's small files; the weights only with
    tracking.log_weights."""
    run.set_tags({"artfuse.package": package_uri, "artfuse.model_id": summary["model_id"]})
    # the chosen epoch's figures, named apart from the per-epoch series of the same names
    best = {"best_epoch": summary["best_epoch"], "duration_s": summary.get("duration_s")}
    run.log_metrics(best | {f"best_{key}": summary[key] for key in ("val_accuracy", "val_macro_f1")})
    run.log_scores(summary["test"])
    if summary["test"]:
        run.log_json(summary["test"], f"{artifact_path}/metrics.json" if artifact_path else "metrics.json")
    weights = (WEIGHTS,) if cfg.tracking.log_weights else ()
    run.log_files(package_uri, [*PACKAGE_FILES, "train_report.json", *weights], cfg, artifact_path)


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """A pretrained backbone learns slower; norms, biases and embeddings get no weight decay."""
    # transformer_only has no ImageNet weights: its "backbone" trains from scratch unless given a weight file.
    pretrained = cfg.model.pretrained != "none" and not (
        cfg.model.arch == "transformer_only" and cfg.model.pretrained == "imagenet"
    )
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else cfg.train.weight_decay
        groups.setdefault((pretrained and name.startswith("backbone."), decay), []).append(p)
    return [
        {
            "params": ps,
            "lr_scale": cfg.train.backbone_lr_scale if pretrained_backbone else 1.0,
            "pretrained_backbone": pretrained_backbone,
            "weight_decay": decay,
        }
        for (pretrained_backbone, decay), ps in groups.items()
    ]


def lr_at(step: int, total: int, warmup: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to lr_min_ratio * lr."""
    if step < warmup:
        return cfg.train.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = cfg.train.lr * cfg.train.lr_min_ratio
    return floor + (cfg.train.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def backbone_factor(step: int, wait: int, ramp: int) -> float:
    """The pretrained backbone's share of its learning rate: 0 for `wait` steps, then a linear ramp over `ramp`."""
    if step < wait:
        return 0.0
    return min(1.0, (step - wait + 1) / ramp) if wait and ramp else 1.0


@torch.inference_mode()
def validate(model: torch.nn.Module, dataset, preprocess: Preprocess, vocabs, device, batch_size: int) -> dict:
    model.eval()
    truth: dict[str, list] = {t: [] for t in vocabs}
    predicted: dict[str, list] = {t: [] for t in vocabs}
    loss_sum = 0.0
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        logits = model(preprocess.to_tensor(batch["image"], device))
        for task in vocabs:
            truth[task].append(batch[label_column(task)])
            predicted[task].append(logits[task].argmax(1).cpu().numpy())
            y = torch.as_tensor(batch[label_column(task)], device=device)
            loss_sum += torch.nn.functional.cross_entropy(logits[task].float(), y, reduction="sum").item()
    tasks = {}
    for task, vocab in vocabs.items():
        y, p = np.concatenate(truth[task]), np.concatenate(predicted[task])
        tasks[task] = summarize(confusion_matrix(y, p, len(vocab)), vocab)
    n = int(sum(len(b) for b in truth[next(iter(vocabs))]))
    # plain cross-entropy (no class weights, no smoothing), summed over tasks, mean over images
    return {"n": n, "tasks": tasks, "loss": loss_sum / max(n, 1)}


CHECKPOINT = "checkpoint.pt"


def save_checkpoint(directory: str | Path, checkpoint: dict) -> None:
    """One checkpoint, one dict: {"model": the optimised weights, "ema": the EMA weights or None, "optimizer",
    "epoch" (0-based, completed), "history": every epoch's metrics so far, "val": this epoch's validation}."""
    torch.save(checkpoint, Path(directory) / CHECKPOINT)


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> dict:
    path = Path(directory) / CHECKPOINT
    if not path.exists():
        raise ConfigError(
            f"{directory} holds no {CHECKPOINT}: it is a checkpoint of the older three-file format (model.safetensors, "
            "optimizer.pt, state.json), which this version cannot resume. Train again with a new --out, or delete "
            "the old one's _train/ folder"
        )
    return torch.load(path, map_location=device, weights_only=True)


def packaged_weights(checkpoint: dict) -> dict[str, torch.Tensor]:
    """What is validated and packaged: the EMA weights when EMA is on, steadier than the last step's."""
    return checkpoint["ema"] if checkpoint["ema"] is not None else checkpoint["model"]


def mean_over_tasks(scores: dict, metric: str) -> float:
    return float(np.mean([task[metric] for task in scores["tasks"].values()]))


@dataclass
class TrainStep:
    """One optimisation step: forward (with the branches' own loss), backward, clip, step, EMA. The loop runs it on
    Ray Data's batches; `bench --train` times it alone on tensors already on the device."""

    model: torch.nn.Module  # what the step runs: DDP-wrapped when world > 1, maybe compiled
    raw_model: torch.nn.Module  # the module underneath, whose state dict is saved
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    losses: dict[str, torch.nn.Module]
    branch_loss: float
    grad_clip: float
    device_type: str
    precision: str  # bf16 | fp32: the dtype the forward runs in (train.precision resolved on this device)
    correct: torch.Tensor | None = None  # top-1 hits on the batches' own labels since take_correct(), summed over tasks

    def take_correct(self) -> int:
        correct, self.correct = self.correct, None
        return int(correct.item()) if correct is not None else 0

    def __call__(self, x: torch.Tensor, targets: dict[str, torch.Tensor], lam: float, step: int) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = self.model(x, branch_logits=True) if self.branch_loss else self.model(x)
            hits = sum((logits[t].detach().argmax(1) == targets[t]).sum() for t in targets)
            self.correct = hits if self.correct is None else self.correct + hits
            loss = sum(mixed_loss(self.losses[t], logits[t].float(), targets[t], lam) for t in targets)
            if self.branch_loss:  # each branch's own heads: the auxiliary loss that keeps both learning
                loss = loss + self.branch_loss * sum(
                    mixed_loss(self.losses[t], logits[f"{branch}.{t}"].float(), targets[t], lam)
                    for branch in BRANCHES
                    for t in targets
                )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.ema:
            self.ema.update(self.raw_model, step=step + 1)
        return loss


def build_train_step(
    cfg: Config,
    vocabs: dict[str, list[str]],
    device: torch.device,
    class_weights: dict[str, list[float]] | None,
    wrap: Callable[[torch.nn.Module], torch.nn.Module],
) -> TrainStep:
    """The model, optimiser, losses and EMA of a run; `wrap` prepares the model for the workers (Ray Train's DDP)."""
    # The EMA (timm's ModelEmaV3) is a second model with its own weights: the averaged ones, steadier on small
    # collections (the paper's unstable training); its warmup makes the average's horizon grow with the steps.
    # channels_last on CPUs too: oneDNN's convolutions run faster on it (2-core Zen 5, fusion at 288 px: 1.4x)
    raw_model = create_model(cfg.model, {t: len(v) for t, v in vocabs.items()}).to(memory_format=torch.channels_last)
    model = wrap(raw_model)
    if cfg.train.compile:
        model = torch.compile(model)
    weights = class_weights or {}
    return TrainStep(
        model=model,
        raw_model=raw_model,
        ema=ModelEmaV3(raw_model, decay=cfg.train.ema_decay, use_warmup=True) if cfg.train.ema_decay > 0 else None,
        optimizer=torch.optim.AdamW(param_groups(raw_model, cfg), lr=cfg.train.lr),
        losses={
            task: torch.nn.CrossEntropyLoss(
                weight=torch.tensor(weights[task], device=device) if task in weights else None,
                label_smoothing=cfg.train.label_smoothing,
            )
            for task in vocabs
        },
        branch_loss=cfg.model.branch_loss if cfg.model.arch == "fusion" else 0.0,
        grad_clip=cfg.train.grad_clip,
        device_type=device.type,
        precision="bf16" if trains_in_bf16(cfg.train.precision, device) else "fp32",
    )


def trains_in_bf16(precision: str, device: torch.device) -> bool:
    """train.precision resolved on the worker's device: auto is bf16 where the hardware computes it natively."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and native_cpu_bf16())


def train_loop(config: dict) -> None:
    cfg: Config = config["cfg"]
    vocabs: dict[str, list[str]] = config["vocabs"]
    preprocess: Preprocess = config["preprocess"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed + rank)
    if device.type == "cpu":
        # Ray pins OMP_NUM_THREADS to the worker's (fractional) CPU reservation, i.e. one thread; the reservation is
        # kept small only so Ray Data can schedule, so let the forward/backward use the node's cores.
        threads = cfg.train.torch_threads or max(1, node_cpus() // context.get_local_world_size())
        torch.set_num_threads(threads)
        keep_freed_memory()  # a step's activations are reused, not page-faulted in again

    step_fn = build_train_step(cfg, vocabs, device, config["class_weights"], wrap=ray.train.torch.prepare_model)
    raw_model, ema, optimizer = step_fn.raw_model, step_fn.ema, step_fn.optimizer
    eval_model = ema.module if ema else raw_model
    # read now: a checkpoint's groups replace these below, and older checkpoints lack the key
    waits_for_transformer = [group["pretrained_backbone"] for group in optimizer.param_groups]
    steps_per_epoch = math.ceil(config["n_train"] / world / cfg.train.batch_size)
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup_steps = int(cfg.train.warmup_epochs * steps_per_epoch)
    backbone_wait_steps = int(cfg.train.backbone_wait_epochs * steps_per_epoch)
    mixing = np.random.default_rng([cfg.train.seed, rank])
    first_step_s = None

    start_epoch, history = 0, []
    if ray.train.get_checkpoint():
        with ray.train.get_checkpoint().as_directory() as d:
            checkpoint = load_checkpoint(d, device)
        raw_model.load_state_dict(checkpoint["model"])
        if ema:
            ema.module.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, history = checkpoint["epoch"] + 1, checkpoint["history"]
        print(f"resuming from the checkpoint of epoch {start_epoch}: starting epoch {start_epoch + 1}")

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, cfg.train.epochs):
        step_fn.model.train()
        started, seen, loss_sum = time.perf_counter(), 0, 0.0
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.train.batch_size, local_shuffle_buffer_size=4 * cfg.train.batch_size
        )
        show_bar = rank == 0 and config["progress_bars"]
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}") if show_bar else None
        for i, batch in enumerate(batches):
            step = epoch * steps_per_epoch + i
            lr = lr_at(step, total_steps, warmup_steps, cfg)
            backbone = backbone_factor(step, backbone_wait_steps, warmup_steps)
            for group, waits in zip(optimizer.param_groups, waits_for_transformer, strict=True):
                group["lr"] = lr * group["lr_scale"] * (backbone if waits else 1.0)
            x, lam = mix_batch(
                preprocess.to_tensor(batch["image"], device), cfg.train.mixup_alpha, cfg.train.cutmix_alpha, mixing
            )
            targets = {t: batch[label_column(t)].to(device) for t in vocabs}
            loss = step_fn(x, targets, lam, step)
            if first_step_s is None:
                first_step_s = round(time.time() - config["started_at"], 2)
            seen += len(x)
            loss_sum += loss.item() * len(x)
            if bar:
                bar.update(1)
        if bar:
            bar.close()
        elapsed = time.perf_counter() - started

        val = validate(eval_model, val_shard, preprocess, vocabs, device, cfg.train.batch_size)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            # top-1 on the augmented (under mixup / CutMix, mixed) batches against each image's own label
            "train_accuracy": step_fn.take_correct() / max(seen * len(vocabs), 1),
            "val_loss": val["loss"],
            # the schedule's rate at the epoch's last step (set above per step; a worker's shard may be empty)
            "lr": lr_at((epoch + 1) * steps_per_epoch - 1, total_steps, warmup_steps, cfg),
            "train_img_s": round(seen * world / elapsed, 2),
            "val_accuracy": mean_over_tasks(val, "accuracy"),
            "val_macro_f1": mean_over_tasks(val, "macro_f1"),
            "precision": step_fn.precision,  # train.precision as resolved on this worker
        }
        if epoch == start_epoch:  # this attempt's warm-up: from the driver's start to its first optimizer step
            metrics["first_step_s"] = first_step_s
        history.append(metrics)
        print(json.dumps(metrics))
        if rank == 0:
            tracking.log_epoch(config.get("tracking_run"), metrics)
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                checkpoint = {
                    "model": raw_model.state_dict(),
                    "ema": ema.module.state_dict() if ema else None,
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch,
                    "history": history,
                    "val": val,
                }
                save_checkpoint(d, checkpoint)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)
        if rank == 0 and epoch + 1 < cfg.train.epochs:
            pause_point(cfg.pause, "epoch")  # fault tests only: off by default
