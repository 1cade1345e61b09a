"""Group commands racing each other on the real store, as two processes (two app instances
on one database) or lined up with a paused store step: the rules hold whatever the order
(never a banned member, exactly one owner and a member) and the doctor finds nothing. The
cap under a thousand joins is tests/service/test_group_joins_at_capacity.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from typing import Any

import pytest

from services.groups.app import GroupsApp, GroupsLimits, lease_stamp
from services.groups.domain import DomainError, GroupLimitReached, GroupSettings, Role
from services.groups.storage import GroupsStore
from services.kit.events import EventBus
from services.kit.outbox import Outbox
from services.kit.timestamps import now_ms
from tests.faults.faulty import Fault, FaultyDatabase, Plan
from tools.doctor import check_groups

LIMITS = GroupsLimits()
ROUNDS = 15


def new_app(db: Any, bus: EventBus, limits: GroupsLimits = LIMITS) -> GroupsApp:
    return GroupsApp(GroupsStore(db), Outbox(bus, retry_after_seconds=0), limits)


async def paused_app(
    db: Any, bus: EventBus, op: str, occurrence: int = 0, limits: GroupsLimits = LIMITS
) -> tuple[GroupsApp, Fault]:
    """An app whose store pauses at the `occurrence`-th `op` until the fault is released."""
    plan = Plan()
    app = new_app(FaultyDatabase(db, plan), bus, limits)
    await app.start()
    fault = Fault("pause", op=op, occurrence=occurrence)
    plan.begin(fault)
    return app, fault


async def a_group(app: GroupsApp, capacity: int = 10, *members: str) -> tuple[str, str]:
    """A new group with its owner and `members` (their ids suffixed); (group id, owner)."""
    tag = uuid.uuid4().hex[:8]
    owner = f"owner{tag}"
    group, _ = await app.create_group(
        owner, GroupSettings("Race", "", "FOOD", "", capacity, True, ""), ""
    )
    for member in members:
        await app.join_group(member, group.group_id, 1)
    return group.group_id, owner


async def group_doc(db: Any, group_id: str) -> dict[str, Any]:
    doc = await db["groups"].find_one({"_id": group_id})
    assert doc is not None
    return dict(doc)


async def settle(*calls: Awaitable[Any]) -> list[Any]:
    """Run the calls at once; their results or the domain errors they were refused with."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, DomainError):
            raise result
    return results


@pytest.fixture
async def apps(mongo_db: Any, bus: EventBus) -> tuple[GroupsApp, GroupsApp]:
    """Two processes of the groups service on one database."""
    await GroupsStore(mongo_db).create_indexes()
    first, second = new_app(mongo_db, bus), new_app(mongo_db, bus)
    await first.start()
    await second.start()
    return first, second


# A ban racing a join of the same user


async def test_a_ban_racing_a_join_never_leaves_a_banned_member(
    apps: tuple[GroupsApp, GroupsApp], mongo_db: Any
) -> None:
    first, second = apps
    for n in range(ROUNDS):
        group_id, owner = await a_group(first)
        user = f"joiner{n}{uuid.uuid4().hex[:6]}"
        await settle(
            first.join_group(user, group_id, 1),
            second.remove_member(owner, group_id, user, ban=True),
        )
        doc = await group_doc(mongo_db, group_id)
        assert user not in doc["members"] and user in doc["banned"]
    assert await check_groups(mongo_db) == []


@pytest.mark.parametrize("paused", ["join", "ban"])
async def test_a_ban_lined_up_against_a_join_at_its_commit_never_leaves_a_banned_member(
    paused: str, apps: tuple[GroupsApp, GroupsApp], mongo_db: Any, bus: EventBus
) -> None:
    app, _ = apps
    group_id, owner = await a_group(app)
    user = f"joiner{uuid.uuid4().hex[:6]}"
    slow, fault = await paused_app(mongo_db, bus, "groups.update_one")
    join = lambda a: a.join_group(user, group_id, 1)  # noqa: E731
    ban = lambda a: a.remove_member(owner, group_id, user, ban=True)  # noqa: E731
    first, then = (join, ban) if paused == "join" else (ban, join)
    stopped = asyncio.create_task(first(slow))
    await fault.reached.wait()  # decided, about to commit
    await settle(then(app))
    fault.release.set()
    await settle(stopped)
    doc = await group_doc(mongo_db, group_id)
    assert user not in doc["members"] and user in doc["banned"]
    assert await check_groups(mongo_db) == []


