"""Events that outlive a NATS outage: stored next to the write, published, then removed.

A service records its events in its own database right after the write they describe and
publishes them at once; whatever could not be published (NATS down, process stopped) stays
in the outbox, and the relay publishes it later. JetStream deduplicates on the event id, so
a relay that republishes an event already stored does no harm.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from groupchat.events.v1 import events_pb2

from services.kit.events import EventBus, OutgoingEvent
from services.kit.metrics import EVENTS_DEFERRED

log = structlog.get_logger("outbox")


class Outbox:
    def __init__(self, collection: Any, bus: EventBus, *, retry_after_seconds: float = 2.0) -> None:
        self._collection = collection
        self._bus = bus
        self._retry_after = retry_after_seconds

    async def create_indexes(self) -> None:
        await self._collection.create_index("created_at_ms")

    async def publish(self, events: list[OutgoingEvent]) -> None:
        """Store the events, then try to publish them now; the relay retries failures."""
        if not events:
            return
        now = int(time.time() * 1000)
        await self._collection.insert_many(
            [
                {
                    "_id": e.envelope.event_id,
                    "subject": e.subject,
                    "data": e.envelope.SerializeToString(),
                    "created_at_ms": now,
                }
                for e in events
            ],
            ordered=True,
        )
        await self._publish_stored(events)

    async def _publish_stored(self, events: list[OutgoingEvent]) -> int:
        published: list[str] = []
        try:
            for event in events:
                await self._bus.publish(event)
                published.append(event.envelope.event_id)
        except Exception as exc:  # NATS down or slow: the relay takes over
            EVENTS_DEFERRED.inc(len(events) - len(published))
            log.warning(
                "outbox_publish_deferred", error=repr(exc), pending=len(events) - len(published)
            )
        if published:
            await self._collection.delete_many({"_id": {"$in": published}})
        return len(published)

    async def relay_once(self, limit: int = 500) -> int:
        """Publish stored events older than the retry delay; returns how many went out."""
        cutoff = int(time.time() * 1000) - int(self._retry_after * 1000)
        docs = (
            await self._collection.find({"created_at_ms": {"$lte": cutoff}})
            .sort("created_at_ms", 1)
            .limit(limit)
            .to_list(None)
        )
        events = []
        for doc in docs:
            envelope = events_pb2.Envelope()
            envelope.ParseFromString(doc["data"])
            events.append(OutgoingEvent(subject=doc["subject"], envelope=envelope))
        sent = await self._publish_stored(events)
        if sent:
            log.info("outbox_relayed", events=sent)
        return sent

    async def run_relay(self, interval_seconds: float = 1.0) -> None:
        """Relay forever (until cancelled), one pass per interval."""
        while True:
            try:
                await self.relay_once()
            except Exception:
                log.exception("outbox_relay_failed")
            await asyncio.sleep(interval_seconds)
