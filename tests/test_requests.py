"""Requests a cluster can meet, or a clear error: each job checks its resource requests against the nodes before it
starts, instead of waiting for ever for a node that never comes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from artfuse.bench.label import save_untrained_package
from artfuse.cli import main
from artfuse.cluster import requests
from artfuse.cluster.requests import PoolSize, label_pool, most_that_fit
from artfuse.config import ClusterConfig, ConfigError, load_config
from artfuse.data.samples import generate_samples
from artfuse.pipelines.label import actor_resources, decode_resources

TINY = ["model.img_size=64", "model.d_model=32", "model.num_heads=2", "model.depth=1", "model.pretrained=none"]
GIB = 2**30
NIGHTLY = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "nightly-label.yaml"


def test_most_that_fit_places_the_companions_first_then_counts_units():
    half, one = {"CPU": 0.5}, {"CPU": 1.0}
    assert most_that_fit(half, [half], [one, one]) == 3
    assert most_that_fit(half, [half], [one]) == 1
    assert most_that_fit({"CPU": 2.0}, [one], [{"CPU": 2.0}]) == 0  # the decode task fits, the actor beside it not
    assert most_that_fit(one, [{"CPU": 4.0}], [{"CPU": 2.0}]) == -1  # not even the companion fits
    gpu_node = {"CPU": 16.0, "GPU": 1.0, "memory": 64 * GIB}
    assert most_that_fit({"CPU": 2.0, "GPU": 1.0}, [one], [gpu_node] * 4) == 4
    # the companion goes where it leaves the most room, not on the first node it fits
    assert most_that_fit({"CPU": 2.0}, [one], [{"CPU": 2.0}, {"CPU": 3.0}]) == 2


def nodes(monkeypatch, *cpus: float, memory: float = 16 * GIB) -> None:
    monkeypatch.setattr(requests, "cluster_nodes", lambda: [{"CPU": c, "memory": memory} for c in cpus])


def label_config(*settings: str):
    return load_config(None, ["label.actor_memory_mb=0", *settings])


def test_pool_fits_the_nodes_and_may_shrink_to_what_they_hold_without_the_largest(monkeypatch):
    cfg = label_config("label.cpus_per_actor=0.5", "label.decode_cpus=0.5", "label.min_actors=2", "label.max_actors=2")
    lc = cfg.label
    nodes(monkeypatch, 1, 1)  # the node-loss test's cluster: without one node, one actor beside a decode task
    assert label_pool(lc, actor_resources(lc), decode_resources(lc), cfg.cluster) == PoolSize(min=1, max=2, initial=2)
    nodes(monkeypatch, 1)  # two actors would leave no decode task room
    assert label_pool(lc, actor_resources(lc), decode_resources(lc), cfg.cluster) == PoolSize(min=1, max=1, initial=1)
    nodes(monkeypatch, 4, 4)  # either node alone holds the whole pool and a decode task
    assert label_pool(lc, actor_resources(lc), decode_resources(lc), cfg.cluster) == PoolSize(min=2, max=2, initial=2)


def test_an_actor_no_node_holds_beside_a_decode_task_names_the_setting(monkeypatch):
    cfg = label_config("label.cpus_per_actor=2")
    nodes(monkeypatch, 2)
    with pytest.raises(ConfigError, match=r"label\.cpus_per_actor=2.*largest node has 2 CPUs.*lower label\.cpus_per"):
        label_pool(cfg.label, actor_resources(cfg.label), decode_resources(cfg.label), cfg.cluster)
    nodes(monkeypatch, 2, memory=3 * GIB)  # enough CPUs; the actor's memory reservation is what no node has
    cfg = load_config(None, ["label.actor_memory_mb=4096"])
    with pytest.raises(ConfigError, match=r"^label\.actor_memory_mb=4096: .* 3\.0 GiB memory"):
        label_pool(cfg.label, actor_resources(cfg.label), decode_resources(cfg.label), cfg.cluster)


def test_on_a_cluster_that_may_grow_an_unmet_request_only_warns(monkeypatch, caplog):
    nodes(monkeypatch, 2)
    cfg = load_config(None, ["train.cpus_per_worker=4", "cluster.autoscaling=true"])
    with caplog.at_level(logging.WARNING):
        requests.check_train(cfg)
    assert "train.cpus_per_worker=4" in caplog.text and "waiting for nodes to join" in caplog.text
    with pytest.raises(ConfigError, match="train.cpus_per_worker=4"):
        requests.check_train(load_config(None, ["train.cpus_per_worker=4", "cluster.autoscaling=false"]))
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # auto: a cluster joined by address may grow
    assert requests.may_grow(ClusterConfig())
    monkeypatch.delenv("RAY_ADDRESS")
    assert not requests.may_grow(ClusterConfig())


def test_train_workers_that_fit_alone_but_not_together_name_num_workers(monkeypatch):
    nodes(monkeypatch, 2, 2)
    with pytest.raises(ConfigError, match=r"train\.cpus_per_worker=1, train\.num_workers=4: .*4 x a Train worker"):
        requests.check_train(load_config(None, ["train.cpus_per_worker=1", "train.num_workers=4"]))
    requests.check_train(load_config(None, ["train.cpus_per_worker=1", "train.num_workers=3"]))


def test_a_tune_trial_no_node_holds_names_cpus_per_trial(monkeypatch):
    from artfuse.pipelines.tune import TRIAL_DRIVER_RESOURCES

    nodes(monkeypatch, 2)
    with pytest.raises(ConfigError, match=r"^tune\.cpus_per_trial=2: "):
        requests.check_trial(load_config(None, ["tune.cpus_per_trial=2"]), TRIAL_DRIVER_RESOURCES)
    requests.check_trial(load_config(None, ["tune.cpus_per_trial=1"]), TRIAL_DRIVER_RESOURCES)


# The two hangs of issue 27, on the tests' 2-CPU local cluster: each ends at once in exit 2 naming its setting.


def test_train_asking_more_cpus_per_worker_than_a_node_has_exits_2(tmp_path, ray_local, capsys):
    generate_samples(str(tmp_path / "samples"), n=12, seed=1)
    args = ["train", "--data", str(tmp_path / "samples"), "--out", str(tmp_path / "out")]
    for setting in [*TINY, "train.epochs=1", "train.cpus_per_worker=4"]:
        args += ["--set", setting]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "train.cpus_per_worker=4" in error and "largest node has 2 CPUs" in error, error
    assert not (tmp_path / "out").exists()


def test_label_actor_taking_every_cpu_exits_2(tmp_path, ray_local, capsys):
    generate_samples(str(tmp_path / "archive"), n=6, seed=1)
    save_untrained_package(str(tmp_path / "model"), load_config(None, TINY), {"label": 6})
    args = ["label", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "archive")]
    args += ["--out", str(tmp_path / "out"), "--config", str(NIGHTLY)]
    args += ["--set", "label.num_gpus_per_actor=0", "--set", "label.cpus_per_actor=2"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "label.cpus_per_actor=2" in error and "largest node has 2 CPUs" in error, error
