"""The plaza through the gateway: a creator links a post, browsers find and join the group,
editors pick it, the creator sees where members came from."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from typing import Any

import grpc
import pytest
from groupchat.groups.v1 import groups_pb2
from groupchat.plaza.v1 import plaza_pb2 as pb

from services.kit.rpc_status import error_info
from tests.conftest import eventually
from tests.e2e.groups import unique
from tools.platform import post_event, publish
from tools.suite import ROOT, Suite

pytestmark = pytest.mark.e2e


async def create_linked_group(gateway: Any, suite: Suite, owner: str, keyword: str) -> str:
    """Publish the owner's post, then create a listed group linked to it (once the groups
    service has the post: its projection is fed over NATS)."""
    post_id = unique("post")
    await publish(
        suite.nats_url_as("platform"),
        [post_event("publish", post_id, owner, title=f"My {keyword} routine")],
    )
    stub, md = gateway(owner)
    request = groups_pb2.CreateGroupRequest(
        name=f"{keyword} club",
        description="Weekly swaps and tips",
        category=groups_pb2.MAKEUP_BEAUTY,
        listed=True,
        linked_post_id=post_id,
        request_id=post_id,
    )
    created: list[str] = []

    async def create() -> bool:
        try:
            reply = await stub.CreateGroup(request, metadata=md)
        except grpc.aio.AioRpcError as error:
            assert error_info(error).reason == "POST_NOT_FOUND"  # type: ignore[union-attr]
            return False
        created.append(reply.group.group_id)
        return True

    await eventually(create)
    return created[0]


async def search(gateway: Any, user: str, query: str) -> list[pb.GroupCard]:
    stub, md = gateway(user)
    reply = await stub.SearchGroups(pb.SearchGroupsRequest(query=query), metadata=md)
    return list(reply.cards)


async def test_a_linked_group_is_found_joined_picked_and_measured(
    gateway: Any, suite: Suite
) -> None:
    owner, browser, editor = unique("creator"), unique("browser"), unique("editor")
    keyword = f"kw{uuid.uuid4().hex[:8]}"
    group_id = await create_linked_group(gateway, suite, owner, keyword)

    async def found() -> bool:
        return bool(await search(gateway, browser, keyword))

    await eventually(found)
    (card,) = await search(gateway, browser, keyword)
    assert (card.group_id, card.owner_id, card.member_count) == (group_id, owner, 1)
    assert card.linked_post.title == f"My {keyword} routine"
    assert card.linked_post.author_id == owner

    stub, md = gateway(browser)
    await stub.JoinGroup(
        groups_pb2.JoinGroupRequest(group_id=group_id, source=groups_pb2.SEARCH), metadata=md
    )
    editor_stub, editor_md = gateway(editor, ["editor"])
    await editor_stub.SetGroupSelected(
        pb.SetGroupSelectedRequest(group_id=group_id, selected=True), metadata=editor_md
    )
    shelf = await stub.ListSelectedGroups(
        pb.ListSelectedGroupsRequest(category=groups_pb2.MAKEUP_BEAUTY, page_size=50),
        metadata=md,
    )
    assert any(c.group_id == group_id and c.selected and not c.filler for c in shelf.cards)

    owner_stub, owner_md = gateway(owner)

    async def insights() -> pb.GetGroupInsightsResponse:
        return await owner_stub.GetGroupInsights(
            pb.GetGroupInsightsRequest(group_id=group_id, days=1), metadata=owner_md
        )

    async def join_counted() -> bool:
        total = (await insights()).total
        return total.joins == 1 and total.plaza_impressions >= 2

    await eventually(join_counted)
    report = await insights()
    assert [(s.source, s.joins) for s in report.total.joins_by_source] == [(groups_pb2.SEARCH, 1)]
    assert report.total.plaza_joins == 1
    assert report.plaza_conversion == pytest.approx(1 / report.total.plaza_impressions)


async def test_a_deleted_post_leaves_the_card_and_the_group_says_so(
    gateway: Any, suite: Suite
) -> None:
    owner = unique("creator")
    keyword = f"kw{uuid.uuid4().hex[:8]}"
    group_id = await create_linked_group(gateway, suite, owner, keyword)
    stub, md = gateway(owner)
    group = (await stub.GetGroup(groups_pb2.GetGroupRequest(group_id=group_id), metadata=md)).group

    await publish(
        suite.nats_url_as("platform"), [post_event("delete", group.linked_post_id, owner)]
    )

    async def unlinked() -> bool:
        reply = await stub.GetGroup(groups_pb2.GetGroupRequest(group_id=group_id), metadata=md)
        return reply.group.unlinked_post_id == group.linked_post_id

    await eventually(unlinked)

    async def card_without_post() -> bool:
        cards = await search(gateway, owner, keyword)
        return len(cards) == 1 and not cards[0].HasField("linked_post")

    await eventually(card_without_post)


async def test_only_editors_pick_groups_and_only_admins_see_insights(
    gateway: Any, suite: Suite
) -> None:
    owner, visitor = unique("creator"), unique("visitor")
    keyword = f"kw{uuid.uuid4().hex[:8]}"
    group_id = await create_linked_group(gateway, suite, owner, keyword)
    stub, md = gateway(visitor)

    async def known_to_the_plaza() -> bool:  # the plaza learns of groups from their events
        return bool(await search(gateway, visitor, keyword))

    await eventually(known_to_the_plaza, within=30)

    with pytest.raises(grpc.aio.AioRpcError) as not_editor:
        await stub.SetGroupSelected(
            pb.SetGroupSelectedRequest(group_id=group_id, selected=True), metadata=md
        )
    with pytest.raises(grpc.aio.AioRpcError) as not_admin:
        await stub.GetGroupInsights(pb.GetGroupInsightsRequest(group_id=group_id), metadata=md)

    assert not_editor.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(not_editor.value).reason == "EDITOR_ONLY"  # type: ignore[union-attr]
    assert not_admin.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_categories_count_listed_groups(gateway: Any, suite: Suite) -> None:
    owner = unique("creator")
    stub, md = gateway(owner)
    before = await stub.ListCategories(pb.ListCategoriesRequest(), metadata=md)
    counts = {c.category: c.listed_groups for c in before.categories}
    assert len(before.categories) == len(groups_pb2.Category.values()) - 1
    names = {c.category: c.display_name for c in before.categories}
    assert names[groups_pb2.MAKEUP_BEAUTY] == "Makeup & beauty"

    await create_linked_group(gateway, suite, owner, f"kw{uuid.uuid4().hex[:8]}")

    async def counted() -> bool:
        after = await stub.ListCategories(pb.ListCategoriesRequest(), metadata=md)
        now = {c.category: c.listed_groups for c in after.categories}
        return now[groups_pb2.MAKEUP_BEAUTY] > counts[groups_pb2.MAKEUP_BEAUTY]

    await eventually(counted)


async def test_make_plaza_rebuild_ends_with_the_same_cards(gateway: Any, suite: Suite) -> None:
    owner, member, editor = unique("creator"), unique("member"), unique("editor")
    keyword = f"kw{uuid.uuid4().hex[:8]}"
    group_id = await create_linked_group(gateway, suite, owner, keyword)
    stub, md = gateway(member)
    await stub.JoinGroup(
        groups_pb2.JoinGroupRequest(group_id=group_id, source=groups_pb2.PLAZA), metadata=md
    )
    for text in ("first!", "second"):
        await stub.SendGroupMessage(
            groups_pb2.SendGroupMessageRequest(group_id=group_id, text=text), metadata=md
        )
    editor_stub, editor_md = gateway(editor, ["editor"])
    await editor_stub.SetGroupSelected(
        pb.SetGroupSelectedRequest(group_id=group_id, selected=True), metadata=editor_md
    )

    async def settled() -> bool:
        cards = await search(gateway, owner, keyword)
        return len(cards) == 1 and cards[0].messages_last_hour == 2 and cards[0].selected

    await eventually(settled)
    (before,) = await search(gateway, owner, keyword)

    rebuilt = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.plaza.rebuild",
        env={**os.environ, "NATS_URL": suite.nats_url, **suite.nats_users.env("operator")},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await rebuilt.communicate()

    assert rebuilt.returncode == 0, output.decode()
    assert "plaza read model rebuilt" in output.decode()
    (after,) = await search(gateway, owner, keyword)
    # The hot score decays with the time it is computed at; everything else is the same.
    assert after.hot_score == pytest.approx(before.hot_score, rel=1e-3)
    after.hot_score = before.hot_score
    assert after == before
