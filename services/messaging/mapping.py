"""Messaging's domain objects as protobuf messages: the one place the two meet."""

from __future__ import annotations

from groupchat.content.v1 import content_pb2
from groupchat.messaging.v1 import messaging_pb2

from services.kit.posts import as_removed
from services.kit.timestamps import timestamp_from_ms
from services.messaging.domain import Conversation, DirectMessage, QuotaUsage, SharedPost


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
    if (quote := m.reply_to) is not None:
        message.reply_to.CopyFrom(
            content_pb2.Quote(
                seq=quote.seq,
                sender_id=quote.sender_id,
                excerpt=quote.excerpt,
                recalled=quote.recalled,
                shared_post_id=quote.shared_post_id,
            )
        )
    if (recall := m.recall) is not None:
        message.recall.CopyFrom(
            content_pb2.Recall(
                recalled_by=recall.recalled_by,
                recalled_at=timestamp_from_ms(recall.recalled_at_ms),
                moderation=False,
            )
        )
    return message


def shared_post_to_proto(card: SharedPost) -> content_pb2.SharedPost:
    shown = content_pb2.SharedPost(
        post_id=card.post_id, title=card.title, cover_url=card.cover_url, author_id=card.author_id
    )
    return as_removed(shown) if card.removed else shown


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
