"""State snapshots: how a read model is rebuilt from nothing after its events expired.

The event streams keep only so much (EventSettings' retention), so a projection cannot be
replayed from the first event for ever. Instead, whoever owns an aggregate republishes its
current state on request: asked on `admin.snapshots.<area>` (core NATS), the owner
publishes one snapshot event per aggregate, carrying the aggregate's current version, on
`snapshots.<area>.<aggregate id>` in the SNAPSHOTS stream, and answers once all are stored.
That stream keeps only the latest message of each subject, so it stays one message per
aggregate however often snapshots are asked for.

A snapshot reads committed state only, and projections apply it like any event: where it
is newer than what they hold. So it mixes with the events still in the streams in any
order (an event newer than the snapshot wins, an older one changes nothing), and the
outbox needs no part in it: a change whose events still wait in their document is already
in the state the snapshot reads.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import structlog
from groupchat.events.v1 import events_pb2

from services.kit.events import SNAPSHOT_ROOT, EventBus, NobodyAnswers, OutgoingEvent

log = structlog.get_logger("snapshots")

# The current state of every aggregate of an area, as one envelope each.
Snapshots = Callable[[], AsyncIterator[events_pb2.Envelope]]


def request_subject(area: str) -> str:
    # Core NATS, outside every stream: a stream would capture the request.
    return f"admin.{SNAPSHOT_ROOT}.{area}"


def snapshot_subject(area: str, aggregate_id: str) -> str:
    return f"{SNAPSHOT_ROOT}.{area}.{aggregate_id}"


async def serve_snapshots(bus: EventBus, area: str, snapshots: Snapshots) -> None:
    """Answer snapshot requests for `area` (one replica answers each): publish every
    aggregate's current state, then reply with how many were published."""

    async def publish_all(_: bytes) -> bytes:
        published = 0
        try:
            async for envelope in snapshots():
                subject = snapshot_subject(area, envelope.aggregate_id)
                await bus.publish(OutgoingEvent(subject, envelope))
                published += 1
        except Exception as exc:  # the requester must hear of it, not time out
            log.exception("snapshots_failed", area=area, published=published)
            return json.dumps({"error": repr(exc)}).encode()
        log.info("snapshots_published", area=area, count=published)
        return json.dumps({"published": published}).encode()

    await bus.respond(request_subject(area), f"{area}-snapshots", publish_all)


async def request_snapshots(bus: EventBus, area: str, wait_seconds: float) -> int | None:
    """Have the owner of `area` republish its aggregates' state; returns how many it
    published once they are all stored, or None when nobody serves that area's snapshots.
    TimeoutError when the owner does not finish in time, RuntimeError when it fails."""
    try:
        reply = json.loads(await bus.request(request_subject(area), b"", wait_seconds))
    except NobodyAnswers:
        return None
    if "error" in reply:
        raise RuntimeError(f"{area} snapshots failed: {reply['error']}")
    return int(reply["published"])
