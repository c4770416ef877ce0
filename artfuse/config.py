"""Typed configuration: dataclasses with a comment on each default, loaded from YAML plus `--set` overrides.

Overrides are type-checked against the default (as nanoGPT's configurator asserts), and every mistake a
user can make ends in a `ConfigError` whose message names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-caused configuration or usage error (the CLI exits 2 with its message)."""


@dataclass
class ModelConfig:
    # fusion | cnn_only | transformer_only. cnn_only (the CNN branch alone, with the fusion model's backbone, freezing
    # and heads): by 5-fold cross-validation fusion did not beat it on western-genre (+0.7 points, 95 % interval
    # -1.8 to +3.2), and the decision rule keeps fusion only where it beats it on both painting sets
    # (docs/measurements.md, "Fusion or its CNN branch")
    arch: str = "cnn_only"
    backbone: str = "efficientnet_lite0"  # any timm CNN that supports features_only
    # imagenet (the offline package for efficientnet_lite0, else timm's hub) | none | a weight file or URI
    pretrained: str = "imagenet"
    feature_stride: int = (
        32  # CNN stage that feeds the tokens: 16 (196 tokens at 224 px) or 32 (49 tokens, faster on CPU)
    )
    # The CNN's layers up to its stage at this stride keep their pretrained weights and BatchNorm statistics: training
    # skips their backward pass (fusion at 288 px on 2 cores: 15 img/s instead of 7.5) and small sets cannot wear
    # them out; 0 trains them all. Only where there are pretrained CNN weights.
    freeze_stride: int = 16
    img_size: int = 288  # square input side in pixels (paintings: 288 beat 224 by 4 points on western-genre)
    d_model: int = 192  # Transformer width
    depth: int = 2  # Transformer encoder layers
    num_heads: int = 4  # attention heads
    mlp_ratio: float = 4.0  # Transformer MLP hidden size / d_model
    fusion: str = "concat"  # concat | gated | cross_attention
    dropout: float = 0.1  # dropout before the heads and inside the Transformer
    drop_path: float = 0.0  # stochastic depth in the Transformer
    patch_size: int = 16  # transformer_only: ViT patch size
    # fusion: weight of an auxiliary loss from a linear head per task on each branch's own features (pooled CNN,
    # Transformer CLS), so neither branch starves; 0 = no branch heads. Other archs have one branch and ignore it.
    # 0.3: docs/measurements.md, Accuracy (the fusion ahead of the CNN alone on both real sets; level without it).
    branch_loss: float = 0.3


@dataclass
class StorageConfig:
    endpoint_url: str = ""  # S3 endpoint; empty means AWS_ENDPOINT_URL or AWS itself
    region: str = ""  # S3 region; empty means the standard AWS chain
    anon: bool = False  # anonymous S3 access (public buckets)
    http_timeout_s: float = 30.0  # HTTP(S) reads (IIIF): seconds to connect, and between bytes of an answer
    http_retries: int = 3  # retries of a failed HTTP(S) request (connection errors, 429, 5xx), with backoff
    http_backoff_s: float = 0.5  # first retry's wait; each further one doubles it (a Retry-After header wins)
    http_max_per_server: int = 4  # concurrent HTTP(S) requests to one server, per process (museum servers are small)
    # How long a read waits out an endpoint that does not answer (retrying) before the job fails naming it; a
    # job never turns an outage into per-object error rows.
    patience_s: float = 60.0
    # S3 prefixes listed at once: a listing splits at the delimiter's common prefixes and lists them side by side
    # (1 = one flat listing, page after page)
    list_threads: int = 16


@dataclass
class DataConfig:
    tasks: list[str] = field(default_factory=list)  # label columns to learn; empty means every label column
    # Stratified shares of each label (ignored where the manifest has a `split` column): val chooses the best epoch,
    # test chose nothing and gives the reported figure (about 175 images of each real set); 0 = no test split.
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    seed: int = 0  # split seed
    # k-fold cross-validation (`artfuse ablate --folds K` sets both): with folds = K > 0, the images outside the test
    # split are dealt into K folds, stratified on the first task; fold `fold` is the validation split (it chooses the
    # best epoch and gives the figure), the other K - 1 train, and the test split is left out altogether.
    folds: int = 0
    fold: int = 0
    max_pixels: int = 64_000_000  # decoded pixels above this are an error (decompression bombs), not an OOM
    max_bytes: int = 256 * 1024 * 1024  # objects larger than this are an error, not read
    corrections: str = ""  # a corrections dataset (artfuse review) whose decisions override and extend the labels


