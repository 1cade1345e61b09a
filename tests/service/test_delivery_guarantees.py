"""What must not be lost or doubled: sequence numbers across processes, events across a NATS
outage or a process that died after its write, redelivered events."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from groupchat.events.v1 import events_pb2

from services.groups.app import GroupsApp, GroupsLimits
from services.groups.domain import GroupSettings, Message
from services.groups.mapping import message_to_proto
from services.groups.storage import GroupsStore
from services.kit.events import EventBus, OutgoingEvent, new_event
from services.kit.mongo import ProcessedEvents
from services.kit.outbox import (
    EVENTS_FIELD,
    HOLDS_EVENTS,
    WAITING_SINCE_FIELD,
    Outbox,
    pending,
    with_pending,
)
from tests.conftest import eventually


class UnreachableBus:
    """An event bus whose NATS is down."""

    async def publish(self, event: OutgoingEvent) -> None:
        raise ConnectionError("nats: no servers available")


SETTINGS = GroupSettings("Kept", "", "FOOD", "", 500, True, "")


async def groups_app(db: Any, outbox: Outbox) -> GroupsApp:
    store = GroupsStore(db)
    await store.create_indexes()
    app = GroupsApp(store, outbox, GroupsLimits())
    await app.start()
    return app


async def collect(listener: Any, subject: str) -> list[events_pb2.Envelope]:
    """The events published on `subject` from now on, as they arrive."""
    received: list[events_pb2.Envelope] = []

    async def on_message(msg: Any) -> None:
        received.append(events_pb2.Envelope.FromString(msg.data))

    await listener.subscribe(subject, cb=on_message)
    await listener.flush()
    return received


def sample_event() -> OutgoingEvent:
    return new_event(
        "groups",
        "group_dissolved",
        aggregate_id=f"g_{uuid.uuid4().hex[:8]}",
        aggregate_version=1,
        user_id="alice",
        group_dissolved={"group_id": "g"},
    )


async def test_two_processes_sending_to_one_group_share_one_gapless_sequence(
    mongo_db: Any, bus: EventBus
) -> None:
    # Two app instances over one store stand for two groups processes.
    first, second = [await groups_app(mongo_db, Outbox(bus)) for _ in range(2)]
    group, _ = await first.create_group("owner", SETTINGS, "")
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


async def test_a_write_while_nats_is_down_answers_and_its_event_is_published_later(
    mongo_db: Any, bus: EventBus, nats_client: Any
) -> None:
    db, listener = mongo_db, nats_client
    down = await groups_app(db, Outbox(UnreachableBus(), retry_after_seconds=0))  # type: ignore[arg-type]
    group, _ = await down.create_group("owner", SETTINGS, "")
    received = await collect(listener, f"groupchat.groups.*.{group.group_id}.*")
    message = await down.send_message("owner", group.group_id, "while NATS is down", [], "")
    assert await db["messages"].count_documents(HOLDS_EVENTS) == 1

    recovered = Outbox(bus, retry_after_seconds=0)
    await groups_app(db, recovered)
    assert await recovered.relay_once() == 2  # the group's creation and the message
    await eventually(lambda: len(received) == 2)
    assert {e.type for e in received} == {"groups.group_created", "groups.group_message_posted"}
    posted = next(e for e in received if e.type == "groups.group_message_posted")
    assert posted.group_message_posted.message.seq == message.seq
    assert await db["messages"].count_documents(HOLDS_EVENTS) == 0
    assert await db["groups"].count_documents(HOLDS_EVENTS) == 0
    assert await recovered.relay_once() == 0


async def test_a_message_stored_by_a_process_that_died_is_finished_and_published(
    mongo_db: Any, bus: EventBus, nats_client: Any
) -> None:
    db, listener = mongo_db, nats_client
    app = await groups_app(db, Outbox(bus))
    group, _ = await app.create_group("owner", SETTINGS, "")
    received = await collect(listener, f"groupchat.groups.group_message_posted.{group.group_id}.*")
    # The process died right after the insert: nothing after it ran.
    store = GroupsStore(db)
    message = Message(group.group_id, 1, "owner", "last words", (), "", 1_000)
    event = new_event(
        "groups",
        "group_message_posted",
        aggregate_id=group.group_id,
        aggregate_version=1,
        user_id="owner",
        group_message_posted={"message": message_to_proto(message)},
    )
    assert await store.insert_message(message, [event])
    assert (await app.get_group("owner", group.group_id)).last_seq == 0

    survivor = Outbox(bus, retry_after_seconds=0)
    await groups_app(db, survivor)
    await survivor.relay_once()
    await eventually(lambda: len(received) == 1)
    assert received[0].event_id == event.envelope.event_id
    finished = await app.get_group("owner", group.group_id)
    assert (finished.last_seq, finished.last_message) == (1, message)
    _, unread = await app.mark_read("owner", group.group_id, 0)
    assert unread == 0  # the sender has read what they wrote


async def test_a_republished_event_is_stored_once(bus: EventBus, nats_client: Any) -> None:
    event = sample_event()
    await bus.publish(event)
    await bus.publish(event)  # the relay racing the inline publish
    js = nats_client.jetstream()
    info = await js.stream_info("GROUPCHAT_GROUPS", subjects_filter=event.subject)
    assert info.state.subjects == {event.subject: 1}


async def test_a_failed_handler_gets_the_event_again_and_handles_it_once(
    mongo_db: Any, bus: EventBus
) -> None:
    processed = ProcessedEvents(mongo_db["processed_events"])
    event = sample_event()
    attempts: list[str] = []
    applied: list[str] = []

    async def handle(envelope: events_pb2.Envelope) -> None:
        attempts.append(envelope.event_id)
        if len(attempts) == 1:
            raise RuntimeError("store briefly unavailable")
        if await processed.first_time(envelope.event_id):
            applied.append(envelope.event_id)

    durable = f"test_{uuid.uuid4().hex[:8]}"
    await bus.consume(durable, event.subject, handle)
    await bus.publish(event)
    await eventually(lambda: len(applied) == 1)
    assert applied == [event.envelope.event_id]
    assert attempts == [event.envelope.event_id] * 2
    assert not await processed.first_time(event.envelope.event_id)


class GatedBus:
    """An event bus whose publishes wait until the test opens the gate, counting events."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self.gate = asyncio.Event()
        self.publishing = asyncio.Event()
        self.published: list[str] = []

    async def publish(self, event: OutgoingEvent) -> None:
        self.publishing.set()
        await self.gate.wait()
        await self._bus.publish(event)
        self.published.append(event.envelope.event_id)


