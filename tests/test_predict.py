import numpy as np
import pytest

from artfuse.bench.label import save_untrained_package
from artfuse.config import ConfigError, load_config
from artfuse.models.package import load_package
from artfuse.models.predict import Predictor

TINY = ["model.img_size=64", "model.d_model=32", "model.depth=1", "model.pretrained=none", "model.dropout=0"]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_flip_tta_averages_the_image_and_its_mirror(tmp_path):
    package = load_package(save_untrained_package(str(tmp_path / "model"), load_config(None, TINY), {"label": 6}))
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    plain, flip = Predictor(package), Predictor(package, tta="flip")

    as_is, of_mirror = plain(images, embeddings=True), plain(mirrored, embeddings=True)
    with_tta = flip(images, embeddings=True)
    # log-probabilities are the logits less a constant per row, which the softmax of their mean cancels
    expected = softmax((np.log(as_is["label"]) + np.log(of_mirror["label"])) / 2)
    assert with_tta["label"] == pytest.approx(expected, abs=1e-5)
    assert not np.allclose(with_tta["label"], as_is["label"], atol=1e-4)  # the mirror changed something
    mean_embedding = (as_is["embedding"].astype(np.float32) + of_mirror["embedding"].astype(np.float32)) / 2
    assert with_tta["embedding"].astype(np.float32) == pytest.approx(mean_embedding, abs=2e-2)
    assert flip(mirrored)["label"] == pytest.approx(with_tta["label"], abs=1e-5)  # mirror-invariant by design


def test_unknown_tta_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="label.tta must be one of none, flip"):
        load_config(None, ["label.tta=multicrop"])
    package = load_package(save_untrained_package(str(tmp_path / "model"), load_config(None, TINY), {"label": 2}))
    with pytest.raises(ConfigError, match="label.tta must be one of none, flip; got 'five'"):
        Predictor(package, tta="five")
