"""The Subscribe stream: follow the caller's groups, say ready, send what a resuming client
missed, then push until the end, each conversation in seq order without gap or duplicate.

The hub hands each group's messages on in order once per gateway; a stream keeps the last
seq of each conversation it delivered, so it drops what it already sent and fetches what
it would otherwise skip (a direct message that overtook another, a conversation that moved
on while NATS was away).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from groupchat.gateway.v1 import gateway_pb2
from groupchat.groups.v1 import groups_pb2
from groupchat.messaging.v1 import messaging_pb2

from services.gateway.config import StreamLimits
from services.gateway.fanout import FanoutHub, Item, Session
from services.gateway.history import Fetched, History, direct_key, group_key
from services.gateway.responses import batch_response, is_event
from services.kit.downstream import Downstream
from services.kit.errors import DomainError, ErrorKind, Validator
from services.kit.metrics import STREAMS_ENDED
from services.kit.rpc import current_identity

MAX_RESUME_POSITIONS = 1000
# The newest direct conversations whose positions a stream starts with.
DIRECT_POSITIONS = 100
MAX_ID_LENGTH = 200
# The most one response carries when events wait for a stream (far below the 4 MiB a gRPC
# client receives by default).
BATCH_EVENTS = 256
BATCH_BYTES = 512 * 1024


class SlowConsumer(DomainError):
    kind = ErrorKind.RESOURCE_EXHAUSTED
    reason = "SLOW_CONSUMER"


class StreamStalled(DomainError):
    kind = ErrorKind.RESOURCE_EXHAUSTED
    reason = "STREAM_STALLED"


class StreamGap(DomainError):
    kind = ErrorKind.UNAVAILABLE
    reason = "STREAM_GAP"


class ResumeTooFar(DomainError):
    kind = ErrorKind.FAILED_PRECONDITION
    reason = "RESUME_TOO_FAR"


class GatewayShuttingDown(DomainError):
    kind = ErrorKind.UNAVAILABLE
    reason = "GATEWAY_SHUTTING_DOWN"


RESUBSCRIBE = "subscribe again with resume_from set to the last seq you hold of each conversation"
# How often the stall watch looks, as a share of the stall time: a stalled stream ends
# between the stall time and a quarter more.
STALL_CHECKS_PER_PERIOD = 4


class StallWatch:
    """Ends a stream whose write waited longer than `seconds` (its client stopped reading)
    with StreamStalled. One timer of the gateway's looks at every write in progress, a few
    times per period: a timer per write cost a fifth of the gateway's CPU in a fan-out.
    A stream's task is told once (`open`, `close`), not at every write."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._tasks: dict[grpc.aio.ServicerContext, asyncio.Task[object]] = {}
        self._since: dict[grpc.aio.ServicerContext, float] = {}  # writes waiting: since
        self._stalled: set[grpc.aio.ServicerContext] = set()  # cancelled by the watch
        self._timer: asyncio.TimerHandle | None = None

    def open(self, context: grpc.aio.ServicerContext) -> None:
        """Watch the writes of the stream `context` whose task is the current one."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks[context] = task

    def close(self, context: grpc.aio.ServicerContext) -> None:
        del self._tasks[context]

    async def write(self, context: grpc.aio.ServicerContext, response: bytes) -> None:
        loop = asyncio.get_running_loop()
        self._since[context] = loop.time()
        if self._timer is None:
            self._timer = loop.call_later(self._seconds / STALL_CHECKS_PER_PERIOD, self._check)
        try:
            await context.write(response)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            if context not in self._stalled:
                raise
            self._tasks[context].uncancel()
            raise StreamStalled(
                f"this stream was not read for {self._seconds:g}s: " + RESUBSCRIBE
            ) from None
        finally:
            del self._since[context]
            self._stalled.discard(context)

    def _check(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self._seconds
        for context, since in self._since.items():
            if since <= cutoff and context not in self._stalled and context in self._tasks:
                self._stalled.add(context)
                self._tasks[context].cancel()
        if self._since:
            self._timer = loop.call_later(self._seconds / STALL_CHECKS_PER_PERIOD, self._check)


class SubscribeHandler:
    def __init__(
        self,
        hub: FanoutHub,
        groups: Downstream,
        messaging: Downstream,
        history: History,
        limits: StreamLimits,
    ) -> None:
        self._hub = hub
        self._groups = groups
        self._messaging = messaging
        self._history = history
        self._limits = limits
        self._stalls = StallWatch(limits.stall_seconds)

    async def __call__(
        self, request: gateway_pb2.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Writes serialized SubscribeResponses (events are serialized once per gateway, not
        once per stream: register with an identity response serializer). Writes, not
        yields: each write has a deadline, so a client that stops reading is ended."""
        resume = resume_positions(request, current_identity().user_id)
        session = await self._hub.open(current_identity())
        self._stalls.open(context)
        try:
            await self._stream(session, resume, context)
        except DomainError as error:
            STREAMS_ENDED.labels(error.reason).inc()
            raise
        finally:
            self._stalls.close(context)
            await self._hub.close(session)
        return
        yield  # an async generator, as the RPC interceptor expects of a stream handler

    async def _stream(
        self, session: Session, resume: dict[str, int], context: grpc.aio.ServicerContext
    ) -> None:
        last_seqs = await self._last_seqs(context)
        await self._hub.follow(session.user_id, last_seqs)
        # Read again now that the subscriptions are live: what was sent in between.
        self._hub.check(await self._last_seqs(context))
        conversations = await self._direct_last_seqs(session, context)
        catch_up = self._resume_from(session, resume)
        ready = gateway_pb2.Ready(
            group_ids=list(last_seqs),
            positions=[
                *(
                    gateway_pb2.Position(group_id=g, seq=session.positions[group_key(g)])
                    for g in last_seqs
                    if group_key(g) in session.positions
                ),
                *(
                    gateway_pb2.Position(conversation_id=c, seq=session.positions[direct_key(c)])
                    for c in conversations
                ),
            ],
        )
        await self._write(context, gateway_pb2.SubscribeResponse(ready=ready).SerializeToString())
        budget = _Budget(self._limits.resume_max_events)
        for key in catch_up:
            await self._fill(session, key, None, context, budget)
        while True:
            item = await session.next()
            if item is Session.OVERFLOW:
                raise SlowConsumer(
                    "more events waited for this stream than its buffer holds: " + RESUBSCRIBE
                )
            if item is Session.GAP:
                raise StreamGap(
                    "a message this stream follows could not be fetched: " + RESUBSCRIBE
                )
            if item is Session.ENDED:
                raise GatewayShuttingDown("this gateway is shutting down: " + RESUBSCRIBE)
            if item is Session.RECHECK:
                await self._recheck_direct(session, context)
                await self._write(context, _refresh(session))
                continue
            await self._deliver(session, item, context)

    def _resume_from(self, session: Session, resume: dict[str, int]) -> list[str]:
        """Start each resumed conversation where the client stands; the conversations
        whose missed messages must be sent first."""
        catch_up: list[str] = []
        missed = 0
        for key, seq in resume.items():
            start = session.positions.get(key)
            if key.startswith("group:") and start is None:
                continue  # no longer a member: ListMyGroups tells the client
            if start is None or seq < start:
                catch_up.append(key)
                missed += start - seq if start is not None else 0
            session.positions[key] = seq
        if missed > self._limits.resume_max_events:
            raise ResumeTooFar(
                f"{missed} messages were missed, more than a resume sends "
                f"({self._limits.resume_max_events}): page with ListGroupMessages(after_seq) "
                "and subscribe without resume_from",
                missed=str(missed),
            )
        return catch_up

    async def _deliver(
        self, session: Session, item: Item, context: grpc.aio.ServicerContext
    ) -> None:
        """Send `item` and the Items waiting behind it: one response for all the events
        (a batch), unless only one is to be sent; a lone event is never held back."""
        items = session.waiting_items(BATCH_EVENTS - 1, BATCH_BYTES)
        if not items:
            items = [item]
        else:
            items.insert(0, item)
        batch: list[bytes] = []
        positions = session.positions
        for key, seq, response in items:
            if key is not None:
                position = positions.get(key)
                if position is None and session.knows_every_direct and key.startswith("direct:"):
                    position = positions[key] = 0  # a conversation begun since Ready
                if position is not None:
                    if seq <= position:
                        continue  # sent already
                    if seq > position + 1:
                        await self._send(context, batch)  # what came before goes first
                        batch = []
                        await self._fill(session, key, seq, context, None)
                        if seq <= positions.get(key, seq - 1):
                            continue
                positions[key] = seq
            if is_event(response):
                batch.append(response)
            else:  # not an event (a refresh): on its own, in its place
                await self._send(context, batch)
                batch = []
                await self._write(context, response)
        await self._send(context, batch)

    async def _send(self, context: grpc.aio.ServicerContext, responses: list[bytes]) -> None:
        """Write serialized `event` responses: one as it is, several as one batch."""
        if len(responses) == 1:
            await self._write(context, responses[0])
        elif responses:
            await self._write(context, batch_response(responses))

    async def _recheck_direct(self, session: Session, context: grpc.aio.ServicerContext) -> None:
        """NATS was away: send what the caller's newest direct conversations hold past this
        stream's positions."""
        for conversation in await self._newest_direct(session, context):
            key = direct_key(conversation.conversation_id)
            position = session.positions.get(key, 0 if session.knows_every_direct else None)
            if position is None:
                session.positions[key] = conversation.last_seq
            elif conversation.last_seq > position:
                session.positions[key] = position
                await self._fill(session, key, conversation.last_seq, context, None)

    async def _fill(
        self,
        session: Session,
        key: str,
        until: int | None,
        context: grpc.aio.ServicerContext,
        budget: _Budget | None,
    ) -> None:
        """Send the conversation's messages past the stream's position in it, fetched from
        the owning service: up to `until`, or all there are."""
        while (position := session.positions.get(key)) is not None and (
            until is None or position < until
        ):
            try:
                fetched: Fetched = await self._history.fetch(session.identity, key, position)
            except (grpc.aio.AioRpcError, DomainError) as error:
                why = error.reason if isinstance(error, DomainError) else error.code().name
                raise StreamGap(
                    f"missed messages could not be fetched ({why}): " + RESUBSCRIBE
                ) from None
            for seq, response in fetched.messages:
                if seq <= session.positions.get(key, seq):
                    continue  # sent already, or the conversation was left meanwhile
                if budget is not None:
                    budget.spend()
                session.positions[key] = seq
                await self._write(context, response)
            if not fetched.has_more:
                return

    async def _write(self, context: grpc.aio.ServicerContext, response: bytes) -> None:
        await self._stalls.write(context, response)

    async def _direct_last_seqs(
        self, session: Session, context: grpc.aio.ServicerContext
    ) -> list[str]:
        """Start the caller's newest direct conversations at their last seq; when those are
        all there are, a conversation the stream has not heard of is new and starts at 0."""
        conversations = await self._newest_direct(session, context)
        for conversation in conversations:
            session.positions.setdefault(
                direct_key(conversation.conversation_id), conversation.last_seq
            )
        return [c.conversation_id for c in conversations]

    async def _newest_direct(
        self, session: Session, context: grpc.aio.ServicerContext
    ) -> list[messaging_pb2.DirectConversation]:
        page = await self._messaging.call(
            "ListDirectConversations",
            messaging_pb2.ListDirectConversationsRequest(page_size=DIRECT_POSITIONS),
            context,
        )
        session.knows_every_direct = not page.has_more
        return list(page.conversations)

    async def _last_seqs(self, context: grpc.aio.ServicerContext) -> dict[str, int]:
        """The caller's groups, each with its last seq."""
        last_seqs: dict[str, int] = {}
        token = ""
        while True:
            page = await self._groups.call(
                "ListMyGroups",
                groups_pb2.ListMyGroupsRequest(page_size=500, page_token=token),
                context,
            )
            last_seqs.update((g.group.group_id, g.group.last_seq) for g in page.groups)
            token = page.next_page_token
            if not token:
                return last_seqs


