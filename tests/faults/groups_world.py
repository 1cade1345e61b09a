"""The world the groups fault tests act in: the store, NATS and the events seen there, a
scene (a group with members and a message) built fresh for each stopped command, a new
process's relay to recover with, and the invariants asserted after it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from groupchat.events.v1 import events_pb2

from services.groups.app import GroupsApp, GroupsLimits
from services.groups.domain import GroupSettings
from services.groups.mapping import message_to_proto
from services.groups.storage import GroupsStore, message_from_doc
from services.kit.events import EventBus
from services.kit.outbox import Outbox
from services.kit.posts import PostChange
from tests.faults.conftest import Published
from tools.doctor import check_groups

LIMITS = GroupsLimits()
MESSAGE_POSTED = "groups.group_message_posted"
# Versioned by the message (its version), not the group.
MESSAGE_CHANGED = "groups.group_message_changed"


@dataclass
class World:
    db: Any
    bus: EventBus
    events: Published
    users: set[str] = field(default_factory=set)
    # The process that builds scenes (not under test), started on first use.
    _builder: tuple[GroupsApp, Outbox] | None = None

    def app(self, db: Any | None = None) -> tuple[GroupsApp, Outbox]:
        """A groups process on `db` (the store itself unless given): its relay's scan takes
        every waiting event at once."""
        outbox = Outbox(self.bus, retry_after_seconds=0)
        return GroupsApp(GroupsStore(self.db if db is None else db), outbox, LIMITS), outbox


@dataclass(frozen=True)
class Scene:
    """A group (`owner` and `member`, one message, the owner's post linked), and `outsider`,
    who is in no group and has a post of their own; or, `solo`, a group of its owner alone."""

    tag: str
    group_id: str
    owner: str
    member: str
    outsider: str
    post_id: str
    outsider_post_id: str


def settings(name: str, post_id: str = "", capacity: int = 10) -> GroupSettings:
    return GroupSettings(name, "", "FOOD", "", capacity, True, post_id)


async def build_scene(world: World, solo: bool) -> Scene:
    tag = uuid.uuid4().hex[:8]
    owner, member, outsider = f"o{tag}", f"m{tag}", f"u{tag}"
    world.users |= {owner, member, outsider}
    if world._builder is None:
        world._builder = world.app()
        await world._builder[0].start()
    app, outbox = world._builder
    post_id = f"p{tag}"
    store = GroupsStore(world.db)
    await store.posts.apply(PostChange(post_id, owner, 1, True, "Tea"))
    await store.posts.apply(PostChange(f"{post_id}u", outsider, 1, True, "Coffee"))
    group, _ = await app.create_group(owner, settings("Tea", post_id), f"r{tag}")
    if not solo:
        await app.join_group(member, group.group_id, 1)
        await app.send_message(owner, group.group_id, "hello", [], f"c{tag}")
    await outbox.relay_once()
    return Scene(tag, group.group_id, owner, member, outsider, post_id, f"{post_id}u")


# After a fault


async def recover(world: World) -> tuple[GroupsApp, Outbox]:
    """A new process on the same store: its relay finishes and publishes what was left."""
    app, outbox = world.app()
    await app.start()
    await outbox.relay_once()
    return app, outbox


async def assert_invariants(world: World, republished: bool = False) -> None:
    """What must hold of the whole database once the relay ran: the doctor's checks, no
    event left waiting, and on NATS exactly the committed changes' events, each once (or,
    `republished`, at least once: a relay stopped between publishing and clearing publishes
    again, which JetStream drops by event id but a core subscriber sees)."""
    # With no grace, any event still waiting in a document is a problem too.
    assert await check_groups(world.db, pending_grace_seconds=0) == []
    await world.events.settle()
    ours = [e for e in world.events.envelopes if world.events.user_of[e.event_id] in world.users]
    unique = {e.event_id: e for e in ours}
    if not republished:
        assert len(ours) == len(unique), "an event was published twice"
    groups = {
        doc["_id"]: doc["version"] async for doc in world.db["groups"].find({}, {"version": 1})
    }
    messages = {(doc["group_id"], doc["seq"]): doc async for doc in world.db["messages"].find({})}
    published: dict[str, list[events_pb2.Envelope]] = {}
    for event in unique.values():
        assert event.aggregate_id in groups, f"{event.type} of a group never committed"
        published.setdefault(event.aggregate_id, []).append(event)
    for group_id, version in groups.items():
        events = published.get(group_id, [])
        changes = sorted(
            e.aggregate_version for e in events if e.type not in (MESSAGE_POSTED, MESSAGE_CHANGED)
        )
        # The version moves by one per event: versions 1..version, each once, is every
        # committed change published and nothing else.
        assert changes == list(range(1, version + 1)), (group_id, changes, version)
        posted = sorted(e.aggregate_version for e in events if e.type == MESSAGE_POSTED)
        assert posted == sorted(seq for g, seq in messages if g == group_id), (group_id, posted)
    changed: dict[tuple[str, int], list[events_pb2.Envelope]] = {}
    for event in unique.values():
        if event.type == MESSAGE_CHANGED:
            key = (event.aggregate_id, event.group_message_changed.message.seq)
            changed.setdefault(key, []).append(event)
    for key, doc in messages.items():
        events = sorted(changed.get(key, []), key=lambda e: e.aggregate_version)
        # A message's changes likewise: versions 2..version, and the newest carries the
        # message as stored (its reaction counts the reactors, its tombstone).
        assert [e.aggregate_version for e in events] == list(range(2, doc["version"] + 1)), key
        if events:
            stored = message_to_proto(message_from_doc(doc))
            assert events[-1].group_message_changed.message == stored, key
    async for activity in world.db["group_activity"].find({}):
        # A recall is finished too: the group knows its recalled seqs (unread counts skip
        # them), and shows the tombstone when the recalled message is its last.
        group_id = activity["_id"]
        recalled = {seq for (g, seq), doc in messages.items() if g == group_id and "recall" in doc}
        assert set(activity.get("recalled") or ()) == recalled, group_id
        last = messages[(group_id, activity["last_seq"])]
        assert ("recall" in activity["last_message"]) == ("recall" in last), group_id
