"""Events that wait for a stream go out in one response (a batch made by joining their bytes),
a lone event at once as itself; the buffer stays bounded and in order around it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from groupchat.events.v1 import events_pb2
from groupchat.gateway.v1 import gateway_pb2

from services.gateway.fanout import Item, Session
from services.gateway.history import group_key
from services.gateway.responses import batch_response, is_event, pushed_events
from services.gateway.subscribe import SubscribeHandler
from services.kit.auth import Identity
from tests.unit.test_stream_sequencing import LIMITS

KEY = group_key("g_1")


def envelope(seq: int, text: str = "") -> events_pb2.Envelope:
    return events_pb2.Envelope(
        type="groups.group_message_posted",
        aggregate_id="g_1",
        aggregate_version=seq,
        group_message_posted={"message": {"group_id": "g_1", "seq": seq, "text": text or "m"}},
    )


def response(seq: int, text: str = "") -> bytes:
    return gateway_pb2.SubscribeResponse(event=envelope(seq, text)).SerializeToString()


def test_a_batch_of_serialized_responses_reads_as_their_events_in_order() -> None:
    long_text = "x" * 300  # a length that takes two bytes of varint, inside and outside
    parts = [response(1), response(2, long_text), response(3)]
    batch = gateway_pb2.SubscribeResponse.FromString(batch_response(parts))
    assert batch.WhichOneof("kind") == "batch"
    assert list(pushed_events(batch)) == [envelope(1), envelope(2, long_text), envelope(3)]
    expected = gateway_pb2.SubscribeResponse(
        batch=gateway_pb2.EventBatch(events=[envelope(1), envelope(2, long_text), envelope(3)])
    )
    assert batch_response(parts) == expected.SerializeToString()
    single = gateway_pb2.SubscribeResponse.FromString(response(7))
    assert list(pushed_events(single)) == [envelope(7)]
    ready = gateway_pb2.SubscribeResponse(ready=gateway_pb2.Ready())
    refresh = gateway_pb2.SubscribeResponse(refresh=gateway_pb2.Refresh(group_ids=["g_1"]))
    assert list(pushed_events(ready)) == [] and list(pushed_events(refresh)) == []
    assert is_event(response(1)) and not is_event(refresh.SerializeToString())


async def test_waiting_items_stop_at_a_marker_and_at_the_limits() -> None:
    session = Session(Identity("alice", frozenset(), "t"), LIMITS)
    for seq in range(1, 6):
        session.offer(KEY, seq, response(seq))
    session.offer_recheck()
    session.offer(KEY, 6, response(6))
    first = await session.next()
    assert first[1] == 1
    assert [seq for _, seq, _ in session.waiting_items(2, 1 << 20)] == [2, 3]
    size = len(response(4))
    assert [seq for _, seq, _ in session.waiting_items(10, size)] == [4]
    assert [seq for _, seq, _ in session.waiting_items(10, 1)] == [5]  # at least one
    assert session.waiting_items(10, 1 << 20) == []  # the marker is next
    assert await session.next() is Session.RECHECK
    assert [seq for _, seq, _ in session.waiting_items(10, 1 << 20)] == [6]
    assert session.buffered == 0 and session._bytes == 0


class FakeContext:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.writes.append(data)


def handler() -> SubscribeHandler:
    none: Any = None
    return SubscribeHandler(none, none, none, none, replace(LIMITS, stall_seconds=1))


async def test_what_waits_goes_out_in_one_batch_and_a_lone_event_as_itself() -> None:
    session = Session(Identity("alice", frozenset(), "t"), LIMITS)
    session.positions[KEY] = 0
    context: Any = FakeContext()
    refresh = gateway_pb2.SubscribeResponse(refresh=gateway_pb2.Refresh()).SerializeToString()
    for seq in (1, 2, 2, 3):  # a duplicate among them is dropped
        session.offer(KEY, seq, response(seq))
    session.offer(None, 0, refresh)  # not an event: sent on its own, in its place
    session.offer(KEY, 4, response(4))
    await handler()._deliver(session, await session.next(), context)
    assert context.writes == [
        batch_response([response(1), response(2), response(3)]),
        refresh,
        response(4),  # the one event after the refresh: as itself
    ]
    assert session.positions[KEY] == 4 and session.buffered == 0
    session.offer(KEY, 5, response(5))
    context.writes.clear()
    item: Item = await session.next()
    await handler()._deliver(session, item, context)
    assert context.writes == [response(5)]
