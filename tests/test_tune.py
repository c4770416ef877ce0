"""Ray Tune search: the search space and trial configs, and a real search that is interrupted and resumed."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import ray.train
from ray import tune as ray_tune
from ray.tune.search.sample import Categorical, Domain

from artfuse.config import ConfigError, load_config
from artfuse.pipelines.pause import PAUSED
from artfuse.pipelines.train import load_checkpoint
from artfuse.pipelines.tune import (
    check_same_search,
    check_space,
    finished_run_metrics,
    fit_concurrency,
    search_space,
    searched_params,
    trial_config,
    with_trial_resources,
)

EPOCHS = 2
# Tiny, but on the pretrained backbone (no slower at 64 px): after one epoch the trials differ, so ASHA has
# something to rank (from scratch they all sit at chance, tie, and nothing is ever below the cutoff). No EMA: over
# one epoch's three steps the average still sits near the initial weights, and the trials would tie again.
FUSION = ["model.arch=fusion"]  # the space's model fields are the fusion model's (cnn_only searches training alone)
TINY = [
    *FUSION,
    "model.img_size=64",
    f"train.epochs={EPOCHS}",
    "train.ema_decay=0",
    "train.warmup_epochs=0",
    "train.batch_size=16",
    "tune.d_model=[32]",
    "tune.num_heads=[2,4]",
    "tune.depth=[1]",
    "tune.lr_range=[0.001,0.01]",
    "tune.grace_period=1",
    "tune.reduction_factor=3",
    "tune.max_concurrent_trials=2",
]
# The kill test's search, two at a time: at the kill one trial has finished, one is midway and the third has just
# started or not yet; the rerun finishes the last two side by side (a fourth trial would cost the rerun a round).
N_TRIALS = 3
# The ASHA test's search, one trial at a time: the first trial to reach the rung always goes on (there is no cutoff
# yet), the third is stopped if it scores below the median of the first two. With the seeded space below, the first
# and third sample hopeless learning rates (about 1e-5: three steps leave the weights near their seeded start, macro-F1
# about 0.2 and 0.05) and the second a good one (4e-4, about 0.5), so the third is stopped every run.
ASHA_TRIALS = 3
# The kill test's search: ASHA's first rung at the last epoch, so it stops no trial. Which trials ASHA stops at an
# earlier rung depends on the scores, and a search whose every other trial was stopped would have none midway to
# interrupt (ASHA has its own test).
KILL_TEST = [*TINY, f"tune.grace_period={EPOCHS}"]
SEARCH_TIMEOUT_S = 420


def test_default_space_searches_every_listed_parameter():
    cfg = load_config(None, FUSION)
    space = search_space(cfg)
    assert set(space) == set(searched_params(cfg))
    assert isinstance(space["model.fusion"], Categorical)
    assert set(space["model.fusion"].categories) == {"concat", "gated", "cross_attention"}
    assert space["train.lr"].lower == cfg.tune.lr_range[0] and space["train.lr"].upper == cfg.tune.lr_range[1]
    check_space(cfg)


def test_an_arch_is_searched_only_over_the_fields_it_uses():
    cnn = search_space(load_config(None, ["model.arch=cnn_only"]))
    assert not {"model.fusion", "model.depth", "model.d_model", "model.num_heads", "model.feature_stride"} & set(cnn)
    assert {"model.dropout", "train.lr", "train.weight_decay"} <= set(cnn)
    vit = search_space(load_config(None, ["model.arch=transformer_only"]))
    assert {"model.depth", "model.d_model"} <= set(vit) and not {"model.fusion", "model.feature_stride"} & set(vit)


def test_single_values_are_fixed_and_empty_lists_keep_the_base():
    overrides = ["tune.depth=[3]", "tune.fusion=[]", "tune.lr_range=[0.002]", "model.fusion=gated"]
    cfg = load_config(None, [*FUSION, *overrides])
    space = search_space(cfg)
    assert space["model.depth"] == 3 and space["train.lr"] == 0.002
    assert "model.fusion" not in space
    assert "model.depth" not in searched_params(cfg)
    trial = trial_config(cfg, {k: v for k, v in space.items() if not isinstance(v, Domain)})
    assert (trial.model.depth, trial.train.lr, trial.model.fusion) == (3, 0.002, "gated")


def test_trial_config_picks_a_head_count_that_divides_d_model():
    cfg = load_config(None, [*FUSION, "tune.d_model=[96,128]", "tune.num_heads=[3,4,8]"])
    assert trial_config(cfg, {"model.d_model": 128, "model.num_heads": 3}).model.num_heads == 4
    assert trial_config(cfg, {"model.d_model": 96, "model.num_heads": 8}).model.num_heads == 8
    assert trial_config(cfg, {"model.d_model": 96, "model.num_heads": 3}).model.num_heads == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["tune.d_model=[30]", "tune.num_heads=[4,8]"], "divides d_model 30"),
        (["tune.fusion=[concat,sum]"], "model.fusion='sum'"),
        (["tune.feature_stride=[16,64]"], "model.feature_stride=64"),
        (["tune.lr_range=[0.01,0.001]"], "tune.lr_range"),
        (["tune.weight_decay_range=[0,0.1]"], "tune.weight_decay_range"),
        (["tune.grace_period=20", "train.epochs=4"], "tune.grace_period"),
        (["tune.gpus_per_trial=0.5"], "tune.gpus_per_trial"),
        (["tune.num_heads=[0]"], "at least 1"),
    ],
)
def test_a_bad_space_fails_before_any_trial(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        check_space(load_config(None, [*FUSION, *overrides]))


def test_trial_resources_and_concurrency_fit_the_cluster():
    cfg = load_config(None, ["tune.cpus_per_trial=1.0", "train.num_workers=2", "tune.gpus_per_trial=2"])
    trial = with_trial_resources(cfg, concurrency=1, cluster_cpus=None)
    assert (trial.train.cpus_per_worker, trial.train.use_gpu, trial.train.torch_threads) == (0.5, True, 0)
    local = with_trial_resources(load_config(), concurrency=2, cluster_cpus=2.0)
    assert local.train.cpus_per_worker == 0.5 and local.train.torch_threads == 1

    # 2 cores: two trials at 0.5 CPU leave one whole CPU to Ray Data; a third would starve it.
    assert fit_concurrency(4, {"CPU": 2.0}, 0.5, 0.0) == 2
    assert fit_concurrency(1, {"CPU": 2.0}, 0.5, 0.0) == 1
    assert fit_concurrency(8, {"CPU": 64.0, "GPU": 4.0}, 4.0, 1.0) == 4
    with pytest.raises(ConfigError, match="lower tune.cpus_per_trial"):
        fit_concurrency(2, {"CPU": 2.0}, 2.0, 0.0)


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    uri = str(tmp_path / "search_config.yaml")
    cfg = load_config(None, TINY)
    check_same_search(uri, cfg, resuming=False)
    check_same_search(uri, cfg, resuming=True)
    check_same_search(uri, dataclasses.replace(cfg, label=dataclasses.replace(cfg.label, batch_size=7)), True)
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=5))
    with pytest.raises(ConfigError, match="train.epochs"):
        check_same_search(uri, changed, resuming=True)


def test_cli_reports_a_bad_space_in_one_line(tmp_path, capsys):
    from artfuse.cli import main

    code = main(["tune", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "tune.num_heads=[5]"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("artfuse tune: error:") and "\n" not in err


@pytest.mark.slow  # three Tune trials of Ray Train runs, about 90 s on a quiet 2-core machine
def test_asha_stops_the_trials_below_the_cutoff_and_the_table_says_so(tmp_path, ray_local):
    from artfuse.data.samples import generate_samples
    from artfuse.pipelines.tune import tune

    generate_samples(str(tmp_path / "samples"), n=60, seed=0)
    # One trial at a time and a seeded space (learning rates from hopeless to good): the same trials reach the first
    # rung in the same order every run, so which trials ASHA stops does not depend on timing.
    settings = [*TINY, "tune.max_concurrent_trials=1", "tune.reduction_factor=2", "tune.lr_range=[0.00001,0.01]"]
    cfg = load_config(None, [*settings, f"tune.num_samples={ASHA_TRIALS}"])
    before = _live_placement_groups()
    report = tune(str(tmp_path / "samples"), str(tmp_path / "search"), cfg)

    rows = pq.read_table(tmp_path / "search" / "results.parquet").to_pylist()
    stopped = [r for r in rows if r["status"] == "stopped_early"]
    assert len(rows) == ASHA_TRIALS and {r["status"] for r in rows} <= {"completed", "stopped_early"}
    assert stopped and all(r["stopped_early"] and r["epochs_run"] == 1 for r in stopped)
    assert all(r["epochs_run"] == 2 for r in rows if r["status"] == "completed")
    assert report["stopped_early"] == len(stopped) and report["completed"] == ASHA_TRIALS - len(stopped)
    # ASHA stops below the rung's cutoff: a stopped trial never beats every trial that went on.
    assert min(r["val_macro_f1"] for r in stopped) <= max(r["val_macro_f1"] for r in rows if not r["stopped_early"])

    # A stopped trial's Train controller dies with it; Ray Train's own cleaner (a detached actor that watches the
    # controller through the dashboard's state API) then removes its placement group, giving its CPUs back. It
    # checks every second: wait for it, then no group of the search may be left.
    deadline = time.time() + 60
    while _live_placement_groups() - before and time.time() < deadline:
        time.sleep(0.5)
    assert not _live_placement_groups() - before, "a finished search left placement groups holding CPUs"


def _live_placement_groups() -> set[str]:
    from ray.util import placement_group_table

    return {pg for pg, info in placement_group_table().items() if info["state"] != "REMOVED"}


def _tune_command(data: Path, out: Path, settings: list[str] | tuple[str, ...] = ()) -> list[str]:
    sets = [arg for item in [*KILL_TEST, *settings] for arg in ("--set", item)]
    return [
        sys.executable,
        "-m",
        "artfuse.cli",
        "tune",
        "--data",
        str(data),
        "--out",
        str(out),
        "--samples",
        str(N_TRIALS),
        *sets,
    ]


def _checkpointed_epochs(trials: Path) -> dict[str, int]:
    """The last epoch each trial's Ray Train run has checkpointed (trials with at least one checkpoint)."""
    epochs = {}
    for snapshot in trials.glob("*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):  # being replaced right now
            continue
        if results:
            epochs[snapshot.parent.name] = max(r["metrics"]["epoch"] for r in results)
    return epochs


def _persisted_statuses(experiment: Path) -> dict[str, str]:
    """Trial statuses as Tune last saved them: what a restore starts from."""
    if not ray_tune.Tuner.can_restore(str(experiment)):
        return {}
    try:
        analysis = ray_tune.ExperimentAnalysis(str(experiment))
    except (ValueError, OSError, json.JSONDecodeError):  # a state file being replaced right now
        return {}
    return {trial.trial_id: trial.status for trial in analysis.trials}


def test_a_run_counts_as_finished_only_once_it_has_checkpointed_every_epoch(tmp_path, ray_local):
    import tempfile

    from ray.train.torch import TorchTrainer

    def two_epochs(config):
        for epoch in (1, 2):
            with tempfile.TemporaryDirectory() as d:
                Path(d, "epoch").write_text(str(epoch))
                ray.train.report({"epoch": epoch}, checkpoint=ray.train.Checkpoint.from_directory(d))

    TorchTrainer(
        two_epochs,
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="run", storage_path=str(tmp_path)),
    ).fit()
    assert finished_run_metrics(str(tmp_path / "run"), load_config(None, ["train.epochs=2"]))["epoch"] == 2
    assert finished_run_metrics(str(tmp_path / "run"), load_config(None, ["train.epochs=3"])) is None
    assert finished_run_metrics(str(tmp_path / "never-started"), load_config(None, ["train.epochs=2"])) is None


