"""The commands a developer runs against a running suite: `make seed` and `make follow`."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from groupchat.messaging.v1 import messaging_pb2
from groupchat.plaza.v1 import plaza_pb2

from tests.conftest import eventually
from tests.e2e.commands import doctor_finds_nothing_off, run_tool
from tools.suite import Suite

pytestmark = pytest.mark.e2e


async def test_seed_fills_the_plaza_with_linked_groups_members_and_picks(
    gateway: Any, suite: Suite
) -> None:
    seed = str(uuid.uuid4().int % 1_000_000)

    output = await run_tool(suite, "tools.seed", "--groups", "12", "--picks", "3", "--seed", seed)

    summary = dict(line.strip().rsplit(maxsplit=1) for line in output.splitlines()[1:])
    await doctor_finds_nothing_off(suite)
    assert summary["groups"] == "12"
    assert int(summary["groups linked to a post"]) > 0
    assert int(summary["joins"]) > 0 and int(summary["messages"]) > 0
    assert summary["editor picks"] == "3"
    stub, md = gateway("visitor")
    shelf = await stub.ListSelectedGroups(plaza_pb2.ListSelectedGroupsRequest(), metadata=md)
    assert sum(card.selected for card in shelf.cards) >= 3


async def test_make_follow_makes_two_users_mutual_followers(gateway: Any, suite: Suite) -> None:
    fan, star = f"fan_{uuid.uuid4().hex[:8]}", f"star_{uuid.uuid4().hex[:8]}"

    await run_tool(suite, "tools.platform", "follow", fan, star)
    await run_tool(suite, "tools.platform", "follow", star, fan)

    stub, md = gateway(fan)

    async def no_slot_used() -> bool:
        reply = await stub.SendDirectMessage(
            messaging_pb2.SendDirectMessageRequest(recipient_id=star, text="hi!"), metadata=md
        )
        return not reply.used_stranger_slot

    # The first message may arrive before the follow projection has both edges; it then
    # counts as a stranger's, and a later one does not.
    await eventually(no_slot_used)
