"""Invites through the gateway: an unlisted group is joined only with one."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from groupchat.groups.v1 import groups_pb2 as pb

from services.kit.rpc_status import error_info
from tests.e2e.groups import unique

pytestmark = pytest.mark.e2e


async def reason_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    info = error_info(caught.value)
    return caught.value.code(), info.reason if info else ""


async def test_an_unlisted_group_is_joined_through_the_gateway_with_an_invite(
    gateway: Any,
) -> None:
    owner, guest, latecomer = unique("owner"), unique("guest"), unique("late")
    stub, md = gateway(owner)
    group = (
        await stub.CreateGroup(
            pb.CreateGroupRequest(name="Book club", category=pb.BOOKS), metadata=md
        )
    ).group
    await stub.SendGroupMessage(
        pb.SendGroupMessageRequest(group_id=group.group_id, text="chapter 3 tonight"), metadata=md
    )
    guest_stub, guest_md = gateway(guest)
    not_found = (grpc.StatusCode.NOT_FOUND, "GROUP_NOT_FOUND")
    join = pb.JoinGroupRequest(group_id=group.group_id, source=pb.PLAZA)
    assert await reason_of(guest_stub.JoinGroup(join, metadata=guest_md)) == not_found

    invite = (
        await stub.CreateInvite(
            pb.CreateInviteRequest(group_id=group.group_id, max_uses=1, expires_in_seconds=3600),
            metadata=md,
        )
    ).invite
    assert (invite.max_uses, invite.uses) == (1, 0) and invite.HasField("expire_time")
    card = await guest_stub.GetGroup(
        pb.GetGroupRequest(group_id=group.group_id, invite_code=invite.code), metadata=guest_md
    )
    assert card.group.name == "Book club" and not card.group.HasField("last_message")
    join.invite_code = invite.code
    joined = await guest_stub.JoinGroup(join, metadata=guest_md)
    assert joined.joined and joined.group.member_count == 2

    late_stub, late_md = gateway(latecomer)
    assert await reason_of(late_stub.JoinGroup(join, metadata=late_md)) == not_found
    revoke = pb.RevokeInviteRequest(group_id=group.group_id, code=invite.code)
    await stub.RevokeInvite(revoke, metadata=md)
    await stub.RevokeInvite(revoke, metadata=md)
