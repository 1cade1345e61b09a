"""Direct-message sends stopped at every step (a gRPC cancel or deadline stops a handler at
any await) leave no drift: seqs gap-free and each taken once, every stored message
published and nothing else, the day's stranger quota counting exactly the strangers whose
conversations were charged, and each conversation's projection converging to its last
message. Against the real store and NATS; the outbox relay runs as in the service."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from groupchat.events.v1 import events_pb2
from nats.js.api import DeliverPolicy

from services.kit.config import EventSettings
from services.kit.events import EventBus
from services.kit.mongo import open_database
from services.kit.outbox import HOLDS_EVENTS, Outbox
from services.kit.timestamps import now_ms
from services.messaging import domain
from services.messaging.app import MessagingApp, MessagingLimits, SendResult
from services.messaging.domain import StrangerQuota
from services.messaging.service import open_messaging
from services.messaging.storage import MessagingStore
from tests.conftest import eventually

# Enough strangers for every step of every kind of send to start a new conversation.
LIMITS = MessagingLimits(stranger_daily_limit=1_000)


@dataclass
class World:
    db: Any
    store: MessagingStore
    app: MessagingApp
    outbox: Outbox
    # (conversation id, seq) of every direct_message_sent seen on NATS.
    published: set[tuple[str, int]] = field(default_factory=set)


@pytest.fixture
async def world(
    nats_url: str, nats_client: Any, mongodb_uri: str, database: str
) -> AsyncIterator[World]:
    client, db = open_database(mongodb_uri, database)
    bus = await EventBus.connect(nats_url, "messaging-faults", EventSettings())
    # A short retry delay, so that the relay soon takes over what a stopped send left.
    outbox = Outbox(bus, retry_after_seconds=0.3, scan_interval_seconds=0.1)
    store, app = await open_messaging(db, outbox, LIMITS)
    world = World(db, store, app, outbox)

    async def collect(msg: Any) -> None:
        envelope = events_pb2.Envelope.FromString(msg.data)
        world.published.add((envelope.aggregate_id, envelope.aggregate_version))

    # From the stream, not a core subscription: a core subscriber was seen to miss the
    # first event published right after it subscribed, which would look like a lost event.
    await nats_client.jetstream().subscribe(
        "groupchat.messaging.>",
        cb=collect,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
    )
    relay = asyncio.create_task(outbox.run())
    try:
        yield world
    finally:
        # Cancelled until it ends: on Python 3.11 asyncio.wait_for (in the relay, in nats'
        # publish) can drop a cancel that lands as the awaited result arrives.
        while not relay.done():
            relay.cancel()
            await asyncio.wait([relay], timeout=0.5)
        await bus.close()
        client.close()


class StoppingStore:
    """The store, cancelling the send that uses it at its `stop_at`-th call (or its first
    call of the method named `stop_at`): as the call is
    made ("before": a call the send awaits itself never reaches the store, a write it
    shields goes on), while the call is on its way ("during": it is slow and goes on after
    the cancel, as a driver's write does) or once the call has returned ("after")."""

    def __init__(self, store: MessagingStore, stop_at: int | str, moment: str) -> None:
        self._store = store
        self._stop_at = stop_at
        self._moment = moment
        self.calls = 0
        self.victim: asyncio.Task[Any] | None = None

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)
        if not inspect.iscoroutinefunction(method):
            return method

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self._stop_at not in (self.calls, name):
                return await method(*args, **kwargs)
            self._stop_at = 0  # once
            if self._moment == "before":
                self._stop()
                await asyncio.sleep(0)  # the cancel lands here when the send itself calls
                return await method(*args, **kwargs)
            if self._moment == "during":

                async def slow() -> Any:
                    await asyncio.sleep(0.05)
                    return await method(*args, **kwargs)

                on_its_way = asyncio.ensure_future(slow())
                asyncio.get_running_loop().call_soon(self._stop)
                return await asyncio.shield(on_its_way)
            result = await method(*args, **kwargs)
            self._stop()
            return result

        return call

    def _stop(self) -> None:
        assert self.victim is not None
        self.victim.cancel()


def unique(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:6]}"


