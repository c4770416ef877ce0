"""The paper's ablation baselines, each FusionNet's contract with one branch: the CNN alone, a ViT alone."""

from __future__ import annotations

from collections.abc import Mapping

import timm
import torch
from torch import nn

from artfuse.config import ConfigError
from artfuse.models.fusion import MultiTaskModel, create_cnn

VIT_ARCH = "vit_small_patch16_224"  # the template for transformer_only; every size argument is overridden


class CnnOnly(MultiTaskModel):
    """A timm CNN, globally average-pooled, one head per task."""

    def __init__(self, backbone: str, tasks: Mapping[str, int], *, drop_rate: float = 0.1):
        super().__init__()
        self.backbone = create_cnn(backbone, num_classes=0, global_pool="avg", drop_rate=0.0)
        self.num_features = self.backbone.num_features
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(tasks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (B, C)


class TransformerOnly(MultiTaskModel):
    """A ViT on image patches (timm's VisionTransformer, from scratch); its CLS output feeds the heads."""

    def __init__(
        self,
        tasks: Mapping[str, int],
        *,
        img_size: int = 224,
        patch_size: int = 16,
        d_model: int = 192,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.1,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ConfigError(
                f"model.img_size ({img_size}) must be a multiple of model.patch_size ({patch_size})"
            )
        self.backbone = timm.create_model(
            VIT_ARCH,
            pretrained=False,
            num_classes=0,
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=d_model,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            drop_rate=0.0,  # the head dropout is ours, below
            pos_drop_rate=drop_rate,
            proj_drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,  # resamples the position embeddings for other input sizes
        )
        self.num_features = d_model
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(tasks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (B, D)
