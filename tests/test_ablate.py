"""ablate: every architecture on one split for N seeds, a mean ± std table from the test split, resumable; evaluate
scores a package's test split (an older package's validation split)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train import TINY as TRAIN_TINY

from artfuse.config import ConfigError, DataConfig, load_config
from artfuse.data.catalog import load_collection
from artfuse.data.samples import generate_samples
from artfuse.models.package import load_package
from artfuse.pipelines.ablate import ablate, paired_differences, to_markdown
from artfuse.pipelines.evaluate import trained_split

# test_train's tiny model; fusion also trains its branch heads' auxiliary loss, on batches mixed by mixup or CutMix
TINY = [*TRAIN_TINY, "model.branch_loss=0.3", "train.mixup_alpha=0.4", "train.cutmix_alpha=1.0", "train.epochs=1"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    generate_samples(str(out), n=48, seed=1)  # 6 labels x 8 images: 5 train, 1 val, 2 test each
    return out


def run_records(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.glob("*/seed*/ablation_run.json"))}


def test_ablation_over_seeds_tabulates_the_test_split_and_a_rerun_skips_finished_runs(samples, tmp_path, ray_local):
    # Two trainings in all: one seed, then a rerun asked for two that trains only the second (the fusion, with its
    # branch heads' auxiliary loss); the architectures are one loop, so one of them is enough.
    out = tmp_path / "ablation"
    cfg = load_config(None, TINY)
    summary = ablate(str(samples), str(out), cfg, archs=("fusion",), seeds=1)
    # the movement with the fewest training images; the samples are balanced, so the first of those by name
    assert summary["measured"] == ["accuracy", "macro_f1", "recall[label=colour_field]"]
    fusion = summary["archs"]["fusion"]
    assert fusion["runs"] == 1 and fusion["accuracy"]["std"] is None  # one run: a mean, no spread
    assert "| fusion | 1 | 12 |" in (out / "ablation.md").read_text()
    first = run_records(out)
    assert sorted(first) == ["fusion/seed0/ablation_run.json"]

    # a rerun trains only what is missing and keeps every package
    summary = ablate(str(samples), str(out), cfg, archs=("fusion",), seeds=2)
    second = run_records(out)
    assert sorted(second) == ["fusion/seed0/ablation_run.json", "fusion/seed1/ablation_run.json"]
    assert {k: second[k] for k in first} == first  # seed 0 was not trained again
    fusion = summary["archs"]["fusion"]
    assert fusion["runs"] == 2 and fusion["seeds"] == [0, 1] and fusion["split"] == "test" and fusion["n"] == 12
    for column in summary["measured"]:
        assert 0.0 <= fusion[column]["mean"] <= 1.0 and fusion[column]["std"] is not None
    seed0 = json.loads((out / "fusion" / "seed0" / "ablation_run.json").read_text())["row"]
    seed1 = json.loads((out / "fusion" / "seed1" / "ablation_run.json").read_text())["row"]
    assert fusion["accuracy"]["mean"] == pytest.approx((seed0["accuracy"] + seed1["accuracy"]) / 2, abs=1e-4)
    assert "| fusion | 2 | 12 |" in (out / "ablation.md").read_text() and " ± " in (out / "ablation.md").read_text()
    assert json.loads((out / "ablation.json").read_text()) == summary
    runs = (out / "runs.csv").read_text().splitlines()
    assert len(runs) == 3 and runs[0].startswith("arch,seed,split,n,accuracy,macro_f1,val_accuracy")
    assert list((out / "_train").iterdir()) == []  # finished runs' checkpoints are gone, their packages kept
    package = load_package(str(out / "fusion" / "seed0"))
    assert package.model.branch_heads is not None and package.meta["training"]["n_test"] == 12

    # nothing left to train; other settings in the same --out are refused, not mixed in
    records = run_records(out)
    ablate(str(samples), str(out), cfg, archs=("fusion",), seeds=2)
    assert run_records(out) == records
    with pytest.raises(ConfigError, match=r"trained with other settings \(train.epochs\): use a new --out"):
        ablate(str(samples), str(out), load_config(None, [*TINY, "train.epochs=2"]), archs=("fusion",), seeds=1)

    # evaluate's split: a package's test split; a package from before test splits (no test_fraction), its val split
    training = package.meta["training"]
    split = load_collection(str(samples), trained_split(DataConfig(), training, ["label"]))
    assert split.fingerprint == training["fingerprint"] and split.subset("test").num_rows == 12
    del training["data_config"]["test_fraction"]
    older = load_collection(str(samples), trained_split(DataConfig(), training, ["label"]))
    assert older.subset("test").num_rows == 0 and older.subset("val").num_rows == 6


def test_paired_differences_compare_the_first_arch_fold_by_fold_on_the_folds_both_have():
    runs = [
        *({"arch": "fusion", "seed": 0, "fold": f, "accuracy": a} for f, a in enumerate([0.90, 0.88, 0.86, 0.91])),
        *({"arch": "cnn_only", "seed": 0, "fold": f, "accuracy": a} for f, a in enumerate([0.91, 0.86, 0.86])),
        {"arch": "transformer_only", "seed": 0, "fold": 0, "accuracy": 0.70},
    ]
    paired = paired_differences(runs)
    cnn = paired["cnn_only"]
    assert cnn["against"] == "fusion" and cnn["runs"] == 3 and cnn["differences"] == [-0.01, 0.02, 0.0]
    assert cnn["mean"] == pytest.approx(0.0033, abs=1e-4)
    low, high = cnn["ci"]
    assert low < 0 < high and high - cnn["mean"] == pytest.approx(cnn["mean"] - low, abs=1e-3)  # t, 2 df: wide
    assert paired["transformer_only"]["differences"] == [0.2] and paired["transformer_only"]["ci"] is None
    assert paired_differences(runs[:4]) == {}  # one arch: nothing to pair
    summary = {
        "data": "d",
        "measured": [],
        "archs": {},
        "paired": paired,
        "minutes_total": 1,
        "budget": {
            "model": load_config(None, []).model.__dict__,
            "data": {**DataConfig().__dict__, "folds": 5},
            "train": load_config(None, []).train.__dict__,
        },
    }
    assert "fusion - cnn_only, accuracy, paired over the 3 runs both have" in to_markdown(summary)
