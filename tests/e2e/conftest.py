"""The suite as separate processes (nats-server, MongoDB, the services), once per test
session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from groupchat.gateway.v1 import gateway_pb2_grpc

from tests.conftest import TEST_JWT_SECRET
from tools.suite import Suite


@contextmanager
def running_suite(data_dir: Path, **extra_env: str) -> Iterator[Suite]:
    """An isolated suite under `data_dir`, stopped at the end."""
    # The local MongoDB server is one Python process (about 1,000 operations/s here): a
    # 1,000-join storm keeps it busy for 10 s and more, beyond the gateway's 5 s default cap
    # on downstream calls. These tests are about outcomes, not that deadline.
    suite = Suite.isolated(
        data_dir, TEST_JWT_SECRET, **{"DOWNSTREAM_TIMEOUT_SECONDS": "60", **extra_env}
    )
    suite.start()
    try:
        yield suite
    finally:
        suite.stop()


@pytest.fixture(scope="session")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    with running_suite(tmp_path_factory.mktemp("suite")) as running:
        yield running


@pytest.fixture
async def gateway(suite: Suite, token: Callable[..., str]):  # type: ignore[no-untyped-def]
    """`gateway(user)` returns (stub, metadata) for calls as that user."""
    channel = grpc.aio.insecure_channel(suite.gateway_address)
    stub = gateway_pb2_grpc.GatewayStub(channel)

    def as_user(user_id: str, roles: list[str] | None = None):  # type: ignore[no-untyped-def]
        return stub, (("authorization", f"Bearer {token(user_id, roles)}"),)

    yield as_user
    await channel.close()
