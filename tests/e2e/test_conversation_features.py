"""What people do in a conversation, through the gateway's stubs and its Subscribe stream:
share a post, reply, react, recall, announce, pin, mention everyone; and what the creator
sees of it in the funnel."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import grpc
import pytest
from groupchat.content.v1 import content_pb2
from groupchat.events.v1 import events_pb2
from groupchat.gateway.v1 import gateway_pb2
from groupchat.groups.v1 import groups_pb2 as pb
from groupchat.messaging.v1 import messaging_pb2
from groupchat.plaza.v1 import plaza_pb2

from services.kit.rpc_status import error_info
from tests.conftest import eventually
from tests.e2e.conftest import RECALL_WINDOW_SECONDS
from tests.e2e.groups import group_of, unique
from tests.e2e.streams import OpenStream, open_stream
from tools.platform import post_event, publish
from tools.suite import Suite

pytestmark = pytest.mark.e2e

THUMBS_UP = "\N{THUMBS UP SIGN}"


async def send(gateway: Any, user: str, group_id: str, **fields: Any) -> pb.GroupMessage:
    stub, md = gateway(user)
    fields.setdefault("client_msg_id", uuid.uuid4().hex)
    reply = await stub.SendGroupMessage(
        pb.SendGroupMessageRequest(group_id=group_id, **fields), metadata=md
    )
    return reply.message


async def history(gateway: Any, user: str, group_id: str) -> list[pb.GroupMessage]:
    stub, md = gateway(user)
    page = await stub.ListGroupMessages(pb.ListGroupMessagesRequest(group_id=group_id), metadata=md)
    return list(page.messages)


async def published_post(suite: Suite, gateway: Any, author: str, title: str) -> str:
    """A post the platform published, once the groups service knows it."""
    post_id = unique("post")
    await publish(
        suite.nats_url_as("platform"),
        [post_event("publish", post_id, author, title=title, cover_url="https://c/x.png")],
    )
    return post_id


async def refused(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    info = error_info(caught.value)
    return caught.value.code(), info.reason if info else ""


def changes(stream: OpenStream) -> list[Any]:
    return [e.group_message_changed for e in stream.of_type("group_message_changed")]


async def test_a_shared_post_carries_its_card_until_its_author_removes_it(
    suite: Suite, gateway: Any
) -> None:
    owner, member, author = unique("owner"), unique("member"), unique("author")
    group_id = await group_of(gateway, owner, member, name="Tea lovers")
    post_id = await published_post(suite, gateway, author, "Matcha at home")
    stream = await open_stream(*gateway(owner))
    try:

        async def share() -> pb.GroupMessage | None:
            try:
                return await send(gateway, member, group_id, shared_post_id=post_id)
            except grpc.aio.AioRpcError as error:
                info = error_info(error)
                assert info is not None and info.reason == "POST_NOT_FOUND", error
                return None

        shared: list[pb.GroupMessage] = []
        await eventually(lambda: _appended(shared, share()), 20)
        card = shared[0].shared_post
        assert (card.post_id, card.title, card.author_id) == (post_id, "Matcha at home", author)
        await eventually(lambda: len(stream.of_type("group_message_posted")) == 1, 20)
        pushed = stream.of_type("group_message_posted")[0].group_message_posted.message
        assert pushed.shared_post.title == "Matcha at home"

        stub, md = gateway(owner)
        opened = await stub.OpenSharedPost(
            content_pb2.OpenSharedPostRequest(group_id=group_id, seq=shared[0].seq), metadata=md
        )
        assert opened.post_id == post_id

        await publish(suite.nats_url_as("platform"), [post_event("hide", post_id, author)])

        async def shown_removed() -> bool:
            (message,) = await history(gateway, owner, group_id)
            return message.shared_post.removed and not message.shared_post.title

        await eventually(shown_removed, 20)
    finally:
        await stream.close()


async def _appended(into: list[Any], attempt: Any) -> bool:
    result = await attempt
    if result is not None:
        into.append(result)
    return result is not None


async def test_a_reply_quotes_the_message_and_a_reply_to_nothing_is_invalid(
    gateway: Any,
) -> None:
    owner, member = unique("owner"), unique("member")
    group_id = await group_of(gateway, owner, member, name="Tea lovers")
    first = await send(gateway, owner, group_id, text="Who brings the kettle on Sunday?")

    reply = await send(gateway, member, group_id, text="Me!", reply_to_seq=first.seq)

    assert reply.reply_to.seq == first.seq
    assert reply.reply_to.sender_id == owner
    assert reply.reply_to.excerpt == "Who brings the kettle on Sunday?"
    code, _ = await refused(send(gateway, member, group_id, text="?", reply_to_seq=99))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_hundred_members_reacting_at_once_are_counted_exactly(gateway: Any) -> None:
    owner = unique("owner")
    members = [unique("m") for _ in range(100)]
    group_id = await group_of(gateway, owner, *members, name="Tea lovers")
    message = await send(gateway, owner, group_id, text="Our first tasting is on Saturday")
    stream = await open_stream(*gateway(owner))
    try:

        async def react(user: str) -> None:
            stub, md = gateway(user)
            request = pb.ReactToGroupMessageRequest(
                group_id=group_id, seq=message.seq, emoji=THUMBS_UP
            )
            await stub.ReactToGroupMessage(request, metadata=md)
            await stub.ReactToGroupMessage(request, metadata=md)  # again: still one

        await asyncio.gather(*(react(m) for m in members))

        (stored,) = await history(gateway, members[0], group_id)
        assert [(r.emoji, r.count, r.mine) for r in stored.reactions] == [(THUMBS_UP, 100, True)]
        (as_owner,) = await history(gateway, owner, group_id)
        assert [(r.count, r.mine) for r in as_owner.reactions] == [(100, False)]
        assert stored.version == 101
        # Every change reached the stream, with the whole message and its version.
        await eventually(lambda: len(changes(stream)) == 100, 30)
        assert sorted(c.message.version for c in changes(stream)) == list(range(2, 102))
        assert {c.actor_id for c in changes(stream)} == set(members)
    finally:
        await stream.close()


async def test_a_sender_recalls_within_the_window_and_not_after(gateway: Any) -> None:
    owner, member = unique("owner"), unique("member")
    group_id = await group_of(gateway, owner, member, name="Tea lovers")
    stream = await open_stream(*gateway(owner))
    stub, md = gateway(member)
    try:
        oops = await send(gateway, member, group_id, text="my phone number is ...")
        recalled = await stub.RecallGroupMessage(
            pb.RecallGroupMessageRequest(group_id=group_id, seq=oops.seq), metadata=md
        )
        assert recalled.message.recall.recalled_by == member
        assert not recalled.message.recall.moderation
        assert recalled.message.text == ""
        await eventually(lambda: len(changes(stream)) == 1, 20)
        pushed = changes(stream)[0]
        assert pushed.change == events_pb2.RECALLED and pushed.actor_id == member
        assert pushed.message.text == ""

        late = await send(gateway, member, group_id, text="too late to take back")
        await asyncio.sleep(  # the window is wall-clock time: wait it out
            max(0.0, late.sent_at.ToMilliseconds() / 1000 + RECALL_WINDOW_SECONDS - time.time())
            + 0.5
        )
        code, reason = await refused(
            stub.RecallGroupMessage(
                pb.RecallGroupMessageRequest(group_id=group_id, seq=late.seq), metadata=md
            )
        )
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "RECALL_WINDOW_PASSED")
        messages = await history(gateway, owner, group_id)
        assert [(m.text, m.HasField("recall")) for m in messages] == [
            ("", True),
            ("too late to take back", False),
        ]
    finally:
        await stream.close()


async def test_an_admin_removes_a_members_message_on_the_record(gateway: Any) -> None:
    owner, admin, member = unique("owner"), unique("admin"), unique("member")
    group_id = await group_of(gateway, owner, admin, member, name="Tea lovers")
    stub, md = gateway(owner)
    await stub.SetMemberRole(
        pb.SetMemberRoleRequest(group_id=group_id, user_id=admin, role=pb.ADMIN), metadata=md
    )
    spam = await send(gateway, member, group_id, text="cheap followers, DM me")
    reader = unique("reader")
    stub_r, md_r = gateway(reader)
    await stub_r.JoinGroup(pb.JoinGroupRequest(group_id=group_id), metadata=md_r)

    stub, md = gateway(admin)
    removed = await stub.RecallGroupMessage(
        pb.RecallGroupMessageRequest(group_id=group_id, seq=spam.seq), metadata=md
    )

    assert removed.message.recall.recalled_by == admin
    assert removed.message.recall.moderation
    (shown,) = await history(gateway, member, group_id)
    assert (shown.text, shown.recall.recalled_by, shown.recall.moderation) == ("", admin, True)
    # A member may not recall someone else's message.
    code, _ = await refused(
        gateway(reader)[0].RecallGroupMessage(
            pb.RecallGroupMessageRequest(group_id=group_id, seq=spam.seq), metadata=md_r
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_announcements_and_pins_reach_members_and_the_plaza(gateway: Any) -> None:
    owner, member = unique("owner"), unique("member")
    group_id = await group_of(gateway, owner, member, name="Tea lovers")
    first = await send(gateway, owner, group_id, text="House rules: be kind")
    stream = await open_stream(*gateway(member))
    stub, md = gateway(owner)
    try:
        await stub.SetGroupAnnouncement(
            pb.SetGroupAnnouncementRequest(group_id=group_id, text="Tasting on Saturday 3pm"),
            metadata=md,
        )
        pinned = await stub.PinGroupMessage(
            pb.PinGroupMessageRequest(group_id=group_id, seq=first.seq), metadata=md
        )
        assert [p.message.seq for p in pinned.group.pinned] == [first.seq]

        got = await gateway(member)[0].GetGroup(
            pb.GetGroupRequest(group_id=group_id), metadata=gateway(member)[1]
        )
        assert got.group.announcement.text == "Tasting on Saturday 3pm"
        assert got.group.announcement.set_by == owner
        assert [p.message.text for p in got.group.pinned] == ["House rules: be kind"]

        def announced() -> bool:
            return any(
                e.group_updated.group.announcement.text == "Tasting on Saturday 3pm"
                for e in stream.of_type("group_updated")
            )

        await eventually(announced, 20)

        async def on_the_card() -> bool:
            page = await stub.SearchGroups(
                plaza_pb2.SearchGroupsRequest(query="Tea lovers"), metadata=md
            )
            return any(
                c.group_id == group_id and c.announcement == "Tasting on Saturday 3pm"
                for c in page.cards
            )

        await eventually(on_the_card, 20)

        await stub.SetGroupAnnouncement(
            pb.SetGroupAnnouncementRequest(group_id=group_id, text=""), metadata=md
        )
        cleared = await stub.GetGroup(pb.GetGroupRequest(group_id=group_id), metadata=md)
        assert not cleared.group.HasField("announcement")
    finally:
        await stream.close()


async def test_mentioning_everyone_is_for_admins_and_counts_in_the_messages_tab(
    gateway: Any,
) -> None:
    owner, member = unique("owner"), unique("member")
    group_id = await group_of(gateway, owner, member, name="Tea lovers")

    by_member = send(gateway, member, group_id, text="@all", mention_all=True)
    code, reason = await refused(by_member)
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "NOT_ALLOWED")
    await send(gateway, owner, group_id, text="@all meetup moved to 4pm", mention_all=True)
    await send(gateway, owner, group_id, text=f"@{member} can you bring cups?", mentions=[member])
    await send(gateway, owner, group_id, text="thanks all")

    stub, md = gateway(member)
    tab = await stub.ListConversations(gateway_pb2.ListConversationsRequest(), metadata=md)
    row = next(c for c in tab.conversations if c.group.group.group_id == group_id)
    assert (row.unread_count, row.mention_count) == (3, 2)

    code, reason = await refused(
        send(gateway, owner, group_id, text="@all again", mention_all=True)
    )
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MENTION_ALL_RATE_LIMITED")


async def test_a_direct_message_shares_replies_and_is_recalled_on_both_sides(
    suite: Suite, gateway: Any
) -> None:
    alice, bob, author = unique("alice"), unique("bob"), unique("author")
    post_id = await published_post(suite, gateway, author, "Weekend hike")
    bobs = await open_stream(*gateway(bob))
    stub, md = gateway(alice)
    try:
        hello = await stub.SendDirectMessage(
            messaging_pb2.SendDirectMessageRequest(recipient_id=bob, text="look at this trail"),
            metadata=md,
        )

        async def share() -> bool:
            try:
                sent = await stub.SendDirectMessage(
                    messaging_pb2.SendDirectMessageRequest(
                        recipient_id=bob, shared_post_id=post_id, reply_to_seq=hello.message.seq
                    ),
                    metadata=md,
                )
            except grpc.aio.AioRpcError as error:
                info = error_info(error)
                assert info is not None and info.reason == "POST_NOT_FOUND", error
                return False
            assert sent.message.shared_post.title == "Weekend hike"
            assert sent.message.reply_to.excerpt == "look at this trail"
            return True

        await eventually(share, 20)
        recalled = await stub.RecallDirectMessage(
            messaging_pb2.RecallDirectMessageRequest(peer_id=bob, seq=hello.message.seq),
            metadata=md,
        )
        assert recalled.message.recall.recalled_by == alice

        def told() -> bool:
            return any(
                e.direct_message_changed.message.seq == hello.message.seq
                for e in bobs.of_type("direct_message_changed")
            )

        await eventually(told, 20)
        page = await gateway(bob)[0].ListDirectMessages(
            messaging_pb2.ListDirectMessagesRequest(peer_id=alice), metadata=gateway(bob)[1]
        )
        assert [(m.text, m.HasField("recall")) for m in page.messages] == [("", True), ("", False)]
        assert page.messages[1].reply_to.recalled
    finally:
        await bobs.close()


async def test_the_creator_sees_the_funnel_of_their_group(suite: Suite, gateway: Any) -> None:
    owner, visitor, member = unique("owner"), unique("visitor"), unique("member")
    group_id = await group_of(gateway, owner, name="Tea lovers")
    own_post = await published_post(suite, gateway, owner, "My matcha recipe")
    v_stub, v_md = gateway(visitor)
    await v_stub.GetGroup(pb.GetGroupRequest(group_id=group_id), metadata=v_md)  # a card view
    await v_stub.JoinGroup(pb.JoinGroupRequest(group_id=group_id, source=pb.PLAZA), metadata=v_md)
    m_stub, m_md = gateway(member)
    await m_stub.JoinGroup(pb.JoinGroupRequest(group_id=group_id, source=pb.POST), metadata=m_md)

    async def shared() -> pb.GroupMessage | None:
        try:
            return await send(gateway, owner, group_id, text="try it", shared_post_id=own_post)
        except grpc.aio.AioRpcError:
            return None

    messages: list[pb.GroupMessage] = []
    await eventually(lambda: _appended(messages, shared()), 20)
    await send(gateway, visitor, group_id, text="will do!")
    for user in (visitor, member):
        stub, md = gateway(user)
        await stub.OpenSharedPost(
            content_pb2.OpenSharedPostRequest(group_id=group_id, seq=messages[0].seq), metadata=md
        )

    stub, md = gateway(owner)

    async def funnel_complete() -> bool:
        insights = await stub.GetGroupInsights(
            plaza_pb2.GetGroupInsightsRequest(group_id=group_id, days=1), metadata=md
        )
        total = insights.total
        return (
            total.card_views,
            total.joins,
            total.active_members,
            total.posts_shared,
            total.own_posts_shared,
            total.shared_post_opens,
            total.own_post_opens,
        ) == (1, 2, 2, 1, 1, 2, 2)

    await eventually(funnel_complete, 30)
    insights = await stub.GetGroupInsights(
        plaza_pb2.GetGroupInsightsRequest(group_id=group_id, days=1), metadata=md
    )
    assert insights.time_zone == "Asia/Shanghai"
    assert insights.total.funnel.join_rate == 2.0  # two joins from one card view
    assert insights.total.funnel.open_rate == 2.0
    assert [(p.post_id, p.own, p.shares, p.opens) for p in insights.posts] == [
        (own_post, True, 1, 2)
    ]
    mine = await stub.ListMyGroupInsights(plaza_pb2.ListMyGroupInsightsRequest(days=1), metadata=md)
    assert [g.group_id for g in mine.groups] == [group_id]
    assert mine.own_post_opens == 2
