"""The training schedule: the learning rate's warmup and decay, and a pretrained backbone that waits for the new
Transformer before it learns."""

from __future__ import annotations

import pytest

from artfuse.config import ConfigError, load_config
from artfuse.models import create_model
from artfuse.pipelines.train import backbone_factor, lr_at, param_groups


def test_lr_warms_up_linearly_then_decays_to_the_floor():
    cfg = load_config(None, ["train.lr=0.001", "train.lr_min_ratio=0.01"])
    rates = [lr_at(step, total=100, warmup=10, cfg=cfg) for step in range(100)]
    assert rates[0] == pytest.approx(0.0001) and rates[9] == pytest.approx(0.001)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))
    assert lr_at(100, total=100, warmup=10, cfg=cfg) == pytest.approx(0.00001)


def test_the_backbone_waits_then_ramps_up_over_the_warmup():
    assert [backbone_factor(step, wait=3, ramp=2) for step in range(7)] == [0, 0, 0, 0.5, 1, 1, 1]
    assert [backbone_factor(step, wait=0, ramp=2) for step in range(3)] == [1, 1, 1]  # lr_at's warmup is enough
    assert [backbone_factor(step, wait=2, ramp=0) for step in range(4)] == [0, 0, 1, 1]


@pytest.mark.parametrize("pretrained, waiting", [("imagenet", True), ("none", False)])
def test_only_a_pretrained_backbone_learns_slower_and_waits(pretrained, waiting):
    cfg = load_config(None, [f"model.pretrained={pretrained}", "model.img_size=64", "model.d_model=32"])
    model = create_model(cfg.model, {"label": 3}, load_pretrained=False)
    groups = param_groups(model, cfg)
    backbone = {id(p) for name, p in model.named_parameters() if name.startswith("backbone.") and p.requires_grad}
    for group in groups:
        in_backbone = {id(p) in backbone for p in group["params"]}
        if waiting:  # a group is all backbone or none of it
            assert len(in_backbone) == 1 and group["pretrained_backbone"] == (in_backbone == {True})
        else:  # a backbone trained from scratch learns like the new layers
            assert not group["pretrained_backbone"]
        assert group["lr_scale"] == (cfg.train.backbone_lr_scale if group["pretrained_backbone"] else 1.0)
    assert any(g["pretrained_backbone"] for g in groups) == waiting
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("wait", ["-1", "12"])
def test_a_wait_outside_the_training_is_refused(wait):
    with pytest.raises(ConfigError, match="train.backbone_wait_epochs must be 0 or more and below train.epochs"):
        load_config(None, [f"train.backbone_wait_epochs={wait}", "train.epochs=12"])
