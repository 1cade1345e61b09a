"""Lock every environment the project installs (`make lock`, `python -m tools.lock [--upgrade]`).

One lock file per environment, under requirements/, each a pip requirements file with a hash
for every file of every pinned release, so that `pip install --require-hashes -r ...` on a
machine with only python3 and pip installs exactly what was tested:

- dev.txt: the virtualenv of `make run` and `make test` (the runtime dependencies, the dev
  extra and the build backend, so the project itself installs with `--no-build-isolation`);
- runtime.txt: the image's /opt/venv (pyproject's [project].dependencies only);
- protogen.txt: the image builder's grpcio-tools, which generates the code and is left behind;
- pip.txt: pip itself, installed first into each of those venvs.

dev.txt is resolved first and runtime.txt and protogen.txt are constrained by it, so a package
they share has one version everywhere: the image runs what `make test` tested.
uv resolves once for every Python the project supports (requires-python) and every platform;
pip evaluates the markers at install time.

Without --upgrade a pin moves only where pyproject.toml no longer admits it (uv prefers what
the lock already holds); --upgrade moves every pin to the newest release its range admits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
LOCKS = ROOT / "requirements"
DIGEST_LINE = re.compile(r"^# pyproject-sha256: ([0-9a-f]{64})$", re.MULTILINE)


@dataclass(frozen=True)
class Environment:
    """One installed environment: its lock file, what it is for, and what it asks for."""

    name: str
    purpose: str
    source: str
    requirements: tuple[str, ...]
    # Resolved within dev.txt's pins, so that what it shares with dev.txt is what was tested.
    follows_dev: bool = True

    @property
    def lock_file(self) -> Path:
        return LOCKS / f"{self.name}.txt"


def load_pyproject(path: Path = PYPROJECT) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def environments(pyproject: dict[str, Any]) -> list[Environment]:
    """The environments to lock, in locking order (dev first: the others are constrained by it)."""
    project = pyproject["project"]
    runtime = tuple(project["dependencies"])
    dev = tuple(project["optional-dependencies"]["dev"])
    build = tuple(pyproject["build-system"]["requires"])
    protogen = tuple(r for r in dev if Requirement(r).name == "grpcio-tools")
    return [
        Environment(
            "dev",
            "the virtualenv of `make run` and `make test`",
            "dependencies, the dev extra and build-system.requires",
            runtime + dev + build,
            follows_dev=False,
        ),
        Environment(
            "runtime", "the image's /opt/venv (deploy/Dockerfile)", "dependencies", runtime
        ),
        Environment(
            "protogen",
            "grpcio-tools in the image's builder stage (deploy/Dockerfile)",
            "grpcio-tools of the dev extra",
            protogen,
        ),
        # Not the interpreter's own pip, whose version (and speed) varies from one machine and
        # base image to the next: each venv installs this one first, then its lock.
        Environment(
            "pip",
            "the pip that installs the other locks",
            "requires-python (pip is in no table)",
            ("pip",),
            follows_dev=False,
        ),
    ]


def lowest_python(pyproject: dict[str, Any]) -> str:
    """The oldest Python that requires-python admits: the locks resolve for it and every newer."""
    (lowest,) = (
        s.version
        for s in SpecifierSet(pyproject["project"]["requires-python"])
        if s.operator == ">="
    )
    return lowest


def pyproject_digest(pyproject: dict[str, Any]) -> str:
    """A digest of what the locks were made from: requires-python and every environment's
    requirements, each normalised (so reformatting pyproject.toml needs no re-lock)."""
    tables = {
        "requires-python": pyproject["project"]["requires-python"],
        **{
            env.name: sorted(str(Requirement(r)) for r in env.requirements)
            for env in environments(pyproject)
        },
    }
    return hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()


def recorded_digest(lock_text: str) -> str | None:
    """The pyproject digest a lock file was made from, or None if it records none."""
    found = DIGEST_LINE.search(lock_text)
    return found.group(1) if found else None


def _uv_version() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "uv", "--version"], check=True, capture_output=True, text=True
    )
    return out.stdout.split()[1]


def _compile(env: Environment, python: str, digest: str, upgrade: bool) -> None:
    command = ["uv", "pip", "compile", "-", "--universal", "--python-version", python]
    command += ["--generate-hashes", *(["--upgrade"] if upgrade else [])]
    if env.follows_dev:
        command += ["--constraints", "requirements/dev.txt"]
    # uv writes the lock itself, so it prefers the versions the lock already pins; --no-config:
    # the lock is made from PyPI alone, whatever a uv.toml or UV_* variable says here.
    output = ["--output-file", f"requirements/{env.name}.txt", "--no-header", "--no-config"]
    subprocess.run(
        [sys.executable, "-m", *command, *output, "--quiet"],
        input="\n".join(env.requirements) + "\n",
        cwd=ROOT,
        check=True,
        text=True,
    )
    header = [
        f"# requirements/{env.name}.txt: {env.purpose}.",
        "# Do not edit: `make lock` (tools/lock.py) writes it from pyproject.toml's",
        f"# {env.source}, with uv {_uv_version()}:",
        f"#   {' '.join(command)}",
        f"# One resolution for every Python >= {python} and platform; install it with",
        f"#   pip install --require-hashes -r requirements/{env.name}.txt",
        f"# pyproject-sha256: {digest}",
    ]
    body = env.lock_file.read_text()
    env.lock_file.write_text("\n".join(header) + "\n" + body)


def lock(upgrade: bool = False) -> None:
    """Write every lock file from pyproject.toml."""
    pyproject = load_pyproject()
    digest = pyproject_digest(pyproject)
    LOCKS.mkdir(exist_ok=True)
    for env in environments(pyproject):
        _compile(env, lowest_python(pyproject), digest, upgrade)
        print(f"locked {env.lock_file.relative_to(ROOT)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upgrade", action="store_true", help="move every pin to the newest")
    lock(upgrade=parser.parse_args().upgrade)
