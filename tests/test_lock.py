"""The lock file covers pyproject.toml: every requirement (dev extra included) is pinned to a
version that satisfies it, and torch keeps its pins."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        assert version, f"requirements.lock: {line!r} is not pinned with =="
        pins[canonicalize_name(Requirement(name).name)] = version.split(";")[0].strip()
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    return reqs


def test_every_requirement_is_locked_at_a_satisfying_version():
    pins = _pins()
    requirements = _requirements()
    assert len(requirements) > 10
    problems = []
    for req in requirements:
        version = pins.get(canonicalize_name(req.name))
        if version is None:
            problems.append(f"{req.name} missing from requirements.lock")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}=={version} does not satisfy {req}")
    assert not problems, "run `make lock`: " + "; ".join(problems)


def test_torch_pins_are_kept():
    pins = _pins()
    assert pins["torch"] == "2.14.1"
    assert pins["torchvision"] == "0.29.1"
