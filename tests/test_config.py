import pytest

from artfuse.config import Config, ConfigError, load_config
from artfuse.reporting.metrics import confusion_matrix, summarize


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.arch == "cnn_only"


def test_set_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  fusion: gated\ntrain:\n  epochs: 3\n")
    cfg = load_config(
        path, ["train.lr=0.01", "model.depth=3", "data.tasks=[style, artist]", "train.augment=false"]
    )
    assert cfg.model.fusion == "gated" and cfg.train.epochs == 3 and cfg.model.depth == 3
    assert cfg.train.lr == 0.01 and cfg.data.tasks == ["style", "artist"] and cfg.train.augment is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.fusoin=gated", "did you mean 'fusion'"),
        ("train.epochs=many", "train.epochs expects an integer"),
        ("model.fusion=sum", "model.fusion must be one of"),
        ("model.d_model=190", "divisible by model.num_heads"),
        ("nonsense", "expects key=value"),
        ("train.augment=3", "expects true or false"),
        ("label.decode_niceness=20", "label.decode_niceness must be between 0 and 19"),
        ("label.stall_timeout_s=-1", "label.stall_timeout_s must be at least 0"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/config.yaml")


def test_metrics_from_confusion():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    m = summarize(confusion_matrix(y_true, y_pred, 3), ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["b"] == {
        "precision": pytest.approx(2 / 3),
        "recall": 1.0,
        "f1": pytest.approx(0.8),
        "support": 2,
    }
    # per-class F1: a = 0.5, b = 0.8, c = 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
