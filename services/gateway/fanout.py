"""Local fan-out of events to the Subscribe streams of one gateway.

The gateway subscribes once per group that any of its connected users belongs to, and per
connected user for that user's joins and direct messages; each event is serialized once and
handed to the bounded queues of the streams it concerns. A stream whose queue is full is
ended (the client catches up by sequence), so one slow reader never stalls a group.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from groupchat.events.v1 import events_pb2
from groupchat.gateway.v1 import gateway_pb2

from services.kit.metrics import FANOUT_DROPPED

log = structlog.get_logger("fanout")

# Events that concern one member (the last subject token), not the whole group.
MEMBER_EVENTS = frozenset({"member_left", "member_removed", "member_role_changed", "member_muted"})
# After these the member no longer follows the group.
DEPARTURES = frozenset({"member_left", "member_removed"})


class Session:
    """One open Subscribe stream: a bounded buffer, then a terminal marker."""

    OVERFLOW: Any = object()
    ENDED: Any = object()

    def __init__(self, user_id: str, buffer_size: int) -> None:
        self.user_id = user_id
        self._buffer_size = buffer_size
        # Bounded by offer(); unbounded itself so that the terminal marker always fits.
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._finished = False

    def offer(self, response: bytes) -> None:
        if self._finished:
            return
        if self._queue.qsize() >= self._buffer_size:
            FANOUT_DROPPED.inc()
            self._finish(Session.OVERFLOW)
        else:
            self._queue.put_nowait(response)

    def end(self) -> None:
        """Finish the stream after what is buffered (the gateway is shutting down)."""
        self._finish(Session.ENDED)

    def _finish(self, marker: Any) -> None:
        if not self._finished:
            self._finished = True
            self._queue.put_nowait(marker)

    async def next(self) -> Any:
        """The next serialized response, or Session.OVERFLOW / Session.ENDED once finished."""
        return await self._queue.get()

    @property
    def buffered(self) -> int:
        return self._queue.qsize()


Subscribe = Callable[[str, Callable[[Any], Awaitable[None]]], Awaitable[Any]]


class FanoutHub:
    def __init__(
        self, subscribe: Subscribe, flush: Callable[[], Awaitable[None]], buffer_size: int
    ) -> None:
        self._subscribe = subscribe
        self._flush = flush
        self._buffer_size = buffer_size
        self._sessions: dict[str, set[Session]] = defaultdict(set)
        self._followers: dict[str, set[str]] = defaultdict(set)  # group -> local users
        self._followed: dict[str, set[str]] = defaultdict(set)  # user -> groups
        self._group_subs: dict[str, Any] = {}
        self._user_subs: dict[str, list[Any]] = {}
        self._lock = asyncio.Lock()

    def open_streams(self) -> int:
        return sum(len(sessions) for sessions in self._sessions.values())

    def buffered_events(self) -> int:
        """Events waiting in stream buffers (read at scrape time, not on the hot path)."""
        return sum(s.buffered for sessions in self._sessions.values() for s in sessions)

    async def open(self, user_id: str) -> Session:
        """Register a stream; from now on the user's joins and direct messages are seen."""
        session = Session(user_id, self._buffer_size)
        async with self._lock:
            self._sessions[user_id].add(session)
            if user_id not in self._user_subs:
                self._user_subs[user_id] = [
                    await self._subscribe(
                        f"groupchat.groups.member_joined.*.{user_id}", self._on_user_event
                    ),
                    await self._subscribe(
                        f"groupchat.messaging.direct_message_sent.*.{user_id}",
                        self._on_direct_message,
                    ),
                ]
        return session

    async def follow(self, user_id: str, group_ids: list[str]) -> None:
        """Follow the user's groups; returns once the subscriptions are live on the server."""
        async with self._lock:
            for group_id in group_ids:
                await self._follow(user_id, group_id)
        await self._flush()

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

    async def _follow(self, user_id: str, group_id: str) -> None:
        self._followed[user_id].add(group_id)
        self._followers[group_id].add(user_id)
        if group_id not in self._group_subs:
            self._group_subs[group_id] = await self._subscribe(
                f"groupchat.groups.*.{group_id}.*", self._on_group_event
            )

    async def _unfollow(self, user_id: str, group_id: str) -> None:
        self._followed.get(user_id, set()).discard(group_id)
        followers = self._followers.get(group_id)
        if followers is None:
            return
        followers.discard(user_id)
        if not followers:
            del self._followers[group_id]
            if sub := self._group_subs.pop(group_id, None):
                await sub.unsubscribe()

    async def _on_user_event(self, msg: Any) -> None:
        """The user joined a group: follow it before telling the user, so nothing after the
        join notice is missed."""
        envelope = events_pb2.Envelope.FromString(msg.data)
        user_id = msg.subject.rsplit(".", 1)[1]
        async with self._lock:
            if user_id not in self._sessions:
                return
            await self._follow(user_id, envelope.aggregate_id)
        await self._flush()
        self._deliver(user_id, _response(envelope))

    async def _on_direct_message(self, msg: Any) -> None:
        """A direct message to the user (the last subject token is the recipient)."""
        envelope = events_pb2.Envelope.FromString(msg.data)
        self._deliver(msg.subject.rsplit(".", 1)[1], _response(envelope))

    async def _on_group_event(self, msg: Any) -> None:
        _, _, event_type, group_id, user_id = msg.subject.split(".", 4)
        if event_type == "member_joined":
            return  # the joiner hears of it on their own subscription
        envelope = events_pb2.Envelope.FromString(msg.data)
        response = _response(envelope)
        if event_type in MEMBER_EVENTS:
            self._deliver(user_id, response)
            if event_type in DEPARTURES:
                async with self._lock:
                    await self._unfollow(user_id, group_id)
            return
        for follower in list(self._followers.get(group_id, ())):
            self._deliver(follower, response)
        if event_type == "group_dissolved":
            async with self._lock:
                for follower in list(self._followers.get(group_id, ())):
                    await self._unfollow(follower, group_id)

    def _deliver(self, user_id: str, response: bytes) -> None:
        for session in self._sessions.get(user_id, ()):
            session.offer(response)


def _response(envelope: events_pb2.Envelope) -> bytes:
    return gateway_pb2.SubscribeResponse(event=envelope).SerializeToString()
