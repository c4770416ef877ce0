"""The whole pipeline, small: samples -> train (Ray Train) -> evaluate -> label (Ray Data) -> Parquet."""

import json

import pyarrow.dataset as pads
import pytest

from artfuse.pipelines.demo import demo
from artfuse.pipelines.label import prediction_schema

pytestmark = pytest.mark.slow


def test_demo_end_to_end(tmp_path, ray_local):
    settings = [
        "model.img_size=64",
        "model.d_model=64",
        "model.depth=1",
        "model.pretrained=none",
        "train.epochs=3",
        "train.batch_size=16",
        "label.batch_size=32",
    ]
    summary = demo(str(tmp_path), settings, n_samples=96)
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert set(metrics["tasks"]["label"]) >= {"accuracy", "macro_f1", "per_class", "confusion", "labels"}
    assert (tmp_path / "evaluation" / "confusion_label.png").stat().st_size > 0
    manifest = json.loads((tmp_path / "model" / "artfuse.json").read_text())
    assert manifest["model_id"] and manifest["tasks"]["label"] == metrics["tasks"]["label"]["labels"]
    assert (tmp_path / "model" / "curves.png").exists()

    rows = pads.dataset(
        tmp_path / "predictions", format="parquet", partitioning="hive", ignore_prefixes=["_", "."]
    ).to_table()
    assert rows.num_rows == 96 == summary["rows_written"]
    expected = prediction_schema(manifest["tasks"], None)
    for field in expected:
        assert rows.schema.field(field.name).type == field.type, field.name
    assert "run_date" in rows.column_names
    assert rows["error"].null_count == 96
    assert set(rows["model_id"].to_pylist()) == {manifest["model_id"]}
