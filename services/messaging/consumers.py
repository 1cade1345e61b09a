"""The messaging service's event consumers: the follow projection the stranger rules read,
and the posts projection that sharing a post is checked against."""

from __future__ import annotations

from groupchat.events.v1 import events_pb2

from services.kit.events import EventHandler
from services.kit.posts import post_change_from_event
from services.messaging.app import MessagingApp
from services.messaging.storage import MessagingStore

SOCIAL_DURABLE = "messaging-social"
SOCIAL_SUBJECT = "social.>"
POSTS_DURABLE = "messaging-posts"


def posts_handler(app: MessagingApp) -> EventHandler:
    """Platform post events: a post may be shared while published, and shows as removed in
    the messages that share it once it is not."""

    async def handle(envelope: events_pb2.Envelope) -> None:
        change = post_change_from_event(envelope)
        if change is not None:
            await app.apply_post_change(change)

    return handle


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
