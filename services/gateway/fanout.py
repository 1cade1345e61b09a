"""Local fan-out of events to the Subscribe streams of one gateway.

The gateway subscribes once per group that any of its connected users belongs to, and per
connected user for that user's joins and direct messages; each event is serialized once and
handed to the bounded buffers of the streams it concerns. A group's messages are put in seq
order once per gateway (a `Sequence` per group): a message past a gap is held a moment for
the late publish, then the gap is fetched from the groups service; after NATS reconnects
every followed group is checked the same way. A gap that cannot be filled ends the streams
that follow the group (STREAM_GAP), so no stream ever misses a message silently.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog
from groupchat.events.v1 import events_pb2
from groupchat.gateway.v1 import gateway_pb2

from services.gateway.config import StreamLimits
from services.gateway.history import Fetched, direct_key, group_key
from services.gateway.sequencing import Sequence
from services.kit.auth import Identity
from services.kit.errors import DomainError, ErrorKind
from services.kit.metrics import FANOUT_DELIVERIES, FANOUT_DROPPED, STREAM_GAPS

log = structlog.get_logger("fanout")

# Events that concern one member (the last subject token), not the whole group.
MEMBER_EVENTS = frozenset({"member_left", "member_removed", "member_role_changed", "member_muted"})
# After these the member no longer follows the group.
DEPARTURES = frozenset({"member_left", "member_removed"})
REPAIR_CONCURRENCY = 8

# What a stream's buffer holds: (conversation key or None, seq, serialized response), or
# Session.RECHECK: NATS was away, so compare the direct conversations with the messaging
# service and tell the client to refresh what changes it may have missed.
Item = tuple[str | None, int, bytes]
Fetch = Callable[[Identity, str, int], Awaitable[Fetched]]
Subscribe = Callable[[str, Callable[[Any], Awaitable[None]]], Coroutine[Any, Any, Any]]


class TooManyStreams(DomainError):
    kind = ErrorKind.RESOURCE_EXHAUSTED
    reason = "TOO_MANY_STREAMS"


class Session:
    """One open Subscribe stream: a buffer bounded in events and bytes, then a terminal
    marker. Finishing drops what is buffered at once.

    The buffer is a deque with at most one waiter (the stream's writer), not an
    asyncio.Queue: an offer is an append, and wakes the writer only when it is waiting. The
    writer takes one item (`next`), then whatever else waits (`waiting_items`), to send
    them in one response."""

    OVERFLOW: Any = object()
    ENDED: Any = object()
    GAP: Any = object()
    RECHECK: Any = object()

    def __init__(self, identity: Identity, limits: StreamLimits) -> None:
        self.identity = identity
        # The last seq of each conversation that the client holds (or is about to).
        self.positions: dict[str, int] = {}
        # Whether every direct conversation of the user had a position at Ready.
        self.knows_every_direct = False
        self._limits = limits
        self._items: deque[Any] = deque()  # Items and markers, bounded by offer()
        self._waiter: asyncio.Future[None] | None = None
        self._bytes = 0
        self._finished = False

    @property
    def user_id(self) -> str:
        return self.identity.user_id

    def offer(self, key: str | None, seq: int, response: bytes) -> None:
        self.put((key, seq, response))

    def put(self, item: Item) -> None:
        """Offer an Item (the hub makes one per event and hands it to every stream)."""
        if self._finished:
            return
        size = len(item[2])
        if (
            len(self._items) >= self._limits.buffer_events
            or self._bytes + size > self._limits.buffer_bytes
        ):
            FANOUT_DROPPED.inc()
            self._finish(Session.OVERFLOW)
            return
        self._bytes += size
        self._items.append(item)
        if self._waiter is not None:
            self._wake()

    def offer_recheck(self) -> None:
        if not self._finished:
            self._items.append(Session.RECHECK)
            self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def end(self) -> None:
        """Finish the stream after what is buffered (the gateway is shutting down)."""
        self._finish(Session.ENDED)

    def lose(self) -> None:
        """Finish the stream now: a gap in a conversation it follows could not be filled."""
        self._finish(Session.GAP)

    def _finish(self, marker: Any) -> None:
        if self._finished:
            return
        self._finished = True
        if marker is not Session.ENDED:
            self._items.clear()  # free the memory whether or not anyone reads
            self._bytes = 0
        self._items.append(marker)
        self._wake()

    async def next(self) -> Any:
        """The next Item or Session.RECHECK, or Session.OVERFLOW / ENDED / GAP once
        finished."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if isinstance(item, tuple):
            self._bytes -= len(item[2])
        return item

    def waiting_items(self, max_events: int, max_bytes: int) -> list[Item]:
        """The Items that wait now, in order, up to the next marker and within the limits
        (at least one if any waits): what the writer sends along with the one it took."""
        items = self._items
        taken: list[Item] = []
        size = 0
        while items and len(taken) < max_events:
            item = items[0]
            if type(item) is not tuple:
                break  # a marker: handled on its own, after what came before it
            item_size = len(item[2])
            if taken and size + item_size > max_bytes:
                break
            size += item_size
            taken.append(items.popleft())
        self._bytes -= size
        return taken

    @property
    def buffered(self) -> int:
        return len(self._items)


class FanoutHub:
    def __init__(
        self,
        subscribe: Subscribe,
        flush: Callable[[], Awaitable[None]],
        fetch: Fetch,
        limits: StreamLimits,
    ) -> None:
        self._subscribe = subscribe
        self._flush = flush
        self._fetch = fetch
        self._limits = limits
        self._sessions: dict[str, set[Session]] = defaultdict(set)
        self._followers: dict[str, set[str]] = defaultdict(set)  # group -> local users
        self._followed: dict[str, set[str]] = defaultdict(set)  # user -> groups
        self._sequences: dict[str, Sequence[bytes]] = {}  # group -> its messages in order
        self._repairs: dict[str, asyncio.Task[None]] = {}
        self._repair_slots = asyncio.Semaphore(REPAIR_CONCURRENCY)
        self._resyncs: set[asyncio.Task[None]] = set()
        self._group_subs: dict[str, Any] = {}
        self._user_subs: dict[str, list[Any]] = {}
        self._lock = asyncio.Lock()

    def open_streams(self) -> int:
        return sum(len(sessions) for sessions in self._sessions.values())

    def buffered_events(self) -> int:
        """Events waiting in stream buffers (read at scrape time, not on the hot path)."""
        return sum(s.buffered for sessions in self._sessions.values() for s in sessions)

    async def open(self, identity: Identity) -> Session:
        """Register a stream; from now on the user's joins and direct messages are seen."""
        user_id = identity.user_id
        session = Session(identity, self._limits)
        async with self._lock:
            if len(self._sessions.get(user_id, ())) >= self._limits.max_per_user:
                raise TooManyStreams(
                    f"{self._limits.max_per_user} streams are open for this user on this "
                    "gateway already: close one first"
                )
            for group_id in self._followed.get(user_id, ()):
                session.positions[group_key(group_id)] = self._sequences[group_id].emitted
            self._sessions[user_id].add(session)
            if user_id not in self._user_subs:
                self._user_subs[user_id] = [
                    await self._subscribe_detached(
                        f"groupchat.groups.member_joined.*.{user_id}", self._on_user_event
                    ),
                    await self._subscribe_detached(
                        f"groupchat.messaging.direct_message_sent.*.{user_id}",
                        self._on_direct_message,
                    ),
                    await self._subscribe_detached(
                        f"groupchat.messaging.direct_message_changed.*.{user_id}",
                        self._on_direct_change,
                    ),
                ]
        return session

    async def follow(self, user_id: str, last_seqs: dict[str, int]) -> None:
        """Follow the user's groups (each with its last seq as the groups service reported
        it); returns once the subscriptions are live on the server. Each of the user's
        streams starts a group where this gateway stands in it."""
        async with self._lock:
            for group_id, last_seq in last_seqs.items():
                await self._follow(user_id, group_id, last_seq)
        await self._confirm_subscriptions()

    async def _confirm_subscriptions(self) -> None:
        """Wait until the server has the subscriptions made so far; if NATS goes away
        meanwhile, go on: the reconnect subscribes again and resyncs every group."""
        try:
            await self._flush()
        except Exception as error:
            log.warning("subscriptions_unconfirmed", error=repr(error))

    def check(self, last_seqs: dict[str, int]) -> None:
        """The groups service reports these last seqs (read after the subscriptions were
        live): fetch what this gateway has not seen, it may have been published before."""
        for group_id, last_seq in last_seqs.items():
            sequence = self._sequences.get(group_id)
            if sequence is not None and last_seq > sequence.emitted:
                self._repair(group_id, wait=False)

    def resync(self) -> None:
        """NATS reconnected (or dropped messages): what was published meanwhile may never
        arrive. Check every followed group, and have every stream check the direct
        conversations it knows."""
        task = asyncio.create_task(self._resync(), context=contextvars.Context())
        self._resyncs.add(task)
        task.add_done_callback(self._resyncs.discard)

    async def _resync(self) -> None:
        # Once the server has our subscriptions again, whatever they missed was stored
        # before: a fetch from now on finds it.
        await self._confirm_subscriptions()
        log.info("fanout_resync", groups=len(self._sequences), users=len(self._sessions))
        for group_id in list(self._sequences):
            self._repair(group_id, wait=False)
        for sessions in self._sessions.values():
            for session in sessions:
                session.offer_recheck()

    async def close(self, session: Session) -> None:
        async with self._lock:
            user_id = session.user_id
            self._sessions[user_id].discard(session)
            if self._sessions[user_id]:
                return
            del self._sessions[user_id]
            for sub in self._user_subs.pop(user_id, ()):
                await sub.unsubscribe()
            for group_id in list(self._followed.pop(user_id, ())):
                await self._unfollow(user_id, group_id)

    def end_all(self) -> None:
        for sessions in self._sessions.values():
            for session in sessions:
                session.end()

    async def _follow(self, user_id: str, group_id: str, last_seq: int) -> None:
        sequence = self._sequences.get(group_id)
        if sequence is None:
            sequence = self._sequences[group_id] = Sequence(last_seq)
        if group_id not in self._followed[user_id]:
            for session in self._sessions.get(user_id, ()):
                session.positions[group_key(group_id)] = sequence.emitted
        self._followed[user_id].add(group_id)
        self._followers[group_id].add(user_id)
        if group_id not in self._group_subs:
            self._group_subs[group_id] = await self._subscribe_detached(
                f"groupchat.groups.*.{group_id}.*", self._on_group_event
            )

    async def _subscribe_detached(
        self, subject: str, handler: Callable[[Any], Awaitable[None]]
    ) -> Any:
        """Subscribe outside the calling RPC's context: the subscription's task, which runs
        the handler for every stream on this gateway, must not log as that RPC."""
        return await asyncio.create_task(
            self._subscribe(subject, handler), context=contextvars.Context()
        )

    async def _unfollow(self, user_id: str, group_id: str) -> None:
        self._followed.get(user_id, set()).discard(group_id)
        for session in self._sessions.get(user_id, ()):
            session.positions.pop(group_key(group_id), None)
        followers = self._followers.get(group_id)
        if followers is None:
            return
        followers.discard(user_id)
        if not followers:
            del self._followers[group_id]
            self._sequences.pop(group_id, None)
            if repair := self._repairs.pop(group_id, None):
                repair.cancel()
            if sub := self._group_subs.pop(group_id, None):
                await sub.unsubscribe()

    async def _on_user_event(self, msg: Any) -> None:
        """The user joined a group: follow it before telling the user, so nothing after the
        join notice is missed, and fetch what was sent between the join and now."""
        envelope = events_pb2.Envelope.FromString(msg.data)
        user_id = msg.subject.rsplit(".", 1)[1]
        group_id = envelope.aggregate_id
        async with self._lock:
            if user_id not in self._sessions:
                return
            known = group_id in self._sequences
            await self._follow(user_id, group_id, envelope.member_joined.member.read_seq)
        await self._confirm_subscriptions()
        self._deliver(user_id, None, 0, _response(envelope))
        if not known:
            self._repair(group_id, wait=False)

    async def _on_direct_message(self, msg: Any) -> None:
        """A direct message the user sent or received (the last subject token is the user);
        each stream puts its conversations in order itself (see SubscribeHandler)."""
        envelope = events_pb2.Envelope.FromString(msg.data)
        user_id = msg.subject.rsplit(".", 1)[1]
        self._deliver(
            user_id,
            direct_key(envelope.aggregate_id),
            envelope.aggregate_version,
            _response(envelope),
        )

    async def _on_direct_change(self, msg: Any) -> None:
        """A direct message the user sent or received changed (a recall): a new state of a
        delivered message, with no seq of its own."""
        user_id = msg.subject.rsplit(".", 1)[1]
        self._deliver(user_id, None, 0, _response(events_pb2.Envelope.FromString(msg.data)))

    async def _on_group_event(self, msg: Any) -> None:
        _, _, event_type, group_id, user_id = msg.subject.split(".", 4)
        if event_type == "member_joined":
            return  # the joiner hears of it on their own subscription
        envelope = events_pb2.Envelope.FromString(msg.data)
        if event_type == "group_message_posted":
            self._sequenced(group_id, envelope.aggregate_version, _response(envelope))
            return
        response = _response(envelope)
        if event_type in MEMBER_EVENTS:
            self._deliver(user_id, None, 0, response)
            if event_type in DEPARTURES:
                async with self._lock:
                    await self._unfollow(user_id, group_id)
            return
        followers = list(self._followers.get(group_id, ()))
        FANOUT_DELIVERIES.inc(len(followers))
        item: Item = (None, 0, response)
        for follower in followers:
            self._offer(follower, item)
        if event_type == "group_dissolved":
            async with self._lock:
                for follower in list(self._followers.get(group_id, ())):
                    await self._unfollow(follower, group_id)

    def _sequenced(self, group_id: str, seq: int, response: bytes) -> None:
        sequence = self._sequences.get(group_id)
        if sequence is None:
            return  # no longer followed here
        if sequence.is_duplicate(seq):
            STREAM_GAPS.labels("duplicate").inc()
            return
        self._emit(group_id, sequence.accept(seq, response), sequence)
        if sequence.has_gap:
            self._repair(group_id, wait=True)

    def _emit(self, group_id: str, responses: list[bytes], sequence: Sequence[bytes]) -> None:
        if not responses:
            return
        key = group_key(group_id)
        first = sequence.emitted - len(responses) + 1
        followers = self._followers.get(group_id, ())
        FANOUT_DELIVERIES.inc(len(followers) * len(responses))
        # The followers' streams, looked up once for all of these messages.
        sessions = [
            session for follower in followers for session in self._sessions.get(follower, ())
        ]
        for offset, response in enumerate(responses):
            item: Item = (key, first + offset, response)  # one per message, shared
            for session in sessions:
                session.put(item)

    def _deliver(self, user_id: str, key: str | None, seq: int, response: bytes) -> None:
        """Hand one user's streams an event meant for that user alone."""
        if user_id in self._sessions:
            FANOUT_DELIVERIES.inc()
            self._offer(user_id, (key, seq, response))

    def _offer(self, user_id: str, item: Item) -> None:
        # Uncounted: a group's events are counted once per event for all its followers.
        for session in self._sessions.get(user_id, ()):
            session.put(item)

    def _repair(self, group_id: str, *, wait: bool) -> None:
        if group_id in self._repairs:
            return
        task = asyncio.create_task(self._fill(group_id, wait), context=contextvars.Context())
        self._repairs[group_id] = task
        task.add_done_callback(lambda _: self._repairs.pop(group_id, None))

    async def _fill(self, group_id: str, wait: bool) -> None:
        """Fetch the group's messages past what this gateway has handed on, until no gap
        remains; end the followers' streams if that cannot be done in time."""
        if wait:  # a late publish usually closes the gap by itself
            await asyncio.sleep(self._limits.gap_wait_seconds)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._limits.repair_seconds
        checked = False
        failures = 0
        while (sequence := self._sequences.get(group_id)) is not None:
            if checked and not sequence.has_gap:
                return
            identity = self._member_identity(group_id, failures)
            if identity is None:
                return
            try:
                async with self._repair_slots:
                    fetched = await self._fetch(identity, group_key(group_id), sequence.emitted)
            except Exception as error:
                failures += 1
                if loop.time() >= deadline:
                    self._give_up(group_id, sequence, repr(error))
                    return
                await asyncio.sleep(min(1.0, max(self._limits.gap_wait_seconds, 0.05)))
                continue
            if self._sequences.get(group_id) is not sequence:
                return
            before = sequence.emitted
            for seq, response in fetched.messages:
                self._emit(group_id, sequence.accept(seq, response), sequence)
            if sequence.emitted > before:
                STREAM_GAPS.labels("filled").inc()
            checked = not fetched.has_more
            if sequence.has_gap and not fetched.has_more and sequence.emitted == before:
                # Messages past the gap may have arrived while the fetch was on its way, or
                # the store not show the missing one yet: ask again until the deadline.
                if loop.time() >= deadline:
                    self._give_up(group_id, sequence, "the missing messages are not stored")
                    return
                await asyncio.sleep(min(1.0, max(self._limits.gap_wait_seconds, 0.05)))

    def _give_up(self, group_id: str, sequence: Sequence[bytes], why: str) -> None:
        STREAM_GAPS.labels("lost").inc()
        log.warning("stream_gap_lost", group_id=group_id, after_seq=sequence.emitted, why=why)
        for follower in list(self._followers.get(group_id, ())):
            for session in self._sessions.get(follower, ()):
                session.lose()
        sequence.give_up_gap()

    def _member_identity(self, group_id: str, failures: int) -> Identity | None:
        """Someone on this gateway who may read the group's messages: after each failure
        another follower, in case that one has left meanwhile or their token expired."""
        identities = [
            session.identity
            for follower in self._followers.get(group_id, ())
            for session in list(self._sessions.get(follower, ()))[:1]
        ]
        return identities[failures % len(identities)] if identities else None


def _response(envelope: events_pb2.Envelope) -> bytes:
    return gateway_pb2.SubscribeResponse(event=envelope).SerializeToString()
