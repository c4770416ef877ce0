"""ablate --folds: stratified folds over the images outside the test split, each held out by one run, resumable."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from test_train import TINY

from artfuse.config import ConfigError, DataConfig, load_config
from artfuse.data.catalog import LEFT_OUT, load_collection
from artfuse.data.samples import generate_samples
from artfuse.models.predict import native_cpu_bf16
from artfuse.pipelines import ablate as ablate_module
from artfuse.pipelines.ablate import ablate
from artfuse.pipelines.evaluate import calibrate_out_of_fold


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    generate_samples(str(out), n=48, seed=1)  # 6 labels x 8 images: 2 test each, 6 outside it
    return out


def rows(table) -> dict[str, str]:
    return dict(zip(table.column("uri").to_pylist(), table.column("label").to_pylist(), strict=True))


def test_folds_are_disjoint_stratified_and_hold_out_every_non_test_image_once(samples):
    plain = load_collection(str(samples), DataConfig())
    test, outside = rows(plain.subset("test")), {**rows(plain.subset("train")), **rows(plain.subset("val"))}
    held = []
    for fold in range(5):
        split = load_collection(str(samples), DataConfig(folds=5, fold=fold))
        assert split.subset("test").num_rows == 0 and split.vocabs == plain.vocabs
        # the test split's images stay in the table, in no split a run reads: the collection is the same one
        assert split.fingerprint == plain.fingerprint
        assert rows(split.table.filter(pc.equal(split.table["split"], LEFT_OUT))) == test
        val, train = rows(split.subset("val")), rows(split.subset("train"))
        assert not set(val) & set(train) and {**val, **train} == outside  # the test split is in no fold run
        # each label's 6 images outside the test split: 1 or 2 in every fold
        assert set(Counter(val.values())) == set(plain.vocabs["label"]) and set(Counter(val.values()).values()) <= {
            1,
            2,
        }
        held += list(val)
    assert sorted(held) == sorted(outside) and not set(held) & set(test)
    with pytest.raises(ConfigError, match=r"has 6 image\(s\) outside the test split; data.folds=7 needs"):
        load_collection(str(samples), DataConfig(folds=7))
    with pytest.raises(ConfigError, match="data.fold one of 0 .. folds - 1"):
        load_config(None, ["data.folds=5", "data.fold=5"])


@pytest.mark.slow
def test_ablate_over_folds_scores_each_held_fold_and_a_rerun_trains_nothing(samples, tmp_path, ray_local, monkeypatch):
    # 2 folds, the fewest trainings that still stop after the first and go on with the rest: the folds themselves
    # are checked at K = 5 above
    out, cfg = tmp_path / "folds", load_config(None, [*TINY, "train.epochs=1"])
    summary = ablate(str(samples), str(out), cfg, archs=("cnn_only",), folds=2, first_folds=1)
    assert summary["archs"]["cnn_only"]["folds"] == [0]
    runs = out / "cnn_only" / "seed0"
    with pytest.raises(ConfigError, match="holds no finished fold run"):
        calibrate_out_of_fold(str(runs / "fold0"), str(out / "cnn_only"), cfg)
    with pytest.raises(ConfigError, match="1 of the 2 fold runs under .* are not finished"):
        calibrate_out_of_fold(str(runs / "fold0"), str(runs), cfg)
    summary = ablate(str(samples), str(out), cfg, archs=("cnn_only",), folds=2)  # goes on with fold 1
    cnn = summary["archs"]["cnn_only"]
    assert cnn["runs"] == 2 and cnn["folds"] == [0, 1] and cnn["split"] == "held fold" and cnn["n"] == 36
    assert cnn["accuracy"]["ci"] is not None and " ± " in (out / "ablation.md").read_text()
    records = sorted(out.glob("cnn_only/seed0/fold*/ablation_run.json"))
    assert len(records) == 2
    for fold, record in enumerate(records):
        run = json.loads(record.read_text())
        assert run["row"]["fold"] == fold and run["config"]["data"]["folds"] == 2
        held = np.load(record.parent / "val_logits.npz")  # the held fold's out-of-fold logits, for calibration
        assert held["logits/label"].shape == (run["row"]["n"], 6) and len(held["labels/label"]) == run["row"]["n"]
    assert "2-fold cross-validation over the images outside the test split" in (out / "ablation.md").read_text()
    assert {json.loads(r.read_text())["row"]["precision"] for r in records} == {"bf16" if native_cpu_bf16() else "fp32"}

    # The runs' small files alone, on another machine (as committed to git): the collection copied elsewhere (new
    # paths, new mtimes), the run folders without weights, checkpoints or plots. A rerun trains nothing, and the
    # out-of-fold calibration reads them.
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(samples, elsewhere / "samples", copy_function=shutil.copy)
    shutil.copytree(out, elsewhere / "folds", ignore=shutil.ignore_patterns("model.safetensors", "_train", "*.png"))
    assert not list((elsewhere / "folds").rglob("model.safetensors"))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fold run was trained again")

    monkeypatch.setattr(ablate_module, "train_run", no_training)
    again = ablate(str(elsewhere / "samples"), str(elsewhere / "folds"), cfg, archs=("cnn_only",), folds=2)
    assert again["archs"]["cnn_only"]["accuracy"] == cnn["accuracy"] and again["archs"]["cnn_only"]["n"] == 36
    calibrated = calibrate_out_of_fold(str(runs / "fold0"), str(elsewhere / "folds" / "cnn_only" / "seed0"), cfg)
    assert str(elsewhere) in json.dumps(calibrated)
    with pytest.raises(ConfigError, match="trained on another collection"):
        generate_samples(str(tmp_path / "other"), n=48, seed=2)
        ablate(str(tmp_path / "other"), str(elsewhere / "folds"), cfg, archs=("cnn_only",), folds=2)
    # the temperature and review threshold fitted on every held fold's predictions: each image outside the test split
    fitted = calibrate_out_of_fold(str(runs / "fold0"), str(runs), cfg)
    assert fitted["tasks"]["label"]["n"] == 36 and fitted["fitted_on"].startswith("out-of-fold predictions")
    assert json.loads((runs / "fold0" / "artfuse.json").read_text())["calibration"] == {
        key: fitted[key] for key in ("method", "fitted_on", "tasks")
    }
    mtimes = [r.stat().st_mtime_ns for r in records]
    ablate(str(samples), str(out), cfg, archs=("cnn_only",), folds=2)
    assert [r.stat().st_mtime_ns for r in records] == mtimes  # nothing trained again
    with pytest.raises(ConfigError, match=r"trained with other settings \(train.epochs\)"):
        ablate(str(samples), str(out), load_config(None, [*TINY, "train.epochs=2"]), archs=("cnn_only",), folds=2)
