"""The events messaging's commands commit with their changes (services.kit.outbox): a
message sent or recalled, published for each of its two participants (the recipient, and
the sender's other devices), and a shared post opened, for the post's author."""

from __future__ import annotations

from groupchat.events.v1 import events_pb2

from services.kit.content import SharedPost
from services.kit.events import OutgoingEvent, new_event
from services.messaging.domain import Admission, DirectMessage, MessageWithState
from services.messaging.mapping import message_to_proto


def recalled_events(tombstone: DirectMessage, actor_id: str) -> list[OutgoingEvent]:
    """The recall, for both participants (as its message was sent to both)."""
    return [
        new_event(
            "messaging",
            "direct_message_changed",
            aggregate_id=tombstone.conversation_id,
            aggregate_version=tombstone.version,
            user_id=user_id,
            direct_message_changed={
                "message": message_to_proto(tombstone),
                "change": events_pb2.RECALLED,
                "actor_id": actor_id,
            },
        )
        for user_id in (tombstone.recipient_id, tombstone.sender_id)
    ]


def sent_events(sent: MessageWithState, admission: Admission) -> list[OutgoingEvent]:
    """The message for its recipient, and for its sender's other devices."""
    message = sent.message
    return [
        new_event(
            "messaging",
            "direct_message_sent",
            aggregate_id=message.conversation_id,
            aggregate_version=message.seq,
            user_id=user_id,
            direct_message_sent={
                "message": message_to_proto(message),
                "established": admission is Admission.ANSWER,
                "is_request": sent.state.is_request_from(message.sender_id),
            },
        )
        for user_id in (message.recipient_id, message.sender_id)
    ]


def shared_post_opened_event(
    card: SharedPost, opener_id: str, conversation_id: str, seq: int
) -> OutgoingEvent:
    """Analytics: published once, never replayed (aggregate version 0)."""
    return new_event(
        "messaging",
        "shared_post_opened",
        aggregate_id=conversation_id,
        aggregate_version=0,
        user_id=card.author_id or opener_id,
        shared_post_opened={
            "post_id": card.post_id,
            "author_id": card.author_id,
            "opener_id": opener_id,
            "conversation_id": conversation_id,
            "seq": seq,
        },
    )
