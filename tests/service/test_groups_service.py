"""The groups service over real gRPC, with real NATS."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from groupchat.events.v1 import events_pb2
from groupchat.groups.v1 import groups_pb2 as pb

from services.kit.rpc_status import error_info
from tests.conftest import eventually
from tests.service.conftest import GroupsCaller


async def create(groups: GroupsCaller, owner: str, **fields: Any) -> pb.Group:
    stub, md = groups(owner)
    fields.setdefault("name", "Tea lovers")
    fields.setdefault("category", pb.FOOD)
    fields.setdefault("listed", True)
    reply = await stub.CreateGroup(pb.CreateGroupRequest(**fields), metadata=md)
    return reply.group


async def join(groups: GroupsCaller, user: str, group_id: str) -> pb.JoinGroupResponse:
    stub, md = groups(user)
    return await stub.JoinGroup(pb.JoinGroupRequest(group_id=group_id), metadata=md)


async def refused(call: Any) -> tuple[grpc.StatusCode, str]:
    """Await a call that must fail; return its code and ErrorInfo reason."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    info = error_info(caught.value)
    return caught.value.code(), info.reason if info else ""


# Creating and joining


async def test_creator_is_the_owner_and_first_member(groups: GroupsCaller) -> None:
    group = await create(groups, "alice", capacity=20)
    assert (group.owner_id, group.member_count, group.capacity) == ("alice", 1, 20)
    stub, md = groups("alice")
    members = await stub.ListMembers(pb.ListMembersRequest(group_id=group.group_id), metadata=md)
    assert [(m.user_id, m.role) for m in members.members] == [("alice", pb.OWNER)]


async def test_create_retried_with_the_same_request_id_returns_the_first_group(
    groups: GroupsCaller,
) -> None:
    first = await create(groups, "alice", request_id="r-1")
    again = await create(groups, "alice", request_id="r-1")
    other = await create(groups, "alice", request_id="r-2")
    assert again.group_id == first.group_id
    assert other.group_id != first.group_id


async def test_concurrent_retries_of_one_create_make_one_group(groups: GroupsCaller) -> None:
    replies = await asyncio.gather(
        *(create(groups, "alice", request_id="r-storm") for _ in range(10))
    )
    assert len({group.group_id for group in replies}) == 1
    stub, md = groups("alice")
    mine = await stub.ListMyGroups(pb.ListMyGroupsRequest(), metadata=md)
    assert [g.group.group_id for g in mine.groups] == [replies[0].group_id]


async def test_calls_without_a_token_are_unauthenticated(groups: GroupsCaller) -> None:
    stub, _ = groups("alice")
    code, _ = await refused(stub.GetGroup(pb.GetGroupRequest(group_id="g_x")))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_join_is_idempotent(groups: GroupsCaller) -> None:
    group = await create(groups, "alice")
    first = await join(groups, "bob", group.group_id)
    again = await join(groups, "bob", group.group_id)
    assert first.joined and not again.joined
    assert again.group.member_count == 2


async def test_same_user_joining_concurrently_is_one_member(groups: GroupsCaller) -> None:
    group = await create(groups, "alice")
    replies = await asyncio.gather(*(join(groups, "bob", group.group_id) for _ in range(20)))
    assert sum(r.joined for r in replies) == 1
    stub, md = groups("alice")
    stored = (await stub.GetGroup(pb.GetGroupRequest(group_id=group.group_id), metadata=md)).group
    assert stored.member_count == 2


@pytest.mark.parametrize("groups_env", [{"MAX_GROUPS_PER_USER": "2"}])
async def test_a_user_is_in_at_most_the_configured_number_of_groups(groups: GroupsCaller) -> None:
    g1, g2, g3 = [await create(groups, f"owner{i}") for i in range(3)]
    await join(groups, "bob", g1.group_id)
    await join(groups, "bob", g2.group_id)
    code, reason = await refused(join(groups, "bob", g3.group_id))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "GROUP_LIMIT_REACHED")
    stub, md = groups("bob")
    await stub.LeaveGroup(pb.LeaveGroupRequest(group_id=g1.group_id), metadata=md)
    assert (await join(groups, "bob", g3.group_id)).joined


@pytest.mark.parametrize("groups_env", [{"JOIN_RATE_LIMIT": "3"}])
async def test_joins_are_rate_limited_per_user(groups: GroupsCaller) -> None:
    targets = [await create(groups, f"owner{i}") for i in range(4)]
    for group in targets[:3]:
        await join(groups, "bob", group.group_id)
    code, reason = await refused(join(groups, "bob", targets[3].group_id))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "JOIN_RATE_LIMITED")
    assert (await join(groups, "carol", targets[3].group_id)).joined