@dataclass
class TrainConfig:
    epochs: int = 12  # passes over the training split
    batch_size: int = 32  # per worker
    lr: float = 1e-3  # peak learning rate for the new layers
    backbone_lr_scale: float = 0.1  # a pretrained backbone learns at lr * this
    weight_decay: float = 0.05  # AdamW
    warmup_epochs: float = 1.0  # linear warmup, then cosine decay to lr_min_ratio * lr
    lr_min_ratio: float = 0.01
    # A pretrained backbone's trainable layers wait this many epochs (learning rate 0) while the new Transformer and
    # heads learn from their random start, then ramp up over warmup_epochs; 0 = every layer learns from the first step.
    backbone_wait_epochs: float = 0.0
    label_smoothing: float = 0.1
    # Mixup / CutMix: each training image is blended with (mixup) or gets a box of (CutMix) another image of its
    # batch, and its loss is shared between the two labels. The Beta(alpha, alpha) of the mixing share; 0 = off.
    # Both on: each batch uses one of them, half the time each.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    class_balance: str = "weighted"  # weighted (inverse-frequency loss weights) | none
    ema_decay: float = 0.998  # validate and package an EMA of the weights (warmed up over the steps); 0 disables
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    augment: bool = True  # random resized crop + flip + colour jitter on the training split
    num_workers: int = 1  # Ray Train workers
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 0.5  # leave CPUs to Ray Data (docs/architecture.md, CPU starvation)
    compile: bool = False  # torch.compile the model (GPU)
    # The training step's autocast: auto = bf16 on a GPU, and on a CPU that computes bf16 natively (AVX512-BF16 or AMX;
    # 2-core Zen 5, the default fusion: the step 1.1x faster than in fp32), fp32 on other CPUs; bf16 | fp32: always
    precision: str = "auto"
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    seed: int = 0
    torch_threads: int = 0  # CPU training threads per worker; 0 = the node's cores / workers on the node


@dataclass
class LabelConfig:
    batch_size: int = 64  # images per model batch
    decode_batch_size: int = 64  # images per decode task
    min_actors: int = 1  # model actor pool size (min == max: fixed)
    max_actors: int = 1
    num_gpus_per_actor: float = 0.0  # 1 on a GPU cluster
    cpus_per_actor: float = 1.0
    # Host memory Ray reserves for each model actor, so a node is not given more actors than its RAM holds (a CPU
    # actor at 288 px and batch 64 peaks at about 3.4 GB; Ray Data warns when an actor reserves none). 0: none.
    actor_memory_mb: int = 4096
    decode_cpus: float = 1.0  # CPUs per decode task
    # OS priority of decode workers (0-19): a CPU model actor preempts them (2-core bench, 288 px: ratio 0.75 and
    # 0.75 at 19 vs 0.60-0.69 at 0); harmless beside a GPU actor. 0 where decode shares nodes with other work.
    decode_niceness: int = 19
    gpu_decode: bool = False  # decode JPEGs with nvJPEG on the model actor's GPU
    gpu_decode_max_pixels: int = 16_000_000  # larger JPEGs decode on CPU (draft mode reads them at 1/8 scale)
    torch_threads: int = 0  # intra-op threads of a CPU model actor; 0 = every CPU of its node
    # bf16 autocast in a CPU model actor: on a CPU with native bf16 (AVX512-BF16 or AMX) much faster (2-core Zen 5
    # bench: model 163 vs about 91 img/s), slower on others. GPU actors always run bf16.
    cpu_bf16: bool = False
    # Test-time augmentation: flip = also run each image's mirror image and average the logits (twice the model
    # compute per image); none = the image alone. Evaluate and label both read it.
    tta: str = "none"
    topk: int = 3  # labels per task in <task>_topk
    # needs_review when a task's top score is below this: auto = the package's threshold per task (fitted on the
    # validation split to reach target_accuracy; 0.5 for a package without one), or one number for every task
    review_threshold: float | str = "auto"
    target_accuracy: float = 0.95  # training fits each task's review threshold so accepted predictions reach this
    # How the fitted threshold reaches target_accuracy on the fitting data's accepted predictions: point = their
    # accuracy does; wilson = the 95 % one-sided Wilson lower bound of their accuracy does (fewer accepted, but the
    # target holds on new images more often than when the point estimate of about 130 images just reaches it).
    threshold_rule: str = "point"
    embeddings: bool = False  # write the fused embedding (float16) per row
    run_date: str = ""  # partition date (YYYY-MM-DD); empty means today (UTC)
    break_lock: str = ""  # run id of a dead run whose lock on --out this run may take over (README: Guarantees)
    rows_per_file: int = 1024  # least rows per Parquet file; a killed run keeps every file it finished
    # A run whose pipeline moves nothing for this long is stopped, naming why, instead of waiting for ever (a node
    # lost mid-run can leave the model actors holding every CPU the decode tasks need); 0 = never stop.
    stall_timeout_s: float = 900.0


