"""Open Subscribe streams, read by a task each: which seqs of the watched group each one got,
and how it ended."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import grpc
from groupchat.gateway.v1 import gateway_pb2

from services.gateway.responses import pushed_events
from services.kit.rpc_status import error_info


@dataclass(frozen=True)
class StreamEnd:
    """How the gateway ended a stream: its status code, and the ErrorInfo reason when it
    gave one (the client then knows to catch up; without one the end tells it nothing)."""

    code: str
    reason: str


class WatchedStream:
    """One device's Subscribe stream, from Ready on."""

    def __init__(self, device: str, stub: Any, metadata: Any, group_id: str) -> None:
        self.device = device
        self.group_id = group_id
        self.events = 0
        self.seqs: list[int] = []
        self.end: StreamEnd | None = None
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._closing = False
        self._call = stub.Subscribe(gateway_pb2.SubscribeRequest(), metadata=metadata)
        self._task = asyncio.create_task(self._read())

    async def wait_ready(self, within: float) -> None:
        await asyncio.wait_for(self._ready.wait(), within)
        if self.end is not None:
            raise RuntimeError(f"{self.device}'s stream ended before Ready: {self.end}")

    def has_all(self, last_seq: int) -> bool:
        """Got every seq up to `last_seq`, or ended (it gets nothing more)."""
        return self.end is not None or set(range(1, last_seq + 1)) <= set(self.seqs)

    async def wait_for_all(self, last_seq: int) -> None:
        while not self.has_all(last_seq):
            self._changed.clear()
            await self._changed.wait()

    def missed(self, stored_seqs: set[int]) -> list[int]:
        return sorted(stored_seqs - set(self.seqs))

    def doubled(self) -> list[int]:
        return sorted(seq for seq, times in Counter(self.seqs).items() if times > 1)

    def out_of_order(self) -> int:
        """How often a seq came after a higher one."""
        pairs = zip(self.seqs, self.seqs[1:], strict=False)
        return sum(1 for before, after in pairs if after < before)

    async def close(self) -> None:
        self._closing = True
        self._call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _read(self) -> None:
        try:
            async for response in self._call:
                if response.HasField("ready"):
                    self._ready.set()
                else:  # an event or a batch of them; a refresh carries none
                    for event in pushed_events(response):
                        self._count(event)
            self.end = StreamEnd(grpc.StatusCode.OK.name, "")
        except grpc.aio.AioRpcError as error:
            if not (self._closing and error.code() == grpc.StatusCode.CANCELLED):
                info = error_info(error)
                self.end = StreamEnd(error.code().name, info.reason if info else "")
        finally:
            self._ready.set()
            self._changed.set()

    def _count(self, event: Any) -> None:
        self.events += 1
        if event.WhichOneof("payload") == "group_message_posted":
            message = event.group_message_posted.message
            if message.group_id == self.group_id:
                self.seqs.append(message.seq)
                self._changed.set()