@pytest.mark.slow  # two CLI searches, each with the local Ray it starts (and the first killed with it)
def test_search_survives_a_kill_and_its_best_package_labels(tmp_path, request):
    from artfuse.data.samples import generate_samples

    data, out, log_path = tmp_path / "samples", tmp_path / "search", tmp_path / "first.log"
    generate_samples(str(data), n=60, seed=0)

    # First run: kill its whole process group (driver and local Ray) once Tune has saved a finished trial and
    # another trial is midway (it has checkpointed some epochs, not all, and is not finished). The pause point makes
    # that state certain: the second trial to checkpoint a first epoch blocks there (and every later one), so the
    # search cannot end, while the first trial goes on to finish. Tune saves its state every second here (10 s by
    # default), so that the wait for a saved finished trial is short.
    pause = tmp_path / "pause"
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    pausing = ["pause.point=epoch", "pause.after=2", f"pause.dir={pause}"]
    with log_path.open("w") as log:
        first = subprocess.Popen(
            _tune_command(data, out, pausing), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        finished: set[str] = set()
        midway: set[str] = set()
        while first.poll() is None:  # the search cannot end before that state: no deadline to race
            finished = {t for t, s in _persisted_statuses(out / "_tune").items() if s == "TERMINATED"}
            midway = {t for t, epoch in _checkpointed_epochs(out / "_trials").items() if epoch < EPOCHS} - finished
            if finished and midway and (pause / PAUSED).exists():
                break
            time.sleep(0.5)
        with contextlib.suppress(ProcessLookupError):  # it may have ended on its own: the asserts below say so
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert finished and midway, log_path.read_text()[-3000:]
    assert not (out / "results.csv").exists(), "the search ended before it could be interrupted"
    started_before = {p.parent.name for p in (out / "_trials").glob("*/attempts.json")}
    snapshots_before = {t: (out / "_trials" / t / "checkpoint_manager_snapshot.json").read_text() for t in finished}

    # Rerun the same command: it restores the search and completes what is left.
    second = subprocess.run(
        _tune_command(data, out), capture_output=True, text=True, timeout=SEARCH_TIMEOUT_S, env=env
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    report = json.loads((out / "tune_report.json").read_text())
    assert report["resumed"] is True

    rows = {r["trial_id"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
    assert pacsv.read_csv(out / "results.csv").num_rows == len(rows) == N_TRIALS
    assert {r["status"] for r in rows.values()} <= {"completed", "stopped_early"}
    for trial_id in finished:  # finished before the kill: not run again
        assert rows[trial_id]["attempts"] == 1
        assert (out / "_trials" / trial_id / "checkpoint_manager_snapshot.json").read_text() == snapshots_before[
            trial_id
        ]
    for trial_id in started_before - finished:  # interrupted: started again, continuing from their own checkpoints
        assert rows[trial_id]["attempts"] == 2
    # Whether an interrupted trial resumes mid-run or only reports its finished run depends on where the kill lands:
    # the driver's process group dies at once, but Ray's workers can finish the epoch in hand before they notice.
    # Resuming from an epoch checkpoint is checked in test_train.py, reporting a finished run above.
    assert all(rows[t]["attempts"] == 1 for t in set(rows) - started_before)

    assert all(r["status"] == "completed" and r["epochs_run"] == EPOCHS for r in rows.values())
    # each row's best epoch is the best of the whole training, both attempts included: the history in the run's
    # last checkpoint (Tune's own log of a resumed trial lacks the epochs of its first attempt)
    for trial_id, row in rows.items():
        last = ray.train.Result.from_path(str(out / "_trials" / trial_id)).checkpoint
        with last.as_directory() as d:
            history = load_checkpoint(d)["history"]
        assert row["val_macro_f1"] == pytest.approx(max(h["val_macro_f1"] for h in history))
    assert report["stopped_early"] == 0 and report["trials"] == N_TRIALS
    for param in ("model.fusion", "model.num_heads", "model.feature_stride", "train.lr", "train.weight_decay"):
        assert all(r[param] is not None for r in rows.values())
    assert (out / "macro_f1_by_param.png").stat().st_size > 0

    best = max(rows.values(), key=lambda r: (r["val_macro_f1"], r["val_accuracy"]))
    assert report["best"]["trial_id"] == best["trial_id"]
    best_cfg = load_config(out / "best_config.yaml")
    assert best_cfg.model.fusion == best["model.fusion"] and best_cfg.train.lr == pytest.approx(best["train.lr"])
    assert best_cfg.model.d_model % best_cfg.model.num_heads == 0
    assert best_cfg.train.torch_threads == 0  # the user's setting, not the share each concurrent trial got

    from artfuse.models.package import load_package
    from artfuse.pipelines.label import label

    package = load_package(str(out / "best"))
    assert package.model_config.fusion == best["model.fusion"]
    assert package.meta["metrics"]["tasks"]["label"]["macro_f1"] == pytest.approx(best["val_macro_f1"])
    request.getfixturevalue("ray_local")  # only now: the searches above ran their own local Ray
    labelled = label(str(out / "best"), str(data), str(tmp_path / "predictions"), best_cfg)
    assert labelled["labelled"] == 60 and labelled["errors"] == 0
