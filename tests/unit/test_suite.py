"""The local suite's pure parts: what it prints and which databases it names."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.suite import STORING_SERVICES, Suite, local_mongodb_uri, without_password


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (local_mongodb_uri(27017), local_mongodb_uri(27017)),
        ("mongodb://alice:s3cr@t@db:27017/?tls=true", "mongodb://alice:***@db:27017/?tls=true"),
        (
            "mongodb+srv://alice:pw@cluster0.example.net",
            "mongodb+srv://alice:***@cluster0.example.net",
        ),
        ("mongodb://alice@db/", "mongodb://alice@db/"),
    ],
)
def test_a_printed_uri_hides_its_password(uri: str, shown: str) -> None:
    assert without_password(uri) == shown


def test_make_run_uses_each_services_own_database() -> None:
    assert Suite().databases == {service: service for service in STORING_SERVICES}


def test_isolated_suites_name_databases_of_their_own(tmp_path: Path) -> None:
    first, second = (Suite.isolated(tmp_path, "secret") for _ in range(2))
    assert set(first.databases.values()).isdisjoint(second.databases.values())
    assert set(first.databases.values()).isdisjoint(Suite().databases.values())
