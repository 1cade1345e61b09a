"""A direct message's send stopped at each of its store steps, every way a step can stop,
leaves the invariants intact once a new process's relay has run: the doctor finds nothing,
each stored message was published once per participant and nothing else, stored with its
event or not at all, the day's stranger quota counts exactly the strangers whose stored
conversations charged it (a crash between charging and storing may leave a charge without
its message: never more than the limit, and a retry makes it good), and retrying the send
with its client message id stores it once.

Each test learns the send's steps from a clean run, then replays it once per step with the
fault there, on fresh users (same setup) in the test's database. The retry runs on the
process that failed, unless it crashed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from pymongo.errors import AutoReconnect

from services.kit.events import EventBus
from services.kit.outbox import Outbox
from services.kit.timestamps import now_ms
from services.messaging import domain
from services.messaging.app import MessagingApp, MessagingLimits
from services.messaging.domain import StrangerQuota, StrangerQuotaExceeded
from services.messaging.service import open_messaging
from services.messaging.storage import MessagingStore
from tests.faults.conftest import Published, service_bus
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
    task = asyncio.create_task(
        app.send_message(send.sender, send.recipient, "hi", send.client_msg_id)
    )
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
        result = await app.send_message(send.sender, send.recipient, "hi", send.client_msg_id)
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
