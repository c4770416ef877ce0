"""FusionNet: a CNN for local features, a Transformer for global context over the CNN's feature tokens, fused.

A Fusion Model for Artwork Identification Based on Convolutional Neural Networks and Transformers
    - Wang & Song, 2025

The CNN branch is any timm CNN; the feature map of its stage at one stride becomes d_model tokens with a CLS
token and learned 2-D position embeddings (resampled for other input sizes). A pre-norm Transformer encoder (timm's
ViT `Block`) models their global context, and a fusion head combines the CNN's own pooled features (after its
head convolution, what cnn_only classifies) with the CLS output:
`concat` (the paper's), `gated` or `cross_attention`. One linear head per task maps the fused embedding to
logits. Optionally each branch also gets its own linear head per task (`branch_heads`): training adds their losses
so that neither branch starves while the other carries the fused head; predictions use the fused head only.
"""

from __future__ import annotations

from collections.abc import Mapping

import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn

from artfuse.config import ConfigError

BRANCHES = ("cnn", "transformer")  # FusionNet's branches, in the order forward_branches returns their features

# ----------------------------------------------------------------------------------------------------
# Blocks


def create_cnn(name: str, **kwargs) -> nn.Module:
    """A timm CNN without weights (they are loaded by weights.py); an unknown name is a config error."""
    if not timm.is_model(name):
        raise ConfigError(f"model.backbone: unknown timm model '{name}' (see timm.list_models())")
    return timm.create_model(name, pretrained=False, **kwargs)


def stage_at_stride(model: nn.Module, name: str, stride: int) -> int:
    """Index (for timm's `forward_intermediates`) of the deepest stage of CNN `name` at `stride`."""
    reductions = [stage["reduction"] for stage in model.feature_info]
    if stride not in reductions:
        raise ConfigError(
            f"model.feature_stride={stride}: {name} has feature maps at strides {sorted(set(reductions))}"
        )
    if not hasattr(model, "forward_intermediates"):
        raise ConfigError(f"model.backbone: {name} has no forward_intermediates; pick another timm CNN")
    return len(reductions) - 1 - reductions[::-1].index(stride)


def modules_through_stride(model: nn.Module, name: str, stride: int) -> list[str]:
    """Names of CNN `name`'s modules that run up to and including its deepest stage at `stride`, in forward order
    (timm CNNs register their modules in that order: stem, then stages)."""
    stage = model.feature_info[stage_at_stride(model, name, stride)]["module"]  # e.g. "blocks.4" or "layer3"
    parent, _, index = stage.partition(".")
    names = []
    for child, module in model.named_children():
        if child != parent:
            names.append(child)
            continue
        if index:  # a stage inside a container (EfficientNet's blocks.N): its earlier siblings run first
            names += [f"{child}.{sibling}" for sibling, _ in module.named_children()][: int(index) + 1]
        else:
            names.append(child)
        return names
    raise ConfigError(f"model.freeze_stride: cannot find {name}'s stage module {stage}")


