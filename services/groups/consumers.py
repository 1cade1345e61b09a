"""The groups service's event consumers: an event in, a use case, then the ack."""

from __future__ import annotations

from groupchat.events.v1 import events_pb2

from services.groups.app import GroupsApp
from services.kit.events import EventHandler
from services.kit.posts import post_change_from_event

POSTS_DURABLE = "groups-posts"


def posts_handler(app: GroupsApp) -> EventHandler:
    """Platform post events: keep the posts projection that linking a post is checked
    against, and unlink removed posts from their groups."""

    async def handle(envelope: events_pb2.Envelope) -> None:
        change = post_change_from_event(envelope)
        if change is not None:
            await app.apply_post_change(change)

    return handle
