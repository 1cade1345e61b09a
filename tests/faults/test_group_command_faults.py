"""Every groups command stopped at each of its store steps, every way a step can stop (a
cancel as it is about to be sent, the store unreachable, the process killed right after the
server applied it), leaves the invariants intact once a new process's
relay has run: the doctor finds nothing, each committed change was published exactly once
and nothing else, the command took effect entirely or not at all, and retrying it works.

Each test learns a command's steps from a clean run, then replays the command once per step
with the fault there, on a fresh group and fresh users (same setup) in the test's database.
The retry runs on the process that failed, unless it crashed, so that what a fault leaves in
a living process (a lock, a cached seq) is retried through too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from groupchat.events.v1 import events_pb2
from pymongo.errors import AutoReconnect

from services.groups.app import GroupsApp
from services.groups.domain import (
    GroupNotFound,
    MemberNotFound,
    NotAllowed,
    NotAMember,
    Role,
)
from services.groups.storage import GroupsStore
from services.kit.events import EventBus
from services.kit.outbox import EVENTS_FIELD, WAITING_SINCE_FIELD, Outbox
from services.kit.posts import PostChange
from tests.faults.conftest import Published
from tests.faults.faulty import Crash, Fault, FaultKind, FaultyDatabase, Plan
from tests.faults.groups_world import (
    MESSAGE_POSTED,
    Scene,
    World,
    assert_invariants,
    build_scene,
    recover,
    settings,
)
from tools.doctor import inspect_groups

# A cancel after a step applied stops a command as a crash there does, and leaves its process
# as a cancel before the next step does: the relay's test (test_relay_faults.py) has it.
KINDS: list[FaultKind] = ["cancel_before", "error_before", "crash_after"]


# The commands


@dataclass(frozen=True)
class Snapshot:
    group: dict[str, Any] | None
    messages: list[dict[str, Any]]
    events: list[events_pb2.Envelope]


@dataclass(frozen=True)
class Case:
    name: str
    act: Callable[[GroupsApp, Scene], Awaitable[Any]]
    # Whether the stored state shows the command's effect.
    applied: Callable[[Scene, Snapshot], bool]
    # The events of the effect, in version order.
    events: tuple[str, ...]
    # What a retry may answer once the first attempt took effect.
    retry_refusals: tuple[type[Exception], ...] = ()
    solo: bool = False
    # The group the command is about, when not the scene's (a created one).
    find: Callable[[Scene], dict[str, Any]] | None = None


def member_entry(snapshot: Snapshot, user_id: str) -> dict[str, Any] | None:
    members: dict[str, Any] = (snapshot.group or {}).get("members") or {}
    return members.get(user_id)


def is_member(snapshot: Snapshot, user_id: str) -> bool:
    return member_entry(snapshot, user_id) is not None


CASES = [
    Case(
        "create_group",
        lambda app, s: app.create_group(
            s.outsider, settings("New", s.outsider_post_id), f"n{s.tag}"
        ),
        lambda s, after: after.group is not None and is_member(after, s.outsider),
        ("groups.group_created",),
        find=lambda s: {"create_key": f"{s.outsider}:n{s.tag}"},
    ),
    Case(
        "join_group",
        lambda app, s: app.join_group(s.outsider, s.group_id, 1),
        lambda s, after: is_member(after, s.outsider),
        ("groups.member_joined",),
    ),
    Case(
        "leave_group",
        lambda app, s: app.leave_group(s.member, s.group_id),
        lambda s, after: not is_member(after, s.member),
        ("groups.member_left",),
        retry_refusals=(NotAMember,),
    ),
    Case(
        "remove_member",
        lambda app, s: app.remove_member(s.owner, s.group_id, s.member, ban=False),
        lambda s, after: not is_member(after, s.member),
        ("groups.member_removed",),
        retry_refusals=(MemberNotFound,),
    ),
    Case(
        "remove_and_ban_member",
        lambda app, s: app.remove_member(s.owner, s.group_id, s.member, ban=True),
        lambda s, after: (
            not is_member(after, s.member) and s.member in (after.group or {})["banned"]
        ),
        ("groups.member_removed",),
    ),
    Case(
        "set_member_role",
        lambda app, s: app.set_member_role(s.owner, s.group_id, s.member, int(Role.ADMIN)),
        lambda s, after: (member_entry(after, s.member) or {}).get("role") == Role.ADMIN,
        ("groups.member_role_changed",),
    ),
    Case(
        "mute_member",
        lambda app, s: app.mute_member(s.owner, s.group_id, s.member, 3_600),
        lambda s, after: (member_entry(after, s.member) or {}).get("muted_until_ms", 0) > 0,
        ("groups.member_muted",),
    ),
    Case(
        "transfer_ownership",
        lambda app, s: app.transfer_ownership(s.owner, s.group_id, s.member),
        lambda s, after: (after.group or {}).get("owner_id") == s.member,
        ("groups.group_updated", "groups.member_role_changed", "groups.member_role_changed"),
        retry_refusals=(NotAllowed,),
    ),
    Case(
        "update_group",
        lambda app, s: app.update_group(s.owner, s.group_id, settings("Renamed"), ["name"]),
        lambda s, after: (after.group or {}).get("name") == "Renamed",
        ("groups.group_updated",),
    ),
    Case(
        # The platform hid the linked post: the posts consumer unlinks it from the group.
        "apply_post_change_unlinking",
        lambda app, s: app.apply_post_change(PostChange(s.post_id, s.owner, 2, False, None)),
        lambda s, after: (after.group or {}).get("unlinked_post_id") == s.post_id,
        ("groups.group_updated",),
    ),
    Case(
        "send_message",
        lambda app, s: app.send_message(s.member, s.group_id, "hi all", [], f"c2{s.tag}"),
        lambda s, after: len(after.messages) == 2,
        (MESSAGE_POSTED,),
    ),
    Case(
        "send_message_sharing_a_post_replying_to_all",
        lambda app, s: app.send_message(
            s.owner,
            s.group_id,
            "",
            [],
            f"c2{s.tag}",
            shared_post_id=s.outsider_post_id,
            reply_to_seq=1,
            mention_all=True,
        ),
        lambda s, after: len(after.messages) == 2,
        (MESSAGE_POSTED,),
    ),
    Case(
        "react_to_message",
        lambda app, s: app.conversation.react(s.member, s.group_id, 1, "👍", False),
        lambda s, after: after.messages[0].get("reactions", {}).get("👍") == [s.member],
        ("groups.group_message_changed",),
    ),
    Case(
        "recall_message",
        lambda app, s: app.conversation.recall(s.owner, s.group_id, 1),
        lambda s, after: "recall" in after.messages[0] and "text" not in after.messages[0],
        ("groups.group_message_changed",),
    ),
    Case(
        "set_announcement",
        lambda app, s: app.board.set_announcement(s.owner, s.group_id, "Tea at 5"),
        lambda s, after: (after.group or {}).get("announcement", {}).get("text") == "Tea at 5",
        ("groups.group_updated",),
    ),
    Case(
        "pin_message",
        lambda app, s: app.board.pin_message(s.owner, s.group_id, 1, False),
        lambda s, after: len((after.group or {}).get("pinned") or []) == 1,
        ("groups.group_updated",),
    ),
    Case(
        "leave_group_dissolving",
        lambda app, s: app.leave_group(s.owner, s.group_id),
        lambda s, after: bool((after.group or {}).get("dissolved")),
        ("groups.group_dissolved",),
        retry_refusals=(GroupNotFound,),
        solo=True,
    ),
]

EXPECTED_FAILURE: dict[FaultKind, type[BaseException]] = {
    "cancel_before": asyncio.CancelledError,
    "error_before": AutoReconnect,
    "crash_after": Crash,
}


# What is stored and what was published


def without_events(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in (EVENTS_FIELD, WAITING_SINCE_FIELD)}


async def snapshot(world: World, case: Case, scene: Scene) -> Snapshot:
    query = case.find(scene) if case.find else {"_id": scene.group_id}
    doc = await world.db["groups"].find_one(query)
    group_id = doc["_id"] if doc else scene.group_id
    messages = await world.db["messages"].find({"group_id": group_id}).sort("seq", 1).to_list(None)
    await world.events.settle()
    events = sorted(
        world.events.by_aggregate.get(group_id, []),
        key=lambda e: (e.type == MESSAGE_POSTED, e.aggregate_version),
    )
    return Snapshot(
        without_events(doc) if doc else None, [without_events(m) for m in messages], events
    )


# The tier


@dataclass(frozen=True)
class Stopped:
    """A process that ran a command whose store faulted: what its store saw, and the
    process itself (which lives on, unless the fault was a crash)."""

    plan: Plan
    process: tuple[GroupsApp, Outbox]


async def run_stopped(world: World, case: Case, scene: Scene, fault: Fault | None) -> Stopped:
    """Run the command on a process whose store faults at `fault`; return once nothing it
    started is still on its way to the store."""
    plan = Plan()
    app, outbox = world.app(FaultyDatabase(world.db, plan))
    await app.start()
    plan.begin(*([fault] if fault else []))
    task = asyncio.create_task(case.act(app, scene))
    plan.victim = task
    await asyncio.wait([task])
    await plan.settled()
    if fault is None:
        task.result()
    elif plan.fired:
        expected = EXPECTED_FAILURE[fault.kind]
        if expected is asyncio.CancelledError:
            assert task.cancelled(), f"{case.name} went on after a cancel at {plan.fired}"
        else:
            assert isinstance(task.exception(), expected), (plan.fired, task.exception())
    return Stopped(plan, (app, outbox))


async def assert_all_or_nothing(
    world: World, case: Case, scene: Scene, before: Snapshot, where: str
) -> None:
    after = await snapshot(world, case, scene)
    seen = {e.event_id for e in before.events}
    new = [e.type for e in after.events if e.event_id not in seen]
    if case.applied(scene, after):
        assert tuple(new) == case.events, f"{where}: applied, but published {new}"
    else:
        assert new == [], f"{where}: not applied, but published {new}"
        assert after.group == before.group, f"{where}: half applied"
        assert after.messages == before.messages, f"{where}: half applied"


async def retry(
    world: World, case: Case, scene: Scene, process: tuple[GroupsApp, Outbox], where: str
) -> None:
    app, outbox = process
    try:
        await case.act(app, scene)
    except case.retry_refusals:
        pass
    await outbox.relay_once()  # what the process's relay does next
    await assert_invariants(world)
    assert case.applied(scene, await snapshot(world, case, scene)), f"{where}: retry"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_a_command_stopped_at_any_step_leaves_no_drift(
    case: Case, kind: FaultKind, mongo_db: Any, bus: EventBus, group_events: Published
) -> None:
    world = World(mongo_db, bus, group_events)
    await GroupsStore(mongo_db).create_indexes()
    scene = await build_scene(world, case.solo)
    before = await snapshot(world, case, scene)
    steps = (await run_stopped(world, case, scene, None)).plan.ops
    await recover(world)
    await assert_invariants(world)
    # Run through, a command leaves no lease behind that no membership holds.
    assert (await inspect_groups(world.db, pending_grace_seconds=0)).notes == []
    await assert_all_or_nothing(world, case, scene, before, "clean run")
    assert case.applied(scene, await snapshot(world, case, scene))

    for at, step in enumerate(steps):
        where = f"{case.name}, {kind} at step {at} ({step})"
        scene = await build_scene(world, case.solo)
        before = await snapshot(world, case, scene)
        stopped = await run_stopped(world, case, scene, Fault(kind, at=at))
        plan = stopped.plan
        assert plan.fired == [(at, step, kind)], f"{where}: the steps changed: {plan.ops}"
        restarted = await recover(world)
        await assert_invariants(world)
        await assert_all_or_nothing(world, case, scene, before, where)
        # The client retries on the process that failed it, unless that one died (its locks
        # and caches went through the fault too).
        await retry(world, case, scene, restarted if plan.crashed else stopped.process, where)
