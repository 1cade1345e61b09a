"""Fault-injection tier: commands stopped at each store step (tests/faults/faulty.py) against
the session's MongoDB server (`mongodb_uri`: MONGODB_URI when set, else a local one) and a
real nats-server, then the stored invariants checked with `tools.doctor` and the events seen
on NATS."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
import pytest
from groupchat.events.v1 import events_pb2

from services.kit.config import EventSettings
from services.kit.events import SERVICE_STREAMS, EventBus
from tests.conftest import eventually
from tools.nats_users import NatsUsers


class Published:
    """Every event seen on a core NATS subscription, in arrival order: a core subscriber
    sees each publish, including one that JetStream dropped as a duplicate."""

    def __init__(self) -> None:
        self.envelopes: list[events_pb2.Envelope] = []
        self.by_aggregate: dict[str, list[events_pb2.Envelope]] = defaultdict(list)
        # The user each event's subject names (its last token), by event id.
        self.user_of: dict[str, str] = {}
        self._nc: Any = None
        self._sub: Any = None

    async def start(self, nats_url: str, subject: str, options: dict[str, Any]) -> None:
        async def collect(msg: Any) -> None:
            envelope = events_pb2.Envelope.FromString(msg.data)
            self.envelopes.append(envelope)
            self.user_of[envelope.event_id] = msg.subject.rsplit(".", 1)[-1]
            self.by_aggregate[envelope.aggregate_id].append(envelope)

        self._nc = await nats.connect(nats_url, **options)
        self._sub = await self._nc.subscribe(subject, cb=collect, pending_msgs_limit=1_000_000)
        await self._nc.flush()

    async def settle(self) -> None:
        """Return once every event published before the call has been collected (events are
        routed to subscribers before JetStream acknowledges them)."""
        await self._nc.flush()
        await eventually(lambda: self._sub.pending_msgs == 0, within=5, interval=0.001)
        await asyncio.sleep(0)

    async def close(self) -> None:
        await self._nc.drain()


@pytest.fixture
async def jetstream(nats_url: str) -> AsyncIterator[Any]:
    """A JetStream context, to see what the streams stored."""
    nc = await nats.connect(nats_url)
    try:
        yield nc.jetstream()
    finally:
        await nc.drain()


@asynccontextmanager
async def published_on(
    nats_url: str, nats_users: NatsUsers, subject: str
) -> AsyncIterator[Published]:
    """The events published on `subject` from now until the block ends, seen as the
    gateway sees them (its NATS user)."""
    published = Published()
    await published.start(
        nats_url, subject, nats_users.credentials("gateway").connect_options(nats_url)
    )
    try:
        yield published
    finally:
        await published.close()


@pytest.fixture
async def group_events(nats_url: str, nats_users: NatsUsers) -> AsyncIterator[Published]:
    """The groups service's events, from before the test acts."""
    async with published_on(nats_url, nats_users, "groupchat.groups.*.*.*") as published:
        yield published


@pytest.fixture
async def direct_events(nats_url: str, nats_users: NatsUsers) -> AsyncIterator[Published]:
    """The messaging service's events (direct messages), from before the test acts."""
    subject = "groupchat.messaging.direct_message_sent.*.*"
    async with published_on(nats_url, nats_users, subject) as published:
        yield published


@asynccontextmanager
async def service_bus(
    nats_url: str, nats_users: NatsUsers, service: str
) -> AsyncIterator[EventBus]:
    """The event bus `service` connects, as its NATS user, with its streams."""
    bus = await EventBus.connect(
        nats_url,
        service,
        EventSettings(),
        credentials=nats_users.credentials(service),
        stream_names=SERVICE_STREAMS[service],
    )
    try:
        yield bus
    finally:
        await bus.close()


@pytest.fixture
async def bus(nats_url: str, nats_users: NatsUsers) -> AsyncIterator[EventBus]:
    """The groups service's event bus, for the app and outbox under test (the direct
    message faults override it with messaging's)."""
    async with service_bus(nats_url, nats_users, "groups") as bus:
        yield bus