@dataclass
class TuneConfig:
    num_samples: int = 8  # trials
    max_concurrent_trials: int = 2  # lowered to what fits on a fixed-size (local) cluster
    time_budget_s: float = 0.0  # stop the whole search after this long; 0 means no limit
    grace_period: int = 2  # ASHA: epochs before a trial may be stopped
    reduction_factor: int = 2  # ASHA: keep the top 1/reduction_factor of trials at each rung
    # CPUs of each trial's Ray Train workers together (overrides train.cpus_per_worker); 0.5 leaves Ray Data CPUs
    cpus_per_trial: float = 0.5
    gpus_per_trial: float = 0.0  # 0, or train.num_workers (one GPU per worker; overrides train.use_gpu)
    # random: Ray Tune's random sampling of the space; optuna: Optuna's TPE (Ray Tune's OptunaSearch, needs the
    # `tracking` extra), which proposes each trial from the results so far. ASHA stops weak trials under both.
    search: str = "random"
    # optuna: trials sampled at random before TPE models the results (Optuna's own default, 10, is more trials than a
    # whole default search)
    startup_trials: int = 4
    seed: int = 0  # search-space sampling seed (both searches: one seed, the same first trials)
    # search space: a list means "choose one", a two-element [low, high] under *_range means log-uniform
    fusion: list[str] = field(default_factory=lambda: ["concat", "gated", "cross_attention"])
    depth: list[int] = field(default_factory=lambda: [1, 2, 4])
    d_model: list[int] = field(default_factory=lambda: [128, 192, 256])
    num_heads: list[int] = field(default_factory=lambda: [4, 8])
    feature_stride: list[int] = field(default_factory=lambda: [16, 32])
    dropout: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2])
    label_smoothing: list[float] = field(default_factory=lambda: [0.0, 0.1])
    lr_range: list[float] = field(default_factory=lambda: [3e-4, 3e-3])
    backbone_lr_scale: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.3])
    weight_decay_range: list[float] = field(default_factory=lambda: [0.01, 0.1])


@dataclass
class ClusterConfig:
    # Whether nodes may still join the Ray cluster (an autoscaler): then a request no node holds yet only warns, and
    # the label job's actor pool is not fitted to today's nodes. auto: yes for a cluster joined through RAY_ADDRESS
    # (`ray job submit`), no for the local one a job starts on its own machine.
    autoscaling: bool | str = "auto"


@dataclass
class TrackingConfig:
    # An MLflow tracking URI: train, tune, ablate and evaluate each log a run there. Empty: MLFLOW_TRACKING_URI where it
    # is set, else nothing is logged. sqlite:///path/mlflow.db needs no server (one machine: on a cluster, give an
    # `mlflow server`'s http:// URI); a plain path or file: (MLflow's deprecated file store) is refused.
    uri: str = ""
    experiment: str = "artfuse"  # the MLflow experiment the runs go to (created where missing)
    log_weights: bool = False  # also upload the package's weights (model.safetensors) as an artifact; no by default


@dataclass
class BenchConfig:
    n_images: int = 512  # JPEGs decoded alone; the pipeline labels at least this many
    width: int = 1024  # generated image size
    height: int = 768
    model_batches: int = 10  # timed model batches
    pipeline_seconds: float = 60.0  # pipeline size: what min(model, decode) labels in this time (start-up is small)
    # --simulate: every stage's sleep this many times the card's (figures divided back), so that this machine's own
    # scheduling overhead weighs that much less against the card's times
    simulate_time_scale: float = 4.0
    train_images: int = 240  # --train: the generated collection the loop trains on (its train split is 65 %)
    train_epochs: int = 2  # --train: the last epoch's img/s is the loop's figure; the first warms up


