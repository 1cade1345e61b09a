"""Groups' domain objects as protobuf messages: the one place the two meet."""

from __future__ import annotations

from groupchat.content.v1 import content_pb2
from groupchat.events.v1 import events_pb2
from groupchat.groups.v1 import groups_pb2

from services.groups.domain import (
    Group,
    Invite,
    Membership,
    Message,
    activity_for_member,
    unread_count,
)
from services.groups.message_rules import reaction_counts
from services.kit.content import quote_to_proto, recall_to_proto, shared_post_to_proto
from services.kit.timestamps import timestamp_from_ms

# The join source every join with an invite counts as, in the creator's insights.
INVITE_SOURCE = groups_pb2.INVITE_LINK


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
        created_at=timestamp_from_ms(g.created_at_ms),
        updated_at=timestamp_from_ms(g.updated_at_ms),
        version=g.version,
        last_message=message_to_proto(g.last_message) if g.last_message else None,
        last_activity_at=timestamp_from_ms(g.last_activity_ms),
        unlinked_post_id=g.unlinked_post_id,
        slow_mode_seconds=s.slow_mode_seconds,
        announcement=groups_pb2.Announcement(
            text=g.announcement.text,
            set_by=g.announcement.set_by,
            set_at=timestamp_from_ms(g.announcement.set_at_ms),
        )
        if g.announcement
        else None,
        pinned=[
            groups_pb2.PinnedMessage(
                message=message_to_proto(p.message),
                pinned_by=p.pinned_by,
                pinned_at=timestamp_from_ms(p.pinned_at_ms),
            )
            for p in g.pinned
        ],
    )


def invite_to_proto(i: Invite) -> groups_pb2.Invite:
    invite = groups_pb2.Invite(
        code=i.code,
        group_id=i.group_id,
        created_by=i.created_by,
        created_at=timestamp_from_ms(i.created_at_ms),
        max_uses=i.max_uses,
        uses=i.uses,
    )
    if i.expires_at_ms:
        invite.expire_time.FromMilliseconds(i.expires_at_ms)
    return invite


def invite_event_payload(i: Invite) -> events_pb2.InviteCreated:
    """An invite as its event tells it: without the code, which only its creator gets."""
    event = events_pb2.InviteCreated(
        group_id=i.group_id, created_by=i.created_by, max_uses=i.max_uses
    )
    if i.expires_at_ms:
        event.expire_time.FromMilliseconds(i.expires_at_ms)
    return event


def my_group_to_proto(g: Group, m: Membership, mention_count: int = 0) -> groups_pb2.MyGroup:
    """A group as one of the member's conversations."""
    return groups_pb2.MyGroup(
        group=group_to_proto(g),
        membership=member_to_proto(m),
        unread_count=unread_count(g, m),
        mention_count=mention_count,
        last_activity_at=timestamp_from_ms(activity_for_member(g, m)),
    )


def member_to_proto(m: Membership) -> groups_pb2.Member:
    member = groups_pb2.Member(
        group_id=m.group_id,
        user_id=m.user_id,
        role=groups_pb2.Role.Name(m.role),
        joined_at=timestamp_from_ms(m.joined_at_ms),
        read_seq=m.read_seq,
    )
    if m.muted_until_ms:
        member.muted_until.FromMilliseconds(m.muted_until_ms)
    return member


def message_to_proto(m: Message, viewer: str | None = None) -> groups_pb2.GroupMessage:
    """The message; its reactions say `mine` for `viewer` (none in events)."""
    message = groups_pb2.GroupMessage(
        group_id=m.group_id,
        seq=m.seq,
        sender_id=m.sender_id,
        text=m.text,
        mentions=list(m.mentions),
        client_msg_id=m.client_msg_id,
        sent_at=timestamp_from_ms(m.sent_at_ms),
        mention_all=m.mention_all,
        shared_post=shared_post_to_proto(m.shared_post) if m.shared_post else None,
        reactions=[
            content_pb2.Reaction(emoji=e, count=n, mine=mine)
            for e, n, mine in reaction_counts(m, viewer)
        ],
        version=m.version,
    )
    if m.reply_to is not None:
        message.reply_to.CopyFrom(quote_to_proto(m.reply_to))
    if m.recall is not None:
        message.recall.CopyFrom(recall_to_proto(m.recall))
    return message


def category_name(value: int) -> str | None:
    """The taxonomy name of a Category value; None for unspecified or unknown values."""
    if value == groups_pb2.CATEGORY_UNSPECIFIED or value not in groups_pb2.Category.values():
        return None
    return groups_pb2.Category.Name(value)
