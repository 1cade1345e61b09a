"""A direct message's send stopped at each of its store steps, every way a step can stop,
leaves the invariants intact once a new process's relay has run: the doctor finds nothing,
each stored message was published once per participant and nothing else, stored with its
event or not at all, the day's stranger quota counts exactly the strangers whose stored
conversations charged it (a crash between charging and storing may leave a charge without
its message: never more than the limit, and a retry makes it good), and retrying the send
with its client message id stores it once. A recall stopped the same way is all or nothing:
the tombstone with its two events and the conversation's projection of it (the preview,
the recalled seqs the unread counts skip), or the message untouched and nothing published.

Each test learns the command's steps from a clean run, then replays it once per step with
the fault there, on fresh users (same setup) in the test's database. The retry runs on the
process that failed, unless it crashed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from pymongo.errors import AutoReconnect

from services.kit.events import EventBus
from services.kit.outbox import Outbox
from services.kit.posts import PostChange
from services.kit.timestamps import now_ms
from services.messaging import domain
from services.messaging.app import MessagingApp, MessagingLimits, SendResult
from services.messaging.domain import Quote, StrangerQuota, StrangerQuotaExceeded
from services.messaging.service import open_messaging
from services.messaging.storage import MessagingStore
from tests.faults.conftest import Published, published_on, service_bus
from tests.faults.faulty import Crash, Fault, FaultKind, FaultyDatabase, Plan
from tools.doctor import check_messaging, inspect_messaging
from tools.nats_users import NatsUsers

LIMITS = MessagingLimits(stranger_daily_limit=2)
KINDS: list[FaultKind] = ["cancel_before", "error_before", "crash_after"]
EXPECTED_FAILURE: dict[FaultKind, type[BaseException]] = {
    "cancel_before": asyncio.CancelledError,
    "error_before": AutoReconnect,
    "crash_after": Crash,
}


@pytest.fixture
async def bus(nats_url: str, nats_users: NatsUsers) -> AsyncIterator[EventBus]:
    """The messaging service's event bus, as its NATS user."""
    async with service_bus(nats_url, nats_users, "messaging") as bus:
        yield bus


@dataclass
class World:
    db: Any
    bus: EventBus
    events: Published
    users: set[str] = field(default_factory=set)
    # The recalls' events, for the tests of recalls.
    changed: Published = field(default_factory=Published)
    _builder: tuple[MessagingApp, Outbox] | None = None

    async def app(self, db: Any | None = None) -> tuple[MessagingApp, Outbox]:
        """A messaging process on `db` (the store itself unless given), its relay's scan
        taking every waiting event at once."""
        outbox = Outbox(self.bus, retry_after_seconds=0)
        _, app = await open_messaging(self.db if db is None else db, outbox, LIMITS)
        return app, outbox

    async def builder(self) -> MessagingApp:
        """The process that sets scenes up (not under test)."""
        if self._builder is None:
            self._builder = await self.app()
        return self._builder[0]

    async def publish_scene(self) -> None:
        """Publish what setting the scene committed."""
        await self.builder()
        assert self._builder is not None
        await self._builder[1].relay_once()

    def user(self, name: str, tag: str) -> str:
        user = f"{name}{tag}"
        self.users.add(user)
        return user


@dataclass(frozen=True)
class Send:
    sender: str
    recipient: str
    client_msg_id: str
    shared_post_id: str = ""
    reply_to_seq: int = 0

    def on(self, app: MessagingApp) -> Awaitable[SendResult]:
        return app.send_message(
            self.sender,
            self.recipient,
            "hi",
            self.client_msg_id,
            self.shared_post_id,
            self.reply_to_seq,
        )

    @property
    def conversation_id(self) -> str:
        return domain.conversation_id(self.sender, self.recipient)


# What the conversation looks like before the send, from the sender's side.


async def first_message(world: World, tag: str) -> Send:
    return Send(world.user("alice", tag), world.user("stranger", tag), f"c{tag}")


async def another_message_to_a_stranger(world: World, tag: str) -> Send:
    send = await first_message(world, tag)
    await (await world.builder()).send_message(send.sender, send.recipient, "hello?", "")
    return send


async def answer(world: World, tag: str) -> Send:
    alice, fan = world.user("alice", tag), world.user("fan", tag)
    await (await world.builder()).send_message(fan, alice, "hi!", "")
    return Send(alice, fan, f"c{tag}")