async def stopped_send(
    world: World, stop_at: int | str, moment: str, sender: str, recipient: str, client_msg_id: str
) -> bool:
    """Send through a store that cancels the send at its `stop_at`-th call; True if the send
    was stopped (False: it had fewer calls)."""
    stopping = StoppingStore(world.store, stop_at, moment)
    app = MessagingApp(cast(MessagingStore, stopping), world.outbox, LIMITS)
    task = asyncio.create_task(app.send_message(sender, recipient, "hi", client_msg_id))
    stopping.victim = task
    await asyncio.wait([task])
    return task.cancelled()


async def establish(world: World, a: str, b: str) -> None:
    await world.app.send_message(a, b, "hi", "")
    await world.app.send_message(b, a, "hi back", "")


# The checks


async def stored_seqs(world: World, conversation_id: str) -> list[int]:
    docs = (
        await world.db["messages"]
        .find({"conversation_id": conversation_id}, {"seq": 1})
        .sort("seq", 1)
        .to_list(None)
    )
    return [d["seq"] for d in docs]


async def assert_no_drift(world: World, sender: str, peers: list[str]) -> None:
    conversations = [domain.conversation_id(sender, peer) for peer in peers]
    stored: set[tuple[str, int]] = set()
    for conversation_id in conversations:
        seqs = await stored_seqs(world, conversation_id)
        assert seqs == list(range(1, len(seqs) + 1)), (conversation_id, seqs)
        stored |= {(conversation_id, seq) for seq in seqs}

    def published_exactly_the_stored() -> bool:
        ours = {p for p in world.published if p[0] in conversations}
        assert ours <= stored, ours - stored  # nothing published that was not committed
        return ours == stored

    await eventually(published_exactly_the_stored)

    async def all_events_handed_over() -> bool:
        waiting = {"conversation_id": {"$in": conversations}, **HOLDS_EVENTS}
        return await world.db["messages"].count_documents(waiting) == 0

    await eventually(all_events_handed_over)

    # The day counts exactly the strangers whose conversation was charged today.
    day = StrangerQuota(LIMITS.stranger_daily_limit, LIMITS.quota_zone).day(now_ms())
    charged = set()
    for peer, conversation_id in zip(peers, conversations, strict=True):
        last = await world.store.last_message(conversation_id)
        if last is not None and last.state.charged(sender, day):
            charged.add(peer)
    quota = await world.db["stranger_days"].find_one({"_id": f"{sender}:{day}"}) or {}
    assert set(quota.get("recipients", [])) == charged
    assert quota.get("count", 0) == len(charged)

    for conversation_id in conversations:

        async def converged(conversation_id: str = conversation_id) -> bool:
            return await projected(world, conversation_id)

        await eventually(converged)


async def projected(world: World, conversation_id: str) -> bool:
    """The conversation's projection says what its last message says."""
    last = await world.store.last_message(conversation_id)
    conversation = await world.store.get_conversation(conversation_id)
    if last is None:
        return conversation is None
    if conversation is None or conversation.last_seq != last.message.seq:
        return False
    assert conversation.last_message == last.message
    assert (conversation.started_by, conversation.answered) == (
        last.state.started_by,
        last.state.answered,
    )
    assert conversation.read_seq(last.message.sender_id) >= last.message.seq
    return True


# The tests


SendKind = Callable[[World, str], Awaitable[tuple[str, str]]]


async def first_message(world: World, alice: str) -> tuple[str, str]:
    return alice, unique("stranger")


async def second_message_to_a_stranger(world: World, alice: str) -> tuple[str, str]:
    stranger = unique("stranger")
    await world.app.send_message(alice, stranger, "hello?", "")
    return alice, stranger


async def answer(world: World, alice: str) -> tuple[str, str]:
    """alice answers someone who wrote to her first (sender and recipient swap below)."""
    fan = unique("fan")
    await world.app.send_message(fan, alice, "hi!", "")
    return alice, fan


async def established(world: World, alice: str) -> tuple[str, str]:
    friend = unique("friend")
    await establish(world, alice, friend)
    return alice, friend


