"""The suite as separate processes (nats-server, groups, gateway), once per test session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from groupchat.gateway.v1 import gateway_pb2_grpc

from tests.conftest import TEST_JWT_SECRET
from tools.suite import Suite


@pytest.fixture(scope="session")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    data_dir: Path = tmp_path_factory.mktemp("suite")
    running = Suite.isolated(data_dir, TEST_JWT_SECRET)
    running.start()
    yield running
    running.stop()


@pytest.fixture
async def gateway(suite: Suite, token: Callable[..., str]):  # type: ignore[no-untyped-def]
    """`gateway(user)` returns (stub, metadata) for calls as that user."""
    channel = grpc.aio.insecure_channel(suite.gateway_address)
    stub = gateway_pb2_grpc.GatewayStub(channel)

    def as_user(user_id: str, roles: list[str] | None = None):  # type: ignore[no-untyped-def]
        return stub, (("authorization", f"Bearer {token(user_id, roles)}"),)

    yield as_user
    await channel.close()
