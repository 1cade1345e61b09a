"""Messages fetched from their owning service, as stream responses: what fills a gap in a
stream and what a resuming client missed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from groupchat.events.v1 import events_pb2
from groupchat.gateway.v1 import gateway_pb2
from groupchat.groups.v1 import groups_pb2
from groupchat.messaging.v1 import messaging_pb2

from services.kit.auth import Identity
from services.kit.downstream import Downstream

PAGE_SIZE = 100


@dataclass(frozen=True)
class Fetched:
    """A conversation's messages after some seq, ascending: (seq, serialized response)."""

    messages: list[tuple[int, bytes]]
    has_more: bool


def group_key(group_id: str) -> str:
    return f"group:{group_id}"


def direct_key(conversation_id: str) -> str:
    return f"direct:{conversation_id}"


class History:
    def __init__(self, groups: Downstream, messaging: Downstream) -> None:
        self._groups = groups
        self._messaging = messaging

    async def fetch(self, identity: Identity, key: str, after_seq: int) -> Fetched:
        """One page of the conversation named by `key` (group_key / direct_key), read as
        `identity`."""
        kind, _, conversation = key.partition(":")
        if kind == "group":
            return await self._group_messages(identity, conversation, after_seq)
        return await self._direct_messages(identity, conversation, after_seq)

    async def _group_messages(self, identity: Identity, group_id: str, after_seq: int) -> Fetched:
        page = await self._groups.call(
            "ListGroupMessages",
            groups_pb2.ListGroupMessagesRequest(
                group_id=group_id, after_seq=after_seq, page_size=PAGE_SIZE
            ),
            identity=identity,
        )
        return Fetched([(m.seq, group_message_response(m)) for m in page.messages], page.has_more)

    async def _direct_messages(
        self, identity: Identity, conversation_id: str, after_seq: int
    ) -> Fetched:
        peer_id = peer_in(conversation_id, identity.user_id)
        page = await self._messaging.call(
            "ListDirectMessages",
            messaging_pb2.ListDirectMessagesRequest(
                peer_id=peer_id, after_seq=after_seq, page_size=PAGE_SIZE
            ),
            identity=identity,
        )
        return Fetched([(m.seq, direct_message_response(m)) for m in page.messages], page.has_more)


def peer_in(conversation_id: str, user_id: str) -> str:
    """The other participant of a direct conversation ("alice:bob")."""
    first, _, second = conversation_id.partition(":")
    return second if first == user_id else first


def group_message_response(message: groups_pb2.GroupMessage) -> bytes:
    return _response(
        message.group_id,
        message,
        type="groups.group_message_posted",
        group_message_posted=events_pb2.GroupMessagePosted(message=message),
    )


def direct_message_response(message: messaging_pb2.DirectMessage) -> bytes:
    return _response(
        message.conversation_id,
        message,
        type="messaging.direct_message_sent",
        direct_message_sent=events_pb2.DirectMessageSent(message=message),
    )


def _response(conversation: str, message: Any, **event: Any) -> bytes:
    """A stored message as the stream response its event would have been (no event id)."""
    envelope = events_pb2.Envelope(
        aggregate_id=conversation,
        aggregate_version=message.seq,
        occurred_at=message.sent_at,
        **event,
    )
    return gateway_pb2.SubscribeResponse(event=envelope).SerializeToString()