@dataclass
class AnnotateConfig:
    language: str = "en"  # BCP 47 tag of the labels' language (each TextualBody's `language`)
    batch_rows: int = 65_536  # prediction rows read at a time
    # IIIF rows held in memory at once, whole manifests together: a larger output is spread over more spill files
    bucket_rows: int = 100_000
    write_threads: int = 16  # documents written at once (S3 answers each PUT in tens of milliseconds)


@dataclass
class PauseConfig:
    """Fault tests only: the job blocks at a known point, where the test kills it (artfuse/pipelines/pause.py)."""

    point: str = ""  # off ("") | epoch (train: after an epoch's checkpoint, epochs remaining) | batch (label)
    after: int = 1  # block from this pass of the point on, passes counted across the job's processes
    dir: str = ""  # local folder: the pass count, `paused` when blocked, and the `release` file that ends it


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    pause: PauseConfig = field(default_factory=PauseConfig)


CHOICES = {
    "model.arch": ("fusion", "cnn_only", "transformer_only"),
    "model.fusion": ("concat", "gated", "cross_attention"),
    "model.feature_stride": (8, 16, 32),
    "model.freeze_stride": (0, 2, 4, 8, 16, 32),
    "train.class_balance": ("weighted", "none"),
    "train.precision": ("auto", "bf16", "fp32"),
    "pause.point": ("", "epoch", "batch"),
    "label.tta": ("none", "flip"),
    "label.threshold_rule": ("point", "wilson"),
    "cluster.autoscaling": ("auto", True, False),
    "tune.search": ("random", "optuna"),
}


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key '{name}'{_suggest(key, fields)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, f"{name}.")
        else:
            kwargs[key] = _coerce(value, hint, name)
    cfg = cls(**kwargs)
    return cfg


def _parse_value(raw: str) -> Any:
    """A `--set` value as YAML reads it; text YAML cannot read (e.g. 2026-02-30, not a date) stays text."""
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError):
        return raw


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, then validated."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. model.fusion=gated), got '{item}'")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
        node[parts[-1]] = _parse_value(raw)
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def _is_date(text: str) -> bool:
    try:
        return datetime.date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False


