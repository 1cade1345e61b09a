"""What a group message carries besides its text, and what happens to it after it is sent:
shared posts, replies, @all and mention counts, reactions, the recall, the announcement and
pins, over real gRPC with real NATS and the real MongoDB server.

The nats-server and the `groups-posts` durable outlive a test, so every test uses fresh post
ids and waits for the projection with `eventually`."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import grpc
import pymongo
import pytest
from groupchat.content.v1 import content_pb2
from groupchat.events.v1 import events_pb2
from groupchat.groups.v1 import groups_pb2 as pb

from services.groups.snapshots import group_snapshots
from services.groups.storage import GroupsStore
from services.kit.mongo import open_database
from services.kit.rpc_status import error_info, field_violations
from tests.conftest import eventually, unique_database_name
from tests.service.conftest import GroupsCaller
from tests.service.test_groups_service import create, join, refused
from tools.platform import post_event, publish

THUMBS, FIRE = "👍", "🔥"


def new_post_id() -> str:
    return f"p_{uuid.uuid4().hex[:12]}"


async def group_with(groups: GroupsCaller, *members: str, admins: tuple[str, ...] = ()) -> str:
    group = await create(groups, "owner")
    owner, md = groups("owner")
    for user in (*members, *admins):
        await join(groups, user, group.group_id)
    for user in admins:
        request = pb.SetMemberRoleRequest(group_id=group.group_id, user_id=user, role=pb.ADMIN)
        await owner.SetMemberRole(request, metadata=md)
    return group.group_id


async def send(groups: GroupsCaller, user: str, group_id: str, **fields: Any) -> pb.GroupMessage:
    stub, md = groups(user)
    request = pb.SendGroupMessageRequest(group_id=group_id, **fields)
    return (await stub.SendGroupMessage(request, metadata=md)).message


async def history(groups: GroupsCaller, user: str, group_id: str) -> list[pb.GroupMessage]:
    stub, md = groups(user)
    request = pb.ListGroupMessagesRequest(group_id=group_id, page_size=200)
    return list((await stub.ListGroupMessages(request, metadata=md)).messages)


async def get_group(groups: GroupsCaller, user: str, group_id: str) -> pb.Group:
    stub, md = groups(user)
    return (await stub.GetGroup(pb.GetGroupRequest(group_id=group_id), metadata=md)).group


async def my_group(groups: GroupsCaller, user: str, group_id: str) -> pb.MyGroup:
    stub, md = groups(user)
    mine = (await stub.ListMyGroups(pb.ListMyGroupsRequest(), metadata=md)).groups
    [entry] = [g for g in mine if g.group.group_id == group_id]
    return entry


def react(groups: GroupsCaller, user: str, group_id: str, seq: int, emoji: str, **kw: Any) -> Any:
    stub, md = groups(user)
    request = pb.ReactToGroupMessageRequest(group_id=group_id, seq=seq, emoji=emoji, **kw)
    return stub.ReactToGroupMessage(request, metadata=md)


def recall(groups: GroupsCaller, user: str, group_id: str, seq: int) -> Any:
    stub, md = groups(user)
    request = pb.RecallGroupMessageRequest(group_id=group_id, seq=seq)
    return stub.RecallGroupMessage(request, metadata=md)


def pin(groups: GroupsCaller, user: str, group_id: str, seq: int, unpin: bool = False) -> Any:
    stub, md = groups(user)
    request = pb.PinGroupMessageRequest(group_id=group_id, seq=seq, unpin=unpin)
    return stub.PinGroupMessage(request, metadata=md)


def announce(groups: GroupsCaller, user: str, group_id: str, text: str) -> Any:
    stub, md = groups(user)
    request = pb.SetGroupAnnouncementRequest(group_id=group_id, text=text)
    return stub.SetGroupAnnouncement(request, metadata=md)


def open_post(groups: GroupsCaller, user: str, **fields: Any) -> Any:
    stub, md = groups(user)
    return stub.OpenSharedPost(content_pb2.OpenSharedPostRequest(**fields), metadata=md)


async def failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def shared_post(groups: GroupsCaller, platform_url: str, author: str) -> str:
    """A post of `author`'s, published, once the groups' projection has it."""
    post_id = new_post_id()
    await publish(
        platform_url,
        [
            post_event(
                "publish",
                post_id,
                author,
                title="Matcha at home",
                cover_url="https://img.example/m.jpg",
            )
        ],
    )
    probe = await create(groups, "prober")

    async def projected() -> bool:
        code, _ = await refused_or_none(
            send(groups, "prober", probe.group_id, shared_post_id=post_id)
        )
        return code is None

    await eventually(projected)
    return post_id


async def refused_or_none(call: Any) -> tuple[grpc.StatusCode | None, str]:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        return error.code(), info.reason if info else ""
    return None, ""


# Shared posts


async def test_a_shared_post_carries_its_card_and_shows_removed_once_taken_down(
    groups: GroupsCaller, platform_url: str
) -> None:
    post_id = await shared_post(groups, platform_url, "carol")  # not a member: anyone's post
    gid = await group_with(groups, "bob")
    shared = await send(groups, "bob", gid, shared_post_id=post_id)
    assert shared.text == "" and shared.version == 1
    card = content_pb2.SharedPost(
        post_id=post_id,
        title="Matcha at home",
        cover_url="https://img.example/m.jpg",
        author_id="carol",
    )
    assert shared.shared_post == card
    await pin(groups, "owner", gid, shared.seq)
    assert (await history(groups, "owner", gid))[-1].shared_post == card

    await publish(platform_url, [post_event("hide", post_id, "carol")])
    removed = content_pb2.SharedPost(post_id=post_id, removed=True)

    async def shows_removed() -> bool:
        return (await history(groups, "owner", gid))[-1].shared_post == removed

    await eventually(shows_removed)
    group = await get_group(groups, "owner", gid)
    assert group.last_message.shared_post == removed
    assert group.pinned[0].message.shared_post == removed
    assert (await my_group(groups, "bob", gid)).group.last_message.shared_post == removed


async def test_sharing_an_unknown_post_or_nothing_is_refused(groups: GroupsCaller) -> None:
    gid = await group_with(groups, "bob")
    assert await refused(send(groups, "bob", gid, shared_post_id=new_post_id())) == (
        grpc.StatusCode.NOT_FOUND,
        "POST_NOT_FOUND",
    )
    error = await failure(send(groups, "bob", gid, text=""))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(error) == ["text"]


async def test_a_hidden_post_cannot_be_shared(groups: GroupsCaller, platform_url: str) -> None:
    post_id = await shared_post(groups, platform_url, "carol")
    await publish(platform_url, [post_event("hide", post_id, "carol")])
    gid = await group_with(groups, "bob")

    async def refused_as_hidden() -> bool:
        outcome = await refused_or_none(send(groups, "bob", gid, shared_post_id=post_id))
        return outcome == (grpc.StatusCode.FAILED_PRECONDITION, "POST_NOT_PUBLISHED")

    await eventually(refused_as_hidden)


async def test_opening_a_shared_post_returns_its_card_and_records_the_open(
    groups: GroupsCaller, platform_url: str, nats_client: Any
) -> None:
    post_id = await shared_post(groups, platform_url, "carol")
    gid = await group_with(groups, "bob")
    opened: list[events_pb2.Envelope] = []

    async def collect(msg: Any) -> None:
        opened.append(events_pb2.Envelope.FromString(msg.data))

    await nats_client.subscribe(f"groupchat.groups.shared_post_opened.{gid}.*", cb=collect)
    await nats_client.flush()
    shared = await send(groups, "owner", gid, text="look", shared_post_id=post_id)
    plain = await send(groups, "owner", gid, text="no post")

    reply = await open_post(groups, "bob", group_id=gid, seq=shared.seq)
    assert (reply.post_id, reply.post.title, reply.post.author_id) == (
        post_id,
        "Matcha at home",
        "carol",
    )
    await eventually(lambda: len(opened) == 1)
    event = opened[0]
    assert (event.type, event.aggregate_id, event.aggregate_version) == (
        "groups.shared_post_opened",
        gid,
        0,
    )
    assert event.shared_post_opened == events_pb2.SharedPostOpened(
        post_id=post_id, author_id="carol", opener_id="bob", group_id=gid, seq=shared.seq
    )
    assert await refused(open_post(groups, "bob", group_id=gid, seq=plain.seq)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "NO_SHARED_POST",
    )
    assert await refused(open_post(groups, "eve", group_id=gid, seq=shared.seq)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_A_MEMBER",
    )
    code, _ = await refused(open_post(groups, "bob", conversation_id="a:b", seq=1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    await recall(groups, "owner", gid, shared.seq)
    assert await refused(open_post(groups, "bob", group_id=gid, seq=shared.seq)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "NO_SHARED_POST",
    )


# Replies


async def test_a_reply_quotes_the_start_of_the_earlier_message_and_shows_its_recall(
    groups: GroupsCaller,
) -> None:
    gid = await group_with(groups, "bob")
    long_text = "x" * 150
    first = await send(groups, "owner", gid, text=long_text)
    reply = await send(groups, "bob", gid, text="agreed", reply_to_seq=first.seq)
    quote = content_pb2.Quote(seq=first.seq, sender_id="owner", excerpt="x" * 100)
    assert reply.reply_to == quote
    assert (await history(groups, "bob", gid))[-1].reply_to == quote

    await recall(groups, "owner", gid, first.seq)
    shown = (await history(groups, "bob", gid))[-1]
    assert shown.reply_to == content_pb2.Quote(seq=first.seq, sender_id="owner", recalled=True)


async def test_a_reply_to_a_seq_that_does_not_exist_is_invalid(groups: GroupsCaller) -> None:
    gid = await group_with(groups, "bob")
    await send(groups, "owner", gid, text="only one")
    error = await failure(send(groups, "bob", gid, text="re", reply_to_seq=2))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(error) == ["reply_to_seq"]
    assert [m.seq for m in await history(groups, "bob", gid)] == [1]


# @all and mention counts


async def test_mention_all_is_for_admins_and_at_most_once_per_interval(
    groups: GroupsCaller,
) -> None:
    gid = await group_with(groups, "bob", admins=("ada",))
    assert await refused(send(groups, "bob", gid, text="hey all", mention_all=True)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_ALLOWED",
    )
    first = await send(groups, "ada", gid, text="meeting!", mention_all=True, client_msg_id="c1")
    assert first.mention_all
    error = await failure(send(groups, "owner", gid, text="again", mention_all=True))
    info = error_info(error)
    assert (error.code(), info.reason if info else "") == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "MENTION_ALL_RATE_LIMITED",
    )
    assert info is not None and 290 <= int(info.metadata["retry_after_seconds"]) <= 300
    retried = await send(groups, "ada", gid, text="meeting!", mention_all=True, client_msg_id="c1")
    assert retried == first
    assert [m.seq for m in await history(groups, "bob", gid)] == [first.seq]


async def test_concurrent_mentions_of_all_let_exactly_one_through(groups: GroupsCaller) -> None:
    gid = await group_with(groups, admins=("ada", "abe"))
    outcomes = await asyncio.gather(
        *(
            refused_or_none(send(groups, user, gid, text=f"{user} {n}", mention_all=True))
            for n in range(5)
            for user in ("owner", "ada", "abe")
        )
    )
    assert sum(code is None for code, _ in outcomes) == 1
    assert {reason for code, reason in outcomes if code} == {"MENTION_ALL_RATE_LIMITED"}


async def test_mention_counts_are_unread_mentions_of_the_member_or_everyone_not_recalled(
    groups: GroupsCaller,
) -> None:
    gid = await group_with(groups, "bob", "carol", admins=("ada",))
    await send(groups, "carol", gid, text="hi @bob", mentions=["bob"])
    await send(groups, "carol", gid, text="just chat")
    await send(groups, "ada", gid, text="@all: tea", mention_all=True)
    mistaken = await send(groups, "carol", gid, text="oops @bob", mentions=["bob"])
    await send(groups, "bob", gid, text="me @bob", mentions=["bob"])  # their own: no
    entry = await my_group(groups, "bob", gid)
    # Bob's own message moved his read position past all of it.
    assert (entry.unread_count, entry.mention_count) == (0, 0)

    stub, md = groups("bob")
    await stub.MarkGroupRead(pb.MarkGroupReadRequest(group_id=gid, read_seq=0), metadata=md)
    fresh = await group_with(groups, "bob", "carol", admins=("ada",))
    await send(groups, "carol", fresh, text="hi @bob", mentions=["bob"])
    await send(groups, "carol", fresh, text="just chat")
    await send(groups, "ada", fresh, text="@all: tea", mention_all=True)
    oops = await send(groups, "carol", fresh, text="oops @bob", mentions=["bob"])
    await send(groups, "carol", fresh, text="@carol only", mentions=["carol"])
    entry = await my_group(groups, "bob", fresh)
    assert (entry.unread_count, entry.mention_count) == (5, 3)

    await recall(groups, "carol", fresh, oops.seq)
    entry = await my_group(groups, "bob", fresh)
    assert (entry.unread_count, entry.mention_count) == (4, 2)
    stub, md = groups("bob")
    conversations = await stub.ListGroupConversations(
        pb.ListGroupConversationsRequest(), metadata=md
    )
    [listed] = [c for c in conversations.groups if c.group.group_id == fresh]
    assert (listed.unread_count, listed.mention_count) == (4, 2)
    read = await stub.MarkGroupRead(
        pb.MarkGroupReadRequest(group_id=fresh, read_seq=3), metadata=md
    )
    assert read.unread_count == 1  # seq 4 is recalled, 5 is left
    entry = await my_group(groups, "bob", fresh)
    assert (entry.unread_count, entry.mention_count) == (1, 0)
    # A recalled message read already counted nothing to subtract.
    await recall(groups, "owner", gid, mistaken.seq)
    carol = await my_group(groups, "carol", gid)
    assert carol.unread_count == 1  # bob's own message after carol's last


# Reactions


async def test_a_storm_of_100_members_reacting_at_once_counts_exactly(
    groups: GroupsCaller, nats_client: Any
) -> None:
    group = await create(groups, "owner")
    gid = group.group_id
    members = [f"r{n:03d}" for n in range(100)]
    await asyncio.gather(*(join(groups, user, gid) for user in members))
    target = await send(groups, "owner", gid, text="react to me")
    changed: list[events_pb2.Envelope] = []

    async def collect(msg: Any) -> None:
        changed.append(events_pb2.Envelope.FromString(msg.data))

    await nats_client.subscribe(f"groupchat.groups.group_message_changed.{gid}.*", cb=collect)
    await nats_client.flush()

    fire_users = members[::2]
    await asyncio.gather(
        *(react(groups, user, gid, target.seq, THUMBS) for user in members),
        *(react(groups, user, gid, target.seq, FIRE) for user in fire_users),
    )
    [shown] = [m for m in await history(groups, members[0], gid) if m.seq == target.seq]
    assert [(r.emoji, r.count, r.mine) for r in shown.reactions] == [
        (THUMBS, 100, True),
        (FIRE, 50, True),
    ]
    assert shown.version == 1 + 150
    await eventually(lambda: len(changed) == 150)
    assert sorted(e.aggregate_version for e in changed) == list(range(2, 152))
    last = max(changed, key=lambda e: e.aggregate_version).group_message_changed
    assert {(r.emoji, r.count, r.mine) for r in last.message.reactions} == {
        (THUMBS, 100, False),
        (FIRE, 50, False),
    }

    await asyncio.gather(
        *(react(groups, user, gid, target.seq, THUMBS, remove=True) for user in members[:30])
    )
    [shown] = [m for m in await history(groups, members[0], gid) if m.seq == target.seq]
    assert [(r.emoji, r.count, r.mine) for r in shown.reactions] == [
        (THUMBS, 70, False),
        (FIRE, 50, True),
    ]


async def test_reacting_again_or_removing_an_absent_reaction_changes_nothing(
    groups: GroupsCaller, nats_client: Any
) -> None:
    gid = await group_with(groups, "bob")
    target = await send(groups, "owner", gid, text="hello")
    changed: list[events_pb2.Envelope] = []

    async def collect(msg: Any) -> None:
        changed.append(events_pb2.Envelope.FromString(msg.data))

    await nats_client.subscribe(f"groupchat.groups.group_message_changed.{gid}.*", cb=collect)
    await nats_client.flush()
    added = (await react(groups, "bob", gid, target.seq, THUMBS)).message
    again = (await react(groups, "bob", gid, target.seq, THUMBS)).message
    absent = (await react(groups, "bob", gid, target.seq, FIRE, remove=True)).message
    assert added == again == absent
    assert [(r.emoji, r.count, r.mine) for r in added.reactions] == [(THUMBS, 1, True)]
    assert added.version == 2
    removed = (await react(groups, "bob", gid, target.seq, THUMBS, remove=True)).message
    assert (list(removed.reactions), removed.version) == ([], 3)
    await eventually(lambda: len(changed) == 2)
    assert [
        (e.group_message_changed.change, e.group_message_changed.emoji, e.aggregate_version)
        for e in sorted(changed, key=lambda e: e.aggregate_version)
    ] == [(events_pb2.REACTION_ADDED, THUMBS, 2), (events_pb2.REACTION_REMOVED, THUMBS, 3)]
    assert {e.group_message_changed.actor_id for e in changed} == {"bob"}


async def test_reactions_are_refused_for_outsiders_unknown_emoji_and_recalled_messages(
    groups: GroupsCaller,
) -> None:
    gid = await group_with(groups, "bob")
    target = await send(groups, "owner", gid, text="hello")
    assert await refused(react(groups, "eve", gid, target.seq, THUMBS)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_A_MEMBER",
    )
    error = await failure(react(groups, "bob", gid, target.seq, "🦄"))
    assert (error.code(), field_violations(error)) == (grpc.StatusCode.INVALID_ARGUMENT, ["emoji"])
    error = await failure(react(groups, "bob", gid, 99, THUMBS))
    assert (error.code(), field_violations(error)) == (grpc.StatusCode.INVALID_ARGUMENT, ["seq"])
    await recall(groups, "owner", gid, target.seq)
    assert await refused(react(groups, "bob", gid, target.seq, THUMBS)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "MESSAGE_RECALLED",
    )


@pytest.mark.parametrize("groups_env", [{"REACTION_EMOJIS": "🦄 🍵"}])
async def test_the_reaction_set_is_configured(groups: GroupsCaller) -> None:
    gid = await group_with(groups, "bob")
    target = await send(groups, "owner", gid, text="hello")
    assert (await react(groups, "bob", gid, target.seq, "🍵")).message.reactions[0].count == 1
    code, _ = await refused(react(groups, "bob", gid, target.seq, THUMBS))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


# Recall


DATABASE = unique_database_name()


@pytest.mark.parametrize("groups_env", [{"MONGODB_DATABASE": DATABASE}])
async def test_the_sender_recalls_within_the_window_and_the_content_is_deleted(
    groups: GroupsCaller, mongodb_client: pymongo.MongoClient[dict[str, Any]]
) -> None:
    gid = await group_with(groups, "bob", "carol")
    earlier = await send(groups, "carol", gid, text="earlier")
    sent = await send(
        groups, "bob", gid, text="secret @carol", mentions=["carol"], reply_to_seq=earlier.seq
    )
    await react(groups, "carol", gid, sent.seq, THUMBS)
    tombstone = (await recall(groups, "bob", gid, sent.seq)).message
    assert (tombstone.text, list(tombstone.mentions), tombstone.HasField("reply_to")) == (
        "",
        [],
        False,
    )
    assert (tombstone.recall.recalled_by, tombstone.recall.moderation) == ("bob", False)
    assert tombstone.version == 3
    again = (await recall(groups, "bob", gid, sent.seq)).message
    assert again == tombstone
    assert (await history(groups, "carol", gid))[-1] == tombstone
    stored = mongodb_client[DATABASE]["messages"].find_one({"_id": f"{gid}:{sent.seq}"})
    assert stored is not None
    gone = {"text", "mentions", "shared_post", "reply_to", "reactions", "mention_all"}
    assert not gone & stored.keys()
    assert stored["recall"]["recalled_by"] == "bob"
    # The Messages tab's preview is the tombstone.
    group = await get_group(groups, "carol", gid)
    assert group.last_message == tombstone
    assert (await my_group(groups, "carol", gid)).group.last_message == tombstone


@pytest.mark.parametrize("groups_env", [{"RECALL_WINDOW_SECONDS": "1"}])
async def test_a_recall_after_the_window_is_refused_for_the_sender(groups: GroupsCaller) -> None:
    gid = await group_with(groups, "bob")
    sent = await send(groups, "bob", gid, text="too late")
    await eventually(lambda: time.time() * 1000 > sent.sent_at.ToMilliseconds() + 1_100)
    assert await refused(recall(groups, "bob", gid, sent.seq)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RECALL_WINDOW_PASSED",
    )
    # The owner's own message too: the window is the sender's, whatever their role.
    own = await send(groups, "owner", gid, text="mine, too late")
    await eventually(lambda: time.time() * 1000 > own.sent_at.ToMilliseconds() + 1_100)
    assert await refused(recall(groups, "owner", gid, own.seq)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RECALL_WINDOW_PASSED",
    )
    # Someone else's the owner may still remove, at any time.
    assert (await recall(groups, "owner", gid, sent.seq)).message.recall.moderation
    # Once recalled, the sender's retry succeeds, changing nothing.
    assert (await recall(groups, "bob", gid, sent.seq)).message.recall.recalled_by == "owner"


async def test_an_admin_removes_a_members_message_recorded_with_who_did_it(
    groups: GroupsCaller, nats_client: Any
) -> None:
    gid = await group_with(groups, "bob", "carol", admins=("ada",))
    sent = await send(groups, "bob", gid, text="spam")
    not_theirs = (grpc.StatusCode.PERMISSION_DENIED, "NOT_ALLOWED")
    assert await refused(recall(groups, "carol", gid, sent.seq)) == not_theirs
    changed: list[events_pb2.Envelope] = []

    async def collect(msg: Any) -> None:
        changed.append(events_pb2.Envelope.FromString(msg.data))

    await nats_client.subscribe(f"groupchat.groups.group_message_changed.{gid}.ada", cb=collect)
    await nats_client.flush()
    removed = (await recall(groups, "ada", gid, sent.seq)).message
    assert (removed.recall.recalled_by, removed.recall.moderation) == ("ada", True)
    await eventually(lambda: len(changed) == 1)
    event = changed[0].group_message_changed
    assert (event.change, event.actor_id, event.message) == (events_pb2.RECALLED, "ada", removed)
    assert changed[0].aggregate_version == removed.version == 2
    # Recalled already, it is still not carol's to recall.
    assert await refused(recall(groups, "carol", gid, sent.seq)) == not_theirs


# The announcement and pins


async def test_the_announcement_is_set_by_admins_shown_to_outsiders_and_cleared(
    groups: GroupsCaller,
) -> None:
    gid = await group_with(groups, "bob", admins=("ada",))
    assert await refused(announce(groups, "bob", gid, "hi")) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED",
    )
    error = await failure(announce(groups, "ada", gid, "x" * 1_001))
    assert (error.code(), field_violations(error)) == (grpc.StatusCode.INVALID_ARGUMENT, ["text"])
    group = (await announce(groups, "ada", gid, "Tea at 5, every Friday")).group
    assert (group.announcement.text, group.announcement.set_by) == ("Tea at 5, every Friday", "ada")
    outsider_view = await get_group(groups, "eve", gid)
    assert outsider_view.announcement == group.announcement
    cleared = (await announce(groups, "owner", gid, "")).group
    assert not cleared.HasField("announcement")
    assert not (await get_group(groups, "bob", gid)).HasField("announcement")


@pytest.mark.parametrize("groups_env", [{"MAX_PINNED_MESSAGES": "2"}])
async def test_pins_are_newest_first_limited_and_show_the_message_as_it_is_now(
    groups: GroupsCaller,
) -> None:
    gid = await group_with(groups, "bob", admins=("ada",))
    one, two, three = [await send(groups, "bob", gid, text=f"m{n}") for n in (1, 2, 3)]
    assert await refused(pin(groups, "bob", gid, one.seq)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED",
    )
    error = await failure(pin(groups, "ada", gid, 99))
    assert (error.code(), field_violations(error)) == (grpc.StatusCode.INVALID_ARGUMENT, ["seq"])
    await pin(groups, "ada", gid, one.seq)
    group = (await pin(groups, "owner", gid, two.seq)).group
    assert [(p.message.seq, p.pinned_by) for p in group.pinned] == [(2, "owner"), (1, "ada")]
    again = (await pin(groups, "owner", gid, two.seq)).group
    assert again.version == group.version  # pinned already: nothing changed
    assert await refused(pin(groups, "ada", gid, three.seq)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "TOO_MANY_PINS",
    )
    await react(groups, "owner", gid, one.seq, THUMBS)
    await recall(groups, "bob", gid, two.seq)
    shown = await get_group(groups, "bob", gid)
    assert shown.pinned[0].message.HasField("recall")
    assert shown.pinned[1].message.reactions[0].count == 1
    assert list((await get_group(groups, "eve", gid)).pinned) == []
    await pin(groups, "ada", gid, two.seq, unpin=True)
    assert await refused(pin(groups, "ada", gid, two.seq)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "MESSAGE_RECALLED",
    )
    group = (await pin(groups, "ada", gid, three.seq)).group
    assert [p.message.seq for p in group.pinned] == [3, 1]


SNAPSHOTS_DATABASE = unique_database_name()


@pytest.mark.parametrize("groups_env", [{"MONGODB_DATABASE": SNAPSHOTS_DATABASE}])
async def test_group_snapshots_carry_the_announcement_and_pins(
    groups: GroupsCaller, mongodb_uri: str
) -> None:
    gid = await group_with(groups, "bob")
    await announce(groups, "owner", gid, "Tea at 5")
    sent = await send(groups, "bob", gid, text="pin me")
    await pin(groups, "owner", gid, sent.seq)
    client, db = open_database(mongodb_uri, SNAPSHOTS_DATABASE)
    try:
        snapshots = [e async for e in group_snapshots(GroupsStore(db))()]
    finally:
        client.close()
    [snapshot] = [e.group_snapshot for e in snapshots if e.aggregate_id == gid]
    assert snapshot.group.announcement.text == "Tea at 5"
    assert [(p.message.seq, p.message.text) for p in snapshot.group.pinned] == [(1, "pin me")]


# Events


async def test_every_change_publishes_its_event(groups: GroupsCaller, nats_client: Any) -> None:
    gid = await group_with(groups, "bob")
    seen: list[tuple[str, events_pb2.Envelope]] = []

    async def collect(msg: Any) -> None:
        # The setup's own events are published after its calls answer: they may come too.
        if msg.subject.split(".")[2] not in ("group_created", "member_joined"):
            seen.append((msg.subject, events_pb2.Envelope.FromString(msg.data)))

    await nats_client.subscribe(f"groupchat.groups.*.{gid}.*", cb=collect)
    await nats_client.flush()
    sent = await send(groups, "bob", gid, text="hi")
    await react(groups, "owner", gid, sent.seq, THUMBS)
    await react(groups, "owner", gid, sent.seq, THUMBS, remove=True)
    await announce(groups, "owner", gid, "welcome")
    await pin(groups, "owner", gid, sent.seq)
    await pin(groups, "owner", gid, sent.seq, unpin=True)
    await recall(groups, "bob", gid, sent.seq)
    # A member's look records nothing (it would be published before the outsider's).
    await get_group(groups, "bob", gid)
    await get_group(groups, "eve", gid)
    expected = [
        ("group_message_posted", "bob"),
        ("group_message_changed", "owner"),
        ("group_message_changed", "owner"),
        ("group_updated", "owner"),
        ("group_updated", "owner"),
        ("group_updated", "owner"),
        ("group_message_changed", "bob"),
        ("group_card_viewed", "eve"),
    ]
    await eventually(lambda: len(seen) >= len(expected))
    assert [tuple(s.split(".")[2::2]) for s, _ in seen] == expected
    envelopes = [e for _, e in seen]
    assert envelopes[0].group_message_posted.message.version == 1
    assert [e.group_updated.changed_fields for e in envelopes[3:6]] == [
        ["announcement"],
        ["pinned"],
        ["pinned"],
    ]
    assert envelopes[3].group_updated.group.announcement.text == "welcome"
    assert [p.message.seq for p in envelopes[4].group_updated.group.pinned] == [sent.seq]
    assert envelopes[6].group_message_changed.message.recall.recalled_by == "bob"
    viewed = envelopes[7]
    assert (viewed.aggregate_version, viewed.group_card_viewed.viewer_id) == (0, "eve")