async def established(world: World, tag: str) -> Send:
    alice, friend = world.user("alice", tag), world.user("friend", tag)
    app = await world.builder()
    await app.send_message(alice, friend, "hi", "")
    await app.send_message(friend, alice, "hi back", "")
    return Send(alice, friend, f"c{tag}")


async def mutual_followers(world: World, tag: str) -> Send:
    alice, bob = world.user("alice", tag), world.user("bob", tag)
    store = MessagingStore(world.db)
    await store.apply_follow(alice, bob, True, 1)
    await store.apply_follow(bob, alice, True, 1)
    return Send(alice, bob, f"c{tag}")


async def a_reply_sharing_a_post(world: World, tag: str) -> Send:
    """Two more reads before the send is admitted: the post shared, the message quoted."""
    send = await established(world, tag)
    await MessagingStore(world.db).posts.apply(
        PostChange(f"p{tag}", send.recipient, 1, True, "Tea")
    )
    return replace(send, shared_post_id=f"p{tag}", reply_to_seq=2)


async def over_the_stranger_quota(world: World, tag: str) -> Send:
    alice = world.user("alice", tag)
    app = await world.builder()
    for n in range(LIMITS.stranger_daily_limit):
        await app.send_message(alice, world.user(f"s{n}x", tag), "hello", "")
    return Send(alice, world.user("stranger", tag), f"c{tag}")


SCENES: list[Callable[[World, str], Awaitable[Send]]] = [
    first_message,
    another_message_to_a_stranger,
    answer,
    established,
    mutual_followers,
    a_reply_sharing_a_post,
    over_the_stranger_quota,
]
# What a send from each scene answers when nothing stops it.
REFUSED: dict[str, type[Exception]] = {"over_the_stranger_quota": StrangerQuotaExceeded}


# The checks


async def stored_seqs(world: World, conversation_id: str) -> list[int]:
    docs = await world.db["messages"].find({"conversation_id": conversation_id}).to_list(None)
    return sorted(d["seq"] for d in docs)


async def assert_invariants(world: World, sender: str, exact_quota: bool) -> None:
    """The doctor's checks with no grace (so no event still waits), every stored message
    published once and nothing else, and the sender's day counting the strangers whose
    stored conversations charged it (at least, when a crash may have left a charge)."""
    assert await check_messaging(world.db, LIMITS.stranger_daily_limit, 0) == []
    await world.events.settle()
    ours = [e for e in world.events.envelopes if world.events.user_of[e.event_id] in world.users]
    assert len(ours) == len({e.event_id for e in ours}), "an event was published twice"
    # Each message is published for each of its two participants.
    published: dict[tuple[str, str], list[int]] = {}
    for event in ours:
        participant = world.events.user_of[event.event_id]
        published.setdefault((event.aggregate_id, participant), []).append(event.aggregate_version)
    stored: dict[str, list[int]] = {}
    async for doc in world.db["messages"].find({}, {"conversation_id": 1, "seq": 1}):
        stored.setdefault(doc["conversation_id"], []).append(doc["seq"])
    # The test's database holds only its own conversations.
    assert {key: sorted(s) for key, s in published.items()} == {
        (c, participant): sorted(s) for c, s in stored.items() for participant in c.split(":")
    }

    day = StrangerQuota(LIMITS.stranger_daily_limit, LIMITS.quota_zone).day(now_ms())
    charged = set()
    store = MessagingStore(world.db)
    for conversation_id in stored:
        if sender not in conversation_id.split(":"):
            continue
        last = await store.last_message(conversation_id)
        if last is not None and last.state.charged(sender, day):
            charged.add(next(u for u in conversation_id.split(":") if u != sender))
    quota = await world.db["stranger_days"].find_one({"_id": f"{sender}:{day}"}) or {}
    recipients = set(quota.get("recipients", []))
    if exact_quota:
        assert recipients == charged, (recipients, charged)
    else:
        assert recipients >= charged, (recipients, charged)


@dataclass(frozen=True)
class Before:
    seqs: list[int]
    event_ids: set[str]


async def before(world: World, send: Send) -> Before:
    await world.events.settle()
    ids = {e.event_id for e in world.events.by_aggregate.get(send.conversation_id, [])}
    return Before(await stored_seqs(world, send.conversation_id), ids)


