"""The local suite's pure parts: what it prints, which databases it names, and how it names
and reaches the replicas of a service."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.kit.auth import KeySet, TokenVerifier, mint_token
from tools.dev_keys import PUBLIC_KEYS_FILE, SIGNING_KEY_FILE, dev_public_keys_file, dev_signing_key
from tools.suite import (
    STORING_SERVICES,
    Suite,
    balanced_target,
    local_mongodb_uri,
    process_names,
    without_password,
)


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
    first, second = (Suite.isolated(tmp_path, tmp_path / "public.jwks") for _ in range(2))
    assert set(first.databases.values()).isdisjoint(second.databases.values())
    assert set(first.databases.values()).isdisjoint(Suite().databases.values())


def test_a_services_processes_have_names_of_their_own() -> None:
    assert process_names("groups", 1) == ["groups"]
    assert process_names("groups", 3) == ["groups", "groups-2", "groups-3"]


def test_the_gateway_reaches_every_replica_through_one_target() -> None:
    target = balanced_target(["127.0.0.1:5001", "127.0.0.1:5002"])
    assert target == "ipv4:127.0.0.1:5001,127.0.0.1:5002"


def test_a_suite_runs_one_process_of_each_service_unless_told_otherwise(tmp_path: Path) -> None:
    suite = Suite.isolated(tmp_path, tmp_path / "public.jwks", replicas={"gateway": 2})
    assert suite.process_names("gateway") == ["gateway", "gateway-2"]
    assert suite.process_names("groups") == ["groups"]


@pytest.mark.parametrize("replicas", [{"group": 2}, {"groups": 0}])
def test_a_suite_refuses_replicas_it_cannot_run(replicas: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="replicas"):
        Suite(replicas=replicas)


def test_the_development_key_is_made_once_and_kept_private(tmp_path: Path) -> None:
    key = dev_signing_key(tmp_path)
    assert dev_signing_key(tmp_path).to_jwk() == key.to_jwk()
    assert (tmp_path / SIGNING_KEY_FILE).stat().st_mode & 0o077 == 0
    verifier = TokenVerifier(KeySet.from_file(dev_public_keys_file(tmp_path)))
    assert verifier.verify(f"Bearer {mint_token(key, 'alice')}").user_id == "alice"
    assert '"d"' not in (tmp_path / PUBLIC_KEYS_FILE).read_text()