def _refresh(session: Session) -> bytes:
    """Changes (reactions, recalls, group updates) carry no seq, so those this stream may
    have missed cannot be fetched like messages: the client re-reads what it shows."""
    group_ids = sorted(
        key.removeprefix("group:") for key in session.positions if key.startswith("group:")
    )
    refresh = gateway_pb2.Refresh(group_ids=group_ids)
    return gateway_pb2.SubscribeResponse(refresh=refresh).SerializeToString()


class _Budget:
    """The messages a resume may still send."""

    def __init__(self, events: int) -> None:
        self._left = events

    def spend(self) -> None:
        if self._left <= 0:
            raise ResumeTooFar(
                "more messages were missed than a resume sends: page with ListGroupMessages "
                "/ ListDirectMessages(after_seq) and subscribe without resume_from"
            )
        self._left -= 1


def resume_positions(request: gateway_pb2.SubscribeRequest, user_id: str) -> dict[str, int]:
    """`resume_from` as conversation key -> seq, or INVALID_ARGUMENT naming what is wrong."""
    check = Validator()
    check.check(
        len(request.resume_from) <= MAX_RESUME_POSITIONS,
        "resume_from",
        f"at most {MAX_RESUME_POSITIONS} positions",
    )
    positions: dict[str, int] = {}
    for n, position in enumerate(request.resume_from[:MAX_RESUME_POSITIONS]):
        field = f"resume_from[{n}]"
        kind = position.WhichOneof("conversation")
        conversation = getattr(position, kind) if kind else ""
        check.check(bool(conversation), field, "set group_id or conversation_id")
        check.check(len(conversation) <= MAX_ID_LENGTH, field, "id too long")
        check.check(position.seq >= 0, f"{field}.seq", "must not be negative")
        if kind == "conversation_id":
            check.check(
                user_id in conversation.split(":"),
                f"{field}.conversation_id",
                "a direct conversation of the caller (the two user ids, sorted, joined by ':')",
            )
            positions[direct_key(conversation)] = position.seq
        elif kind == "group_id":
            positions[group_key(conversation)] = position.seq
    check.raise_if_invalid()
    return positions
