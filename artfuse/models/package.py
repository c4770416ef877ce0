"""The model package: `model.safetensors` + `artfuse.json` in a folder at any URI. Loading never unpickles.

`artfuse.json` holds everything needed to rebuild and run the model (architecture config, tasks and their
label vocabularies, preprocessing, and `calibration`: per task a temperature and a review threshold, see
models/calibration.py), where it came from (training data fingerprint, metrics, versions) and a content hash
of the weights and of everything that changes a prediction, used as `model_id`.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from artfuse.config import ConfigError, ModelConfig, from_dict, to_dict
from artfuse.data import storage
from artfuse.data.preprocess import Preprocess
from artfuse.models import create_model

FORMAT = "artfuse-package/2"  # 2: FusionNet keeps the whole CNN (its pooled features feed the fusion)
WEIGHTS = "model.safetensors"
MANIFEST = "artfuse.json"


@dataclass
class Package:
    model: torch.nn.Module
    model_config: ModelConfig
    tasks: dict[str, list[str]]  # task -> label vocabulary, in head order
    preprocess: Preprocess
    model_id: str
    meta: dict = field(default_factory=dict)  # the whole artfuse.json


def versions() -> dict:
    found = {"python": platform.python_version()}
    for dist in ("artfuse", "torch", "timm", "ray"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def save_package(
    uri: str,
    model: torch.nn.Module,
    model_config: ModelConfig,
    tasks: dict[str, list[str]],
    preprocess: Preprocess,
    *,
    training: dict | None = None,
    metrics: dict | None = None,
    calibration: dict | None = None,
    storage_config=None,
) -> str:
    """Write the package to `uri`; returns its model_id."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: save the module inside
    model = getattr(model, "module", model)  # DistributedDataParallel
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = save_safetensors(state)
    described = {
        "architecture": to_dict(model_config),
        "tasks": {task: list(labels) for task, labels in tasks.items()},
        "preprocess": preprocess.to_dict(),
    }
    if calibration:
        described["calibration"] = calibration
    model_id = content_id(weights, described)
    manifest = {
        "format": FORMAT,
        "model_id": model_id,
        **described,
        "training": training or {},
        "metrics": metrics or {},
        "versions": versions(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    storage.makedirs(uri, storage_config)
    storage.write_bytes(storage.join(uri, WEIGHTS), weights, storage_config)
    storage.write_bytes(storage.join(uri, MANIFEST), json.dumps(manifest, indent=1).encode(), storage_config)
    return model_id


def content_id(weights: bytes, described: dict) -> str:
    digest = hashlib.sha256(weights)
    digest.update(json.dumps(described, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def set_calibration(uri: str, calibration: dict, storage_config=None) -> str:
    """Store `calibration` in the package at `uri` (weights untouched); returns its new model_id."""
    manifest = read_manifest(uri, storage_config)
    manifest["calibration"] = calibration
    described = {key: manifest[key] for key in ("architecture", "tasks", "preprocess", "calibration")}
    manifest["model_id"] = content_id(storage.read_bytes(storage.join(uri, WEIGHTS), storage_config), described)
    storage.write_bytes(storage.join(uri, MANIFEST), json.dumps(manifest, indent=1).encode(), storage_config)
    return manifest["model_id"]


def read_manifest(uri: str, storage_config=None) -> dict:
    path = storage.join(uri, MANIFEST)
    if not storage.exists(path, storage_config):
        raise ConfigError(f"not a model package (no {MANIFEST}): {uri}")
    manifest = json.loads(storage.read_bytes(path, storage_config))
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{path}: unsupported package format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def load_package(uri: str, storage_config=None, device: str | torch.device = "cpu") -> Package:
    """Rebuild the model from `artfuse.json` and load its weights (safetensors: tensors only, no code)."""
    manifest = read_manifest(uri, storage_config)
    # Packages from before model.freeze_stride trained every layer (their weights keep every BatchNorm's counter), and
    # those from before model.branch_loss have no branch heads.
    architecture = {"freeze_stride": 0, "branch_loss": 0.0} | manifest["architecture"]
    model_config = from_dict(ModelConfig, architecture, "architecture.")
    tasks = {task: list(labels) for task, labels in manifest["tasks"].items()}
    model = create_model(model_config, {t: len(v) for t, v in tasks.items()}, load_pretrained=False)
    state = load_safetensors(storage.read_bytes(storage.join(uri, WEIGHTS), storage_config))
    model.load_state_dict(state)
    model.to(device).eval()
    return Package(
        model=model,
        model_config=model_config,
        tasks=tasks,
        preprocess=Preprocess.from_dict(manifest["preprocess"]),
        model_id=manifest["model_id"],
        meta=manifest,
    )