# Roles and moderation


async def group_with(groups: GroupsCaller, *members: str) -> str:
    group = await create(groups, "owner")
    for user in members:
        await join(groups, user, group.group_id)
    return group.group_id


async def test_admin_removes_and_bans_a_member(groups: GroupsCaller) -> None:
    gid = await group_with(groups, "admin", "bob")
    owner, md = groups("owner")
    await owner.SetMemberRole(
        pb.SetMemberRoleRequest(group_id=gid, user_id="admin", role=pb.ADMIN), metadata=md
    )
    admin, amd = groups("admin")
    await admin.RemoveMember(
        pb.RemoveMemberRequest(group_id=gid, user_id="bob", ban=True), metadata=amd
    )
    code, reason = await refused(join(groups, "bob", gid))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "BANNED")


async def test_removed_without_ban_may_join_again(groups: GroupsCaller) -> None:
    gid = await group_with(groups, "bob")
    owner, md = groups("owner")
    await owner.RemoveMember(pb.RemoveMemberRequest(group_id=gid, user_id="bob"), metadata=md)
    assert (await join(groups, "bob", gid)).joined


async def test_member_cannot_remove_mute_or_promote(groups: GroupsCaller) -> None:
    gid = await group_with(groups, "bob", "carol")
    bob, md = groups("bob")
    for call in (
        bob.RemoveMember(pb.RemoveMemberRequest(group_id=gid, user_id="carol"), metadata=md),
        bob.MuteMember(
            pb.MuteMemberRequest(group_id=gid, user_id="carol", duration_seconds=60), metadata=md
        ),
        bob.SetMemberRole(
            pb.SetMemberRoleRequest(group_id=gid, user_id="carol", role=pb.ADMIN), metadata=md
        ),
        bob.TransferOwnership(
            pb.TransferOwnershipRequest(group_id=gid, new_owner_id="carol"), metadata=md
        ),
    ):
        assert await refused(call) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")


async def test_admin_cannot_promote_or_remove_the_owner(groups: GroupsCaller) -> None:
    gid = await group_with(groups, "admin", "bob")
    owner, md = groups("owner")
    await owner.SetMemberRole(
        pb.SetMemberRoleRequest(group_id=gid, user_id="admin", role=pb.ADMIN), metadata=md
    )
    admin, amd = groups("admin")
    assert await refused(
        admin.SetMemberRole(
            pb.SetMemberRoleRequest(group_id=gid, user_id="bob", role=pb.ADMIN), metadata=amd
        )
    ) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    assert await refused(
        admin.RemoveMember(pb.RemoveMemberRequest(group_id=gid, user_id="owner"), metadata=amd)
    ) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")


async def test_muted_member_cannot_send_until_unmuted(groups: GroupsCaller) -> None:
    gid = await group_with(groups, "bob")
    owner, md = groups("owner")
    muted = await owner.MuteMember(
        pb.MuteMemberRequest(group_id=gid, user_id="bob", duration_seconds=600), metadata=md
    )
    assert muted.membership.HasField("muted_until")
    bob, bmd = groups("bob")
    send = pb.SendGroupMessageRequest(group_id=gid, text="hello?")
    assert await refused(bob.SendGroupMessage(send, metadata=bmd)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "MUTED",
    )
    await owner.MuteMember(pb.MuteMemberRequest(group_id=gid, user_id="bob"), metadata=md)
    assert (await bob.SendGroupMessage(send, metadata=bmd)).message.seq == 1


async def test_owner_must_transfer_before_leaving(groups: GroupsCaller) -> None:
    gid = await group_with(groups, "bob")
    owner, md = groups("owner")
    assert await refused(owner.LeaveGroup(pb.LeaveGroupRequest(group_id=gid), metadata=md)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "OWNER_MUST_TRANSFER",
    )
    moved = await owner.TransferOwnership(
        pb.TransferOwnershipRequest(group_id=gid, new_owner_id="bob"), metadata=md
    )
    assert moved.group.owner_id == "bob"
    left = await owner.LeaveGroup(pb.LeaveGroupRequest(group_id=gid), metadata=md)
    assert not left.dissolved
    bob, bmd = groups("bob")
    members = await bob.ListMembers(pb.ListMembersRequest(group_id=gid), metadata=bmd)
    assert [(m.user_id, m.role) for m in members.members] == [("bob", pb.OWNER)]


