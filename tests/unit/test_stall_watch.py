"""One timer ends the streams whose writes wait too long (their clients stopped reading),
and only those: a write that completes, or a cancel from elsewhere, is left as it is."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from services.gateway.subscribe import StallWatch, StreamStalled


class BlockedContext:
    """A stream whose client reads only once `reading` is set."""

    def __init__(self) -> None:
        self.reading = asyncio.Event()
        self.writes: list[bytes] = []

    async def write(self, data: bytes) -> None:
        await self.reading.wait()
        self.writes.append(data)


async def stream(watch: StallWatch, context: BlockedContext, *responses: bytes) -> None:
    """A stream's task: its writes, one after another."""
    watch.open(context)  # type: ignore[arg-type]
    try:
        for response in responses:
            await watch.write(context, response)  # type: ignore[arg-type]
    finally:
        watch.close(context)  # type: ignore[arg-type]


async def test_only_the_write_that_waits_too_long_ends_its_stream_and_on_time() -> None:
    watch = StallWatch(0.2)
    stalled, slow, quick = BlockedContext(), BlockedContext(), BlockedContext()
    quick.reading.set()
    started = time.monotonic()
    stalled_write = asyncio.create_task(stream(watch, stalled, b"a"))
    ended_at: list[float] = []
    stalled_write.add_done_callback(lambda _: ended_at.append(time.monotonic()))
    slow_write = asyncio.create_task(stream(watch, slow, b"b"))
    asyncio.get_running_loop().call_later(0.1, slow.reading.set)  # read in time
    watch.open(quick)  # type: ignore[arg-type]
    for n in range(15):  # a stream that keeps reading lives past the stall time, not ended
        await watch.write(quick, bytes([n]))  # type: ignore[arg-type]
        await asyncio.sleep(0.02)
    watch.close(quick)  # type: ignore[arg-type]
    with pytest.raises(StreamStalled):
        await stalled_write
    # Not before the stall time, and soon after it (a quarter more, and a loaded machine's lag).
    assert 0.2 <= ended_at[0] - started < 0.2 * 1.25 + 0.5
    await slow_write
    assert (stalled.writes, slow.writes, len(quick.writes)) == ([], [b"b"], 15)


async def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    watch = StallWatch(5)
    blocked = BlockedContext()
    write: asyncio.Task[Any] = asyncio.create_task(stream(watch, blocked, b"a"))
    await asyncio.sleep(0)
    write.cancel()
    with pytest.raises(asyncio.CancelledError):
        await write
    blocked.reading.set()
    await stream(watch, blocked, b"b")
    assert blocked.writes == [b"b"]
