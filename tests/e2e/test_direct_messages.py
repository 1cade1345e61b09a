"""Direct messages and the Messages tab through the gateway, with the suite as processes."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from groupchat.gateway.v1 import gateway_pb2
from groupchat.groups.v1 import groups_pb2
from groupchat.messaging.v1 import messaging_pb2 as pb

from services.kit.rpc_status import error_info
from tests.conftest import eventually
from tests.e2e.groups import unique
from tests.e2e.streams import open_stream
from tools.platform import follow_event, publish
from tools.suite import Suite

pytestmark = pytest.mark.e2e


async def send(gateway: Any, sender: str, recipient: str, text: str, **fields: Any) -> Any:
    stub, md = gateway(sender)
    return await stub.SendDirectMessage(
        pb.SendDirectMessageRequest(recipient_id=recipient, text=text, **fields), metadata=md
    )


async def quota(gateway: Any, user: str) -> pb.GetStrangerQuotaResponse:
    stub, md = gateway(user)
    return await stub.GetStrangerQuota(pb.GetStrangerQuotaRequest(), metadata=md)


async def test_a_direct_message_reaches_the_recipients_open_stream(gateway: Any) -> None:
    alice, bob = unique("alice"), unique("bob")
    stub, md = gateway(bob)
    stream = await open_stream(stub, md)
    try:
        sent = await send(gateway, alice, bob, "hi bob, loved your matcha post")

        await eventually(lambda: bool(stream.of_type("direct_message_sent")))
        (event,) = stream.of_type("direct_message_sent")
        assert event.direct_message_sent.message.text == "hi bob, loved your matcha post"
        assert event.direct_message_sent.message.seq == sent.message.seq == 1
        assert event.direct_message_sent.is_request
    finally:
        await stream.close()


async def test_the_sixth_stranger_of_the_day_is_refused_with_quota_details(gateway: Any) -> None:
    sender = unique("sender")
    strangers = [unique("stranger") for _ in range(6)]
    for stranger in strangers[:5]:
        await send(gateway, sender, stranger, "hello there")

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send(gateway, sender, strangers[5], "hello there")

    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(refused.value)
    assert info is not None and info.reason == "STRANGER_QUOTA_EXCEEDED"
    assert info.metadata["resets_at"]
    left = await quota(gateway, sender)
    assert (left.limit, left.used, left.remaining) == (5, 5, 0)
    # Writing again to a stranger already started today uses no further slot.
    await send(gateway, sender, strangers[0], "one more thing")


async def test_twenty_parallel_first_messages_start_exactly_five_conversations(
    gateway: Any,
) -> None:
    sender = unique("spammer")
    results = await asyncio.gather(
        *(send(gateway, sender, unique("target"), "hi") for _ in range(20)),
        return_exceptions=True,
    )

    sent = [r for r in results if isinstance(r, pb.SendDirectMessageResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert (len(sent), len(refused)) == (5, 15)
    assert {error_info(r).reason for r in refused} == {"STRANGER_QUOTA_EXCEEDED"}  # type: ignore[union-attr]


async def test_mutual_followers_are_not_strangers(gateway: Any, suite: Suite) -> None:
    fan, star = unique("fan"), unique("star")
    await publish(suite.nats_url_as("platform"), [follow_event(fan, star), follow_event(star, fan)])
    others = [unique("stranger") for _ in range(5)]
    for other in others:
        await send(gateway, fan, other, "hi")

    async def star_is_reachable() -> bool:
        try:
            reply = await send(gateway, fan, star, "hey, mutual!", client_msg_id="mutual-1")
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False
        return not reply.used_stranger_slot

    # The follow projection is fed over NATS: wait until it has both edges.
    await eventually(star_is_reachable)


async def test_an_answer_lifts_the_unanswered_limit(gateway: Any) -> None:
    alice, bob = unique("alice"), unique("bob")
    for n in range(3):
        await send(gateway, alice, bob, f"message {n}")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send(gateway, alice, bob, "are you there?")
    assert error_info(refused.value).reason == "AWAITING_REPLY"  # type: ignore[union-attr]

    await send(gateway, bob, alice, "hi! sorry, busy week")
    reply = await send(gateway, alice, bob, "no worries")

    assert reply.conversation.established
    assert reply.message.seq == 5


async def test_the_messages_tab_lists_groups_and_direct_conversations_newest_first(
    gateway: Any,
) -> None:
    me, friend, stranger = unique("me"), unique("friend"), unique("stranger")
    stub, md = gateway(me)
    group = await stub.CreateGroup(
        groups_pb2.CreateGroupRequest(name="Night runners", category=groups_pb2.FITNESS),
        metadata=md,
    )
    gid = group.group.group_id
    await send(gateway, me, friend, "see you at 7?")
    await send(gateway, stranger, me, "hi, can I join your running group?")
    await stub.SendGroupMessage(
        groups_pb2.SendGroupMessageRequest(group_id=gid, text="route for tonight"), metadata=md
    )

    tab = await stub.ListConversations(gateway_pb2.ListConversationsRequest(), metadata=md)

    rows = [(c.WhichOneof("kind"), c.title, c.preview, c.is_request) for c in tab.conversations]
    assert rows == [
        ("group", "Night runners", "route for tonight", False),
        ("direct", stranger, "hi, can I join your running group?", True),
        ("direct", friend, "see you at 7?", False),
    ]
    assert [c.unread_count for c in tab.conversations] == [0, 1, 0]


async def test_messages_tab_paging_is_stable_while_messages_arrive(gateway: Any) -> None:
    me = unique("me")
    stub, md = gateway(me)
    for n in range(3):
        reply = await stub.CreateGroup(
            groups_pb2.CreateGroupRequest(name=f"Group {n}", category=groups_pb2.BOOKS),
            metadata=md,
        )
        await stub.SendGroupMessage(
            groups_pb2.SendGroupMessageRequest(group_id=reply.group.group_id, text=f"g{n}"),
            metadata=md,
        )
    for _ in range(5):
        peer = unique("peer")
        await send(gateway, peer, me, f"from {peer}")
    everything = await stub.ListConversations(
        gateway_pb2.ListConversationsRequest(page_size=100), metadata=md
    )
    expected = [c.title for c in everything.conversations]
    assert len(expected) == 8

    first = await stub.ListConversations(
        gateway_pb2.ListConversationsRequest(page_size=3), metadata=md
    )
    # The oldest conversation gets a new message: it moves above the pages already read.
    oldest = expected[-1]
    if oldest.startswith("Group"):
        gid = everything.conversations[-1].group.group.group_id
        await stub.SendGroupMessage(
            groups_pb2.SendGroupMessageRequest(group_id=gid, text="bump"), metadata=md
        )
    else:
        await send(gateway, oldest, me, "bump")
    seen = [c.title for c in first.conversations]
    token = first.next_page_token
    while token:
        page = await stub.ListConversations(
            gateway_pb2.ListConversationsRequest(page_size=3, page_token=token), metadata=md
        )
        seen += [c.title for c in page.conversations]
        token = page.next_page_token

    # Nothing twice, nothing that stayed put lost; the moved one is on top of a fresh list.
    assert seen == expected[:-1]
    again = await stub.ListConversations(
        gateway_pb2.ListConversationsRequest(page_size=1), metadata=md
    )
    assert again.conversations[0].title == oldest