async def assert_all_or_nothing(world: World, send: Send, was: Before, where: str) -> bool:
    """The message is stored with its event, or nothing is; whether it was stored."""
    seqs = await stored_seqs(world, send.conversation_id)
    await world.events.settle()
    new = [
        e
        for e in world.events.by_aggregate.get(send.conversation_id, [])
        if e.event_id not in was.event_ids
    ]
    if seqs == was.seqs:
        assert new == [], f"{where}: not stored, but published {new}"
        return False
    assert seqs == [*was.seqs, len(was.seqs) + 1], f"{where}: {was.seqs} -> {seqs}"
    assert sorted((e.aggregate_version, world.events.user_of[e.event_id]) for e in new) == [
        (seqs[-1], participant) for participant in sorted(send.conversation_id.split(":"))
    ], f"{where}: published {new}"
    return True


# The tier


async def recover(world: World) -> tuple[MessagingApp, Outbox]:
    """A new process on the same store: its relay finishes and publishes what was left."""
    app, outbox = await world.app()
    await outbox.relay_once()
    return app, outbox


async def run_stopped(
    world: World, send: Send, fault: Fault | None, refused: type[Exception] | None
) -> tuple[Plan, tuple[MessagingApp, Outbox]]:
    plan = Plan()
    app, outbox = await world.app(FaultyDatabase(world.db, plan))
    plan.begin(*([fault] if fault else []))
    task = asyncio.create_task(send.on(app))
    plan.victim = task
    await asyncio.wait([task])
    await plan.settled()
    if fault is None or not plan.fired:
        if refused is None:
            task.result()
        else:
            assert isinstance(task.exception(), refused), task.exception()
    elif EXPECTED_FAILURE[fault.kind] is asyncio.CancelledError:
        assert task.cancelled(), f"the send went on after a cancel at {plan.fired}"
    else:
        error = task.exception()
        assert isinstance(error, EXPECTED_FAILURE[fault.kind]), (plan.fired, error)
    return plan, (app, outbox)


async def retry(
    world: World,
    send: Send,
    process: tuple[MessagingApp, Outbox],
    refused: type[Exception] | None,
    stored: bool,
    was: Before,
    where: str,
) -> None:
    app, outbox = process
    try:
        result = await send.on(app)
    except Exception as error:
        assert refused is not None and isinstance(error, refused), f"{where}: retry: {error!r}"
        assert not stored
    else:
        assert refused is None, f"{where}: the retry was let through"
        assert result.message.seq == len(was.seqs) + 1, f"{where}: retry stored it again"
    await outbox.relay_once()
    await assert_invariants(world, send.sender, exact_quota=True)
    # Nor does the doctor see a charge left without its message, anywhere.
    assert (await inspect_messaging(world.db, LIMITS.stranger_daily_limit, 0)).notes == []
    expected = was.seqs if refused else [*was.seqs, len(was.seqs) + 1]
    assert await stored_seqs(world, send.conversation_id) == expected, f"{where}: retry"
    if send.shared_post_id and not refused:
        doc = await world.db["messages"].find_one({"_id": f"{send.conversation_id}:{expected[-1]}"})
        assert doc is not None, where
        assert (doc["shared_post"]["post_id"], doc["reply_to"]["seq"]) == (
            send.shared_post_id,
            send.reply_to_seq,
        ), where


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scene", SCENES, ids=[s.__name__ for s in SCENES])
async def test_a_send_stopped_at_any_step_leaves_no_drift(
    scene: Callable[[World, str], Awaitable[Send]],
    kind: FaultKind,
    mongo_db: Any,
    bus: EventBus,
    direct_events: Published,
) -> None:
    world = World(mongo_db, bus, direct_events)
    refused = REFUSED.get(scene.__name__)
    send = await scene(world, uuid.uuid4().hex[:8])
    await world.publish_scene()
    was = await before(world, send)
    steps = (await run_stopped(world, send, None, refused))[0].ops
    await recover(world)
    await assert_invariants(world, send.sender, exact_quota=True)
    assert await assert_all_or_nothing(world, send, was, "clean run") is (refused is None)

    for at, step in enumerate(steps):
        where = f"{scene.__name__}, {kind} at step {at} ({step})"
        send = await scene(world, uuid.uuid4().hex[:8])
        await world.publish_scene()
        was = await before(world, send)
        plan, process = await run_stopped(world, send, Fault(kind, at=at), refused)
        assert plan.fired == [(at, step, kind)], f"{where}: the steps changed: {plan.ops}"
        restarted = await recover(world)
        await assert_invariants(world, send.sender, exact_quota=not plan.crashed)
        stored = await assert_all_or_nothing(world, send, was, where)
        assert not (stored and refused), f"{where}: a refused send was stored"
        await retry(
            world, send, restarted if plan.crashed else process, refused, stored, was, where
        )


