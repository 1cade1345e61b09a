"""Messaging's domain objects as protobuf messages: the one place the two meet."""

from __future__ import annotations

from groupchat.messaging.v1 import messaging_pb2

from services.kit.content import quote_to_proto, recall_to_proto, shared_post_to_proto
from services.kit.timestamps import timestamp_from_ms
from services.messaging.domain import Conversation, DirectMessage, QuotaUsage


def message_to_proto(m: DirectMessage) -> messaging_pb2.DirectMessage:
    message = messaging_pb2.DirectMessage(
        conversation_id=m.conversation_id,
        seq=m.seq,
        sender_id=m.sender_id,
        recipient_id=m.recipient_id,
        text=m.text,
        client_msg_id=m.client_msg_id,
        sent_at=timestamp_from_ms(m.sent_at_ms),
        version=m.version,
    )
    if m.shared_post is not None:
        message.shared_post.CopyFrom(shared_post_to_proto(m.shared_post))
    if m.reply_to is not None:
        message.reply_to.CopyFrom(quote_to_proto(m.reply_to))
    if m.recall is not None:
        message.recall.CopyFrom(recall_to_proto(m.recall))
    return message


def conversation_to_proto(c: Conversation, viewer_id: str) -> messaging_pb2.DirectConversation:
    """The conversation as `viewer_id`, one of its participants, sees it."""
    conversation = messaging_pb2.DirectConversation(
        conversation_id=c.conversation_id,
        peer_id=c.peer_of(viewer_id),
        started_by=c.started_by or "",
        established=c.established,
        is_request=c.is_request_for(viewer_id),
        last_seq=c.last_seq,
        read_seq=c.read_seq(viewer_id),
        unread_count=c.unread_count(viewer_id),
        last_activity_at=timestamp_from_ms(c.last_activity_ms),
    )
    if c.last_message is not None:
        conversation.last_message.CopyFrom(message_to_proto(c.last_message))
    return conversation


def quota_to_proto(usage: QuotaUsage) -> messaging_pb2.GetStrangerQuotaResponse:
    reply = messaging_pb2.GetStrangerQuotaResponse(
        limit=usage.limit, used=usage.used, remaining=usage.remaining
    )
    reply.resets_at.FromDatetime(usage.resets_at)
    return reply
