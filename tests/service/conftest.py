"""Service tier: one service in-process on a real socket, a real nats-server, the real
MongoDB server of the session (`mongodb_uri`: MONGODB_URI when set, else a local one)."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import nats
import pymongo
import pytest
from groupchat.groups.v1 import groups_pb2_grpc
from groupchat.messaging.v1 import messaging_pb2_grpc

from services.groups.config import GroupsConfig
from services.groups.service import build
from services.kit.config import Env
from services.kit.mongo import open_database
from services.kit.server import ServiceHost
from services.messaging.config import MessagingConfig
from services.messaging.service import build as build_messaging
from services.messaging.storage import MessagingStore
from services.plaza.storage import PlazaStore
from tests.conftest import HARNESS, unique_database_name
from tools.nats_users import NatsUsers
from tools.suite import (
    free_port,
    local_mongodb_uri,
    mongodb_server_command,
    nats_config,
    nats_server_command,
    wait_port,
)

# service_env(nats_url, nats_user, **overrides): the environment of one service in a test.
ServiceEnv = Callable[..., Env]


def without_userinfo(url: str) -> str:
    """`url` without the credentials in it (the harness's, in `nats_url`)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


@pytest.fixture
def service_env(
    mongodb_uri: str,
    mongodb_client: pymongo.MongoClient[dict[str, Any]],
    nats_users: NatsUsers,
    public_keys_file: Path,
) -> Iterator[ServiceEnv]:
    """`service_env(nats_url, nats_user, **overrides)`: the environment a service gets in
    tests, connecting to NATS as `nats_user` (the service's own user, with its permissions),
    on the session's MongoDB server and a fresh database each time (or the MONGODB_DATABASE
    given). Every database named here is dropped after the test."""
    named: set[str] = set()

    def make(nats_url: str, nats_user: str, **overrides: str) -> Env:
        values = {
            "JWT_PUBLIC_KEYS_FILE": str(public_keys_file),
            "NATS_URL": without_userinfo(nats_url),
            **nats_users.env(nats_user),
            "GRPC_LISTEN": "127.0.0.1:0",
            "LOG_LEVEL": "warning",
            "MONGODB_URI": mongodb_uri,
            "SHUTDOWN_GRACE_SECONDS": "2",
            **overrides,
        }
        values.setdefault("MONGODB_DATABASE", unique_database_name())
        named.add(values["MONGODB_DATABASE"])
        return Env(values)

    yield make
    for name in named:
        mongodb_client.drop_database(name)


@pytest.fixture
def platform_url(nats_url: str, nats_users: NatsUsers) -> str:
    """The NATS URL as the platform's user, for its follow and post events (tools.platform)."""
    return nats_users.url(without_userinfo(nats_url), "platform")


Metadata = tuple[tuple[str, str], ...]
GroupsCaller = Callable[[str], tuple[groups_pb2_grpc.GroupsStub, Metadata]]


@asynccontextmanager
async def serving(
    host: ServiceHost, stub_class: Any, token: Callable[..., str]
) -> AsyncIterator[Any]:
    """Start `host` on a free port; yield `as_user(user_id, roles=None)` -> (stub, metadata)."""
    await host.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}")
    stub = stub_class(channel)

    def as_user(user_id: str, roles: list[str] | None = None) -> tuple[Any, Metadata]:
        return stub, (("authorization", f"Bearer {token(user_id, roles)}"),)

    try:
        yield as_user
    finally:
        await channel.close()
        await host.stop()


@pytest.fixture
def groups_env() -> dict[str, str]:
    """Overrides for the groups service of one test (set before the `groups` fixture runs)."""
    return {}


@pytest.fixture
async def groups(
    nats_url: str,
    token: Callable[..., str],
    groups_env: dict[str, str],
    service_env: ServiceEnv,
) -> AsyncIterator[GroupsCaller]:
    """`groups(user)` returns (stub, metadata) for calls to an in-process groups service."""
    host = build(GroupsConfig.from_env(service_env(nats_url, "groups", **groups_env)))
    async with serving(host, groups_pb2_grpc.GroupsStub, token) as as_user:
        yield as_user


MessagingCaller = Callable[[str], tuple[messaging_pb2_grpc.MessagingStub, Metadata]]


