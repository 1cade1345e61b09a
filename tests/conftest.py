"""Fixtures shared by every tier: a nats-server, tokens, and a way to wait on a condition."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from services.kit.auth import mint_token
from tools.suite import free_port, nats_server_command, wait_port

TEST_JWT_SECRET = "test-secret-test-secret-test-secret-0123"


@contextmanager
def running_nats_server(store: Path) -> Iterator[str]:
    """A nats-server with JetStream on a free port, storing under `store`; yields its URL."""
    port = free_port()
    process = subprocess.Popen(
        nats_server_command(port, store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port)
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_nats_server(tmp_path_factory.mktemp("jetstream")) as url:
        yield url


@pytest.fixture
def token() -> Callable[..., str]:
    def make(user_id: str, roles: list[str] | None = None) -> str:
        return mint_token(TEST_JWT_SECRET, user_id, roles)

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
