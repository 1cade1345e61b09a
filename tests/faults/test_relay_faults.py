"""The relay stopped at each of its steps (its scan, the follow-ups it finishes, the clearing
of what it published), every way a step can stop, and then a new process's relay: every
committed event is published and stored in JetStream exactly once, nothing else is, no
document keeps its events, and what a stopped send left is finished. A relay stopped after
publishing but before clearing publishes again; JetStream drops the repeat by event id."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pymongo.errors import AutoReconnect

from services.groups.storage import GroupsStore
from services.kit.events import EventBus
from tests.faults.conftest import Published
from tests.faults.faulty import Crash, Fault, FaultKind, FaultyDatabase, Plan
from tests.faults.groups_world import Scene, World, assert_invariants, build_scene, recover

KINDS: list[FaultKind] = ["cancel_before", "error_before", "cancel_after", "crash_after"]


async def leave_events_waiting(world: World, scene: Scene) -> None:
    """A join killed right after its commit and a send killed right after its insert: a
    group and a message holding events, the message not finished yet."""
    stopped = [
        (lambda app: app.join_group(scene.outsider, scene.group_id, 1), "groups.update_one"),
        (
            lambda app: app.send_message(scene.member, scene.group_id, "hi", [], "c"),
            "messages.insert_one",
        ),
    ]
    for act, op in stopped:
        plan = Plan()
        app, _ = world.app(FaultyDatabase(world.db, plan))
        await app.start()
        plan.begin(Fault("crash_after", op=op))
        with pytest.raises(Crash):
            await act(app)
        await plan.settled()


async def stored_in_stream(jetstream: Any, group_id: str) -> int:
    info = await jetstream.stream_info(
        "GROUPCHAT_GROUPS", subjects_filter=f"groupchat.groups.*.{group_id}.*"
    )
    return sum((info.state.subjects or {}).values())


async def stopped_relay(world: World, fault: Fault | None) -> Plan:
    plan = Plan()
    app, outbox = world.app(FaultyDatabase(world.db, plan))
    await app.start()
    plan.begin(*([fault] if fault else []))
    task = asyncio.create_task(outbox.relay_once())
    plan.victim = task
    await asyncio.wait([task])
    await plan.settled()
    if fault is None:
        assert task.result() == 2  # member_joined and group_message_posted
    elif task.cancelled():
        assert fault.kind in ("cancel_before", "cancel_after")
    else:
        assert isinstance(task.exception(), AutoReconnect | Crash), task.exception()
    return plan


@pytest.mark.parametrize("kind", KINDS)
async def test_a_relay_stopped_at_any_step_still_publishes_each_event_once(
    kind: FaultKind, mongo_db: Any, bus: EventBus, group_events: Published, jetstream: Any
) -> None:
    world = World(mongo_db, bus, group_events)
    await GroupsStore(mongo_db).create_indexes()
    scene = await build_scene(world, solo=False)
    await leave_events_waiting(world, scene)
    steps = (await stopped_relay(world, None)).ops
    await assert_invariants(world)

    for at, step in enumerate(steps):
        where = f"relay, {kind} at step {at} ({step})"
        scene = await build_scene(world, solo=False)
        await leave_events_waiting(world, scene)
        plan = await stopped_relay(world, Fault(kind, at=at))
        assert plan.fired == [(at, step, kind)], f"{where}: the steps changed: {plan.ops}"
        await recover(world)
        await assert_invariants(world, republished=True)
        group = await mongo_db["groups"].find_one({"_id": scene.group_id})
        messages = await mongo_db["messages"].count_documents({"group_id": scene.group_id})
        assert messages == 2
        # Every change and message once in the stream, however often the relays published.
        assert await stored_in_stream(jetstream, scene.group_id) == group["version"] + messages
