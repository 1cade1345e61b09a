"""Fixtures shared by every tier: tokens and a way to wait on a condition."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from services.kit.auth import mint_token

TEST_JWT_SECRET = "test-secret-test-secret-test-secret-0123"


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
