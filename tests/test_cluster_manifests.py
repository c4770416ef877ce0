"""cluster/: the KubeRay manifests, the cluster-launcher config, the runtime env and the README agree with
the installed Ray, the pyproject pin and the jobs/ entrypoints, and configure what production needs."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from artfuse.cluster.submit import JOBS, RUNTIME_ENV_EXCLUDES
from artfuse.config import load_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
RAY_KINDS = {"RayCluster", "RayJob", "RayCronJob", "RayService"}
IMAGE_TAGS = {f"{ray.__version__}-py311", f"{ray.__version__}-py311-gpu"}


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _kind(kind: str) -> list[dict]:
    return [doc for _, doc in _documents() if doc.get("kind") == kind]


def _job_specs() -> list[dict]:
    """Every RayJob spec, the RayCronJob's job template included."""
    return [doc["spec"] for doc in _kind("RayJob")] + [doc["spec"]["jobTemplate"] for doc in _kind("RayCronJob")]


def _cluster_specs() -> list[dict]:
    """Every RayCluster spec, standing or embedded in a job."""
    embedded = [spec["rayClusterSpec"] for spec in _job_specs() if "rayClusterSpec" in spec]
    return [doc["spec"] for doc in _kind("RayCluster")] + embedded


def _images(node) -> list[str]:
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k in ("image", "head_image") and isinstance(v, str)]
        return found + [image for v in node.values() for image in _images(v)]
    if isinstance(node, list):
        return [image for v in node for image in _images(v)]
    return []


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _gpus(pod_template: dict) -> int:
    return sum(int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0)) for c in _containers(pod_template))


def _pinned_ray() -> Requirement:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(req for req in map(Requirement, deps) if req.name == "ray")


def test_every_ray_kind_is_ray_io_v1_and_all_three_kinds_are_there():
    docs = _documents()
    kinds = {doc["kind"] for _, doc in docs if doc.get("kind") in RAY_KINDS}
    assert {"RayCluster", "RayJob", "RayCronJob"} <= kinds
    for name, doc in docs:
        if doc.get("kind") in RAY_KINDS:
            assert doc["apiVersion"] == "ray.io/v1", name


def test_ray_versions_match_the_installed_ray_and_the_pyproject_pin():
    assert Version(ray.__version__) in _pinned_ray().specifier
    specs = _cluster_specs()
    assert len(specs) >= 2
    for spec in specs:
        assert spec["rayVersion"] == ray.__version__


def test_every_image_is_tagged_with_the_installed_ray_version():
    images = [image for _, doc in _documents() for image in _images(doc)]
    assert len(images) >= 8
    for image in images:
        assert image.rsplit(":", 1)[1] in IMAGE_TAGS, image
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    bases = re.findall(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M)
    assert bases == [f"rayproject/ray:{ray.__version__}-py311-gpu"]
    assert "FROM ${BASE_IMAGE}" in dockerfile


def test_clusters_have_an_idle_head_token_auth_and_a_gpu_group_from_zero():
    for spec in _cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["authOptions"]["mode"] == "token"
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert _gpus(spec["headGroupSpec"]["template"]) == 0
        gpu_groups = [group for group in spec["workerGroupSpecs"] if _gpus(group["template"])]
        assert gpu_groups, "no worker group asks for nvidia.com/gpu"
        for group in gpu_groups:
            assert group["minReplicas"] == 0
            assert group["maxReplicas"] >= 1
            for container in _containers(group["template"]):
                assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
                assert container["image"].endswith("-gpu")


def _entrypoint_config(entrypoint: str) -> list[str]:
    args = shlex.split(entrypoint)
    return [args[i + 1] for i, arg in enumerate(args) if arg == "--config"]


def test_every_job_runs_an_existing_entrypoint_from_the_shipped_source():
    cluster_names = {doc["metadata"]["name"] for doc in _kind("RayCluster")}
    specs = _job_specs()
    assert len(specs) >= 4
    for spec in specs:
        args = shlex.split(spec["entrypoint"])
        assert args[0] == "python"
        match = re.fullmatch(r"jobs/(\w+)\.py", args[1])
        assert match and match.group(1) in JOBS, spec["entrypoint"]
        assert (REPO / args[1]).is_file()
        for config in _entrypoint_config(spec["entrypoint"]):
            load_config(REPO / config)
        assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/home/ray/artfuse"
        selector = spec.get("clusterSelector", {}).get("ray.io/cluster")
        assert selector in cluster_names or "rayClusterSpec" in spec


