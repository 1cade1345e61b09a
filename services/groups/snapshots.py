"""The groups' snapshots: every group's current state, republished on request so that a
read model (the plaza) is rebuilt after the events it was built from expired (see
services/kit/snapshots.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from groupchat.events.v1 import events_pb2

from services.groups.mapping import group_to_proto, member_to_proto
from services.groups.storage import GroupsStore
from services.kit.events import new_event
from services.kit.snapshots import Snapshots

AREA = "groups"


def group_snapshots(store: GroupsStore) -> Snapshots:
    """A group_snapshot envelope per group, at the group's current version."""

    async def every_group() -> AsyncIterator[events_pb2.Envelope]:
        async for group, members, dissolved in store.every_group():
            yield new_event(
                AREA,
                "group_snapshot",
                aggregate_id=group.group_id,
                aggregate_version=group.version,
                user_id=group.owner_id,
                group_snapshot={
                    "group": group_to_proto(group),
                    "members": [member_to_proto(m) for m in members],
                    "dissolved": dissolved,
                },
            ).envelope

    return every_group