def validate(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")
    check_model(cfg.model)
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be between 0 and 1; got {cfg.data.val_fraction}")
    if not 0.0 <= cfg.data.test_fraction < 1.0 or cfg.data.val_fraction + cfg.data.test_fraction >= 1.0:
        raise ConfigError(
            f"data.test_fraction must be 0 or more and leave images to train on (val_fraction + test_fraction < 1); "
            f"got test_fraction {cfg.data.test_fraction}, val_fraction {cfg.data.val_fraction}"
        )
    if cfg.data.folds == 1 or cfg.data.folds < 0 or not 0 <= cfg.data.fold < max(cfg.data.folds, 1):
        raise ConfigError(
            f"data.folds must be 0 (no folds) or at least 2, and data.fold one of 0 .. folds - 1; "
            f"got folds {cfg.data.folds}, fold {cfg.data.fold}"
        )
    for name in ("epochs", "batch_size", "num_workers"):
        if getattr(cfg.train, name) < 1:
            raise ConfigError(f"train.{name} must be at least 1")
    if not 0 <= cfg.train.backbone_wait_epochs < cfg.train.epochs:
        raise ConfigError(
            f"train.backbone_wait_epochs must be 0 or more and below train.epochs ({cfg.train.epochs}); "
            f"got {cfg.train.backbone_wait_epochs}"
        )
    for name in ("mixup_alpha", "cutmix_alpha"):
        if getattr(cfg.train, name) < 0:
            raise ConfigError(f"train.{name} must be 0 (off) or more; got {getattr(cfg.train, name)}")
    if cfg.label.batch_size < 1 or cfg.label.topk < 1:
        raise ConfigError("label.batch_size and label.topk must be at least 1")
    if not 1 <= cfg.label.min_actors <= cfg.label.max_actors:
        raise ConfigError("label.min_actors must be at least 1 and at most label.max_actors")
    if cfg.label.actor_memory_mb < 0:
        raise ConfigError(f"label.actor_memory_mb must be 0 or more; got {cfg.label.actor_memory_mb}")
    if cfg.label.run_date and not _is_date(cfg.label.run_date):
        raise ConfigError(f"label.run_date must be a date, YYYY-MM-DD (it names a folder); got {cfg.label.run_date!r}")
    threshold = cfg.label.review_threshold
    if threshold != "auto" and not (isinstance(threshold, float) and 0.0 <= threshold <= 1.0):
        raise ConfigError(f"label.review_threshold must be auto or a number between 0 and 1; got {threshold!r}")
    if not 0.0 < cfg.label.target_accuracy <= 1.0:
        raise ConfigError(f"label.target_accuracy must be above 0 and at most 1; got {cfg.label.target_accuracy}")
    if cfg.pause.point and (not cfg.pause.dir or cfg.pause.after < 1):
        raise ConfigError("pause.point needs pause.dir (a local folder) and pause.after >= 1")
    if not 0 <= cfg.label.decode_niceness <= 19:
        raise ConfigError(f"label.decode_niceness must be between 0 and 19; got {cfg.label.decode_niceness}")
    if cfg.label.stall_timeout_s < 0:
        raise ConfigError(f"label.stall_timeout_s must be at least 0 (0: never stop); got {cfg.label.stall_timeout_s}")
    an = cfg.annotate
    if not re.fullmatch(r"[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*", an.language):
        raise ConfigError(f"annotate.language must be a BCP 47 language tag such as en or zh-Hans; got {an.language!r}")
    if an.batch_rows < 1 or an.bucket_rows < 1 or an.write_threads < 1:
        raise ConfigError("annotate.batch_rows, annotate.bucket_rows and annotate.write_threads must be at least 1")
    st = cfg.storage
    if st.http_timeout_s <= 0 or st.http_retries < 0 or st.http_backoff_s < 0 or st.http_max_per_server < 1:
        raise ConfigError(
            "storage.http_timeout_s must be above 0, storage.http_retries and storage.http_backoff_s at least 0, "
            "storage.http_max_per_server at least 1"
        )
    if cfg.tracking.uri and not tracking_uri_ok(cfg.tracking.uri):
        raise ConfigError(
            f"tracking.uri {cfg.tracking.uri!r} is MLflow's deprecated file store: give sqlite:///path/mlflow.db (no "
            "server needed) or an MLflow server's http(s):// URI"
        )
    if not cfg.tracking.experiment.strip():
        raise ConfigError("tracking.experiment must name an MLflow experiment; got an empty name")
    if st.list_threads < 1:
        raise ConfigError(f"storage.list_threads must be at least 1 (1: one flat listing); got {st.list_threads}")


def tracking_uri_ok(uri: str) -> bool:
    """An MLflow tracking URI other than the deprecated file store (a path, or file:)."""
    scheme = uri.partition(":")[0] if "://" in uri or uri.startswith("databricks") else ""
    return bool(scheme) and scheme != "file"


def check_model(m: ModelConfig) -> None:
    """What every model config must satisfy, however it was made (a config file, a package, code)."""
    if m.d_model % m.num_heads:
        raise ConfigError(f"model.d_model ({m.d_model}) must be divisible by model.num_heads ({m.num_heads})")
    if m.branch_loss < 0:
        raise ConfigError(f"model.branch_loss must be 0 or more; got {m.branch_loss}")
    if m.img_size < 32 or m.img_size % 32:
        raise ConfigError(f"model.img_size must be a multiple of 32 and at least 32; got {m.img_size}")


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(hint) or (Any,)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_type, f"{name}[]") for v in value]
    if origin in (types.UnionType, typing.Union):
        expected = []
        for member in typing.get_args(hint):  # the first member type that takes the value
            try:
                return _coerce(value, member, name)
            except ConfigError as e:  # "<name> expects a number, got ..."
                expected.append(str(e).partition(" expects ")[2].rpartition(", got ")[0])
        raise ConfigError(f"{name} expects {' or '.join(expected)}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} expects true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name} expects an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name} expects a number, got {value!r}")
    if hint is str:
        if isinstance(value, datetime.date):  # YAML reads 2026-01-02 as a date
            return value.isoformat()
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name} expects a string, got {value!r}")
    return value


def _suggest(key: str, options: Any) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(options)})"
