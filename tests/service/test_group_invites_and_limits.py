"""Groups that are not for everyone (invites, what a non-member sees) and limits against abuse
(send rate, slow mode), over real gRPC with real NATS and the MongoDB server."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from groupchat.groups.v1 import groups_pb2 as pb

from services.kit.rpc_status import error_info
from tests.conftest import unique_database_name
from tests.service.conftest import GroupsCaller


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def create(groups: GroupsCaller, owner: str, **fields: Any) -> pb.Group:
    stub, md = groups(owner)
    fields.setdefault("name", "Night shift nurses")
    fields.setdefault("category", pb.WORK)
    return (await stub.CreateGroup(pb.CreateGroupRequest(**fields), metadata=md)).group


async def invite(groups: GroupsCaller, user: str, group_id: str, **terms: int) -> pb.Invite:
    stub, md = groups(user)
    request = pb.CreateInviteRequest(group_id=group_id, **terms)
    return (await stub.CreateInvite(request, metadata=md)).invite


async def join(
    groups: GroupsCaller, user: str, group_id: str, code: str = ""
) -> pb.JoinGroupResponse:
    stub, md = groups(user)
    request = pb.JoinGroupRequest(group_id=group_id, source=pb.PLAZA, invite_code=code)
    return await stub.JoinGroup(request, metadata=md)


async def send(groups: GroupsCaller, user: str, group_id: str, client_msg_id: str = "") -> Any:
    stub, md = groups(user)
    request = pb.SendGroupMessageRequest(group_id=group_id, text="hi", client_msg_id=client_msg_id)
    return (await stub.SendGroupMessage(request, metadata=md)).message


async def outcome(call: Any) -> tuple[grpc.StatusCode, str]:
    """(OK, "") or the refusal's code and ErrorInfo reason."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        return error.code(), info.reason if info else ""
    return grpc.StatusCode.OK, ""


async def refusal(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "GROUP_NOT_FOUND")


# Invites


async def test_an_unlisted_group_is_not_found_without_an_invite_as_if_it_did_not_exist(
    groups: GroupsCaller,
) -> None:
    group = await create(groups, "olga")
    assert await outcome(join(groups, "eve", group.group_id)) == NOT_FOUND
    assert await outcome(join(groups, "eve", "g_doesnotexist")) == NOT_FOUND
    stub, md = groups("eve")
    get = stub.GetGroup(pb.GetGroupRequest(group_id=group.group_id), metadata=md)
    assert await outcome(get) == NOT_FOUND


async def test_an_invite_lets_its_holder_see_and_join_an_unlisted_group(
    groups: GroupsCaller,
) -> None:
    group = await create(groups, "olga")
    code = (await invite(groups, "olga", group.group_id)).code
    stub, md = groups("bob")
    seen = await stub.GetGroup(
        pb.GetGroupRequest(group_id=group.group_id, invite_code=code), metadata=md
    )
    assert seen.group.name == "Night shift nurses"
    joined = await join(groups, "bob", group.group_id, code)
    assert joined.joined and joined.group.member_count == 2
    again = await join(groups, "bob", group.group_id, code)
    assert not again.joined


async def test_a_listed_group_needs_no_invite(groups: GroupsCaller) -> None:
    group = await create(groups, "olga", listed=True)
    assert (await join(groups, "bob", group.group_id)).joined


