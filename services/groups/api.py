"""The groups gRPC servicer: protobuf in, use case, protobuf out. No rules live here."""

from __future__ import annotations

from typing import TypeAlias

import grpc
from groupchat.content.v1 import content_pb2
from groupchat.groups.v1 import groups_pb2 as pb
from groupchat.groups.v1 import groups_pb2_grpc

from services.groups.app import GroupsApp
from services.groups.domain import GroupSettings
from services.groups.mapping import (
    category_name,
    group_to_proto,
    invite_to_proto,
    member_to_proto,
    message_to_proto,
    my_group_to_proto,
)
from services.kit.content import shared_post_to_proto
from services.kit.errors import FieldViolation, InvalidArgument
from services.kit.paging import decode_page_token, encode_page_token, page_size
from services.kit.rpc import current_identity

Ctx: TypeAlias = grpc.aio.ServicerContext


def _settings(
    name: str,
    description: str,
    category: int,
    cover_url: str,
    capacity: int,
    listed: bool,
    linked_post_id: str,
    slow_mode_seconds: int,
) -> GroupSettings:
    return GroupSettings(
        name=name,
        description=description,
        category=category_name(category),
        cover_url=cover_url,
        capacity=capacity,
        listed=listed,
        linked_post_id=linked_post_id,
        slow_mode_seconds=slow_mode_seconds,
    )