async def test_last_member_leaving_dissolves_the_group(groups: GroupsCaller) -> None:
    gid = await group_with(groups)
    owner, md = groups("owner")
    assert (await owner.LeaveGroup(pb.LeaveGroupRequest(group_id=gid), metadata=md)).dissolved
    assert await refused(owner.GetGroup(pb.GetGroupRequest(group_id=gid), metadata=md)) == (
        grpc.StatusCode.NOT_FOUND,
        "GROUP_NOT_FOUND",
    )


async def test_capacity_cannot_drop_below_the_members(groups: GroupsCaller) -> None:
    gid = await group_with(groups, "bob", "carol")
    owner, md = groups("owner")
    update = pb.UpdateGroupRequest(
        group=pb.Group(group_id=gid, capacity=2),
        update_mask=field_mask_pb2.FieldMask(paths=["capacity"]),
    )
    assert await refused(owner.UpdateGroup(update, metadata=md)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "CAPACITY_BELOW_MEMBERS",
    )
    update.group.capacity = 3
    assert (await owner.UpdateGroup(update, metadata=md)).group.capacity == 3
    assert await refused(join(groups, "dave", gid)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "GROUP_FULL",
    )


async def test_update_changes_only_the_masked_fields(groups: GroupsCaller) -> None:
    gid = await group_with(groups)
    owner, md = groups("owner")
    reply = await owner.UpdateGroup(
        pb.UpdateGroupRequest(
            group=pb.Group(group_id=gid, name="Matcha club", description="ignored"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        ),
        metadata=md,
    )
    assert (reply.group.name, reply.group.description) == ("Matcha club", "")


# Messages


async def test_messages_get_consecutive_seqs_under_concurrent_senders(groups: GroupsCaller) -> None:
    senders = [f"s{i}" for i in range(10)]
    gid = await group_with(groups, *senders)

    async def send(user: str, n: int) -> int:
        stub, md = groups(user)
        reply = await stub.SendGroupMessage(
            pb.SendGroupMessageRequest(group_id=gid, text=f"{user} #{n}"), metadata=md
        )
        return reply.message.seq

    seqs = await asyncio.gather(*(send(u, n) for u in senders for n in range(5)))
    assert sorted(seqs) == list(range(1, 51))
    stub, md = groups("owner")
    listed = await stub.ListGroupMessages(
        pb.ListGroupMessagesRequest(group_id=gid, page_size=100), metadata=md
    )
    assert [m.seq for m in listed.messages] == list(range(1, 51))


async def test_a_retried_send_returns_the_first_message(groups: GroupsCaller) -> None:
    gid = await group_with(groups, "bob")
    bob, md = groups("bob")
    request = pb.SendGroupMessageRequest(group_id=gid, text="once", client_msg_id="c-1")
    replies = await asyncio.gather(*(bob.SendGroupMessage(request, metadata=md) for _ in range(5)))
    assert {r.message.seq for r in replies} == {1}
    listed = await bob.ListGroupMessages(pb.ListGroupMessagesRequest(group_id=gid), metadata=md)
    assert [m.text for m in listed.messages] == ["once"]


async def test_non_members_cannot_send_or_read(groups: GroupsCaller) -> None:
    gid = await group_with(groups)
    eve, md = groups("eve")
    expected = (grpc.StatusCode.PERMISSION_DENIED, "NOT_A_MEMBER")
    assert (
        await refused(
            eve.SendGroupMessage(pb.SendGroupMessageRequest(group_id=gid, text="hi"), metadata=md)
        )
        == expected
    )
    assert (
        await refused(eve.ListGroupMessages(pb.ListGroupMessagesRequest(group_id=gid), metadata=md))
        == expected
    )


async def test_history_pages_both_ways_and_unread_follows_the_read_position(
    groups: GroupsCaller,
) -> None:
    gid = await group_with(groups, "bob")
    owner, md = groups("owner")
    for n in range(1, 11):
        await owner.SendGroupMessage(
            pb.SendGroupMessageRequest(group_id=gid, text=f"m{n}"), metadata=md
        )
    bob, bmd = groups("bob")
    after = await bob.ListGroupMessages(
        pb.ListGroupMessagesRequest(group_id=gid, after_seq=3, page_size=4), metadata=bmd
    )
    assert ([m.seq for m in after.messages], after.has_more) == ([4, 5, 6, 7], True)
    before = await bob.ListGroupMessages(
        pb.ListGroupMessagesRequest(group_id=gid, before_seq=4, page_size=5), metadata=bmd
    )
    assert ([m.seq for m in before.messages], before.has_more) == ([1, 2, 3], False)
    mine = await bob.ListMyGroups(pb.ListMyGroupsRequest(), metadata=bmd)
    assert [g.unread_count for g in mine.groups] == [10]
    read = await bob.MarkGroupRead(pb.MarkGroupReadRequest(group_id=gid, read_seq=7), metadata=bmd)
    assert (read.read_seq, read.unread_count) == (7, 3)
    stale = await bob.MarkGroupRead(pb.MarkGroupReadRequest(group_id=gid, read_seq=2), metadata=bmd)
    assert (stale.read_seq, stale.unread_count) == (7, 3)


# Events


async def test_writes_publish_events_on_the_group_subjects(
    groups: GroupsCaller, nats_client: Any
) -> None:
    group = await create(groups, "owner")
    gid = group.group_id
    seen: list[tuple[str, events_pb2.Envelope]] = []

    async def collect(msg: Any) -> None:
        # The create's own event is published after CreateGroup answers: it may come too.
        if ".group_created." not in msg.subject:
            seen.append((msg.subject, events_pb2.Envelope.FromString(msg.data)))

    await nats_client.subscribe(f"groupchat.groups.*.{gid}.*", cb=collect)
    await nats_client.flush()
    await join(groups, "bob", gid)
    bob, md = groups("bob")
    await bob.SendGroupMessage(pb.SendGroupMessageRequest(group_id=gid, text="hi"), metadata=md)
    await bob.LeaveGroup(pb.LeaveGroupRequest(group_id=gid), metadata=md)
    await eventually(lambda: len(seen) >= 3)
    assert [subject for subject, _ in seen] == [
        f"groupchat.groups.member_joined.{gid}.bob",
        f"groupchat.groups.group_message_posted.{gid}.bob",
        f"groupchat.groups.member_left.{gid}.bob",
    ]
    joined, posted, left = (envelope for _, envelope in seen)
    assert joined.member_joined.member.user_id == "bob"
    assert posted.group_message_posted.message.text == "hi"
    assert left.member_left.member_count == 1
    assert joined.aggregate_version < left.aggregate_version
    assert len({e.event_id for _, e in seen}) == 3


async def test_a_member_cannot_edit_the_group_but_an_admin_can(groups: GroupsCaller) -> None:
    gid = await group_with(groups, "bob", "carol")
    rename = pb.UpdateGroupRequest(
        group=pb.Group(group_id=gid, name="Renamed"),
        update_mask=field_mask_pb2.FieldMask(paths=["name"]),
    )
    bob, bmd = groups("bob")
    assert await refused(bob.UpdateGroup(rename, metadata=bmd)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED",
    )
    owner, md = groups("owner")
    await owner.SetMemberRole(
        pb.SetMemberRoleRequest(group_id=gid, user_id="carol", role=pb.ADMIN), metadata=md
    )
    carol, cmd = groups("carol")
    assert (await carol.UpdateGroup(rename, metadata=cmd)).group.name == "Renamed"


async def test_every_kind_of_change_publishes_its_event(
    groups: GroupsCaller, nats_client: Any
) -> None:
    seen: list[str] = []

    async def collect(msg: Any) -> None:
        seen.append(msg.subject)

    await nats_client.subscribe("groupchat.groups.>", cb=collect)
    await nats_client.flush()
    gid = await group_with(groups, "bob", "carol")
    owner, md = groups("owner")
    await owner.UpdateGroup(
        pb.UpdateGroupRequest(
            group=pb.Group(group_id=gid, name="Renamed"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        ),
        metadata=md,
    )
    await owner.SetMemberRole(
        pb.SetMemberRoleRequest(group_id=gid, user_id="bob", role=pb.ADMIN), metadata=md
    )
    await owner.MuteMember(
        pb.MuteMemberRequest(group_id=gid, user_id="carol", duration_seconds=60), metadata=md
    )
    await owner.RemoveMember(pb.RemoveMemberRequest(group_id=gid, user_id="carol"), metadata=md)
    bob, bmd = groups("bob")
    await bob.LeaveGroup(pb.LeaveGroupRequest(group_id=gid), metadata=bmd)
    await owner.LeaveGroup(pb.LeaveGroupRequest(group_id=gid), metadata=md)
    expected = [
        f"groupchat.groups.group_created.{gid}.owner",
        f"groupchat.groups.member_joined.{gid}.bob",
        f"groupchat.groups.member_joined.{gid}.carol",
        f"groupchat.groups.group_updated.{gid}.owner",
        f"groupchat.groups.member_role_changed.{gid}.bob",
        f"groupchat.groups.member_muted.{gid}.carol",
        f"groupchat.groups.member_removed.{gid}.carol",
        f"groupchat.groups.member_left.{gid}.bob",
        f"groupchat.groups.group_dissolved.{gid}.owner",
    ]
    await eventually(lambda: len([s for s in seen if gid in s]) >= len(expected))
    assert [s for s in seen if gid in s] == expected


# Activity and the Messages tab


async def send(groups: GroupsCaller, user: str, group_id: str, text: str) -> pb.GroupMessage:
    stub, md = groups(user)
    request = pb.SendGroupMessageRequest(group_id=group_id, text=text)
    return (await stub.SendGroupMessage(request, metadata=md)).message


async def conversations(
    groups: GroupsCaller, user: str, **position: Any
) -> pb.ListGroupConversationsResponse:
    stub, md = groups(user)
    request = pb.ListGroupConversationsRequest(**position)
    return await stub.ListGroupConversations(request, metadata=md)


def position_of(entry: pb.MyGroup) -> dict[str, Any]:
    """The keyset position just after `entry`."""
    return {
        "before_activity_ms": entry.last_activity_at.ToMilliseconds(),
        "before_group_id": entry.group.group_id,
    }


async def test_the_newest_message_is_the_groups_last_message_and_activity(
    groups: GroupsCaller,
) -> None:
    group = await create(groups, "alice")
    assert not group.HasField("last_message")
    assert group.last_activity_at == group.created_at
    await send(groups, "alice", group.group_id, "first")
    second = await send(groups, "alice", group.group_id, "second")
    stub, md = groups("alice")
    stored = (await stub.GetGroup(pb.GetGroupRequest(group_id=group.group_id), metadata=md)).group
    assert (stored.last_seq, stored.last_message) == (2, second)
    assert stored.last_activity_at == second.sent_at


async def test_last_message_keeps_up_with_concurrent_senders(groups: GroupsCaller) -> None:
    gid = await group_with(groups, "bob", "carol")
    await asyncio.gather(
        *(send(groups, user, gid, f"{user} {n}") for n in range(10) for user in ("bob", "carol"))
    )
    stub, md = groups("owner")
    stored = (await stub.GetGroup(pb.GetGroupRequest(group_id=gid), metadata=md)).group
    assert stored.last_seq == stored.last_message.seq == 20


async def test_a_member_who_joined_after_the_last_message_is_active_from_their_join(
    groups: GroupsCaller,
) -> None:
    group = await create(groups, "alice")
    hello = await send(groups, "alice", group.group_id, "hello")
    joined = await join(groups, "bob", group.group_id)
    stub, md = groups("bob")
    [mine] = (await stub.ListMyGroups(pb.ListMyGroupsRequest(), metadata=md)).groups
    assert mine.last_activity_at == joined.membership.joined_at
    assert mine.unread_count == 0
    [bobs] = (await conversations(groups, "bob")).groups
    assert bobs == mine
    stub, md = groups("alice")
    [alices] = (await stub.ListMyGroups(pb.ListMyGroupsRequest(), metadata=md)).groups
    assert alices.last_activity_at == hello.sent_at


async def test_group_conversations_come_newest_first_and_page_without_repeats_as_messages_arrive(
    groups: GroupsCaller,
) -> None:
    ids = {(await create(groups, "alice", name=f"Group {n}")).group_id for n in range(5)}
    for gid in sorted(ids):
        await send(groups, "alice", gid, "hi")
    everything = await conversations(groups, "alice", page_size=100)
    keys = [(e.last_activity_at.ToMilliseconds(), e.group.group_id) for e in everything.groups]
    assert keys == sorted(keys, reverse=True)
    order = [gid for _, gid in keys]
    assert set(order) == ids and not everything.has_more

    first = await conversations(groups, "alice", page_size=2)
    assert [e.group.group_id for e in first.groups] == order[:2] and first.has_more
    # The oldest group gets a message (strictly later than any activity so far, so it moves
    # to the top, ahead of the reader's position): later pages must not show it again.
    await eventually(lambda: time.time() * 1000 > keys[0][0] + 1)
    await send(groups, "alice", order[-1], "news")
    seen = [e.group.group_id for e in first.groups]
    page = first
    while page.has_more:
        page = await conversations(groups, "alice", page_size=2, **position_of(page.groups[-1]))
        seen += [e.group.group_id for e in page.groups]
    assert seen == order[:-1]
    newest = await conversations(groups, "alice", page_size=1)
    assert newest.groups[0].group.group_id == order[-1]
    assert newest.groups[0].group.last_message.text == "news"


async def test_group_conversations_refuse_a_negative_position(groups: GroupsCaller) -> None:
    stub, md = groups("alice")
    request = pb.ListGroupConversationsRequest(before_activity_ms=-1)
    code, _ = await refused(stub.ListGroupConversations(request, metadata=md))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
