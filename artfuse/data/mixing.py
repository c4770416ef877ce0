"""Mixup and CutMix on a training batch: regularisation for small collections (the paper's unstable training).

Each image is paired with its mirror position in the batch (timm's "batch" mode with the flipped order): mixup
blends the pair, CutMix pastes a box of the partner into the image. The loss is then weighted between the two
labels by `lam`, the share of the image that is its own. We mix here rather than with timm's `Mixup` because
that mixes one target tensor into soft one-hot labels, and a model with several tasks needs one draw for all of
its tasks, with each task's class weights and label smoothing kept in its own loss.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from timm.data.mixup import cutmix_bbox_and_lam


def mix_batch(
    x: torch.Tensor, mixup_alpha: float, cutmix_alpha: float, rng: np.random.Generator
) -> tuple[torch.Tensor, float]:
    """(mixed batch, lam): each image x[i] mixed with x[-1 - i]; lam = 1.0 (the batch untouched) when both alphas
    are 0. With both on, each batch uses one of the two, half the time each."""
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    if use_cutmix:
        lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
        # The box's place is drawn by timm (numpy's global generator); lam becomes the share of pixels kept.
        (top, bottom, left, right), lam = cutmix_bbox_and_lam(x.shape, lam, correct_lam=True)
        x = x.clone()
        x[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
        return x, float(lam)
    if mixup_alpha > 0:
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        return x * lam + x.flip(0) * (1.0 - lam), lam
    return x, 1.0


def mixed_loss(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor, target: torch.Tensor, lam: float
) -> torch.Tensor:
    """`loss` against the image's own labels (weight lam) and its partner's (1 - lam), the partners of mix_batch."""
    if lam >= 1.0:
        return loss(logits, target)
    return lam * loss(logits, target) + (1.0 - lam) * loss(logits, target.flip(0))
