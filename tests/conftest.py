"""Fixtures shared by every tier: a nats-server, a MongoDB server and fresh databases on it,
the session's signing key and key set, tokens, and a way to wait on a condition."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymongo
import pytest

from services.kit.auth import SigningKey, mint_token
from services.kit.config import EventSettings
from services.kit.events import EventBus
from services.kit.mongo import open_database
from tools.dev_keys import PUBLIC_KEYS_FILE, SIGNING_KEY_FILE, dev_signing_key
from tools.nats_users import HARNESS, NatsUsers
from tools.suite import running_mongodb_server, running_nats_server


@dataclass(frozen=True)
class TestKeys:
    """The session's issuer: a signing key, and the key set file every service under test
    trusts (beside it `signing.jwk`, the layout of `make run`'s .run/keys/)."""

    signing_key: SigningKey
    directory: Path

    @property
    def public_keys_file(self) -> Path:
        return self.directory / PUBLIC_KEYS_FILE

    @property
    def signing_key_file(self) -> Path:
        return self.directory / SIGNING_KEY_FILE


@pytest.fixture(scope="session")
def test_keys(tmp_path_factory: pytest.TempPathFactory) -> TestKeys:
    directory = tmp_path_factory.mktemp("keys")
    return TestKeys(dev_signing_key(directory), directory)


@pytest.fixture(scope="session")
def signing_key(test_keys: TestKeys) -> SigningKey:
    return test_keys.signing_key


@pytest.fixture(scope="session")
def public_keys_file(test_keys: TestKeys) -> Path:
    return test_keys.public_keys_file


@pytest.fixture(scope="session")
def nats_users() -> NatsUsers:
    """The NATS users of every server of the session, with passwords of its own."""
    return NatsUsers.generate(HARNESS)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory, nats_users: NatsUsers) -> Iterator[str]:
    """The session's nats-server, with the suite's users: its URL, without credentials."""
    with running_nats_server(tmp_path_factory.mktemp("jetstream"), nats_users) as url:
        yield url


@pytest.fixture(scope="session")
def nats_url(nats_server: str, nats_users: NatsUsers) -> str:
    """The session's nats-server as the tests' harness user."""
    return nats_users.url(nats_server, HARNESS)


@pytest.fixture(scope="session")
def mongodb_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """MONGODB_URI when set (a real MongoDB), else one local server for the whole session.
    Tests share the server, never a database: see `database`."""
    if os.environ.get("MONGODB_URI"):
        yield os.environ["MONGODB_URI"]
        return
    with running_mongodb_server(tmp_path_factory.mktemp("mongodb")) as uri:
        yield uri


@pytest.fixture(scope="session")
def mongodb_client(mongodb_uri: str) -> Iterator[pymongo.MongoClient[dict[str, Any]]]:
    """A synchronous client for the tests' housekeeping: dropping their databases."""
    client: pymongo.MongoClient[dict[str, Any]]
    with pymongo.MongoClient(mongodb_uri, serverSelectionTimeoutMS=5_000) as client:
        yield client


def unique_database_name() -> str:
    """A database name no other test, test run or `make run` uses on a shared server."""
    return f"test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def database(mongodb_client: pymongo.MongoClient[dict[str, Any]]) -> Iterator[str]:
    """A fresh database name for this test; the database is dropped after it."""
    name = unique_database_name()
    yield name
    mongodb_client.drop_database(name)


@pytest.fixture
def token(signing_key: SigningKey) -> Callable[..., str]:
    def make(user_id: str, roles: list[str] | None = None) -> str:
        return mint_token(signing_key, user_id, roles)

    return make


async def eventually(
    condition: Callable[[], Awaitable[bool]] | Callable[[], bool],
    within: float = 10.0,
    interval: float = 0.02,
) -> None:
    """Wait until `condition` holds; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


@pytest.fixture
async def mongo_db(mongodb_uri: str, database: str) -> AsyncIterator[Any]:
    """A fresh database of its own (dropped afterwards), through Motor."""
    client, db = open_database(mongodb_uri, database)
    try:
        yield db
    finally:
        client.close()


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[EventBus]:
    bus = await EventBus.connect(nats_url, "test", EventSettings())
    try:
        yield bus
    finally:
        await bus.close()
