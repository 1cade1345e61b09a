"""The lock files (requirements/*.txt) hold what pyproject.toml asks for: `make lock` re-locks."""

from __future__ import annotations

import re
from collections import defaultdict

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tools.lock import Environment, environments, load_pyproject, pyproject_digest, recorded_digest

RELOCK = "pyproject.toml and the lock disagree: run `make lock` and commit requirements/"
# `name==version [; marker]` at the start of a line, then its `--hash=` continuation lines.
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?:\s*;\s*([^\\]+?))?\s*\\?$")


def pins(env: Environment) -> dict[str, list[tuple[Version, Marker | None, int]]]:
    """Each package the lock pins: its versions (one per marker fork) and their hash counts."""
    found: dict[str, list[tuple[Version, Marker | None, int]]] = defaultdict(list)
    current: list[tuple[Version, Marker | None, int]] | None = None
    for line in env.lock_file.read_text().splitlines():
        if match := PIN.match(line):
            name, version, marker = match.groups()
            current = found[canonicalize_name(name)]
            current.append((Version(version), Marker(marker) if marker else None, 0))
        elif line.strip().startswith("--hash=sha256:") and current:
            version, marker, hashes = current[-1]
            current[-1] = (version, marker, hashes + 1)
    return found


ENVIRONMENTS = environments(load_pyproject())


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_each_lock_was_made_from_the_dependency_tables_pyproject_has_now(
    env: Environment,
) -> None:
    assert env.lock_file.is_file(), f"no {env.lock_file.name}: run `make lock`"
    recorded = recorded_digest(env.lock_file.read_text())

    assert recorded == pyproject_digest(load_pyproject()), RELOCK


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_every_requirement_of_an_environment_is_pinned_at_a_version_its_range_admits(
    env: Environment,
) -> None:
    locked = pins(env)
    assert env.requirements, f"{env.name} asks for nothing"

    for text in env.requirements:
        requirement = Requirement(text)
        forks = locked.get(canonicalize_name(requirement.name))
        assert forks, f"{env.lock_file.name} pins no {requirement.name}: {RELOCK}"
        for version, _, _ in forks:
            admitted = requirement.specifier.contains(version, prereleases=True)
            assert admitted, f"{requirement} but {env.lock_file.name} pins {version}: {RELOCK}"


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: env.name)
def test_every_pin_carries_hashes(env: Environment) -> None:
    locked = pins(env)

    unhashed = [name for name, forks in locked.items() for *_, hashes in forks if not hashes]
    assert locked and not unhashed, f"{env.lock_file.name} pins without a hash: {unhashed}"


def test_a_package_in_more_than_one_lock_has_one_version_everywhere() -> None:
    # The image (runtime, protogen) runs the versions `make test` (dev) tested.
    (dev,) = (env for env in ENVIRONMENTS if env.name == "dev")
    tested = {name: {v for v, _, _ in forks} for name, forks in pins(dev).items()}
    followers = [env for env in ENVIRONMENTS if env.follows_dev]
    assert followers

    for env in followers:
        for name, forks in pins(env).items():
            assert name in tested, f"{env.lock_file.name} pins {name}, which dev.txt does not"
            versions = {v for v, _, _ in forks}
            assert versions <= tested[name], (
                f"{env.lock_file.name}: {name} {versions}, dev.txt: {tested[name]}"
            )
