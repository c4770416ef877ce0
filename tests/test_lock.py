"""requirements-lock.txt agrees with pyproject.toml's ranges and with cluster/'s Ray version, and every install
path (Makefile, .ci/run via make, the Dockerfile, the cluster launcher, cluster/README) goes through it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements-lock.txt"
CLUSTER = REPO / "cluster"


def read_lock(text: str) -> dict[str, Version]:
    """name -> pinned version; every line that is not a comment must be `name==version`, each name once."""
    pins: dict[str, Version] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert match, f"line {number} of the lock is not name==version: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"{name} is pinned twice in the lock"
        pins[name] = Version(match[2])
    return pins


def project_requirements(pyproject: dict) -> list[Requirement]:
    """The dependencies and every extra's, those whose environment marker holds here."""
    project = pyproject["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    requirements = [Requirement(line) for line in lines]
    return [req for req in requirements if req.marker is None or req.marker.evaluate({"extra": ""})]


def disagreements(requirements: list[Requirement], pins: dict[str, Version]) -> list[str]:
    problems = []
    for req in requirements:
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            problems.append(f"{req.name} is required by pyproject but not in the lock")
        elif not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"the lock pins {req.name}=={pinned}, outside pyproject's {req}")
    return problems


@pytest.fixture(scope="module")
def pins() -> dict[str, Version]:
    return read_lock(LOCK.read_text())


def test_every_pyproject_requirement_is_pinned_within_its_range(pins):
    requirements = project_requirements(tomllib.loads((REPO / "pyproject.toml").read_text()))
    assert len(requirements) >= 10
    assert disagreements(requirements, pins) == []


def test_a_pin_outside_its_range_or_missing_is_reported():
    pins = {"ray": Version("2.61.0"), "torch": Version("2.14.1")}
    found = disagreements([Requirement("ray>=2.60,<2.61"), Requirement("torch>=2.4"), Requirement("timm>=1.0")], pins)
    assert found == [
        "the lock pins ray==2.61.0, outside pyproject's ray<2.61,>=2.60",
        "timm is required by pyproject but not in the lock",
    ]
    with pytest.raises(AssertionError, match="not name==version"):
        read_lock("ray>=2.60\n")


def test_the_lock_pins_the_ray_of_every_manifest_and_image(pins):
    ray = str(pins["ray"])
    versions, images = [], []
    for path in sorted(CLUSTER.glob("*.yaml")):
        text = path.read_text()
        versions += re.findall(r'rayVersion:\s*"?([0-9.]+)"?', text)
        for doc in yaml.safe_load_all(text):
            images += re.findall(r"image:\s*(\S+)", yaml.safe_dump(doc)) if doc else []
    assert versions and set(versions) == {ray}
    assert len(images) >= 8
    for image in images:
        assert image.rsplit(":", 1)[1].startswith(f"{ray}-py311"), image
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.findall(r"^ARG BASE_IMAGE=rayproject/ray:(\S+)-py311-gpu$", dockerfile, re.M) == [ray]


def _pip_installs(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(r"\bpip(3)? install\b|PIP_INSTALL\)", line)]


def test_every_install_goes_through_the_lock():
    makefile = (REPO / "Makefile").read_text()
    assert "PIP_INSTALL = $(BIN)/pip install -q -c $(LOCK)" in makefile
    assert re.search(r"^LOCK := requirements-lock.txt$", makefile, re.M)
    installs = {
        "Makefile": [line for line in _pip_installs(makefile) if "$(PIP_INSTALL)" in line],
        "cluster/Dockerfile": _pip_installs((CLUSTER / "Dockerfile").read_text()),
        "cluster/aws-cluster.yaml": _pip_installs((CLUSTER / "aws-cluster.yaml").read_text()),
        "cluster/README.md": _pip_installs((CLUSTER / "README.md").read_text()),
    }
    for where, lines in installs.items():
        assert lines, f"no pip install found in {where}"
        for line in lines:
            if "uninstall" in line:
                continue
            assert "$(PIP_INSTALL)" in line or "requirements-lock.txt" in line, f"{where}: {line.strip()}"
    assert "make test" in (REPO / ".ci" / "run").read_text()
