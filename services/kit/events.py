"""The event bus: domain events in one envelope over NATS, durable ones through JetStream.

Subjects are `groupchat.<area>.<type>.<aggregate id>.<user id>` (see events.proto), so a
subscriber can follow one group (`groupchat.groups.*.<group>.*`) or one user
(`groupchat.groups.member_joined.*.<user>`). The event id is the `Nats-Msg-Id`, so JetStream
drops a republished duplicate; consumers ack only after their work is committed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import structlog
from groupchat.events.v1 import events_pb2
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from services.kit.metrics import (
    EVENTS_CONSUMED,
    EVENTS_PUBLISHED,
    EVENTS_REDELIVERED,
    NATS_CONNECTED,
)

log = structlog.get_logger("events")

SUBJECT_ROOT = "groupchat"
# JetStream streams: stream name -> subjects it keeps. The suite's own events, and the
# platform's (follow graph, posts) that the suite consumes; each service ensures them all at
# start, so whichever starts first creates them.
STREAMS: dict[str, list[str]] = {
    "GROUPCHAT_GROUPS": [f"{SUBJECT_ROOT}.groups.>"],
    "GROUPCHAT_MESSAGING": [f"{SUBJECT_ROOT}.messaging.>"],
    "GROUPCHAT_PLAZA": [f"{SUBJECT_ROOT}.plaza.>"],
    "PLATFORM_SOCIAL": ["social.>"],
    "PLATFORM_POSTS": ["posts.>"],
}
DUPLICATE_WINDOW_SECONDS = 120.0
DRAIN_SECONDS = 2


@dataclass(frozen=True)
class OutgoingEvent:
    subject: str
    envelope: events_pb2.Envelope


def new_event(
    area: str,
    event_type: str,
    *,
    aggregate_id: str,
    aggregate_version: int,
    user_id: str,
    **payload: Any,
) -> OutgoingEvent:
    """An envelope with a fresh id, and the subject it travels on."""
    envelope = events_pb2.Envelope(
        event_id=uuid.uuid4().hex,
        type=f"{area}.{event_type}",
        aggregate_id=aggregate_id,
        aggregate_version=aggregate_version,
        **payload,
    )
    envelope.occurred_at.FromNanoseconds(time.time_ns())
    subject = f"{SUBJECT_ROOT}.{area}.{event_type}.{aggregate_id}.{user_id}"
    return OutgoingEvent(subject=subject, envelope=envelope)


EventHandler = Callable[[events_pb2.Envelope], Awaitable[None]]


class EventBus:
    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._js = nc.jetstream()

    @classmethod
    async def connect(cls, url: str, name: str, stream_replicas: int | None = None) -> EventBus:
        """Connect as `name`. The services that write to the streams pass `stream_replicas`
        and create (or update) them; a client that only reads or publishes (the gateway,
        tools) passes nothing and leaves their configuration alone, so that a process
        started with another replica count never flips a stream's."""

        async def on_disconnect() -> None:
            if not (nc.is_draining or nc.is_closed):  # not our own close
                NATS_CONNECTED.set(0)
                log.warning("nats_disconnected", url=url)

        async def on_reconnect() -> None:
            NATS_CONNECTED.set(1)
            log.info("nats_reconnected", url=url)

        async def on_error(exc: Exception) -> None:
            log.warning("nats_error", error=str(exc))

        nc = await nats.connect(
            url,
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            # Closing lets the handlers in flight finish, not the backlog buffered behind
            # them: what a durable consumer did not ack is redelivered (to another replica),
            # so a plaza with thousands of events queued stops in seconds.
            drain_timeout=DRAIN_SECONDS,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            error_cb=on_error,
        )
        NATS_CONNECTED.set(1)
        bus = cls(nc)
        if stream_replicas is not None:
            await bus.ensure_streams(stream_replicas)
        log.info("nats_connected", url=url)
        return bus

    async def ensure_streams(self, replicas: int) -> None:
        """Create (or update) the suite's streams: file storage, deduplicated by event id."""
        for name, subjects in STREAMS.items():
            config = StreamConfig(
                name=name,
                subjects=subjects,
                storage=StorageType.FILE,
                num_replicas=replicas,
                duplicate_window=DUPLICATE_WINDOW_SECONDS,
            )
            try:
                await self._js.add_stream(config)
            except BadRequestError:
                await self._js.update_stream(config)

    async def publish(self, event: OutgoingEvent) -> None:
        """Publish durably: returns once JetStream has stored the event."""
        await self._js.publish(
            event.subject,
            event.envelope.SerializeToString(),
            headers={"Nats-Msg-Id": event.envelope.event_id},
            timeout=5.0,
        )
        EVENTS_PUBLISHED.labels(event.envelope.type).inc()

    async def subscribe(
        self, subject: str, handler: Callable[[Msg], Awaitable[None]]
    ) -> Subscription:
        """A plain (non-durable) subscription, for real-time push."""
        return await self._nc.subscribe(subject, cb=handler, pending_msgs_limit=65_536)

    async def consume(self, durable: str, subject: str, handler: EventHandler) -> Subscription:
        """A durable consumer: each event is acked after `handler` returns, redelivered if
        it raises. Handlers must be idempotent on the event id (see `ProcessedEvents`).
        Every replica of a service binds the same durable as one deliver group, so each
        event goes to one of them."""

        async def on_message(msg: Msg) -> None:
            envelope = events_pb2.Envelope.FromString(msg.data)
            if msg.metadata.num_delivered > 1:
                EVENTS_REDELIVERED.labels(durable).inc()
            try:
                await handler(envelope)
            except Exception:
                log.exception("event_handler_failed", durable=durable, event_id=envelope.event_id)
                EVENTS_CONSUMED.labels(durable, "failed").inc()
                await msg.nak(delay=1.0)
                return
            await msg.ack()
            EVENTS_CONSUMED.labels(durable, "ok").inc()

        return await self._js.subscribe(
            subject,
            queue=durable,
            durable=durable,
            cb=on_message,
            manual_ack=True,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=30.0,
                max_deliver=-1,
            ),
        )

    async def replay(self, stream: str, handler: EventHandler, batch: int = 256) -> int:
        """Hand every event stored in `stream`, oldest first, up to its last sequence at the
        time of the call, to `handler` (an ephemeral consumer: no durable position moves).
        Returns how many events were replayed; for rebuilding a projection."""
        info = await self._js.stream_info(stream)
        last = info.state.last_seq
        if info.state.messages == 0:
            return 0
        sub = await self._js.pull_subscribe(
            STREAMS[stream][0],
            stream=stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.ALL,
                inactive_threshold=60.0,
            ),
        )
        replayed = 0
        try:
            while True:
                msgs = await sub.fetch(batch, timeout=5.0)
                for msg in msgs:
                    await handler(events_pb2.Envelope.FromString(msg.data))
                    replayed += 1
                    if msg.metadata.sequence.stream >= last or msg.metadata.num_pending == 0:
                        return replayed
        finally:
            consumer = (await sub.consumer_info()).name
            await sub.unsubscribe()
            await self._js.delete_consumer(stream, consumer)

    async def respond(
        self, subject: str, queue: str, handler: Callable[[bytes], Awaitable[bytes]]
    ) -> Subscription:
        """Answer requests on `subject` (core NATS request/reply, outside every stream); of
        the replicas subscribed in `queue`, one answers each request."""

        async def on_request(msg: Msg) -> None:
            await msg.respond(await handler(msg.data))

        return await self._nc.subscribe(subject, queue=queue, cb=on_request)

    async def request(self, subject: str, data: bytes, wait_seconds: float) -> bytes:
        """Ask whoever answers on `subject`; raises TimeoutError when nobody does in time."""
        try:
            reply = await self._nc.request(subject, data, timeout=wait_seconds)
        except nats.errors.NoRespondersError:
            raise TimeoutError(f"nobody answers on {subject}") from None
        return bytes(reply.data)

    async def flush(self) -> None:
        """Return once the server has processed everything sent so far (subscriptions too)."""
        await self._nc.flush(timeout=5)

    async def close(self) -> None:
        """Drain (handlers in flight finish, what was published goes out), or, while NATS
        is away, just close: what was not acked is redelivered, the outbox republishes."""
        if self._nc.is_closed:
            return
        if self._nc.is_connected:
            await self._nc.drain()
        else:
            await self._nc.close()
