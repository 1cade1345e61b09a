"""Users and groups for end-to-end tests, made through the gateway."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from groupchat.groups.v1 import groups_pb2 as pb


def unique(prefix: str) -> str:
    """A user id (or any id) no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def group_of(gateway: Any, owner: str, *members: str, name: str = "Night market") -> str:
    """A listed group of `owner`'s that `members` joined from the plaza; its id."""
    stub, md = gateway(owner)
    created = await stub.CreateGroup(
        pb.CreateGroupRequest(name=name, category=pb.FOOD, listed=True), metadata=md
    )
    group_id = str(created.group.group_id)

    async def join(user: str) -> None:
        stub, md = gateway(user)
        await stub.JoinGroup(pb.JoinGroupRequest(group_id=group_id, source=pb.PLAZA), metadata=md)

    await asyncio.gather(*(join(m) for m in members))
    return group_id
