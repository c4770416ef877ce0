"""Mixup / CutMix: what each does to a batch, the loss it implies, and the config's checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from artfuse.config import ConfigError, load_config
from artfuse.data.mixing import mix_batch, mixed_loss


def batch(n: int = 4, size: int = 32) -> torch.Tensor:
    """Images whose every pixel holds its image's index, so a mixed pixel tells where it came from."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).clone()


def test_off_leaves_the_batch_alone():
    x = batch()
    mixed, lam = mix_batch(x, 0.0, 0.0, np.random.default_rng(0))
    assert lam == 1.0 and torch.equal(mixed, x)


def test_mixup_blends_each_image_with_its_partner():
    x = batch()
    mixed, lam = mix_batch(x, 0.4, 0.0, np.random.default_rng(0))
    assert 0.0 < lam < 1.0
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))


def test_cutmix_pastes_a_box_of_the_partner_and_lam_is_the_share_kept():
    x = batch(size=64)
    np.random.seed(0)  # timm draws the box's place from numpy's global generator
    for seed in range(20):
        mixed, lam = mix_batch(x, 0.0, 1.0, np.random.default_rng(seed))
        for i in range(len(x)):
            own = (mixed[i] == i).float().mean().item()
            partner = (mixed[i] == len(x) - 1 - i).float().mean().item()
            if i != len(x) - 1 - i:
                assert own + partner == pytest.approx(1.0)
                assert own == pytest.approx(lam)
    assert torch.equal(x, batch(size=64))  # the input itself is never written to


def test_both_on_uses_each_about_half_the_time():
    x = batch()
    rng = np.random.default_rng(0)
    blended = 0
    for _ in range(200):
        mixed, _ = mix_batch(x, 0.4, 1.0, rng)
        blended += bool((mixed != mixed.round()).any())  # mixup leaves fractional pixels, CutMix never does
    assert 70 < blended < 130


def test_mixed_loss_weights_the_two_labels():
    loss = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.1)
    logits = torch.randn(4, 3)
    target = torch.tensor([0, 1, 2, 1])
    assert torch.equal(mixed_loss(loss, logits, target, 1.0), loss(logits, target))
    expected = 0.3 * loss(logits, target) + 0.7 * loss(logits, target.flip(0))
    torch.testing.assert_close(mixed_loss(loss, logits, target, 0.3), expected)


@pytest.mark.parametrize("key", ["train.mixup_alpha", "train.cutmix_alpha"])
def test_a_negative_alpha_is_a_config_error(key):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=[f"{key}=-0.2"])