# Ownership racing a removal or a leave of the new owner


def assert_one_owner_who_is_a_member(doc: dict[str, Any]) -> None:
    owners = [u for u, m in doc["members"].items() if m["role"] == Role.OWNER]
    assert owners == [doc["owner_id"]], (owners, doc["owner_id"])


async def test_a_removal_racing_a_transfer_to_the_same_member_keeps_one_owner(
    apps: tuple[GroupsApp, GroupsApp], mongo_db: Any
) -> None:
    first, second = apps
    for n in range(ROUNDS):
        admin, target = f"admin{n}{uuid.uuid4().hex[:6]}", f"target{n}{uuid.uuid4().hex[:6]}"
        group_id, owner = await a_group(first, 10, admin, target)
        await first.set_member_role(owner, group_id, admin, int(Role.ADMIN))
        await settle(
            first.remove_member(admin, group_id, target, ban=False),
            second.transfer_ownership(owner, group_id, target),
        )
        assert_one_owner_who_is_a_member(await group_doc(mongo_db, group_id))
    assert await check_groups(mongo_db) == []


async def test_a_leave_racing_a_transfer_to_the_leaver_keeps_one_owner(
    apps: tuple[GroupsApp, GroupsApp], mongo_db: Any
) -> None:
    first, second = apps
    for n in range(ROUNDS):
        target = f"target{n}{uuid.uuid4().hex[:6]}"
        group_id, owner = await a_group(first, 10, target)
        await settle(
            first.leave_group(target, group_id),
            second.transfer_ownership(owner, group_id, target),
        )
        assert_one_owner_who_is_a_member(await group_doc(mongo_db, group_id))
    assert await check_groups(mongo_db) == []


@pytest.mark.parametrize(
    ("paused", "rival"),
    [("transfer", "remove"), ("transfer", "leave"), ("remove", "transfer"), ("leave", "transfer")],
)
async def test_a_transfer_lined_up_against_losing_its_target_keeps_one_owner(
    paused: str, rival: str, apps: tuple[GroupsApp, GroupsApp], mongo_db: Any, bus: EventBus
) -> None:
    app, _ = apps
    admin, target = f"admin{uuid.uuid4().hex[:6]}", f"target{uuid.uuid4().hex[:6]}"
    group_id, owner = await a_group(app, 10, admin, target)
    await app.set_member_role(owner, group_id, admin, int(Role.ADMIN))
    commands = {
        "transfer": lambda a: a.transfer_ownership(owner, group_id, target),
        "remove": lambda a: a.remove_member(admin, group_id, target, ban=False),
        "leave": lambda a: a.leave_group(target, group_id),
    }
    slow, fault = await paused_app(mongo_db, bus, "groups.update_one")
    stopped = asyncio.create_task(commands[paused](slow))
    await fault.reached.wait()  # decided, about to commit
    await settle(commands[rival](app))
    fault.release.set()
    await settle(stopped)
    assert_one_owner_who_is_a_member(await group_doc(mongo_db, group_id))
    assert await check_groups(mongo_db) == []


# Leases racing memberships. Every membership must hold its user's lease, or the per-user
# limit can be passed: a join stamps its lease anew and a release names the stamp it
# releases, so neither a parting's late release nor a stale-lease sweep takes away the lease
# of a join that renewed it. Each race is lined up with a paused store step.


