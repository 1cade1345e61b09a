"""The gateway puts each group's messages in seq order once: the Sequence rules, and the hub
around them with a fake bus and a fake groups service."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
from groupchat.events.v1 import events_pb2
from groupchat.gateway.v1 import gateway_pb2
from groupchat.groups.v1 import groups_pb2
from prometheus_client import REGISTRY

from services.gateway.config import StreamLimits
from services.gateway.fanout import FanoutHub, Session, TooManyStreams
from services.gateway.history import Fetched, group_key, group_message_response
from services.gateway.sequencing import Sequence
from services.kit.auth import Identity

GROUP = "g_1"
ALICE = Identity("alice", frozenset(), "token")
LIMITS = StreamLimits(
    buffer_events=100,
    buffer_bytes=1 << 20,
    stall_seconds=5,
    max_per_user=2,
    resume_max_events=100,
    gap_wait_seconds=30,  # no repair unless a test says so
    repair_seconds=0.2,
)


def test_a_sequence_hands_on_in_order_holds_past_a_gap_and_drops_duplicates() -> None:
    sequence: Sequence[str] = Sequence(emitted=3)
    assert sequence.accept(5, "e") == []
    assert sequence.has_gap
    assert sequence.accept(4, "d") == ["d", "e"]
    assert not sequence.has_gap
    assert sequence.is_duplicate(5) and sequence.accept(5, "e") == []
    assert sequence.accept(3, "c") == []
    assert sequence.accept(8, "h") == [] and sequence.accept(7, "g") == []
    assert sequence.give_up_gap() == ["g", "h"]
    assert sequence.emitted == 8 and not sequence.has_gap


@dataclass
class Msg:
    subject: str
    data: bytes


class FakeGroupsWorld:
    """A bus that records subscriptions and a groups service that stores messages."""

    def __init__(self) -> None:
        self.handlers: dict[str, Callable[[Any], Awaitable[None]]] = {}
        self.stored: dict[int, bytes] = {}
        self.failing = False
        self.during_fetch: Callable[[], Awaitable[None]] | None = None
        self.refused: set[str] = set()  # users the groups service no longer lets read
        self.fetches = 0

    async def subscribe(self, subject: str, handler: Callable[[Any], Awaitable[None]]) -> Any:
        self.handlers[subject] = handler
        return self

    async def unsubscribe(self) -> None:
        pass

    async def flush(self) -> None:
        pass

    async def fetch(self, identity: Identity, key: str, after_seq: int) -> Fetched:
        assert key == group_key(GROUP)
        self.fetches += 1
        if self.failing or identity.user_id in self.refused:
            raise ConnectionError("groups is down, or this user may not read")
        seqs = sorted(s for s in self.stored if s > after_seq)
        if self.during_fetch is not None:
            happening, self.during_fetch = self.during_fetch, None
            await happening()
        return Fetched([(s, self.stored[s]) for s in seqs], has_more=False)

    def store(self, seq: int) -> bytes:
        message = groups_pb2.GroupMessage(group_id=GROUP, seq=seq, text=f"m{seq}")
        self.stored[seq] = group_message_response(message)
        return self.stored[seq]

    async def publish(self, seq: int) -> None:
        envelope = events_pb2.Envelope(
            type="groups.group_message_posted",
            aggregate_id=GROUP,
            aggregate_version=seq,
            group_message_posted={"message": {"group_id": GROUP, "seq": seq, "text": f"m{seq}"}},
        )
        handler = self.handlers[f"groupchat.groups.*.{GROUP}.*"]
        await handler(
            Msg(f"groupchat.groups.group_message_posted.{GROUP}.bob", envelope.SerializeToString())
        )


async def opened(
    world: FakeGroupsWorld, limits: StreamLimits = LIMITS
) -> tuple[FanoutHub, Session]:
    hub = FanoutHub(world.subscribe, world.flush, world.fetch, limits)
    session = await hub.open(ALICE)
    await hub.follow("alice", {GROUP: 0})
    return hub, session


async def received(session: Session, count: int) -> list[int]:
    seqs = []
    for _ in range(count):
        item = await asyncio.wait_for(session.next(), 5)
        assert isinstance(item, tuple), item
        key, seq, response = item
        assert key == group_key(GROUP)
        event = gateway_pb2.SubscribeResponse.FromString(response).event
        assert event.group_message_posted.message.seq == seq
        seqs.append(seq)
    return seqs


async def test_messages_that_overtake_each_other_reach_a_stream_in_order_once() -> None:
    world = FakeGroupsWorld()
    _, session = await opened(world)
    for seq in (2, 3, 1, 2, 4):
        world.store(seq)
        await world.publish(seq)
    assert await received(session, 4) == [1, 2, 3, 4]
    assert session.buffered == 0
    assert world.fetches == 0  # the late publish closed the gap by itself


async def test_a_message_that_never_arrives_is_fetched_from_the_groups_service() -> None:
    world = FakeGroupsWorld()
    _, session = await opened(world, replace(LIMITS, gap_wait_seconds=0.01))
    for seq in (1, 2, 3):
        world.store(seq)
    await world.publish(1)
    await world.publish(3)  # 2 was published while this gateway was away
    assert await received(session, 3) == [1, 2, 3]


async def test_a_gap_is_fetched_as_another_follower_when_one_may_no_longer_read() -> None:
    world = FakeGroupsWorld()
    hub, alices = await opened(world, replace(LIMITS, gap_wait_seconds=0.01, repair_seconds=5))
    bobs = await hub.open(Identity("bob", frozenset(), "token"))
    await hub.follow("bob", {GROUP: 0})
    world.refused = {"alice"}
    for seq in (1, 2):
        world.store(seq)
    await world.publish(2)
    assert await received(alices, 2) == [1, 2]
    assert await received(bobs, 2) == [1, 2]


async def test_a_gap_that_opens_while_a_check_is_on_its_way_is_not_taken_as_lost() -> None:
    world = FakeGroupsWorld()
    hub, session = await opened(world, replace(LIMITS, gap_wait_seconds=0.01, repair_seconds=5))

    async def a_later_message_overtakes_the_first() -> None:
        world.store(1)  # after the check read the store
        world.store(2)
        await world.publish(2)

    world.during_fetch = a_later_message_overtakes_the_first
    hub.check({GROUP: 1})  # the groups service reports more than this gateway saw
    assert await received(session, 2) == [1, 2]


async def test_a_gap_that_cannot_be_fetched_ends_the_stream_with_a_reason() -> None:
    world = FakeGroupsWorld()
    _, session = await opened(world, replace(LIMITS, gap_wait_seconds=0.01))
    world.failing = True
    await world.publish(2)
    assert await asyncio.wait_for(session.next(), 5) is Session.GAP


async def test_after_a_reconnect_what_was_published_meanwhile_is_fetched() -> None:
    world = FakeGroupsWorld()
    hub, session = await opened(world)
    world.store(1)
    await world.publish(1)
    assert await received(session, 1) == [1]
    world.store(2)  # stored and published while NATS was away: never delivered
    hub.resync()
    # The stream is asked to check its direct conversations itself.
    assert await asyncio.wait_for(session.next(), 5) is Session.RECHECK
    assert await received(session, 1) == [2]


async def test_a_user_opens_at_most_the_configured_streams() -> None:
    world = FakeGroupsWorld()
    hub, _ = await opened(world)
    await hub.open(ALICE)
    with pytest.raises(TooManyStreams):
        await hub.open(ALICE)


async def test_an_overflowing_stream_frees_its_buffer_at_once() -> None:
    world = FakeGroupsWorld()
    _, session = await opened(world, replace(LIMITS, buffer_bytes=1024))
    for seq in range(1, 40):
        await world.publish(seq)
    assert session.buffered == 1
    assert await session.next() is Session.OVERFLOW


def deliveries() -> float:
    return REGISTRY.get_sample_value("groupchat_fanout_deliveries_total") or 0.0


async def test_deliveries_count_each_message_once_per_local_follower_not_per_stream() -> None:
    world = FakeGroupsWorld()
    hub, first = await opened(world)
    second = await hub.open(ALICE)  # alice's other device: the same follower
    bob = await hub.open(Identity("bob", frozenset(), "token"))
    await hub.follow("bob", {GROUP: 0})
    before = deliveries()

    for seq in (1, 2, 3):
        await world.publish(seq)

    assert deliveries() - before == 3 * 2  # three messages, two users
    assert (first.buffered, second.buffered, bob.buffered) == (3, 3, 3)
