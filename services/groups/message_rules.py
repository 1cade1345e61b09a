"""What may happen to a group message after it is sent, in plain Python: @all, reactions,
the recall, pins and the announcement. What it may carry besides its text (a shared post, a
quote) and how that reads now are the same in direct conversations: services.kit.content."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace

from services.groups.domain import (
    Announcement,
    Group,
    Membership,
    Message,
    Pin,
    Role,
    retry_after_seconds,
)
from services.kit.content import ActionNotAllowed, Recall
from services.kit.errors import (
    DomainError,
    FieldViolation,
    InvalidArgument,
    QuotaExceeded,
    Validator,
)

ANNOUNCEMENT_MAX = 1_000
# The recalled seqs a group keeps for unread counts: a member further behind than this many
# recalls may see a few too many unread.
RECALLED_KEPT = 1_000
DEFAULT_REACTION_EMOJIS = ("👍", "❤️", "😂", "🎉", "👏", "😮", "😢", "🔥")
# Who "mentioned" everyone, in the slot that limits @all per group.
MENTION_ALL_SLOT = "@all"


class MessageRecalled(DomainError):
    reason = "MESSAGE_RECALLED"


class TooManyPins(DomainError):
    reason = "TOO_MANY_PINS"


class MentionAllRateLimited(QuotaExceeded):
    reason = "MENTION_ALL_RATE_LIMITED"


@dataclass(frozen=True)
class ContentLimits:
    recall_window_seconds: int = 120
    mention_all_interval_seconds: int = 300
    max_pinned_messages: int = 5
    reaction_emojis: tuple[str, ...] = DEFAULT_REACTION_EMOJIS


def no_such_message(field: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, "no message with this seq in the group")])


def validate_seq(seq: int) -> None:
    check = Validator()
    check.check(seq > 0, "seq", "a message's seq (1 or more)")
    check.raise_if_invalid()


# Sending


def ensure_may_mention_all(member: Membership) -> None:
    if member.role < Role.ADMIN:
        raise ActionNotAllowed("only the owner and admins can mention everyone")


def mention_all_refusal(
    group_id: str, last_ms: int, interval_seconds: int, now_ms: int
) -> MentionAllRateLimited:
    retry_after = retry_after_seconds(last_ms, interval_seconds, now_ms)
    return MentionAllRateLimited(
        f"@all at most once per {interval_seconds}s in a group; try again in {retry_after}s",
        subject=f"group:{group_id}",
        retry_after_seconds=str(retry_after),
    )


# Reactions


def ensure_can_react(message: Message, emoji: str, allowed: Collection[str]) -> None:
    if emoji not in allowed:
        raise InvalidArgument([FieldViolation("emoji", f"one of {' '.join(allowed)}")])
    if message.recall is not None:
        raise MessageRecalled("the message was recalled")


def reacted(message: Message, user_id: str, emoji: str, remove: bool) -> Message | None:
    """The message after `user_id` added (or removed) their `emoji`; None when that changes
    nothing (they have it already, or never had it)."""
    users = message.reactions.get(emoji, ())
    if (user_id in users) != remove:
        return None
    after = tuple(u for u in users if u != user_id) if remove else (*users, user_id)
    reactions = {e: u for e, u in message.reactions.items() if e != emoji}
    if after:
        reactions[emoji] = after
    return replace(message, reactions=reactions, version=message.version + 1)


def reaction_counts(message: Message, viewer: str | None) -> list[tuple[str, int, bool]]:
    """(emoji, count, whether `viewer` reacted with it), most reacted first."""
    counts = [(e, len(u), viewer is not None and viewer in u) for e, u in message.reactions.items()]
    return sorted((c for c in counts if c[1]), key=lambda c: (-c[1], c[0]))


# Recall


def recall_is_moderation(actor: Membership, message: Message) -> bool:
    """Whether `actor` recalling `message` is a moderation removal (the owner or an admin
    removing someone else's message), or their own recall; ActionNotAllowed when it is
    neither."""
    if actor.user_id == message.sender_id:
        return False
    if actor.role >= Role.ADMIN:
        return True
    raise ActionNotAllowed("only the sender, the owner and admins can recall a message")


def recalled(message: Message, actor_id: str, now_ms: int, moderation: bool) -> Message:
    """The tombstone: what the message said, shared and quoted is gone."""
    return replace(
        message,
        text="",
        mentions=(),
        mention_all=False,
        shared_post=None,
        reply_to=None,
        reactions={},
        recall=Recall(actor_id, now_ms, moderation),
        version=message.version + 1,
    )


# The announcement and pins (owner and admins)


def validate_announcement(text: str) -> None:
    check = Validator()
    check.check(len(text) <= ANNOUNCEMENT_MAX, "text", f"at most {ANNOUNCEMENT_MAX} characters")
    check.raise_if_invalid()


def announcement_after(
    group: Group, text: str, actor_id: str, now_ms: int
) -> tuple[bool, Announcement | None]:
    """(whether it changes, the announcement after): an empty text clears it."""
    current = group.announcement
    if not text.strip():
        return current is not None, None
    if current is not None and current.text == text:
        return False, current
    return True, Announcement(text, actor_id, now_ms)


def pins_after(
    group: Group, message: Message, actor_id: str, now_ms: int, unpin: bool, limit: int
) -> tuple[Pin, ...] | None:
    """The group's pins, newest first, after pinning (or unpinning) `message`; None when that
    changes nothing (pinned already, or not pinned)."""
    pinned = any(p.message.seq == message.seq for p in group.pinned)
    if unpin:
        return tuple(p for p in group.pinned if p.message.seq != message.seq) if pinned else None
    if pinned:
        return None
    if message.recall is not None:
        raise MessageRecalled("a recalled message cannot be pinned")
    if len(group.pinned) >= limit:
        raise TooManyPins(f"at most {limit} pinned messages: unpin one first")
    return (Pin(message, actor_id, now_ms), *group.pinned)
