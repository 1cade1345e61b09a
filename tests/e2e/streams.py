"""Reading Subscribe streams in tests: each stream is drained by a task into a list."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
from groupchat.events.v1 import events_pb2
from groupchat.gateway.v1 import gateway_pb2

from services.gateway.responses import pushed_events
from tests.conftest import eventually


class OpenStream:
    def __init__(self, call: Any) -> None:
        self.call = call
        self.ready: gateway_pb2.Ready | None = None
        self.events: list[events_pb2.Envelope] = []
        self.refreshes: list[gateway_pb2.Refresh] = []
        self.error: grpc.aio.AioRpcError | None = None
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                kind = response.WhichOneof("kind")
                if kind == "ready":
                    self.ready = response.ready
                elif kind == "refresh":
                    self.refreshes.append(response.refresh)
                else:
                    self.events.extend(pushed_events(response))
        except grpc.aio.AioRpcError as error:
            self.error = error

    def of_type(self, payload: str) -> list[events_pb2.Envelope]:
        return [e for e in self.events if e.WhichOneof("payload") == payload]

    def seqs(self, conversation: str) -> list[int]:
        """The seqs of the messages received of one group or direct conversation."""
        return [
            e.aggregate_version
            for e in self.events
            if e.aggregate_id == conversation
            and e.WhichOneof("payload") in ("group_message_posted", "direct_message_sent")
        ]

    @property
    def ended(self) -> bool:
        return self._task.done()

    def texts(self) -> list[str]:
        return [e.group_message_posted.message.text for e in self.of_type("group_message_posted")]

    async def wait_ready(self, within: float = 30.0) -> gateway_pb2.Ready:
        await eventually(lambda: self.ready is not None or self.error is not None, within)
        if self.error is not None:
            raise self.error
        assert self.ready is not None
        return self.ready

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def open_stream(
    stub: Any, metadata: Any, resume_from: list[gateway_pb2.Position] | None = None
) -> OpenStream:
    request = gateway_pb2.SubscribeRequest(resume_from=resume_from or [])
    stream = OpenStream(stub.Subscribe(request, metadata=metadata))
    await stream.wait_ready()
    return stream
