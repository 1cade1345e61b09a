"""The event bus: domain events in one envelope over NATS, durable ones through JetStream.

Subjects are `groupchat.<area>.<type>.<aggregate id>.<user id>` (see events.proto), so a
subscriber can follow one group (`groupchat.groups.*.<group>.*`) or one user
(`groupchat.groups.member_joined.*.<user>`). The event id is the `Nats-Msg-Id`, so JetStream
drops a republished duplicate; consumers ack only after their work is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import structlog
from google.protobuf.message import DecodeError
from groupchat.events.v1 import events_pb2
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, BadRequestError, NotFoundError

from services.kit.config import ConfigError, EventSettings, NatsCredentials, without_credentials
from services.kit.locks import KeyedLocks
from services.kit.metrics import (
    CONSUMER_LAG,
    EVENTS_CONSUMED,
    EVENTS_DEAD_LETTERED,
    EVENTS_PUBLISHED,
    EVENTS_REDELIVERED,
    NATS_CONNECTED,
)
from services.kit.tracing import current_trace_context, handling, publishing

log = structlog.get_logger("events")

SUBJECT_ROOT = "groupchat"
# Where a consumer parks the events it cannot handle: `<root>.<durable>`, the event as it
# came, with why and where from in the headers (see `EventBus.consume`).
DEAD_LETTER_ROOT = f"{SUBJECT_ROOT}.dead_letters"
DEAD_LETTER_STREAM = "GROUPCHAT_DEAD_LETTERS"
# The current state of aggregates, one message kept per aggregate (services/kit/snapshots.py).
SNAPSHOT_ROOT = "snapshots"
SNAPSHOT_STREAM = "SNAPSHOTS"
# JetStream streams: stream name -> subjects it keeps. The suite's own events, and the
# platform's (follow graph, posts) that the suite consumes.
STREAMS: dict[str, list[str]] = {
    "GROUPCHAT_GROUPS": [f"{SUBJECT_ROOT}.groups.>"],
    "GROUPCHAT_MESSAGING": [f"{SUBJECT_ROOT}.messaging.>"],
    "GROUPCHAT_PLAZA": [f"{SUBJECT_ROOT}.plaza.>"],
    "PLATFORM_SOCIAL": ["social.>"],
    "PLATFORM_POSTS": ["posts.>"],
    DEAD_LETTER_STREAM: [f"{DEAD_LETTER_ROOT}.>"],
    SNAPSHOT_STREAM: [f"{SNAPSHOT_ROOT}.>"],
}
# The streams each service ensures at start, and the only ones its NATS user may create or
# update (tools/nats_users.py): those it publishes to and those it consumes, so whichever
# of a stream's users starts first creates it.
SERVICE_STREAMS: dict[str, tuple[str, ...]] = {
    "groups": ("GROUPCHAT_GROUPS", "PLATFORM_POSTS", DEAD_LETTER_STREAM, SNAPSHOT_STREAM),
    "messaging": ("GROUPCHAT_MESSAGING", "PLATFORM_SOCIAL", "PLATFORM_POSTS", DEAD_LETTER_STREAM),
    "plaza": (
        "GROUPCHAT_PLAZA",
        "GROUPCHAT_GROUPS",
        "GROUPCHAT_MESSAGING",
        "PLATFORM_POSTS",
        DEAD_LETTER_STREAM,
        SNAPSHOT_STREAM,
    ),
}
# Streams whose subjects each name one aggregate and keep only its latest message.
LATEST_PER_SUBJECT = {SNAPSHOT_STREAM}
DUPLICATE_WINDOW_SECONDS = 120.0
# JetStream's error code when the retention of a stream does not fit the server's storage.
INSUFFICIENT_STORAGE = 10047
DRAIN_SECONDS = 2
# How often a process samples the lag (num_pending) of the durables it consumes.
LAG_SAMPLE_SECONDS = 15.0


@dataclass(frozen=True)
class OutgoingEvent:
    subject: str
    envelope: events_pb2.Envelope
    # The W3C trace context of the command that made the event (empty outside a trace), so
    # that publishing it later, from the outbox, joins that command's trace.
    trace_context: Mapping[str, str] = field(default_factory=dict, compare=False)


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
    return OutgoingEvent(subject, envelope, current_trace_context())


EventHandler = Callable[[events_pb2.Envelope], Awaitable[None]]
# A failed attempt is tried again after 1 s, then 2, 4, ... (at most a minute): a store
# that is briefly away costs retries, not the attempts that park an event.
RETRY_DELAY_SECONDS = 1.0
MAX_RETRY_DELAY_SECONDS = 60.0


def retry_delay(attempts: int) -> float:
    """How long to wait before the next attempt, after `attempts` failed ones."""
    return float(min(RETRY_DELAY_SECONDS * 2 ** (attempts - 1), MAX_RETRY_DELAY_SECONDS))


class NobodyAnswers(TimeoutError):
    """No one is subscribed to answer a request."""


class Unparseable(Exception):
    """Bytes on an event subject that are not one of our events."""


def parse_envelope(data: bytes) -> events_pb2.Envelope:
    """The envelope in `data`; Unparseable when it is none (or one without an id or type)."""
    try:
        envelope = events_pb2.Envelope.FromString(data)
    except DecodeError as exc:
        raise Unparseable(f"not an event envelope: {exc}") from None
    if not envelope.event_id or not envelope.type:
        raise Unparseable("an envelope without an event id or type")
    return envelope


class EventBus:
    def __init__(self, nc: NatsClient, settings: EventSettings | None = None) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._settings = settings or EventSettings()
        self._durables: list[JetStreamContext.PushSubscription] = []
        # Events being handled by this process's durable consumers: close() waits for them.
        self._in_hand: set[asyncio.Task[None]] = set()
        self._loss_listeners: list[Callable[[], None]] = []
        self._before_drain: list[Callable[[], Awaitable[None]]] = []
        self._lag_sampler: asyncio.Task[None] | None = None

    @property
    def jetstream(self) -> JetStreamContext:
        """JetStream beyond events (the revocation bucket: services.kit.revocation)."""
        return self._js

    def on_messages_lost(self, listener: Callable[[], None]) -> None:
        """Call `listener` whenever plain subscriptions may have missed messages: after a
        reconnect (what was published meanwhile is gone) or a client-side overflow."""
        self._loss_listeners.append(listener)

    def before_drain(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run `step` on close once the events in hand are finished, before the connection
        drains: what their handlers left to publish still goes out."""
        self._before_drain.append(step)

    def messages_may_be_lost(self) -> None:
        for listener in self._loss_listeners:
            listener()

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str,
        streams: EventSettings | None = None,
        *,
        credentials: NatsCredentials | None = None,
        stream_names: Collection[str] = tuple(STREAMS),
    ) -> EventBus:
        """Connect as `name`, authenticated with `credentials` (else what `url` carries).
        The services that write to the streams pass `streams` and create (or update) those
        of `stream_names` so; a client that only reads or publishes (the gateway, tools)
        passes nothing and leaves their configuration alone, so that a process started
        with another replica count or retention never flips a stream's."""
        shown = without_credentials(url)

        async def on_disconnect() -> None:
            if not (nc.is_draining or nc.is_closed):  # not our own close
                NATS_CONNECTED.set(0)
                log.warning("nats_disconnected", url=shown)

        async def on_reconnect() -> None:
            NATS_CONNECTED.set(1)
            log.info("nats_reconnected", url=shown)
            bus.messages_may_be_lost()

        async def on_error(exc: Exception) -> None:
            log.warning("nats_error", error=str(exc))
            if isinstance(exc, nats.errors.SlowConsumerError):
                bus.messages_may_be_lost()  # the client dropped messages of a subscription

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
            **(credentials or NatsCredentials()).connect_options(url),
        )
        NATS_CONNECTED.set(1)
        bus = cls(nc, streams)
        if streams is not None:
            try:
                await bus.ensure_streams(streams, stream_names)
            except BaseException:
                await nc.close()
                raise
        log.info("nats_connected", url=shown)
        return bus

    async def ensure_streams(
        self, settings: EventSettings, names: Collection[str] = tuple(STREAMS)
    ) -> None:
        """Create (or update) the suite's streams `names`: file storage, deduplicated by
        event id, and bounded: past the retention age or size the oldest events go."""
        for name in names:
            subjects = STREAMS[name]
            config = StreamConfig(
                name=name,
                subjects=subjects,
                storage=StorageType.FILE,
                num_replicas=settings.stream_replicas,
                max_age=settings.retention_seconds,
                max_bytes=settings.retention_bytes,
                discard=DiscardPolicy.OLD,
                # JetStream refuses a duplicate window longer than the retention.
                duplicate_window=min(DUPLICATE_WINDOW_SECONDS, settings.retention_seconds),
                max_msgs_per_subject=1 if name in LATEST_PER_SUBJECT else -1,
            )
            try:
                await self._create_or_update(config)
            except APIError as exc:
                if exc.err_code != INSUFFICIENT_STORAGE:
                    raise
                raise ConfigError(
                    f"NATS cannot reserve EVENT_RETENTION_BYTES={settings.retention_bytes} for "
                    f"each of the {len(names)} streams: lower it, or raise the server's "
                    "JetStream max_file_store"
                ) from None

    async def _create_or_update(self, config: StreamConfig) -> None:
        try:
            await self._js.add_stream(config)
        except BadRequestError:
            await self._js.update_stream(config)

    async def publish(self, event: OutgoingEvent) -> None:
        """Publish durably: returns once JetStream has stored the event."""
        event_id = event.envelope.event_id
        with publishing(event.subject, event_id, event.trace_context) as trace_headers:
            await self._js.publish(
                event.subject,
                event.envelope.SerializeToString(),
                headers={"Nats-Msg-Id": event_id, **trace_headers},
                timeout=5.0,
            )
        EVENTS_PUBLISHED.labels(event.envelope.type).inc()

    async def publish_plain(self, subject: str, data: bytes) -> None:
        """Publish on core NATS, outside every stream: at most once, to whoever subscribes
        now; lost while NATS is away (the `on_messages_lost` listeners of the subscribers
        hear of it)."""
        await self._nc.publish(subject, data)

    async def subscribe(
        self, subject: str, handler: Callable[[Msg], Awaitable[None]]
    ) -> Subscription:
        """A plain (non-durable) subscription, for real-time push."""

        async def on_message(msg: Msg) -> None:
            with handling(msg.subject, msg.headers, None):
                await handler(msg)

        return await self._nc.subscribe(subject, cb=on_message, pending_msgs_limit=65_536)

    async def consume(
        self,
        durable: str,
        subject: str,
        handler: EventHandler,
        *,
        in_order: Callable[[events_pb2.Envelope], bool] = lambda envelope: True,
    ) -> Subscription:
        """A durable consumer: each event is acked after `handler` returns, retried if it
        raises. Handlers must be idempotent on the event id (see `ProcessedEvents`). Every
        replica of a service binds the same durable as one deliver group, so each event goes
        to one of them.

        Bounds, all from EventSettings:
        - concurrency: JetStream hands out at most `max_in_flight` unacked events of the
          durable (max_ack_pending, across all replicas), each handled in a task of its own;
          events of one aggregate run one after another, in delivery order, so a burst on
          one group queues instead of colliding on its card (all but those for which
          `in_order` says False: a handler to which their order does not matter, a counter,
          takes a burst of them at once);
        - time: a handler gets `handler_timeout_seconds` (queueing behind its aggregate
          included) and the ack wait is longer, so an event is never redelivered while it is
          in hand. A deadline rather than in-progress pings: a stuck handler then counts as
          a failed attempt instead of holding its event for ever;
        - failures: after `max_deliveries` failed attempts, or at once for bytes that are no
          event, the event is parked on the dead-letter stream and acked (`_park`)."""
        serial = KeyedLocks()

        async def on_message(msg: Msg) -> None:
            task = asyncio.create_task(self._settle(durable, msg, handler, serial, in_order))
            self._in_hand.add(task)
            task.add_done_callback(self._in_hand.discard)

        config = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self._settings.ack_wait_seconds,
            max_ack_pending=self._settings.max_in_flight,
            # The consumer, not the server, gives up on an event: it parks it first.
            max_deliver=-1,
        )
        await self._bound_existing_durable(subject, durable, config)
        subscription = await self._js.subscribe(
            subject, queue=durable, durable=durable, cb=on_message, manual_ack=True, config=config
        )
        self._durables.append(subscription)
        # Zero from the start, so that the first event parked after a restart is an
        # increase an alert sees, not the birth of a series.
        for reason in ("failed", "unparseable"):
            EVENTS_DEAD_LETTERED.labels(durable, reason)
        if self._lag_sampler is None:
            self._lag_sampler = asyncio.create_task(self._sample_lag(LAG_SAMPLE_SECONDS))
        return subscription

    async def _sample_lag(self, interval: float) -> None:
        """Until close: every `interval`, set groupchat_events_consumer_lag of each durable
        this bus consumes to what JetStream has not handed it yet."""
        while True:
            for subscription in list(self._durables):
                try:
                    info = await subscription.consumer_info()
                except Exception as exc:  # NATS away: the next sample tells
                    log.debug("consumer_lag_unknown", error=repr(exc))
                    continue
                CONSUMER_LAG.labels(info.name).set(info.num_pending or 0)
            await asyncio.sleep(interval)

    async def _bound_existing_durable(
        self, subject: str, durable: str, bounded: ConsumerConfig
    ) -> None:
        """Binding to a durable that exists keeps its configuration as it was created (by
        an earlier release, or with other settings): bring its bounds in line first."""
        stream = await self._js.find_stream_name_by_subject(subject)
        try:
            current = (await self._js.consumer_info(stream, durable)).config
        except NotFoundError:
            return  # subscribing creates it, bounded
        wanted = dataclasses.replace(
            current,
            ack_wait=bounded.ack_wait,
            max_ack_pending=bounded.max_ack_pending,
            max_deliver=bounded.max_deliver,
        )
        if wanted != current:
            await self._js.add_consumer(stream, config=wanted)

    async def _settle(
        self,
        durable: str,
        msg: Msg,
        handler: EventHandler,
        serial: KeyedLocks,
        in_order: Callable[[events_pb2.Envelope], bool],
    ) -> None:
        with handling(msg.subject, msg.headers, durable):
            try:
                try:
                    envelope = parse_envelope(msg.data)
                except Unparseable as exc:
                    await self._park(durable, msg, str(exc), "unparseable")
                    return
                if msg.metadata.num_delivered > 1:
                    EVENTS_REDELIVERED.labels(durable).inc()
                try:
                    async with asyncio.timeout(self._settings.handler_timeout_seconds):
                        if in_order(envelope):
                            async with serial.hold(envelope.aggregate_id):
                                await handler(envelope)
                        else:
                            await handler(envelope)
                except asyncio.CancelledError:
                    # Stopped before it was done (a shutdown): handed out again at once,
                    # not after the ack wait, during which the durable would count it in
                    # flight and hand out that many fewer to the other replicas.
                    with contextlib.suppress(Exception):  # NATS away: the ack wait it is
                        await msg.nak()
                    raise
                except Exception as exc:
                    log.exception(
                        "event_handler_failed", durable=durable, event_id=envelope.event_id
                    )
                    EVENTS_CONSUMED.labels(durable, "failed").inc()
                    if msg.metadata.num_delivered >= self._settings.max_deliveries:
                        await self._park(durable, msg, repr(exc), "failed")
                    else:
                        await msg.nak(delay=retry_delay(msg.metadata.num_delivered))
                    return
                await msg.ack()
                EVENTS_CONSUMED.labels(durable, "ok").inc()
            except Exception:  # NATS refused the ack or the park: JetStream redelivers later
                log.exception("event_settle_failed", durable=durable, subject=msg.subject)

    async def _park(self, durable: str, msg: Msg, error: str, reason: str) -> None:
        """Put the event, as it came, on `<dead-letter root>.<durable>` with why and where
        from in its headers, then ack it: its consumer moves on. Parking twice (a crash
        before the ack) stores it once: the message id is the original's place."""
        metadata = msg.metadata
        headers = {
            "Nats-Msg-Id": f"{durable}:{metadata.stream}:{metadata.sequence.stream}",
            "Groupchat-Error": " ".join(error.split())[:1000],  # one header line
            "Groupchat-Subject": msg.subject,
            "Groupchat-Stream": metadata.stream,
            "Groupchat-Durable": durable,
            "Groupchat-Deliveries": str(metadata.num_delivered),
        }
        await self._js.publish(
            f"{DEAD_LETTER_ROOT}.{durable}", msg.data, headers=headers, timeout=5.0
        )
        await msg.ack()
        EVENTS_DEAD_LETTERED.labels(durable, reason).inc()
        log.error(
            "event_dead_lettered",
            durable=durable,
            subject=msg.subject,
            deliveries=metadata.num_delivered,
            error=headers["Groupchat-Error"],
        )

    async def replay(
        self, stream: str, handler: EventHandler, batch: int = 256, subject: str | None = None
    ) -> int:
        """Hand every event stored in `stream` (those on `subject` only, when given), oldest
        first, up to its last sequence at the time of the call, to `handler` (an ephemeral
        consumer: no durable position moves). Returns how many events were replayed; for
        rebuilding a projection."""
        info = await self._js.stream_info(stream)
        last = info.state.last_seq
        if info.state.messages == 0:
            return 0
        sub = await self._js.pull_subscribe(
            subject or STREAMS[stream][0],
            stream=stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.ALL,
                inactive_threshold=60.0,
            ),
        )
        replayed = 0
        try:
            if subject is not None and (await sub.consumer_info()).num_pending == 0:
                return 0  # nothing on that subject: a fetch would only wait
            while True:
                msgs = await sub.fetch(batch, timeout=5.0)
                for msg in msgs:
                    try:
                        envelope = parse_envelope(msg.data)
                    except Unparseable as exc:  # its consumers parked it already
                        log.warning("replay_skipped", subject=msg.subject, error=str(exc))
                    else:
                        await handler(envelope)
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
            raise NobodyAnswers(f"nobody answers on {subject}") from None
        return bytes(reply.data)

    async def flush(self) -> None:
        """Return once the server has processed everything sent so far (subscriptions too);
        at once while NATS is away: the client subscribes again when it reconnects, and the
        `on_messages_lost` listeners hear of it then."""
        if self._nc.is_connected:
            await self._nc.flush(timeout=5)

    async def close(self) -> None:
        """Stop taking events, give those in hand DRAIN_SECONDS to finish (the rest is
        handed back, to be redelivered at once, to another replica), run the
        `before_drain` steps, then drain and close the connection."""
        if self._nc.is_closed:
            return
        if self._lag_sampler is not None:
            self._lag_sampler.cancel()
        for subscription in self._durables:
            await subscription.unsubscribe()
        if self._in_hand:
            _, unfinished = await asyncio.wait(self._in_hand, timeout=DRAIN_SECONDS)
            for task in unfinished:
                task.cancel()
            if unfinished:  # their naks go out before the connection drains
                await asyncio.wait(unfinished, timeout=DRAIN_SECONDS)
        for step in self._before_drain:
            try:
                await step()
            except Exception:
                log.exception("before_drain_failed")
        if self._nc.is_connected:
            await self._nc.drain()
        else:  # NATS is away: what was not acked is redelivered, the outbox republishes
            await self._nc.close()