# Recalls


@pytest.fixture
async def changed_events(nats_url: str, nats_users: NatsUsers) -> AsyncIterator[Published]:
    """The recalls' direct_message_changed events, from before the test acts."""
    subject = "groupchat.messaging.direct_message_changed.*.*"
    async with published_on(nats_url, nats_users, subject) as published:
        yield published


@dataclass(frozen=True)
class Recalled:
    sender: str
    peer: str
    seq: int

    @property
    def conversation_id(self) -> str:
        return domain.conversation_id(self.sender, self.peer)

    @property
    def message_id(self) -> str:
        return f"{self.conversation_id}:{self.seq}"


async def recall_the_last_message(world: World, tag: str) -> Recalled:
    """alice shares a post in reply to her friend, who has not read it: the preview and
    the unread count both show it."""
    alice, friend = world.user("alice", tag), world.user("friend", tag)
    app = await world.builder()
    await MessagingStore(world.db).posts.apply(PostChange(f"p{tag}", friend, 1, True, "Tea"))
    await app.send_message(alice, friend, "hi", "")
    await app.send_message(friend, alice, "hi back", "")
    sent = await app.send_message(alice, friend, "look", "", f"p{tag}", 2)
    return Recalled(alice, friend, sent.message.seq)


async def recall_an_earlier_message(world: World, tag: str) -> Recalled:
    recall = await recall_the_last_message(world, tag)
    await (await world.builder()).send_message(recall.peer, recall.sender, "nice", "", "", 3)
    return recall


RECALL_SCENES: list[Callable[[World, str], Awaitable[Recalled]]] = [
    recall_the_last_message,
    recall_an_earlier_message,
]


async def is_recalled(world: World, recall: Recalled, where: str) -> bool:
    """The message is its tombstone or untouched: nothing in between."""
    doc = await world.db["messages"].find_one({"_id": recall.message_id})
    assert doc is not None, where
    if "recall" not in doc:
        assert (doc["text"], doc["version"], doc["shared_post"]["title"]) == ("look", 1, "Tea")
        return False
    assert "text" not in doc and "shared_post" not in doc, f"{where}: {doc}"
    assert (doc["version"], doc["recall"]["recalled_by"]) == (2, recall.sender), where
    return True


async def assert_recall_invariants(world: World, recall: Recalled, where: str) -> bool:
    """The doctor finds nothing; the recall is all or nothing: the tombstone, its two events
    (one per participant, each published once) and the conversation's projection of it,
    or none of them. Whether it was recalled."""
    assert await check_messaging(world.db, LIMITS.stranger_daily_limit, 0) == [], where
    done = await is_recalled(world, recall, where)
    await world.changed.settle()
    events = world.changed.by_aggregate.get(recall.conversation_id, [])
    assert len({e.event_id for e in events}) == len(events), f"{where}: published twice"
    if not done:
        assert events == [], f"{where}: not recalled, but published {events}"
    else:
        assert sorted(world.changed.user_of[e.event_id] for e in events) == sorted(
            (recall.sender, recall.peer)
        ), f"{where}: published {events}"
        assert {(e.aggregate_version, e.direct_message_changed.message.seq) for e in events} == {
            (2, recall.seq)
        }
    conversation = await MessagingStore(world.db).get_conversation(recall.conversation_id)
    assert conversation is not None and conversation.last_message is not None
    assert (recall.seq in conversation.recalled_seqs) is done, where
    # What replies quote of it is gone from storage with it.
    quoting = world.db["messages"].find(
        {"conversation_id": recall.conversation_id, "reply_to.seq": recall.seq}
    )
    async for reply in quoting:
        assert reply["reply_to"]["excerpt"] == ("" if done else "look"), where
    if (quote := conversation.last_message.reply_to) is not None and quote.seq == recall.seq:
        assert (quote.excerpt, quote.recalled) == ("", True) if done else ("look", False), where
    if conversation.last_seq == recall.seq:
        assert (conversation.last_message.recall is not None) is done, where
        assert conversation.last_message.text == ("" if done else "look"), where
    unread = range(conversation.read_seq(recall.peer) + 1, conversation.last_seq + 1)
    expected = len([seq for seq in unread if not (done and seq == recall.seq)])
    assert conversation.unread_count(recall.peer) == expected, where
    return done


