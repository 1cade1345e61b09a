"""The suite as separate processes (nats-server, MongoDB, the services), once per test
session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from groupchat.gateway.v1 import gateway_pb2_grpc

from tools.suite import Suite

# Short enough for a test to see a recall refused once the window has passed.
RECALL_WINDOW_SECONDS = 6


@contextmanager
def running_suite(
    data_dir: Path,
    public_keys_file: Path,
    replicas: Mapping[str, int] | None = None,
    *,
    supervised: bool = False,
    **extra_env: str,
) -> Iterator[Suite]:
    """An isolated suite under `data_dir` (with `replicas` processes of some services),
    stopped at the end. Supervised, it restarts a process that dies (tools.supervisor)."""
    # The local MongoDB server is one Python process (about 1,000 operations/s here): a
    # 1,000-join storm keeps it busy for 30 s and more on a loaded machine, beyond the
    # gateway's 5 s default cap on downstream calls. These tests are about outcomes, not
    # that deadline.
    suite = Suite.isolated(
        data_dir,
        public_keys_file,
        replicas=replicas,
        **{
            "DOWNSTREAM_TIMEOUT_SECONDS": "120",
            "RECALL_WINDOW_SECONDS": str(RECALL_WINDOW_SECONDS),
            **extra_env,
        },
    )
    suite.supervised = supervised
    suite.start()
    try:
        yield suite
    finally:
        suite.stop()


@pytest.fixture(scope="session")
def suite(tmp_path_factory: pytest.TempPathFactory, public_keys_file: Path) -> Iterator[Suite]:
    with running_suite(tmp_path_factory.mktemp("suite"), public_keys_file) as running:
        yield running


@pytest.fixture(scope="session")
def supervised_suite(
    tmp_path_factory: pytest.TempPathFactory, public_keys_file: Path
) -> Iterator[Suite]:
    """A suite of its own that restarts a process that dies, as `make run` does: for tests
    that kill its processes."""
    with running_suite(
        tmp_path_factory.mktemp("supervised"), public_keys_file, supervised=True
    ) as running:
        yield running


@asynccontextmanager
async def gateway_at(address: str, token: Callable[..., str]) -> AsyncIterator[Any]:
    """`gateway(user)` returns (stub, metadata) for calls as that user to the gateway at
    `address`."""
    channel = grpc.aio.insecure_channel(address)
    stub = gateway_pb2_grpc.GatewayStub(channel)

    def as_user(user_id: str, roles: list[str] | None = None):  # type: ignore[no-untyped-def]
        return stub, (("authorization", f"Bearer {token(user_id, roles)}"),)

    try:
        yield as_user
    finally:
        await channel.close()


@pytest.fixture
async def gateway(suite: Suite, token: Callable[..., str]):  # type: ignore[no-untyped-def]
    """`gateway(user)` returns (stub, metadata) for calls as that user."""
    async with gateway_at(suite.gateway_address, token) as as_user:
        yield as_user