async def test_a_relay_running_behind_publishes_and_finishes_what_waits_in_its_queue_once(
    mongo_db: Any, bus: EventBus
) -> None:
    gated = GatedBus(bus)
    # No retry delay and a scan on every turn: each scan would take the queued documents if
    # it did not leave them to the queue.
    outbox = Outbox(gated, retry_after_seconds=0, scan_interval_seconds=0)  # type: ignore[arg-type]
    finished: list[str] = []
    collection = mongo_db["things"]
    await outbox.watch(collection, finish=lambda doc: _record(finished, doc["_id"]))
    relay = asyncio.create_task(outbox.run())
    try:
        events = {}
        for name in ("first", "second"):
            events[name] = sample_event()
            await collection.insert_one(with_pending({"_id": name}, [events[name]]))
            outbox.committed(collection, name, [events[name]])
            if name == "first":
                await gated.publishing.wait()  # the relay is stuck on the first; the second queues
        gated.gate.set()

        async def all_published() -> bool:
            return await collection.count_documents(HOLDS_EVENTS) == 0

        await eventually(all_published)
        await eventually(lambda: len(gated.published) == 2)
        assert gated.published == [
            events["first"].envelope.event_id,
            events["second"].envelope.event_id,
        ]
        assert finished == []  # the commands finished them; the scan had nothing to redo
    finally:
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)


async def _record(finished: list[str], doc_id: str) -> None:
    finished.append(doc_id)


