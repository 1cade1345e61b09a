"""What a running suite leaves under its data directory (`.run/` for `make run`) for tools
outside it (`make chaos`, a shell): `suite.json` with where it listens, and one pid file per
process, `pids/<name>.pid`, rewritten whenever the supervisor restarts that process.

    kill -9 "$(cat .run/pids/nats.pid)"
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

ADDRESSES_FILE = "suite.json"
PIDS_DIR = "pids"


@dataclass(frozen=True)
class SuiteAddresses:
    """Where a running suite listens. No secrets: the development signing key stays in
    .run/keys/ (mode 0600) and any MongoDB password in the environment."""

    gateway_addresses: list[str]
    nats_url: str
    databases: dict[str, str]


def _write_atomically(path: Path, text: str) -> None:
    """A reader sees the old content or the new one, never half of either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_addresses(run_dir: Path, addresses: SuiteAddresses) -> None:
    _write_atomically(run_dir / ADDRESSES_FILE, json.dumps(asdict(addresses), indent=2) + "\n")


def read_addresses(run_dir: Path) -> SuiteAddresses:
    """The addresses of the suite running from `run_dir`; SystemExit when none runs there."""
    path = run_dir / ADDRESSES_FILE
    try:
        return SuiteAddresses(**json.loads(path.read_text()))
    except FileNotFoundError:
        missing = f"no suite runs from {run_dir} ({path} is missing): `make run` first"
        raise SystemExit(missing) from None


def remove_addresses(run_dir: Path) -> None:
    (run_dir / ADDRESSES_FILE).unlink(missing_ok=True)


def pid_file(run_dir: Path, name: str) -> Path:
    return run_dir / PIDS_DIR / f"{name}.pid"


def write_pid(run_dir: Path, name: str, pid: int) -> None:
    _write_atomically(pid_file(run_dir, name), f"{pid}\n")


def read_pid(run_dir: Path, name: str) -> int | None:
    """The pid of process `name` (`nats`, `mongodb`, `groups`, `groups-2`, ...), or None
    when the suite has no such process."""
    try:
        return int(pid_file(run_dir, name).read_text())
    except (FileNotFoundError, ValueError):
        return None


def remove_pid(run_dir: Path, name: str) -> None:
    pid_file(run_dir, name).unlink(missing_ok=True)
