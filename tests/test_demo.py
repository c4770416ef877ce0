"""The whole pipeline, small: samples -> train (Ray Train) -> evaluate -> label (Ray Data) -> Parquet."""

import json

import pyarrow.dataset as pads

from artfuse.pipelines.demo import demo
from artfuse.pipelines.label import prediction_schema


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
    assert metrics["split"] == "test" and metrics["n"] == 18  # 3 of each movement's 16: only images that chose nothing
    assert set(metrics["tasks"]["label"]) >= {"accuracy", "macro_f1", "per_class", "confusion", "labels"}
    assert (tmp_path / "evaluation" / "confusion_label.png").stat().st_size > 0
    manifest = json.loads((tmp_path / "model" / "artfuse.json").read_text())
    assert manifest["model_id"] and manifest["tasks"]["label"] == metrics["tasks"]["label"]["labels"]
    assert (tmp_path / "model" / "curves.png").exists()
    # calibrated at the end of training, and evaluate reports how far the scores can be trusted
    fitted = manifest["calibration"]["tasks"]["label"]
    task = metrics["tasks"]["label"]
    assert task["temperature"] == fitted["temperature"] > 0
    assert 0 <= task["ece"] <= 1 and 0 <= task["ece_uncalibrated"] <= 1
    assert [p["threshold"] for p in task["risk_coverage"]][:2] == [0.0, 0.05]
    assert task["risk_coverage"][0]["coverage"] == 1
    assert task["auto_accept"]["threshold"] == fitted["review_threshold"]
    for plot in ("reliability_label.png", "risk_coverage_label.png"):
        assert (tmp_path / "evaluation" / plot).stat().st_size > 0

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
