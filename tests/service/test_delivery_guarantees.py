"""What must not be lost or doubled: sequence numbers across processes, events across a NATS
outage, redelivered events."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import nats
from groupchat.events.v1 import events_pb2

from services.groups.app import GroupsApp, GroupsLimits
from services.groups.domain import GroupSettings
from services.groups.storage import GroupsStore
from services.kit.events import EventBus, OutgoingEvent, new_event
from services.kit.mongo import ProcessedEvents, open_database
from services.kit.outbox import Outbox
from tests.conftest import eventually


class UnreachableBus:
    """An event bus whose NATS is down."""

    async def publish(self, event: OutgoingEvent) -> None:
        raise ConnectionError("nats: no servers available")


def sample_event() -> OutgoingEvent:
    return new_event(
        "groups",
        "group_dissolved",
        aggregate_id=f"g_{uuid.uuid4().hex[:8]}",
        aggregate_version=1,
        user_id="alice",
        group_dissolved={"group_id": "g"},
    )


async def test_two_processes_sending_to_one_group_share_one_gapless_sequence(nats_url: str) -> None:
    client, db = open_database(None, f"seq_{uuid.uuid4().hex[:8]}")
    bus = await EventBus.connect(nats_url, "test", stream_replicas=1)
    try:
        store = GroupsStore(db)
        await store.create_indexes()
        # Two app instances over one store stand for two groups processes.
        first, second = (
            GroupsApp(store, Outbox(db["outbox"], bus), GroupsLimits()) for _ in range(2)
        )
        group, _ = await first.create_group(
            "owner", GroupSettings("Both", "", "FOOD", "", 500, True, ""), ""
        )
        sends = [
            app.send_message("owner", group.group_id, f"{name} {n}", [], "")
            for n in range(20)
            for app, name in ((first, "first"), (second, "second"))
        ]
        messages = await asyncio.gather(*sends)
        assert sorted(m.seq for m in messages) == list(range(1, 41))
        stored, _ = await first.list_messages("owner", group.group_id, 0, 0, 100)
        assert [m.seq for m in stored] == list(range(1, 41))
        assert len({m.text for m in stored}) == 40
    finally:
        await bus.close()
        client.close()


async def test_events_written_while_nats_is_down_are_published_later(nats_url: str) -> None:
    client, db = open_database(None, f"outbox_{uuid.uuid4().hex[:8]}")
    bus = await EventBus.connect(nats_url, "test", stream_replicas=1)
    listener = await nats.connect(nats_url)
    try:
        event = sample_event()
        received: list[events_pb2.Envelope] = []

        async def collect(msg: Any) -> None:
            received.append(events_pb2.Envelope.FromString(msg.data))

        await listener.subscribe(event.subject, cb=collect)
        await listener.flush()
        down = Outbox(db["outbox"], UnreachableBus(), retry_after_seconds=0)  # type: ignore[arg-type]
        await down.publish([event])
        assert await db["outbox"].count_documents({}) == 1
        assert received == []

        recovered = Outbox(db["outbox"], bus, retry_after_seconds=0)
        assert await recovered.relay_once() == 1
        await eventually(lambda: len(received) == 1)
        assert received[0].event_id == event.envelope.event_id
        assert await db["outbox"].count_documents({}) == 0
        assert await recovered.relay_once() == 0
    finally:
        await listener.drain()
        await bus.close()
        client.close()


async def test_a_republished_event_is_stored_once(nats_url: str) -> None:
    bus = await EventBus.connect(nats_url, "test", stream_replicas=1)
    nc = await nats.connect(nats_url)
    try:
        event = sample_event()
        await bus.publish(event)
        await bus.publish(event)  # the relay racing the inline publish
        js = nc.jetstream()
        info = await js.stream_info("GROUPCHAT_GROUPS", subjects_filter=event.subject)
        assert info.state.subjects == {event.subject: 1}
    finally:
        await nc.drain()
        await bus.close()


async def test_a_failed_handler_gets_the_event_again_and_handles_it_once(nats_url: str) -> None:
    client, db = open_database(None, f"consumer_{uuid.uuid4().hex[:8]}")
    bus = await EventBus.connect(nats_url, "test", stream_replicas=1)
    processed = ProcessedEvents(db["processed_events"])
    event = sample_event()
    attempts: list[str] = []
    applied: list[str] = []

    async def handle(envelope: events_pb2.Envelope) -> None:
        attempts.append(envelope.event_id)
        if len(attempts) == 1:
            raise RuntimeError("store briefly unavailable")
        if await processed.first_time(envelope.event_id):
            applied.append(envelope.event_id)

    try:
        durable = f"test_{uuid.uuid4().hex[:8]}"
        await bus.consume(durable, event.subject, handle)
        await bus.publish(event)
        await eventually(lambda: len(attempts) >= 2)
        assert applied == [event.envelope.event_id]
        assert not await processed.first_time(event.envelope.event_id)
    finally:
        await bus.close()
        client.close()
