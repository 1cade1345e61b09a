"""The messaging service's event consumers: the follow projection the stranger rules read."""

from __future__ import annotations

from groupchat.events.v1 import events_pb2

from services.kit.events import EventHandler
from services.messaging.storage import MessagingStore

SOCIAL_DURABLE = "messaging-social"
SOCIAL_SUBJECT = "social.>"


def follows_handler(store: MessagingStore) -> EventHandler:
    """Platform follow events: keep one edge per (follower, followee). An event changes its
    edge only if its version is newer than the stored one, so a redelivered or reordered
    event changes nothing."""

    async def handle(envelope: events_pb2.Envelope) -> None:
        kind = envelope.WhichOneof("payload")
        if kind == "user_followed":
            edge = (envelope.user_followed.follower_id, envelope.user_followed.followee_id)
        elif kind == "user_unfollowed":
            edge = (envelope.user_unfollowed.follower_id, envelope.user_unfollowed.followee_id)
        else:
            return
        await store.apply_follow(
            *edge, following=kind == "user_followed", version=envelope.aggregate_version
        )

    return handle