@pytest.fixture
def messaging_env() -> dict[str, str]:
    """Overrides for the messaging service of one test (set before `messaging` starts)."""
    return {}


async def start_instances(
    stack: AsyncExitStack,
    count: int,
    service_env: ServiceEnv,
    nats_url: str,
    token: Callable[..., str],
    database: str,
    overrides: dict[str, str],
) -> list[MessagingCaller]:
    """`count` messaging instances serving at once over one database, as replicas would."""

    def host() -> ServiceHost:
        env = service_env(nats_url, "messaging", MONGODB_DATABASE=database, **overrides)
        return build_messaging(MessagingConfig.from_env(env))

    return await serving_replicas(stack, count, host, messaging_pb2_grpc.MessagingStub, token)


async def serving_replicas(
    stack: AsyncExitStack,
    count: int,
    host: Callable[[], ServiceHost],
    stub: Callable[[grpc.aio.Channel], Any],
    token: Callable[..., str],
) -> list[Any]:
    """`count` instances of `host()` serving at once until `stack` closes; a caller each."""
    return [await stack.enter_async_context(serving(host(), stub, token)) for _ in range(count)]


@pytest.fixture
async def messaging(
    service_env: ServiceEnv,
    nats_url: str,
    token: Callable[..., str],
    database: str,
    messaging_env: dict[str, str],
) -> AsyncIterator[MessagingCaller]:
    """`messaging(user)` returns (stub, metadata) for calls to an in-process messaging service."""
    async with AsyncExitStack() as stack:
        (caller,) = await start_instances(
            stack, 1, service_env, nats_url, token, database, messaging_env
        )
        yield caller


@pytest.fixture
async def two_messaging(
    service_env: ServiceEnv,
    nats_url: str,
    token: Callable[..., str],
    database: str,
    messaging_env: dict[str, str],
) -> AsyncIterator[list[MessagingCaller]]:
    async with AsyncExitStack() as stack:
        yield await start_instances(stack, 2, service_env, nats_url, token, database, messaging_env)


@pytest.fixture
async def plaza_store(mongodb_uri: str, database: str) -> AsyncIterator[PlazaStore]:
    client, db = open_database(mongodb_uri, database)
    store = PlazaStore(db)
    await store.create_indexes()
    yield store
    client.close()


@pytest.fixture
async def store(mongodb_uri: str, database: str) -> AsyncIterator[MessagingStore]:
    """The service's store, for waiting on what only events change (the follow projection)."""
    client, db = open_database(mongodb_uri, database)
    yield MessagingStore(db)
    client.close()


@pytest.fixture
async def nats_client(nats_url: str) -> AsyncIterator[Any]:
    nc = await nats.connect(nats_url)
    yield nc
    await nc.drain()


class OwnServer:
    """A server of one test's own (nats-server, the local MongoDB server), which the test
    stops and starts again as an outage would: on the same port and data directory, with
    the same command line."""

    def __init__(self, url: str, port: int, command: list[str]) -> None:
        self.url = url
        self._port = port
        self._command = command
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            self._command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self._port, timeout=30.0)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the server with `sig` (SIGKILL: a crash, nothing flushed, no goodbye)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(sig)
            self._process.wait(10)
        self._process = None


@contextmanager
def own_server(url: str, port: int, command: list[str]) -> Iterator[OwnServer]:
    server = OwnServer(url, port, command)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_nats(tmp_path: Path, nats_users: NatsUsers) -> Iterator[OwnServer]:
    """A nats-server with JetStream for this test alone, with the session's users (its URL
    is the harness's)."""
    port = free_port()
    command = nats_server_command(port, tmp_path / "jetstream", nats_config(tmp_path, nats_users))
    url = nats_users.url(f"nats://127.0.0.1:{port}", HARNESS)
    with own_server(url, port, command) as server:
        yield server


@pytest.fixture
def own_mongodb(tmp_path: Path) -> Iterator[OwnServer]:
    """The local MongoDB server for this test alone, even with MONGODB_URI set: a server the
    test may stop."""
    port = free_port()
    command = mongodb_server_command(port, tmp_path / "mongodb")
    with own_server(local_mongodb_uri(port), port, command) as server:
        yield server
