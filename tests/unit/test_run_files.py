"""What a running suite leaves for tools outside it: its addresses and a pid per process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import run_files


def test_tools_read_back_where_the_suite_listens(tmp_path: Path) -> None:
    addresses = run_files.SuiteAddresses(
        ["127.0.0.1:50051"], "nats://127.0.0.1:4222", {"groups": "groups"}
    )

    run_files.write_addresses(tmp_path, addresses)

    assert run_files.read_addresses(tmp_path) == addresses


def test_no_addresses_means_no_suite_runs_there(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="make run"):
        run_files.read_addresses(tmp_path)


def test_a_pid_file_holds_the_latest_pid_until_removed(tmp_path: Path) -> None:
    run_files.write_pid(tmp_path, "nats", 100)
    run_files.write_pid(tmp_path, "nats", 200)
    assert run_files.read_pid(tmp_path, "nats") == 200

    run_files.remove_pid(tmp_path, "nats")
    assert run_files.read_pid(tmp_path, "nats") is None
