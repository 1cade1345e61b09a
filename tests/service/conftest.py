"""Service tier: one service in-process on a real socket, a real nats-server, the store
(MONGODB_URI when set, else the in-process stand-in)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import nats
import pytest
from groupchat.groups.v1 import groups_pb2_grpc

from services.groups.config import GroupsConfig
from services.groups.service import build
from services.kit.config import Env
from services.kit.server import ServiceHost
from tests.conftest import TEST_JWT_SECRET


def service_env(nats_url: str, **overrides: str) -> Env:
    """The environment a service gets in tests: a fresh database each time."""
    values = {
        "JWT_SECRET": TEST_JWT_SECRET,
        "NATS_URL": nats_url,
        "GRPC_LISTEN": "127.0.0.1:0",
        "LOG_LEVEL": "warning",
        "MONGODB_DATABASE": f"test_{uuid.uuid4().hex[:12]}",
        "SHUTDOWN_GRACE_SECONDS": "2",
    }
    if os.environ.get("MONGODB_URI"):
        values["MONGODB_URI"] = os.environ["MONGODB_URI"]
    values.update(overrides)
    return Env(values)


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
    nats_url: str, token: Callable[..., str], groups_env: dict[str, str]
) -> AsyncIterator[GroupsCaller]:
    """`groups(user)` returns (stub, metadata) for calls to an in-process groups service."""
    host = build(GroupsConfig.from_env(service_env(nats_url, **groups_env)))
    async with serving(host, groups_pb2_grpc.GroupsStub, token) as as_user:
        yield as_user


@pytest.fixture
async def nats_client(nats_url: str) -> AsyncIterator[Any]:
    nc = await nats.connect(nats_url)
    yield nc
    await nc.drain()