@pytest.mark.parametrize("parting", ["leave", "remove"])
async def test_a_rejoin_before_the_parting_lease_is_released_keeps_its_lease(
    parting: str, apps: tuple[GroupsApp, GroupsApp], mongo_db: Any, bus: EventBus
) -> None:
    app, _ = apps
    user = f"user{uuid.uuid4().hex[:6]}"
    group_id, owner = await a_group(app, 10, user)
    slow, fault = await paused_app(mongo_db, bus, "user_groups.update_one")
    part = (
        slow.leave_group(user, group_id)
        if parting == "leave"
        else slow.remove_member(owner, group_id, user, ban=False)
    )
    stopped = asyncio.create_task(part)
    await fault.reached.wait()  # committed; the lease release is on its way
    await app.join_group(user, group_id, 1)  # the lease is still there: reused
    fault.release.set()
    await stopped
    assert await check_groups(mongo_db) == []


async def test_a_join_reusing_an_old_lease_keeps_it_against_a_stale_lease_release(
    mongo_db: Any, bus: EventBus
) -> None:
    limits = GroupsLimits(max_groups_per_user=2)
    app = new_app(mongo_db, bus, limits)
    await GroupsStore(mongo_db).create_indexes()
    await app.start()
    (x, _), (y, _), (z, _) = [await a_group(app) for _ in range(3)]
    user = f"user{uuid.uuid4().hex[:6]}"
    # What a join of x that crashed right after taking its lease three minutes ago left.
    await GroupsStore(mongo_db).take_lease(user, x, 2, lease_stamp(now_ms() - 180_000))
    await app.join_group(user, y, 1)  # the user is at the limit
    slow, fault = await paused_app(mongo_db, bus, "groups.update_one", limits=limits)
    stopped = asyncio.create_task(slow.join_group(user, x, 1))
    await fault.reached.wait()  # renewed x's old lease, about to commit
    with pytest.raises(GroupLimitReached):  # x's lease is fresh again: not released as stale
        await app.join_group(user, z, 1)
    fault.release.set()
    await stopped
    assert await check_groups(mongo_db) == []
    mine = await app.list_my_groups(user, None, 10)
    assert sorted(c.group.group_id for c in mine) == sorted([x, y])


# Reactions and the recall: one write per change, conditional on the message's version


async def test_two_processes_reacting_at_once_count_every_reactor_once(
    apps: tuple[GroupsApp, GroupsApp],
) -> None:
    first, second = apps
    reactors = [f"r{n}-{uuid.uuid4().hex[:6]}" for n in range(40)]
    group_id, owner = await a_group(first, 50, *reactors)
    message = await first.send_message(owner, group_id, "react", [], "")
    await settle(
        *(
            app.conversation.react(user, group_id, message.seq, emoji, False)
            for n, user in enumerate(reactors)
            for app, emoji in ((first, "👍"), (second, "👍"), (second if n % 2 else first, "🔥"))
        )
    )
    stored = await first.conversation.react(reactors[0], group_id, message.seq, "👍", False)
    assert sorted(stored.reactions["👍"]) == sorted(reactors)
    assert sorted(stored.reactions["🔥"]) == sorted(reactors)
    assert stored.version == 1 + 2 * len(reactors)


async def test_reactions_racing_a_recall_leave_a_bare_tombstone(
    apps: tuple[GroupsApp, GroupsApp], mongo_db: Any
) -> None:
    first, second = apps
    reactors = [f"r{n}-{uuid.uuid4().hex[:6]}" for n in range(20)]
    group_id, owner = await a_group(first, 30, *reactors)
    message = await first.send_message(owner, group_id, "react", [], "")
    reactions = [
        (first if n % 2 else second).conversation.react(user, group_id, message.seq, "👍", False)
        for n, user in enumerate(reactors)
    ]
    outcomes = await settle(
        *reactions[:10], second.conversation.recall(owner, group_id, message.seq), *reactions[10:]
    )
    tombstone = await first.conversation.recall(owner, group_id, message.seq)
    assert tombstone.recall is not None and tombstone.reactions == {}
    reacted = sum(not isinstance(o, DomainError) for o in outcomes) - 1
    # Each reaction before the recall moved the version once, the recall once; those after
    # it were refused.
    assert tombstone.version == 1 + reacted + 1
    assert await check_groups(mongo_db) == []