async def run_stopped_recall(
    world: World, recall: Recalled, fault: Fault | None
) -> tuple[Plan, tuple[MessagingApp, Outbox]]:
    plan = Plan()
    app, outbox = await world.app(FaultyDatabase(world.db, plan))
    plan.begin(*([fault] if fault else []))
    task = asyncio.create_task(app.recall_message(recall.sender, recall.peer, recall.seq))
    plan.victim = task
    await asyncio.wait([task])
    await plan.settled()
    if fault is None or not plan.fired:
        assert task.result().version == 2
    elif EXPECTED_FAILURE[fault.kind] is asyncio.CancelledError:
        assert task.cancelled(), f"the recall went on after a cancel at {plan.fired}"
    else:
        error = task.exception()
        assert isinstance(error, EXPECTED_FAILURE[fault.kind]), (plan.fired, error)
    return plan, (app, outbox)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scene", RECALL_SCENES, ids=[s.__name__ for s in RECALL_SCENES])
async def test_a_recall_stopped_at_any_step_is_all_or_nothing(
    scene: Callable[[World, str], Awaitable[Recalled]],
    kind: FaultKind,
    mongo_db: Any,
    bus: EventBus,
    direct_events: Published,
    changed_events: Published,
) -> None:
    world = World(mongo_db, bus, direct_events, changed=changed_events)
    recall = await scene(world, uuid.uuid4().hex[:8])
    await world.publish_scene()
    steps = (await run_stopped_recall(world, recall, None))[0].ops
    await recover(world)
    assert await assert_recall_invariants(world, recall, "clean run")

    for at, step in enumerate(steps):
        where = f"{scene.__name__}, {kind} at step {at} ({step})"
        recall = await scene(world, uuid.uuid4().hex[:8])
        await world.publish_scene()
        plan, process = await run_stopped_recall(world, recall, Fault(kind, at=at))
        assert plan.fired == [(at, step, kind)], f"{where}: the steps changed: {plan.ops}"
        restarted = await recover(world)
        await assert_recall_invariants(world, recall, where)
        # The client tries again: the tombstone, committed and published once.
        app, outbox = restarted if plan.crashed else process
        tombstone = await app.recall_message(recall.sender, recall.peer, recall.seq)
        assert (tombstone.version, tombstone.text) == (2, ""), where
        await outbox.relay_once()
        assert await assert_recall_invariants(world, recall, f"{where}, retried")
        await assert_invariants(world, recall.sender, exact_quota=True)


async def test_a_reply_stored_after_the_recall_of_what_it_quotes_reads_back_recalled(
    mongo_db: Any, bus: EventBus, direct_events: Published, changed_events: Published
) -> None:
    world = World(mongo_db, bus, direct_events, changed=changed_events)
    tag = uuid.uuid4().hex[:8]
    alice, bob = world.user("alice", tag), world.user("bob", tag)
    builder = await world.builder()
    await builder.send_message(alice, bob, "a secret", "")
    await builder.send_message(bob, alice, "tell me", "")
    plan = Plan()
    app, _ = await world.app(FaultyDatabase(world.db, plan))
    # The reply has read the message it quotes and waits to be stored.
    paused = Fault("pause", op="messages.insert_one")
    plan.begin(paused)
    reply = asyncio.create_task(app.send_message(bob, alice, "re", "", "", 1))
    await paused.reached.wait()

    await builder.recall_message(alice, bob, 1)
    paused.release.set()
    sent = await reply

    assert sent.message.reply_to == Quote(1, alice, "a secret", False, "")  # as it read it
    page, _ = await builder.list_messages(bob, alice, 0, 0, 50)
    assert page[2].reply_to == Quote(1, alice, "", True, "")
    conversations = await builder.list_conversations(bob, 0, "", 10)
    assert conversations[0].last_message == page[2]
    await world.publish_scene()
    await recover(world)
    await assert_invariants(world, alice, exact_quota=True)