def test_nightly_schedule_labels_once_a_day_and_cleans_up():
    (cron,) = _kind("RayCronJob")
    minute, hour, *every = cron["spec"]["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and every == ["*", "*", "*"]
    template = cron["spec"]["jobTemplate"]
    assert shlex.split(template["entrypoint"])[1] == "jobs/label.py"
    assert "--report" in shlex.split(template["entrypoint"])  # the curators' page for each night
    assert template["shutdownAfterJobFinishes"] is True


def test_aws_launcher_config_is_valid_with_a_cpu_head_and_spot_gpu_workers_from_zero():
    # Private: no public API checks a launcher YAML offline (ray.autoscaler.sdk.bootstrap_config calls the cloud
    # provider; `ray up` launches); these are what `ray up` runs first.
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert {config["docker"]["image"], config["docker"]["head_image"]} == {
        f"rayproject/ray:{tag}" for tag in IMAGE_TAGS
    }
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert "InstanceMarketOptions" not in head["node_config"]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    spot_gpu = [
        t
        for t in workers
        if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        and t["node_config"]["InstanceType"][0] in "gp"  # g* and p* are the NVIDIA families
    ]
    assert spot_gpu and all(t["min_workers"] == 0 for t in spot_gpu)
    assert any("pip install" in cmd and "artfuse" in cmd for cmd in config["setup_commands"])
    assert "." in config["file_mounts"].values()
    assert any(remote.endswith(".ray/auth_token") for remote in config["file_mounts"])
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "ray start" not in cmd or "RAY_AUTH_MODE=token ray start" in cmd


def test_runtime_env_file_is_the_one_submit_builds_and_carries_no_secrets():
    runtime_env = yaml.safe_load((CLUSTER / "runtime-env.yaml").read_text())
    assert runtime_env["working_dir"] == "."
    assert runtime_env["excludes"] == list(RUNTIME_ENV_EXCLUDES)
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(runtime_env["env_vars"])


@pytest.fixture(scope="module")
def readme() -> str:
    return (CLUSTER / "README.md").read_text()


def test_readme_names_only_files_jobs_and_resources_that_exist(readme):
    for path in set(re.findall(r"\b((?:cluster|jobs)/[\w./-]+\.(?:ya?ml|py))\b", readme)):
        assert (REPO / path).is_file(), path
    submitted = re.findall(r"artfuse submit (\w+)", readme)
    assert submitted and set(submitted) - {"JOB"} <= set(JOBS)
    for config in re.findall(r"--config (\S+)", readme):
        load_config(REPO / config)
    names = {doc["metadata"]["name"] for _, doc in _documents() if "metadata" in doc}
    for name in set(re.findall(r"\b(?:rayjob|raycronjob|raycluster|job|secret)[/ ](artfuse[\w-]*)", readme)):
        assert name in names, name
    for tag in re.findall(r"artfuse-ray:(\d\S*?)(?=[\s`]|$)", readme):
        assert tag in IMAGE_TAGS, tag


def test_readme_manifests_use_the_images_the_dockerfile_builds(readme):
    built = set(re.findall(r"-t \$REGISTRY/artfuse-ray:(\S+)", readme))
    used = {image.rsplit(":", 1)[1] for _, doc in _documents() for image in _images(doc) if "artfuse-ray" in image}
    assert built == used == IMAGE_TAGS
    # the README's sed points every image of the files it names at the user's registry
    sed_files = re.search(r"sed -i \"s#image: artfuse-ray:#image: \$REGISTRY/artfuse-ray:#\" (.+)", readme).group(1)
    for path in sed_files.split():
        for image in _images(list(yaml.safe_load_all((REPO / path).read_text()))):
            assert image.startswith("artfuse-ray:"), (path, image)
