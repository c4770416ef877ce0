"""The model family: FusionNet and its ablation baselines from one factory, plus their preprocessing."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import timm
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg

from artfuse.config import ConfigError, ModelConfig, check_model
from artfuse.models.baselines import VIT_ARCH, CnnOnly, TransformerOnly
from artfuse.models.fusion import FusionNet, MultiTaskModel, freeze_through_stride
from artfuse.models.weights import load_backbone_weights, timm_backbone_name

__all__ = [
    "CnnOnly",
    "FusionNet",
    "MultiTaskModel",
    "TransformerOnly",
    "create_model",
    "data_config",
    "load_backbone_weights",
]

ARCHS: dict[str, type[MultiTaskModel]] = {
    "fusion": FusionNet,
    "cnn_only": CnnOnly,
    "transformer_only": TransformerOnly,
}


def model_args(cfg: ModelConfig) -> dict[str, Any]:
    """The one place a ModelConfig field becomes a constructor argument (timm's names: dropout -> drop_rate);
    each model takes the arguments its signature names. A new field needs an edit here and in the model using it."""
    return dict(
        backbone=timm_backbone_name(cfg),
        feature_stride=cfg.feature_stride,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        d_model=cfg.d_model,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        fusion=cfg.fusion,
        drop_rate=cfg.dropout,
        drop_path_rate=cfg.drop_path,
        branch_heads=cfg.branch_loss > 0,
    )


def create_model(cfg: ModelConfig, tasks: Mapping[str, int], *, load_pretrained: bool = True) -> MultiTaskModel:
    """The `cfg.arch` model with one head per task (name -> number of classes, in output order).

    load_pretrained=False skips the backbone weights, for a state dict that is about to be loaded anyway.
    """
    if cfg.arch not in ARCHS:
        raise ConfigError(f"model.arch must be one of {', '.join(ARCHS)}; got {cfg.arch!r}")
    check_model(cfg)
    cls = ARCHS[cfg.arch]
    takes = inspect.signature(cls).parameters
    model = cls(tasks=tasks, **{name: value for name, value in model_args(cfg).items() if name in takes})
    if load_pretrained:
        load_backbone_weights(model.backbone, cfg)
    stride = frozen_stride(cfg)
    if stride:  # after loading: frozen BatchNorm copies the statistics it finds
        freeze_through_stride(model.backbone, timm_backbone_name(cfg), stride)
    return model


def frozen_stride(cfg: ModelConfig) -> int:
    """The stride up to which the CNN backbone stays frozen: cfg.freeze_stride where there are pretrained CNN
    weights to keep (transformer_only and model.pretrained=none train everything)."""
    return 0 if cfg.arch == "transformer_only" or cfg.pretrained == "none" else cfg.freeze_stride


def data_config(cfg: ModelConfig) -> dict:
    """Input size and the normalisation the backbone's weights expect: {"img_size", "mean", "std"}."""
    arch = VIT_ARCH if cfg.arch == "transformer_only" else timm_backbone_name(cfg)
    if not timm.is_model(arch):
        raise ConfigError(f"model.backbone: unknown timm model '{arch}' (see timm.list_models())")
    pretrained_cfg = get_pretrained_cfg(arch)
    resolved = resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})
    return {"img_size": cfg.img_size, "mean": list(resolved["mean"]), "std": list(resolved["std"])}
