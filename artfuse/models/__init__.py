"""The model family: FusionNet and its ablation baselines from one factory, plus their preprocessing."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import timm
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg

from artfuse.config import ConfigError, ModelConfig
from artfuse.models.baselines import VIT_ARCH, CnnOnly, TransformerOnly, cnn_only, transformer_only
from artfuse.models.fusion import FusionNet, MultiTaskModel, fusion_net
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

ARCHS: dict[str, Callable[[ModelConfig, Mapping[str, int]], MultiTaskModel]] = {
    "fusion": fusion_net,
    "cnn_only": cnn_only,
    "transformer_only": transformer_only,
}


def create_model(
    cfg: ModelConfig, tasks: Mapping[str, int], *, load_pretrained: bool = True
) -> MultiTaskModel:
    """The `cfg.arch` model with one head per task (name -> number of classes, in output order).

    load_pretrained=False skips the backbone weights, for a state dict that is about to be loaded anyway.
    """
    if cfg.arch not in ARCHS:
        raise ConfigError(f"model.arch must be one of {', '.join(ARCHS)}; got {cfg.arch!r}")
    if cfg.d_model % cfg.num_heads:
        raise ConfigError(
            f"model.d_model ({cfg.d_model}) must be divisible by model.num_heads ({cfg.num_heads})"
        )
    model = ARCHS[cfg.arch](cfg, tasks)
    if load_pretrained:
        load_backbone_weights(model.backbone, cfg)
    return model


def data_config(cfg: ModelConfig) -> dict:
    """Input size and the normalisation the backbone's weights expect: {"img_size", "mean", "std"}."""
    arch = VIT_ARCH if cfg.arch == "transformer_only" else timm_backbone_name(cfg)
    if not timm.is_model(arch):
        raise ConfigError(f"model.backbone: unknown timm model '{arch}' (see timm.list_models())")
    pretrained_cfg = get_pretrained_cfg(arch)
    resolved = resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})
    return {"img_size": cfg.img_size, "mean": list(resolved["mean"]), "std": list(resolved["std"])}