# timm's frozen norms apply their fixed affine transform as a multiply and an add over the activations: two passes
# and two temporaries, a third of a training step's forward on a CPU (2 cores, fusion at 288 px). batch_norm in
# inference mode is the same transform in one pass.
class FrozenBatchNorm2d(torchvision.ops.FrozenBatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class FrozenBatchNormAct2d(timm.layers.FrozenBatchNormAct2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(self.drop(x))


SINGLE_KERNEL: dict[type, type] = {
    torchvision.ops.FrozenBatchNorm2d: FrozenBatchNorm2d,
    timm.layers.FrozenBatchNormAct2d: FrozenBatchNormAct2d,
}


def freeze_through_stride(model: nn.Module, name: str, stride: int) -> None:
    """Keep CNN `name`'s layers up to its stage at `stride` as they are: no gradients, BatchNorm frozen (timm's
    FrozenBatchNorm, so its statistics stay the pretrained ones in training too)."""
    timm.utils.freeze(model, modules_through_stride(model, name, stride))
    for module in model.modules():
        if type(module) in SINGLE_KERNEL:  # same buffers and state dict, only the forward differs
            module.__class__ = SINGLE_KERNEL[type(module)]


class TaskHeads(nn.ModuleDict):
    """One linear classifier per task over a shared embedding; logits come back in task order."""

    def __init__(self, in_features: int, tasks: Mapping[str, int]):
        if not tasks:
            raise ConfigError("a model needs at least one task (label column)")
        for name, n_classes in tasks.items():
            if not name or "." in name:
                raise ConfigError(f"task name {name!r} cannot be a head name: use a non-empty name without '.'")
            if n_classes < 1:
                raise ConfigError(f"task '{name}' has {n_classes} classes; it needs at least one")
        super().__init__({name: nn.Linear(in_features, n_classes) for name, n_classes in tasks.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(x) for name, head in self.items()}


class MultiTaskModel(nn.Module):
    """The contract of every artfuse model, with timm's method names: an embedding, then one head per task.

    Subclasses build `backbone` (all pretrained parameters live under it), set `num_features` and `head_drop`,
    call `reset_classifier(tasks)` and implement `forward_features(x) -> (B, num_features)`.
    """

    num_features: int
    head_drop: nn.Module
    head: TaskHeads

    @property
    def tasks(self) -> dict[str, int]:
        return {name: head.out_features for name, head in self.head.items()}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, tasks: Mapping[str, int]) -> None:
        self.head = TaskHeads(self.num_features, tasks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(x))


class ConcatFusion(nn.Module):
    """[pooled CNN features ++ CLS] -> MLP, the seed paper's fusion."""

    def __init__(self, cnn_dim: int, d_model: int, num_heads: int, drop_rate: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(cnn_dim + d_model)
        self.mlp = Mlp(cnn_dim + d_model, hidden_features=d_model, out_features=d_model, drop=drop_rate)

    def forward(self, pooled: torch.Tensor, cls: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(torch.cat([pooled, cls], dim=-1)))


class GatedFusion(nn.Module):
    """g * cnn + (1 - g) * cls, with a per-channel sigmoid gate g computed from both."""

    def __init__(self, cnn_dim: int, d_model: int, num_heads: int, drop_rate: float = 0.0):
        super().__init__()
        self.cnn_proj = nn.Sequential(nn.LayerNorm(cnn_dim), nn.Linear(cnn_dim, d_model))
        self.gate = nn.Linear(2 * d_model, d_model)

    def forward(self, pooled: torch.Tensor, cls: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        cnn = self.cnn_proj(pooled)
        g = torch.sigmoid(self.gate(torch.cat([cnn, cls], dim=-1)))
        return g * cnn + (1 - g) * cls


class CrossAttentionFusion(nn.Module):
    """The CLS output attends over the CNN tokens (the local features it summarised); plus the pooled CNN features,
    projected; residual + norm."""

    def __init__(self, cnn_dim: int, d_model: int, num_heads: int, drop_rate: float = 0.0):
        super().__init__()
        self.kv_norm = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.cnn_proj = nn.Sequential(nn.LayerNorm(cnn_dim), nn.Linear(cnn_dim, d_model))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, pooled: torch.Tensor, cls: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.kv_norm(tokens)
        attended, _ = self.attn(cls.unsqueeze(1), kv, kv, need_weights=False)  # (B, 1, D)
        return self.norm(cls + attended.squeeze(1) + self.cnn_proj(pooled))


FUSIONS: dict[str, type[nn.Module]] = {
    "concat": ConcatFusion,
    "gated": GatedFusion,
    "cross_attention": CrossAttentionFusion,
}

# ----------------------------------------------------------------------------------------------------
# Model


class FusionNet(MultiTaskModel):
    """CNN feature tokens -> Transformer encoder -> fuse pooled CNN features with CLS -> one head per task."""

    def __init__(
        self,
        backbone: str,
        tasks: Mapping[str, int],
        *,
        feature_stride: int = 32,
        img_size: int = 224,
        d_model: int = 192,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        fusion: str = "concat",
        drop_rate: float = 0.1,
        drop_path_rate: float = 0.0,
        branch_heads: bool = False,
    ):
        """
        Args:
            backbone: timm CNN name (anything with `forward_intermediates`, i.e. nearly every timm CNN).
            tasks: task name -> number of classes, in output order.
            feature_stride: the CNN stage whose feature map becomes the tokens (its reduction).
            img_size: input side the position embeddings are learned for; other sizes are resampled.
            d_model: Transformer width and the size of the fused embedding.
            depth: Transformer encoder blocks.
            num_heads: attention heads (Transformer and cross-attention fusion).
            mlp_ratio: Transformer MLP hidden size / d_model.
            fusion: concat | gated | cross_attention.
            drop_rate: dropout on tokens, inside the Transformer and before the heads.
            drop_path_rate: stochastic depth, rising linearly to this over the blocks.
            branch_heads: a linear head per task on each branch's own features (pooled CNN, CLS), for an auxiliary
                loss; `forward(x, branch_logits=True)` returns their logits too.
        """
        super().__init__()
        if fusion not in FUSIONS:
            raise ConfigError(f"model.fusion must be one of {', '.join(FUSIONS)}; got {fusion!r}")
        self.backbone = create_cnn(backbone, num_classes=0)
        self.feature_index = stage_at_stride(self.backbone, backbone, feature_stride)
        token_dim = self.backbone.feature_info[self.feature_index]["num_chs"]
        cnn_dim = self.backbone.num_features
        self.grid_size = (img_size // feature_stride, img_size // feature_stride)

        self.proj = nn.Conv2d(token_dim, d_model, kernel_size=1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], d_model))
        self.pos_drop = nn.Dropout(drop_rate)
        drop_paths = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(
            *[Block(d_model, num_heads, mlp_ratio, qkv_bias=True, proj_drop=drop_rate, drop_path=p) for p in drop_paths]
        )
        self.norm = nn.LayerNorm(d_model)
        self.fusion = FUSIONS[fusion](cnn_dim, d_model, num_heads, drop_rate)

        self.num_features = d_model
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(tasks)
        branch_dims = dict(zip(BRANCHES, (cnn_dim, d_model), strict=True))
        self.branch_heads = (
            nn.ModuleDict({branch: TaskHeads(dim, tasks) for branch, dim in branch_dims.items()})
            if branch_heads
            else None
        )
        self.init_weights()

    def init_weights(self) -> None:
        """ViT-style init for the new layers; the backbone keeps its own (or pretrained) weights."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in (self.blocks, self.fusion, self.head, self.branch_heads):
            if module is not None:
                module.apply(init_weights_vit_timm)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid == self.grid_size:
            return self.pos_embed
        return resample_abs_pos_embed(
            self.pos_embed,
            new_size=list(grid),
            old_size=list(self.grid_size),
            num_prefix_tokens=0,
            interpolation="bilinear",
        )

    def forward_branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pooled CNN features (B, C), Transformer CLS (B, D), fused embedding (B, num_features))."""
        # One pass: the whole CNN's features (after its head conv, as for cnn_only) and the token stage's map.
        features, (fmap,) = self.backbone.forward_intermediates(x, indices=[self.feature_index])
        tokens = self.proj(fmap).flatten(2).transpose(1, 2)  # (B, h*w, D)
        tokens = tokens + self.position_embedding((fmap.shape[-2], fmap.shape[-1]))
        x = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        x = self.norm(self.blocks(self.pos_drop(x)))
        pooled, cls = features.mean(dim=(2, 3)), x[:, 0]
        return pooled, cls, self.fusion(pooled, cls, tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_branches(x)[-1]  # (B, num_features)

    def forward(self, x: torch.Tensor, branch_logits: bool = False) -> dict[str, torch.Tensor]:
        """Logits per task; with branch_logits (and branch heads) also "<branch>.<task>" logits per branch (task
        names never contain '.', so the keys cannot clash)."""
        if not branch_logits or self.branch_heads is None:
            return self.forward_head(self.forward_features(x))
        *branch_features, fused = self.forward_branches(x)
        logits = self.forward_head(fused)
        for branch, features in zip(BRANCHES, branch_features, strict=True):
            heads = self.branch_heads[branch](self.head_drop(features))
            logits |= {f"{branch}.{task}": value for task, value in heads.items()}
        return logits