class GroupsServicer(groups_pb2_grpc.GroupsServicer):
    def __init__(self, app: GroupsApp) -> None:
        self._app = app

    async def CreateGroup(
        self, request: pb.CreateGroupRequest, context: Ctx
    ) -> pb.CreateGroupResponse:
        settings = _settings(
            request.name,
            request.description,
            request.category,
            request.cover_url,
            request.capacity,
            request.listed,
            request.linked_post_id,
            request.slow_mode_seconds,
        )
        group, owner = await self._app.create_group(
            current_identity().user_id, settings, request.request_id
        )
        return pb.CreateGroupResponse(
            group=group_to_proto(group), membership=member_to_proto(owner)
        )

    async def GetGroup(self, request: pb.GetGroupRequest, context: Ctx) -> pb.GetGroupResponse:
        group = await self._app.get_group(
            current_identity().user_id, request.group_id, request.invite_code
        )
        return pb.GetGroupResponse(group=group_to_proto(group))

    async def UpdateGroup(
        self, request: pb.UpdateGroupRequest, context: Ctx
    ) -> pb.UpdateGroupResponse:
        g = request.group
        changes = _settings(
            g.name,
            g.description,
            g.category,
            g.cover_url,
            g.capacity,
            g.listed,
            g.linked_post_id,
            g.slow_mode_seconds,
        )
        group = await self._app.update_group(
            current_identity().user_id, g.group_id, changes, list(request.update_mask.paths)
        )
        return pb.UpdateGroupResponse(group=group_to_proto(group))

    async def JoinGroup(self, request: pb.JoinGroupRequest, context: Ctx) -> pb.JoinGroupResponse:
        result = await self._app.join_group(
            current_identity().user_id, request.group_id, request.source, request.invite_code
        )
        return pb.JoinGroupResponse(
            membership=member_to_proto(result.membership),
            group=group_to_proto(result.group),
            joined=result.joined,
        )

    async def LeaveGroup(
        self, request: pb.LeaveGroupRequest, context: Ctx
    ) -> pb.LeaveGroupResponse:
        dissolved = await self._app.leave_group(current_identity().user_id, request.group_id)
        return pb.LeaveGroupResponse(dissolved=dissolved)

    async def RemoveMember(
        self, request: pb.RemoveMemberRequest, context: Ctx
    ) -> pb.RemoveMemberResponse:
        await self._app.remove_member(
            current_identity().user_id, request.group_id, request.user_id, request.ban
        )
        return pb.RemoveMemberResponse()

    async def SetMemberRole(
        self, request: pb.SetMemberRoleRequest, context: Ctx
    ) -> pb.SetMemberRoleResponse:
        member = await self._app.set_member_role(
            current_identity().user_id, request.group_id, request.user_id, request.role
        )
        return pb.SetMemberRoleResponse(membership=member_to_proto(member))

    async def MuteMember(
        self, request: pb.MuteMemberRequest, context: Ctx
    ) -> pb.MuteMemberResponse:
        member = await self._app.mute_member(
            current_identity().user_id, request.group_id, request.user_id, request.duration_seconds
        )
        return pb.MuteMemberResponse(membership=member_to_proto(member))

    async def TransferOwnership(
        self, request: pb.TransferOwnershipRequest, context: Ctx
    ) -> pb.TransferOwnershipResponse:
        group = await self._app.transfer_ownership(
            current_identity().user_id, request.group_id, request.new_owner_id
        )
        return pb.TransferOwnershipResponse(group=group_to_proto(group))

    async def ListMembers(
        self, request: pb.ListMembersRequest, context: Ctx
    ) -> pb.ListMembersResponse:
        limit = page_size(request.page_size)
        position = decode_page_token(request.page_token) or {}
        members = await self._app.list_members(
            current_identity().user_id, request.group_id, position.get("after"), limit + 1
        )
        page = members[:limit]
        token = encode_page_token({"after": page[-1].user_id}) if len(members) > limit else ""
        return pb.ListMembersResponse(
            members=[member_to_proto(m) for m in page], next_page_token=token
        )

    async def ListMyGroups(
        self, request: pb.ListMyGroupsRequest, context: Ctx
    ) -> pb.ListMyGroupsResponse:
        limit = page_size(request.page_size)
        position = decode_page_token(request.page_token) or {}
        rows = await self._app.list_my_groups(
            current_identity().user_id, position.get("after"), limit + 1
        )
        page = rows[:limit]
        token = encode_page_token({"after": page[-1].group.group_id}) if len(rows) > limit else ""
        return pb.ListMyGroupsResponse(
            groups=[my_group_to_proto(c.group, c.membership, c.mention_count) for c in page],
            next_page_token=token,
        )

    async def ListGroupConversations(
        self, request: pb.ListGroupConversationsRequest, context: Ctx
    ) -> pb.ListGroupConversationsResponse:
        conversations, has_more = await self._app.list_group_conversations(
            current_identity().user_id,
            request.before_activity_ms,
            request.before_group_id,
            page_size(request.page_size, default=20, maximum=100),
        )
        return pb.ListGroupConversationsResponse(
            groups=[
                my_group_to_proto(c.group, c.membership, c.mention_count) for c in conversations
            ],
            has_more=has_more,
        )

    async def SendGroupMessage(
        self, request: pb.SendGroupMessageRequest, context: Ctx
    ) -> pb.SendGroupMessageResponse:
        message = await self._app.send_message(
            current_identity().user_id,
            request.group_id,
            request.text,
            list(request.mentions),
            request.client_msg_id,
            shared_post_id=request.shared_post_id,
            reply_to_seq=request.reply_to_seq,
            mention_all=request.mention_all,
        )
        return pb.SendGroupMessageResponse(message=message_to_proto(message))

    async def ListGroupMessages(
        self, request: pb.ListGroupMessagesRequest, context: Ctx
    ) -> pb.ListGroupMessagesResponse:
        messages, has_more = await self._app.list_messages(
            current_identity().user_id,
            request.group_id,
            request.after_seq,
            request.before_seq,
            page_size(request.page_size, maximum=200),
        )
        viewer = current_identity().user_id
        return pb.ListGroupMessagesResponse(
            messages=[message_to_proto(m, viewer) for m in messages], has_more=has_more
        )

    async def MarkGroupRead(
        self, request: pb.MarkGroupReadRequest, context: Ctx
    ) -> pb.MarkGroupReadResponse:
        read_seq, unread = await self._app.mark_read(
            current_identity().user_id, request.group_id, request.read_seq
        )
        return pb.MarkGroupReadResponse(read_seq=read_seq, unread_count=unread)

    async def CreateInvite(
        self, request: pb.CreateInviteRequest, context: Ctx
    ) -> pb.CreateInviteResponse:
        invite = await self._app.create_invite(
            current_identity().user_id,
            request.group_id,
            request.expires_in_seconds,
            request.max_uses,
        )
        return pb.CreateInviteResponse(invite=invite_to_proto(invite))

    async def RevokeInvite(
        self, request: pb.RevokeInviteRequest, context: Ctx
    ) -> pb.RevokeInviteResponse:
        await self._app.revoke_invite(current_identity().user_id, request.group_id, request.code)
        return pb.RevokeInviteResponse()

    async def ReactToGroupMessage(
        self, request: pb.ReactToGroupMessageRequest, context: Ctx
    ) -> pb.ReactToGroupMessageResponse:
        user_id = current_identity().user_id
        message = await self._app.conversation.react(
            user_id, request.group_id, request.seq, request.emoji, request.remove
        )
        return pb.ReactToGroupMessageResponse(message=message_to_proto(message, user_id))

    async def RecallGroupMessage(
        self, request: pb.RecallGroupMessageRequest, context: Ctx
    ) -> pb.RecallGroupMessageResponse:
        message = await self._app.conversation.recall(
            current_identity().user_id, request.group_id, request.seq
        )
        return pb.RecallGroupMessageResponse(message=message_to_proto(message))

    async def SetGroupAnnouncement(
        self, request: pb.SetGroupAnnouncementRequest, context: Ctx
    ) -> pb.SetGroupAnnouncementResponse:
        group = await self._app.board.set_announcement(
            current_identity().user_id, request.group_id, request.text
        )
        return pb.SetGroupAnnouncementResponse(group=group_to_proto(group))

    async def PinGroupMessage(
        self, request: pb.PinGroupMessageRequest, context: Ctx
    ) -> pb.PinGroupMessageResponse:
        group = await self._app.board.pin_message(
            current_identity().user_id, request.group_id, request.seq, request.unpin
        )
        return pb.PinGroupMessageResponse(group=group_to_proto(group))

    async def OpenSharedPost(
        self, request: content_pb2.OpenSharedPostRequest, context: Ctx
    ) -> content_pb2.OpenSharedPostResponse:
        if request.WhichOneof("conversation") != "group_id":
            # Direct conversations' shared posts are the messaging service's.
            raise InvalidArgument([FieldViolation("group_id", "a group's id (required here)")])
        card = await self._app.conversation.open_shared_post(
            current_identity().user_id, request.group_id, request.seq
        )
        return content_pb2.OpenSharedPostResponse(
            post_id=card.post_id, post=shared_post_to_proto(card)
        )