async def test_the_relay_clears_a_published_document_in_one_write_and_keeps_later_events(
    mongo_db: Any, bus: EventBus
) -> None:
    gated = GatedBus(bus)
    # No scan during the test: what the relay's own clearing leaves is what is seen.
    outbox = Outbox(gated, scan_interval_seconds=3600)  # type: ignore[arg-type]
    collection = mongo_db["cleared"]
    await outbox.watch(collection)
    relay = asyncio.create_task(outbox.run())
    try:
        alone, first, later = sample_event(), sample_event(), sample_event()
        await collection.insert_one(with_pending({"_id": "alone"}, [alone]))
        outbox.committed(collection, "alone", [alone])
        await gated.publishing.wait()
        gated.gate.set()
        await eventually(lambda: len(gated.published) == 1)

        async def cleared(doc_id: str, expected: dict[str, Any]) -> bool:
            return await collection.find_one({"_id": doc_id}) == expected

        # Neither the events nor the waiting mark: no later scan has a write left to do.
        await eventually(lambda: cleared("alone", {"_id": "alone"}))

        gated.gate.clear()
        gated.publishing.clear()
        await collection.insert_one(with_pending({"_id": "busy"}, [first]))
        outbox.committed(collection, "busy", [first])
        await gated.publishing.wait()
        # A command adds an event while the first one is being published.
        await collection.update_one({"_id": "busy"}, pending([later]))
        gated.gate.set()
        await eventually(lambda: len(gated.published) == 2)

        async def only_later_left() -> bool:
            doc = await collection.find_one({"_id": "busy"})
            return [e["id"] for e in doc[EVENTS_FIELD]] == [later.envelope.event_id]

        await eventually(only_later_left)
        assert WAITING_SINCE_FIELD in await collection.find_one({"_id": "busy"})
    finally:
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)


async def test_a_batch_is_cleared_though_another_relay_cleared_one_of_its_documents_first(
    mongo_db: Any, bus: EventBus
) -> None:
    collection = mongo_db["cleared_twice"]
    first, second = (Outbox(bus, scan_interval_seconds=3600) for _ in range(2))
    both, second_only = sample_event(), sample_event()
    await collection.insert_many(
        [with_pending({"_id": "both"}, [both]), with_pending({"_id": "second_only"}, [second_only])]
    )
    for outbox in (first, second):
        await outbox.watch(collection)
    # Both relays were handed "both" (a command's own and a scan's, say), and the first
    # clears it first. ("both" sorts first, where a write over the batch would stop.)
    first.committed(collection, "both", [both])
    second.committed(collection, "both", [both])
    second.committed(collection, "second_only", [second_only])

    async def cleared(doc_id: str) -> bool:
        return await collection.find_one({"_id": doc_id}) == {"_id": doc_id}

    relays = [asyncio.create_task(first.run())]
    try:
        await eventually(lambda: cleared("both"))
        relays.append(asyncio.create_task(second.run()))
        await eventually(lambda: cleared("second_only"))
    finally:
        for relay in relays:
            relay.cancel()
        await asyncio.gather(*relays, return_exceptions=True)


async def test_events_whose_order_is_free_are_handled_together_even_of_one_aggregate(
    bus: EventBus,
) -> None:
    aggregate = f"g_{uuid.uuid4().hex[:8]}"
    events = [
        new_event(
            "groups",
            "group_dissolved",
            aggregate_id=aggregate,
            aggregate_version=version,
            user_id="alice",
            group_dissolved={"group_id": aggregate},
        )
        for version in (1, 2)
    ]
    gate = asyncio.Event()
    in_hand: list[str] = []

    async def handle(envelope: events_pb2.Envelope) -> None:
        in_hand.append(envelope.event_id)
        await gate.wait()

    durable = f"test_{uuid.uuid4().hex[:8]}"
    await bus.consume(durable, events[0].subject, handle, in_order=lambda envelope: False)
    for event in events:
        await bus.publish(event)
    # Both at once: the second did not wait for the first (which waits for the gate).
    await eventually(lambda: len(in_hand) == 2)
    gate.set()
