"""Background work a service runs beside its RPCs, stopped when its exit stack closes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any

import structlog

log = structlog.get_logger("tasks")


def run_in_background(
    stack: AsyncExitStack, work: Coroutine[Any, Any, None], name: str
) -> asyncio.Task[None]:
    """Start `work` as a task that is cancelled (and awaited) when `stack` closes."""
    task = asyncio.create_task(work, name=name)

    async def stop() -> None:
        # Cancel until it ends: a library that swallows one cancel (wait_for on 3.11 does
        # when the awaited result arrives in the same turn) must not keep the task running.
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(stop)
    return task


async def every(seconds: float, step: Callable[[], Awaitable[object]], name: str) -> None:
    """Run `step` every `seconds` until cancelled; a failing step is logged, not fatal."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await step()
        except Exception:
            log.exception("periodic_task_failed", task=name)