async def test_only_the_owner_and_admins_create_and_revoke_invites(groups: GroupsCaller) -> None:
    group = await create(groups, "olga")
    code = (await invite(groups, "olga", group.group_id)).code
    await join(groups, "bob", group.group_id, code)
    stub, md = groups("bob")
    denied = (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    request = pb.CreateInviteRequest(group_id=group.group_id)
    assert await outcome(stub.CreateInvite(request, metadata=md)) == denied
    revoke = pb.RevokeInviteRequest(group_id=group.group_id, code=code)
    assert await outcome(stub.RevokeInvite(revoke, metadata=md)) == denied
    owner, owner_md = groups("olga")
    await owner.SetMemberRole(
        pb.SetMemberRoleRequest(group_id=group.group_id, user_id="bob", role=pb.ADMIN),
        metadata=owner_md,
    )
    assert (await invite(groups, "bob", group.group_id, max_uses=3)).max_uses == 3


async def test_a_revoked_invite_lets_nobody_in_and_revoking_again_changes_nothing(
    groups: GroupsCaller,
) -> None:
    group = await create(groups, "olga")
    code = (await invite(groups, "olga", group.group_id)).code
    stub, md = groups("olga")
    revoke = pb.RevokeInviteRequest(group_id=group.group_id, code=code)
    await stub.RevokeInvite(revoke, metadata=md)
    await stub.RevokeInvite(revoke, metadata=md)
    assert await outcome(join(groups, "bob", group.group_id, code)) == NOT_FOUND


async def test_an_invite_of_another_group_does_not_open_this_one(groups: GroupsCaller) -> None:
    mine, other = await create(groups, "olga"), await create(groups, "olga")
    code = (await invite(groups, "olga", other.group_id)).code
    assert await outcome(join(groups, "bob", mine.group_id, code)) == NOT_FOUND


async def test_an_invite_for_n_uses_admits_exactly_n_of_many_concurrent_joiners(
    groups: GroupsCaller,
) -> None:
    group = await create(groups, "olga")
    code = (await invite(groups, "olga", group.group_id, max_uses=5)).code
    joiners = [unique("j") for _ in range(20)]
    outcomes = await asyncio.gather(
        *(outcome(join(groups, u, group.group_id, code)) for u in joiners)
    )
    assert outcomes.count((grpc.StatusCode.OK, "")) == 5
    assert outcomes.count(NOT_FOUND) == 15
    stub, md = groups("olga")
    members = await stub.ListMembers(pb.ListMembersRequest(group_id=group.group_id), metadata=md)
    assert len(members.members) == 6
    stored = await stub.GetGroup(pb.GetGroupRequest(group_id=group.group_id), metadata=md)
    assert stored.group.member_count == 6


async def test_a_bad_invite_to_a_listed_group_is_said_to_be_the_invite(
    groups: GroupsCaller,
) -> None:
    group = await create(groups, "olga", listed=True)
    refused = await outcome(join(groups, "bob", group.group_id, "nosuchcode"))
    assert refused == (grpc.StatusCode.NOT_FOUND, "INVITE_NOT_FOUND")


# What a non-member sees


async def test_a_non_member_sees_the_card_but_never_the_conversation(
    groups: GroupsCaller,
) -> None:
    group = await create(groups, "olga", listed=True, description="Swap shifts here")
    await send(groups, "olga", group.group_id)
    stub, md = groups("eve")
    seen = (await stub.GetGroup(pb.GetGroupRequest(group_id=group.group_id), metadata=md)).group
    assert (seen.name, seen.description, seen.category, seen.member_count) == (
        "Night shift nurses",
        "Swap shifts here",
        pb.WORK,
        1,
    )
    assert not seen.HasField("last_message") and seen.last_seq == 0
    owner, owner_md = groups("olga")
    full = await owner.GetGroup(pb.GetGroupRequest(group_id=group.group_id), metadata=owner_md)
    assert full.group.last_message.text == "hi" and full.group.last_seq == 1
    not_a_member = (grpc.StatusCode.PERMISSION_DENIED, "NOT_A_MEMBER")
    members = stub.ListMembers(pb.ListMembersRequest(group_id=group.group_id), metadata=md)
    assert await outcome(members) == not_a_member
    history = stub.ListGroupMessages(
        pb.ListGroupMessagesRequest(group_id=group.group_id), metadata=md
    )
    assert await outcome(history) == not_a_member


# Send rate


@pytest.mark.parametrize("groups_env", [{"SEND_BURST": "3", "SEND_RATE_PER_SECOND": "0.01"}])
async def test_a_member_sends_at_most_the_burst_at_once_and_is_told_when_to_retry(
    groups: GroupsCaller,
) -> None:
    group = await create(groups, "olga", listed=True)
    await join(groups, "bob", group.group_id)
    outcomes = await asyncio.gather(
        *(outcome(send(groups, "bob", group.group_id)) for _ in range(10))
    )
    assert outcomes.count((grpc.StatusCode.OK, "")) == 3
    assert outcomes.count((grpc.StatusCode.RESOURCE_EXHAUSTED, "SEND_RATE_LIMITED")) == 7
    error = await refusal(send(groups, "bob", group.group_id))
    info = error_info(error)
    assert info is not None and int(info.metadata["retry_after_seconds"]) >= 1
    # Another member's bucket is their own.
    assert (await send(groups, "olga", group.group_id)).seq == 4


@pytest.mark.parametrize("groups_env", [{"SEND_BURST": "1", "SEND_RATE_PER_SECOND": "0.01"}])
async def test_a_retried_send_is_answered_although_the_rate_is_used_up(
    groups: GroupsCaller,
) -> None:
    group = await create(groups, "olga", listed=True)
    first = await send(groups, "olga", group.group_id, client_msg_id="m-1")
    again = await send(groups, "olga", group.group_id, client_msg_id="m-1")
    assert (again.seq, again.client_msg_id) == (first.seq, "m-1")


# Slow mode


async def slow_mode(groups: GroupsCaller, user: str, group_id: str, seconds: int) -> Any:
    stub, md = groups(user)
    request = pb.UpdateGroupRequest(
        group=pb.Group(group_id=group_id, slow_mode_seconds=seconds),
        update_mask=field_mask_pb2.FieldMask(paths=["slow_mode_seconds"]),
    )
    return await stub.UpdateGroup(request, metadata=md)


async def test_slow_mode_lets_a_member_send_exactly_one_message_per_period(
    groups: GroupsCaller,
) -> None:
    group = await create(groups, "olga", listed=True)
    await join(groups, "bob", group.group_id)
    updated = await slow_mode(groups, "olga", group.group_id, 60)
    assert updated.group.slow_mode_seconds == 60
    stub, md = groups("bob")
    seen = await stub.GetGroup(pb.GetGroupRequest(group_id=group.group_id), metadata=md)
    assert seen.group.slow_mode_seconds == 60
    outcomes = await asyncio.gather(
        *(outcome(send(groups, "bob", group.group_id)) for _ in range(8))
    )
    assert outcomes.count((grpc.StatusCode.OK, "")) == 1
    assert outcomes.count((grpc.StatusCode.RESOURCE_EXHAUSTED, "SLOW_MODE")) == 7
    info = error_info(await refusal(send(groups, "bob", group.group_id)))
    assert info is not None and 1 <= int(info.metadata["retry_after_seconds"]) <= 60
    # The owner, who set it, is not held back.
    assert (await send(groups, "olga", group.group_id)).seq == 2
    assert (await send(groups, "olga", group.group_id)).seq == 3


async def test_only_the_owner_and_admins_set_slow_mode_and_it_can_be_lifted(
    groups: GroupsCaller,
) -> None:
    group = await create(groups, "olga", listed=True, slow_mode_seconds=30)
    assert group.slow_mode_seconds == 30
    await join(groups, "bob", group.group_id)
    denied = await outcome(slow_mode(groups, "bob", group.group_id, 0))
    assert denied == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    await send(groups, "bob", group.group_id)
    await slow_mode(groups, "olga", group.group_id, 0)
    assert (await send(groups, "bob", group.group_id)).seq == 2
    too_slow = await outcome(slow_mode(groups, "olga", group.group_id, 86_401))
    assert too_slow == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


SLOW_MODE_DB = unique_database_name()


@pytest.mark.parametrize("groups_env", [{"MONGODB_DATABASE": SLOW_MODE_DB}])
async def test_a_send_retried_after_it_stopped_past_its_slot_takes_the_slot_again(
    groups: GroupsCaller, mongodb_client: Any
) -> None:
    group = await create(groups, "olga", listed=True)
    await join(groups, "bob", group.group_id)
    await slow_mode(groups, "olga", group.group_id, 60)
    # What a send of bob's "m-1" leaves when it stops after taking its slot, before storing.
    mongodb_client[SLOW_MODE_DB]["send_slots"].insert_one(
        {
            "_id": f"{group.group_id}:bob",
            "last_sent_ms": int(time.time() * 1000),
            "holder": f"{group.group_id}:bob:m-1",
        }
    )
    assert (await send(groups, "bob", group.group_id, client_msg_id="m-1")).seq == 1
    assert await outcome(send(groups, "bob", group.group_id, client_msg_id="m-2")) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "SLOW_MODE",
    )
