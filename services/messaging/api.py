"""The messaging gRPC servicer: protobuf in, use case, protobuf out. No rules live here."""

from __future__ import annotations

from typing import TypeAlias

import grpc
from groupchat.content.v1 import content_pb2
from groupchat.messaging.v1 import messaging_pb2 as pb
from groupchat.messaging.v1 import messaging_pb2_grpc

from services.kit.content import shared_post_to_proto
from services.kit.paging import page_size
from services.kit.rpc import current_identity
from services.messaging.app import MessagingApp
from services.messaging.mapping import conversation_to_proto, message_to_proto, quota_to_proto

Ctx: TypeAlias = grpc.aio.ServicerContext


class MessagingServicer(messaging_pb2_grpc.MessagingServicer):
    def __init__(self, app: MessagingApp) -> None:
        self._app = app

    async def SendDirectMessage(
        self, request: pb.SendDirectMessageRequest, context: Ctx
    ) -> pb.SendDirectMessageResponse:
        user_id = current_identity().user_id
        result = await self._app.send_message(
            user_id,
            request.recipient_id,
            request.text,
            request.client_msg_id,
            request.shared_post_id,
            request.reply_to_seq,
        )
        return pb.SendDirectMessageResponse(
            message=message_to_proto(result.message),
            conversation=conversation_to_proto(result.conversation, user_id),
            used_stranger_slot=result.used_stranger_slot,
        )

    async def ListDirectMessages(
        self, request: pb.ListDirectMessagesRequest, context: Ctx
    ) -> pb.ListDirectMessagesResponse:
        messages, has_more = await self._app.list_messages(
            current_identity().user_id,
            request.peer_id,
            request.after_seq,
            request.before_seq,
            page_size(request.page_size, default=50, maximum=200),
        )
        return pb.ListDirectMessagesResponse(
            messages=[message_to_proto(m) for m in messages], has_more=has_more
        )

    async def MarkDirectRead(
        self, request: pb.MarkDirectReadRequest, context: Ctx
    ) -> pb.MarkDirectReadResponse:
        read_seq, unread = await self._app.mark_read(
            current_identity().user_id, request.peer_id, request.read_seq
        )
        return pb.MarkDirectReadResponse(read_seq=read_seq, unread_count=unread)

    async def GetStrangerQuota(
        self, request: pb.GetStrangerQuotaRequest, context: Ctx
    ) -> pb.GetStrangerQuotaResponse:
        return quota_to_proto(await self._app.stranger_quota(current_identity().user_id))

    async def BlockUser(self, request: pb.BlockUserRequest, context: Ctx) -> pb.BlockUserResponse:
        await self._app.block(current_identity().user_id, request.user_id)
        return pb.BlockUserResponse()

    async def UnblockUser(
        self, request: pb.UnblockUserRequest, context: Ctx
    ) -> pb.UnblockUserResponse:
        await self._app.unblock(current_identity().user_id, request.user_id)
        return pb.UnblockUserResponse()

    async def ListDirectConversations(
        self, request: pb.ListDirectConversationsRequest, context: Ctx
    ) -> pb.ListDirectConversationsResponse:
        user_id = current_identity().user_id
        limit = page_size(request.page_size, default=20, maximum=100)
        rows = await self._app.list_conversations(
            user_id, request.before_activity_ms, request.before_conversation_id, limit + 1
        )
        return pb.ListDirectConversationsResponse(
            conversations=[conversation_to_proto(c, user_id) for c in rows[:limit]],
            has_more=len(rows) > limit,
        )

    async def RecallDirectMessage(
        self, request: pb.RecallDirectMessageRequest, context: Ctx
    ) -> pb.RecallDirectMessageResponse:
        tombstone = await self._app.recall_message(
            current_identity().user_id, request.peer_id, request.seq
        )
        return pb.RecallDirectMessageResponse(message=message_to_proto(tombstone))

    async def OpenSharedPost(
        self, request: content_pb2.OpenSharedPostRequest, context: Ctx
    ) -> content_pb2.OpenSharedPostResponse:
        card = await self._app.open_shared_post(
            current_identity().user_id, request.conversation_id, request.group_id, request.seq
        )
        return content_pb2.OpenSharedPostResponse(
            post_id=card.post_id, post=shared_post_to_proto(card)
        )
