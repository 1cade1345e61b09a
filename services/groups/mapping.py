"""Groups' domain objects as protobuf messages: the one place the two meet."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp
from groupchat.groups.v1 import groups_pb2

from services.groups.domain import Group, Membership, Message


def _timestamp(ms: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def group_to_proto(g: Group) -> groups_pb2.Group:
    s = g.settings
    return groups_pb2.Group(
        group_id=g.group_id,
        name=s.name,
        description=s.description,
        category=groups_pb2.Category.Value(s.category) if s.category else None,
        cover_url=s.cover_url,
        capacity=s.capacity,
        listed=s.listed,
        linked_post_id=s.linked_post_id,
        owner_id=g.owner_id,
        member_count=g.member_count,
        last_seq=g.last_seq,
        created_at=_timestamp(g.created_at_ms),
        updated_at=_timestamp(g.updated_at_ms),
        version=g.version,
    )


def member_to_proto(m: Membership) -> groups_pb2.Member:
    member = groups_pb2.Member(
        group_id=m.group_id,
        user_id=m.user_id,
        role=groups_pb2.Role.Name(m.role),
        joined_at=_timestamp(m.joined_at_ms),
        read_seq=m.read_seq,
    )
    if m.muted_until_ms:
        member.muted_until.FromMilliseconds(m.muted_until_ms)
    return member


def message_to_proto(m: Message) -> groups_pb2.GroupMessage:
    return groups_pb2.GroupMessage(
        group_id=m.group_id,
        seq=m.seq,
        sender_id=m.sender_id,
        text=m.text,
        mentions=list(m.mentions),
        client_msg_id=m.client_msg_id,
        sent_at=_timestamp(m.sent_at_ms),
    )


def category_name(value: int) -> str | None:
    """The taxonomy name of a Category value; None for unspecified or unknown values."""
    if value == groups_pb2.CATEGORY_UNSPECIFIED or value not in groups_pb2.Category.values():
        return None
    return groups_pb2.Category.Name(value)
