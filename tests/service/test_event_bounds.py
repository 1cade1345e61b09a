"""The event system's bounds on a real nats-server of this module's own: streams keep events
only as long and as much as configured; consumers hold a bounded number of events for a
bounded time, and park what they cannot handle on the dead-letter stream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from groupchat.events.v1 import events_pb2
from nats.js.api import DiscardPolicy
from nats.js.errors import NotFoundError
from prometheus_client import REGISTRY

from services.kit.config import ACK_MARGIN_SECONDS, ConfigError, EventSettings
from services.kit.events import (
    DEAD_LETTER_ROOT,
    DEAD_LETTER_STREAM,
    SNAPSHOT_STREAM,
    STREAMS,
    EventBus,
    OutgoingEvent,
    new_event,
)
from tests.conftest import HARNESS, eventually
from tools.nats_users import NatsUsers
from tools.suite import running_nats_server

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory, nats_users: NatsUsers) -> Iterator[str]:
    """This module shrinks stream retention: on a server of its own, the other modules'
    streams keep theirs."""
    with running_nats_server(tmp_path_factory.mktemp("bounds-jetstream"), nats_users) as url:
        yield nats_users.url(url, HARNESS)


async def test_every_stream_keeps_events_only_as_long_and_as_much_as_configured(
    nats_url: str, nats_client: Any
) -> None:
    settings = EventSettings(retention_seconds=3600, retention_bytes=64 * MIB)

    bus = await EventBus.connect(nats_url, "bounds-service", settings)
    await bus.close()

    for name in STREAMS:
        config = (await nats_client.jetstream().stream_info(name)).config
        assert (config.max_age, config.max_bytes, config.discard) == (
            3600,
            64 * MIB,
            DiscardPolicy.OLD,
        ), name
    snapshots = (await nats_client.jetstream().stream_info(SNAPSHOT_STREAM)).config
    assert snapshots.max_msgs_per_subject == 1  # the latest state of each aggregate


async def test_retention_the_server_cannot_reserve_stops_the_service_with_a_message(
    nats_url: str,
) -> None:
    with pytest.raises(ConfigError, match="EVENT_RETENTION_BYTES"):
        await EventBus.connect(nats_url, "greedy", EventSettings(retention_bytes=1024**4))


# Consumers: dead letters, bounded concurrency, deadlines


@asynccontextmanager
async def consumer_bus(nats_url: str, **settings: Any) -> AsyncIterator[EventBus]:
    bus = await EventBus.connect(nats_url, "bounds-consumer", EventSettings(**settings))
    try:
        yield bus
    finally:
        await bus.close()


def an_event(aggregate_id: str, user_id: str = "owner") -> OutgoingEvent:
    return new_event(
        "groups",
        "group_dissolved",
        aggregate_id=aggregate_id,
        aggregate_version=1,
        user_id=user_id,
        group_dissolved={"group_id": aggregate_id},
    )


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def dead_lettered(durable: str, reason: str) -> float:
    labels = {"durable": durable, "reason": reason}
    return REGISTRY.get_sample_value("groupchat_events_dead_lettered_total", labels) or 0.0


async def parked(nats_client: Any, durable: str) -> Any:
    """The last event parked by `durable` (waits for one)."""
    js = nats_client.jetstream()
    found: list[Any] = []

    async def one_is_parked() -> bool:
        try:
            found.append(await js.get_last_msg(DEAD_LETTER_STREAM, f"{DEAD_LETTER_ROOT}.{durable}"))
        except NotFoundError:
            return False
        return True

    await eventually(one_is_parked)
    return found[0]


async def test_bytes_that_are_no_event_are_parked_at_once_and_the_next_event_is_handled(
    nats_url: str, nats_client: Any
) -> None:
    durable, group = unique("poison"), unique("g")
    event = an_event(group)
    handled: list[str] = []

    async def handle(envelope: events_pb2.Envelope) -> None:
        handled.append(envelope.event_id)

    async with consumer_bus(nats_url) as bus:
        await bus.consume(durable, f"groupchat.groups.*.{group}.*", handle)
        await nats_client.jetstream().publish(event.subject, b"\xff\xfenot an envelope")
        await bus.publish(event)

        await eventually(lambda: handled == [event.envelope.event_id])
        letter = await parked(nats_client, durable)

    assert letter.data == b"\xff\xfenot an envelope"
    assert letter.headers["Groupchat-Subject"] == event.subject
    assert letter.headers["Groupchat-Durable"] == durable
    assert letter.headers["Groupchat-Deliveries"] == "1"
    assert "not an event envelope" in letter.headers["Groupchat-Error"]
    assert dead_lettered(durable, "unparseable") == 1


async def test_an_event_that_keeps_failing_is_parked_after_the_last_attempt(
    nats_url: str, nats_client: Any
) -> None:
    durable, group = unique("failing"), unique("g")
    poison, good = an_event(group), an_event(group)
    attempts: list[str] = []

    async def handle(envelope: events_pb2.Envelope) -> None:
        attempts.append(envelope.event_id)
        if envelope.event_id == poison.envelope.event_id:
            raise ValueError("cannot apply this one")

    async with consumer_bus(nats_url, max_deliveries=2) as bus:
        await bus.consume(durable, f"groupchat.groups.*.{group}.*", handle)
        await bus.publish(poison)
        await bus.publish(good)

        letter = await parked(nats_client, durable)
        info = await nats_client.jetstream().consumer_info("GROUPCHAT_GROUPS", durable)

    assert attempts.count(poison.envelope.event_id) == 2
    assert attempts.count(good.envelope.event_id) == 1
    assert letter.data == poison.envelope.SerializeToString()
    assert letter.headers["Groupchat-Deliveries"] == "2"
    assert "cannot apply this one" in letter.headers["Groupchat-Error"]
    assert info.num_ack_pending == 0  # acked: never delivered again
    assert dead_lettered(durable, "failed") == 1


async def test_a_handler_past_its_deadline_is_a_failed_attempt(
    nats_url: str, nats_client: Any
) -> None:
    durable, group = unique("slow"), unique("g")
    never = asyncio.Event()

    async def handle(_: events_pb2.Envelope) -> None:
        await never.wait()

    async with consumer_bus(nats_url, max_deliveries=1, handler_timeout_seconds=0.2) as bus:
        await bus.consume(durable, f"groupchat.groups.*.{group}.*", handle)
        await bus.publish(an_event(group))
        letter = await parked(nats_client, durable)

    assert "TimeoutError" in letter.headers["Groupchat-Error"]


async def test_a_consumer_holds_at_most_max_in_flight_events_and_waits_longer_than_a_handler(
    nats_url: str, nats_client: Any
) -> None:
    durable, owner = unique("bounded"), unique("owner")
    running: list[str] = []
    release = asyncio.Event()
    done: list[str] = []

    async def handle(envelope: events_pb2.Envelope) -> None:
        running.append(envelope.aggregate_id)
        await release.wait()
        done.append(envelope.aggregate_id)

    async with consumer_bus(nats_url, max_in_flight=2, handler_timeout_seconds=10) as bus:
        await bus.consume(durable, f"groupchat.groups.*.*.{owner}", handle)
        for _ in range(4):
            await bus.publish(an_event(unique("g"), owner))
        js = nats_client.jetstream()

        async def two_in_hand_two_held_back() -> bool:
            info = await js.consumer_info("GROUPCHAT_GROUPS", durable)
            return len(running) == 2 and (info.num_ack_pending, info.num_pending) == (2, 2)

        await eventually(two_in_hand_two_held_back)
        release.set()
        await eventually(lambda: len(done) == 4)
        info = await js.consumer_info("GROUPCHAT_GROUPS", durable)

    assert info.config.max_ack_pending == 2
    assert info.config.ack_wait == 10 + ACK_MARGIN_SECONDS


async def test_events_in_hand_when_a_consumer_stops_go_to_the_next_at_once_not_after_the_ack_wait(
    nats_url: str,
) -> None:
    durable, owner = unique("handed-back"), unique("owner")
    started: list[str] = []

    async def stuck(envelope: events_pb2.Envelope) -> None:
        started.append(envelope.aggregate_id)
        await asyncio.Event().wait()  # never done: the stop cancels it

    handled: list[str] = []

    async def handle(envelope: events_pb2.Envelope) -> None:
        handled.append(envelope.aggregate_id)

    subject = f"groupchat.groups.*.*.{owner}"
    groups = [unique("g") for _ in range(3)]
    # The ack wait is a minute: only a hand-back gets the events to the next consumer soon.
    async with consumer_bus(nats_url, max_in_flight=3, handler_timeout_seconds=60) as bus:
        await bus.consume(durable, subject, stuck)
        for group_id in groups:
            await bus.publish(an_event(group_id, owner))
        await eventually(lambda: len(started) == 3)
    async with consumer_bus(nats_url, max_in_flight=3, handler_timeout_seconds=60) as bus:
        await bus.consume(durable, subject, handle)
        await eventually(lambda: sorted(handled) == sorted(groups), within=10.0)


async def test_a_durable_created_with_other_bounds_takes_the_configured_ones(
    nats_url: str, nats_client: Any
) -> None:
    durable, owner = unique("rebounded"), unique("owner")

    async def handle(_: events_pb2.Envelope) -> None:
        pass

    for max_in_flight in (3, 5):
        async with consumer_bus(nats_url, max_in_flight=max_in_flight) as bus:
            await bus.consume(durable, f"groupchat.groups.*.*.{owner}", handle)

    info = await nats_client.jetstream().consumer_info("GROUPCHAT_GROUPS", durable)
    assert info.config.max_ack_pending == 5