@pytest.mark.parametrize("kind", [first_message, second_message_to_a_stranger, answer, established])
@pytest.mark.parametrize("with_client_msg_id", [False, True])
async def test_a_send_stopped_at_any_step_leaves_no_drift(
    world: World, kind: SendKind, with_client_msg_id: bool
) -> None:
    alice = unique("alice")
    sends: list[tuple[str, str, str, int]] = []  # sender, peer, client_msg_id, seqs before
    stopped = 0
    for moment in ("before", "during", "after"):
        for stop_at in range(1, 9):
            sender, peer = await kind(world, alice)
            client_msg_id = f"c-{moment}-{stop_at}" if with_client_msg_id else ""
            before = len(await stored_seqs(world, domain.conversation_id(sender, peer)))
            sends.append((sender, peer, client_msg_id, before))
            stopped += await stopped_send(world, stop_at, moment, sender, peer, client_msg_id)
    assert stopped >= 12  # every kind of send has at least four steps to stop at
    peers = [peer for _, peer, _, _ in sends]

    await assert_no_drift(world, alice, peers)

    # The client tries again: with a client_msg_id it gets the first message if that one
    # was stored, and the message is stored once; without one it sends anew.
    for sender, peer, client_msg_id, before in sends:
        retry = await world.app.send_message(sender, peer, "hi", client_msg_id)
        seqs = await stored_seqs(world, domain.conversation_id(sender, peer))
        assert retry.message.seq == seqs[-1]
        if client_msg_id:
            assert len(seqs) == before + 1
    await assert_no_drift(world, alice, peers)


async def test_sends_cut_short_by_deadlines_leave_no_drift(world: World) -> None:
    alice, friend, fan = unique("alice"), unique("friend"), unique("fan")
    await establish(world, alice, friend)
    await world.app.send_message(fan, alice, "hi!", "")
    peers = [friend, fan]
    timed_out = 0
    for n in range(40):
        timeout = 0.0005 * 1.2**n  # from well inside the first round trip to past the last
        peer = [friend, fan, unique("stranger")][n % 3]
        if peer not in peers:
            peers.append(peer)
        try:
            await asyncio.wait_for(world.app.send_message(alice, peer, f"#{n}", ""), timeout)
        except TimeoutError:
            timed_out += 1
    assert timed_out >= 5
    await assert_no_drift(world, alice, peers)


async def test_parallel_sends_cut_short_into_one_conversation_take_every_seq_once(
    world: World,
) -> None:
    alice, bob = unique("alice"), unique("bob")
    await establish(world, alice, bob)

    async def send(n: int) -> SendResult | None:
        sender, recipient = (alice, bob) if n % 2 else (bob, alice)
        try:
            return await asyncio.wait_for(
                world.app.send_message(sender, recipient, f"#{n}", ""), 0.002 * (n % 10 + 1)
            )
        except TimeoutError:
            return None

    results = await asyncio.gather(*(send(n) for n in range(30)))

    seqs = await stored_seqs(world, domain.conversation_id(alice, bob))
    assert {r.message.seq for r in results if r} <= set(seqs)
    assert len(seqs) >= 2 + sum(1 for r in results if r)
    await assert_no_drift(world, alice, [bob])


async def test_a_late_follow_up_does_not_take_the_conversation_back(world: World) -> None:
    alice, friend = unique("alice"), unique("friend")
    await establish(world, alice, friend)
    # Stopped right after its insert: what follows it is left to the relay.
    assert await stopped_send(world, "insert_message", "after", alice, friend, "")
    newer = await world.app.send_message(friend, alice, "newer", "")
    assert newer.message.seq == 4

    late = {"_id": f"{domain.conversation_id(alice, friend)}:3", **HOLDS_EVENTS}
    await eventually(lambda: is_zero(world.db["messages"].count_documents(late)))

    conversation = await world.store.get_conversation(domain.conversation_id(alice, friend))
    assert conversation is not None and conversation.last_message is not None
    assert (conversation.last_seq, conversation.last_message.text) == (4, "newer")
    assert conversation.read_seq(alice) == 3  # the late follow-up still moved alice's
    assert conversation.read_seq(friend) == 4


async def is_zero(count: Awaitable[int]) -> bool:
    return await count == 0
