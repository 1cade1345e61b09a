"""The Messages tab: the caller's direct conversations and groups in one list, newest first.

Messaging and groups each page their own list by (last activity, id), newest first; this
merges the two. The page token is the position of the last row shown, as (activity, key),
where the key tells the two kinds apart ("d:<conversation>" sorts below "g:<group>" at the
same instant). A conversation that gets a new message moves above the position and is not
shown again on later pages; the Subscribe stream tells the client about it instead.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import grpc
from groupchat.gateway.v1 import gateway_pb2
from groupchat.groups.v1 import groups_pb2
from groupchat.messaging.v1 import messaging_pb2

from services.kit.downstream import Downstream
from services.kit.paging import decode_page_token, encode_page_token, page_size

PREVIEW_CHARS = 80
DIRECT, GROUP = "d:", "g:"
# Sorts after every id ([A-Za-z0-9_:-]): "everything at this instant".
AFTER_ANY_ID = "~"


@dataclass(frozen=True)
class Position:
    """A row's place in the merged order: newer activity first, then the greater key."""

    activity_ms: int
    key: str

    def before_for(self, prefix: str) -> tuple[int, str]:
        """The position to hand the list of one kind (`prefix`), in that list's own ids."""
        if self.key.startswith(prefix):
            return self.activity_ms, self.key.removeprefix(prefix)
        # At the same instant the other kind's rows are all on one side of this one.
        shown_already = prefix > self.key
        return self.activity_ms, "" if shown_already else AFTER_ANY_ID


class ConversationsHandler:
    def __init__(self, groups: Downstream, messaging: Downstream) -> None:
        self._groups = groups
        self._messaging = messaging

    async def __call__(
        self, request: gateway_pb2.ListConversationsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListConversationsResponse:
        limit = page_size(request.page_size, default=20, maximum=100)
        token = decode_page_token(request.page_token)
        after = Position(int(token["ms"]), str(token["key"])) if token else None
        directs, groups = await asyncio.gather(
            self._directs(after, limit, context), self._group_rows(after, limit, context)
        )
        rows = sorted([*directs[0], *groups[0]], key=lambda r: r[0], reverse=True)
        page = rows[:limit]
        more = len(rows) > limit or directs[1] or groups[1]
        next_token = ""
        if more and page:
            last = page[-1][0]
            next_token = encode_page_token({"ms": last[0], "key": last[1]})
        return gateway_pb2.ListConversationsResponse(
            conversations=[conversation for _, conversation in page], next_page_token=next_token
        )

    async def _directs(
        self, after: Position | None, limit: int, context: grpc.aio.ServicerContext
    ) -> tuple[list[tuple[tuple[int, str], gateway_pb2.Conversation]], bool]:
        before_ms, before_id = after.before_for(DIRECT) if after else (0, "")
        reply = await self._messaging.call(
            "ListDirectConversations",
            messaging_pb2.ListDirectConversationsRequest(
                page_size=limit, before_activity_ms=before_ms, before_conversation_id=before_id
            ),
            context,
        )
        return [_direct_row(c) for c in reply.conversations], reply.has_more

    async def _group_rows(
        self, after: Position | None, limit: int, context: grpc.aio.ServicerContext
    ) -> tuple[list[tuple[tuple[int, str], gateway_pb2.Conversation]], bool]:
        before_ms, before_id = after.before_for(GROUP) if after else (0, "")
        reply = await self._groups.call(
            "ListGroupConversations",
            groups_pb2.ListGroupConversationsRequest(
                page_size=limit, before_activity_ms=before_ms, before_group_id=before_id
            ),
            context,
        )
        return [_group_row(g) for g in reply.groups], reply.has_more


def _direct_row(
    c: messaging_pb2.DirectConversation,
) -> tuple[tuple[int, str], gateway_pb2.Conversation]:
    activity = c.last_activity_at.ToMilliseconds()
    row = gateway_pb2.Conversation(
        direct=c,
        title=c.peer_id,
        unread_count=c.unread_count,
        is_request=c.is_request,
        last_activity_at=c.last_activity_at,
    )
    _set_last_message(row, c.last_message if c.HasField("last_message") else None)
    return (activity, DIRECT + c.conversation_id), row


def _group_row(g: groups_pb2.MyGroup) -> tuple[tuple[int, str], gateway_pb2.Conversation]:
    activity = g.last_activity_at.ToMilliseconds()
    row = gateway_pb2.Conversation(
        group=g,
        title=g.group.name,
        unread_count=g.unread_count,
        mention_count=g.mention_count,
        last_activity_at=g.last_activity_at,
    )
    _set_last_message(row, g.group.last_message if g.group.HasField("last_message") else None)
    return (activity, GROUP + g.group.group_id), row


def _set_last_message(row: gateway_pb2.Conversation, message: Any) -> None:
    if message is not None:
        # A message that only shares a post previews as the post's title (a recalled one
        # has neither left).
        row.preview = (message.text or message.shared_post.title)[:PREVIEW_CHARS]
        row.last_sender_id = message.sender_id
