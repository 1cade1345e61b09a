"""What every service that stores opens first, the same way: its MongoDB database, the event
bus (creating the streams with the configured replicas), and the outbox relay, which
publishes the events that commands commit into the collections the service has it watch.
Readiness follows MongoDB alone: without it no command or query can be served, while a NATS
outage only delays events, which wait in their documents until the relay gets them out.
Each is closed on the service's exit stack, in reverse: the relay stops, the bus drains
(events in hand finish), then the database closes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.kit.config import ConfigError, EventSettings, ServerConfig
from services.kit.events import SERVICE_STREAMS, EventBus
from services.kit.mongo import ProcessedEvents, log_server, open_database, reachable
from services.kit.outbox import Outbox
from services.kit.server import ServiceContext
from services.kit.tasks import run_in_background


@dataclass(frozen=True)
class Infrastructure:
    db: Any
    bus: EventBus
    outbox: Outbox

    async def processed_events(self) -> ProcessedEvents:
        """The record of handled event ids that makes this service's consumers idempotent."""
        processed = ProcessedEvents(self.db["processed_events"])
        await processed.create_indexes()
        return processed


async def open_infrastructure(
    context: ServiceContext, config: ServerConfig, name: str, events: EventSettings
) -> Infrastructure:
    stack = context.stack
    if config.mongodb_uri is None:  # only a config read with stores=False leaves it unset
        raise ConfigError("MONGODB_URI must be set: this service keeps its data in MongoDB")
    client, db = open_database(config.mongodb_uri, config.database)
    stack.callback(client.close)
    await log_server(db)
    bus = await EventBus.connect(
        config.nats_url,
        name,
        events,
        credentials=config.nats_credentials,
        stream_names=SERVICE_STREAMS[name],
    )
    stack.push_async_callback(bus.close)
    await context.follow_revocations(bus.jetstream, events.stream_replicas)
    context.ready_when("mongodb", lambda: reachable(db))
    outbox = Outbox(bus)
    run_in_background(stack, outbox.run(), "outbox-relay")
    return Infrastructure(db, bus, outbox)
