"""Groups' rules in plain Python: what a group is, who may do what, what a message must be."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, replace

from services.kit.content import Quote, Recall, SharedPost
from services.kit.errors import (
    ID_DESCRIPTION,
    ID_PATTERN,
    DomainError,
    ErrorKind,
    QuotaExceeded,
    Validator,
    excerpt,
)
from services.kit.posts import Post, ensure_published

NAME_MAX = 50
DESCRIPTION_MAX = 500
TEXT_MAX = 4_000
MENTIONS_MAX = 50
URL_MAX = 2_048
REQUEST_ID_MAX = 128
# The longest slow mode an owner or admin may set: one message per member per this many seconds.
SLOW_MODE_MAX_SECONDS = 86_400
# The longest an invite may stay valid, and the most uses it may allow (0: no limit on uses).
INVITE_MAX_SECONDS = 365 * 86_400
INVITE_MAX_USES = 100_000


class Role(enum.IntEnum):
    MEMBER = 1
    ADMIN = 2
    OWNER = 3


class GroupNotFound(DomainError):
    kind = ErrorKind.NOT_FOUND
    reason = "GROUP_NOT_FOUND"


class MemberNotFound(DomainError):
    kind = ErrorKind.NOT_FOUND
    reason = "MEMBER_NOT_FOUND"


class GroupFull(DomainError):
    reason = "GROUP_FULL"


class Banned(DomainError):
    kind = ErrorKind.PERMISSION_DENIED
    reason = "BANNED"


class NotAMember(DomainError):
    kind = ErrorKind.PERMISSION_DENIED
    reason = "NOT_A_MEMBER"


class Muted(DomainError):
    reason = "MUTED"


class NotAllowed(DomainError):
    """The caller's role does not allow this action on this member."""

    kind = ErrorKind.PERMISSION_DENIED
    reason = "ROLE_NOT_ALLOWED"


class OwnerMustTransfer(DomainError):
    reason = "OWNER_MUST_TRANSFER"


class CapacityBelowMembers(DomainError):
    reason = "CAPACITY_BELOW_MEMBERS"


class GroupLimitReached(QuotaExceeded):
    reason = "GROUP_LIMIT_REACHED"


class JoinRateLimited(QuotaExceeded):
    reason = "JOIN_RATE_LIMITED"


class SlowMode(QuotaExceeded):
    reason = "SLOW_MODE"


class PostNotOwned(DomainError):
    kind = ErrorKind.PERMISSION_DENIED
    reason = "POST_NOT_OWNED"


@dataclass(frozen=True)
class GroupSettings:
    """What a creator chooses. `category` is a taxonomy name; None when not a known one."""

    name: str
    description: str
    category: str | None
    cover_url: str
    capacity: int
    listed: bool
    linked_post_id: str
    # One message per member per this many seconds (the owner and admins are exempt); 0: off.
    slow_mode_seconds: int = 0

    def validate(self, max_capacity: int) -> None:
        check = Validator()
        check.check(0 < len(self.name.strip()) <= NAME_MAX, "name", f"1-{NAME_MAX} characters")
        check.check(
            len(self.description) <= DESCRIPTION_MAX,
            "description",
            f"at most {DESCRIPTION_MAX} characters",
        )
        check.check(self.category is not None, "category", "one of the Category values")
        check.check(
            not self.cover_url
            or (len(self.cover_url) <= URL_MAX and self.cover_url.startswith("https://")),
            "cover_url",
            f"an https:// URL of at most {URL_MAX} characters",
        )
        check.check(2 <= self.capacity <= max_capacity, "capacity", f"between 2 and {max_capacity}")
        check.check(
            not self.linked_post_id or bool(ID_PATTERN.match(self.linked_post_id)),
            "linked_post_id",
            f"a post id: {ID_DESCRIPTION}",
        )
        check.check(
            0 <= self.slow_mode_seconds <= SLOW_MODE_MAX_SECONDS,
            "slow_mode_seconds",
            f"between 0 (off) and {SLOW_MODE_MAX_SECONDS}",
        )
        check.raise_if_invalid()


@dataclass(frozen=True)
class Group:
    group_id: str
    settings: GroupSettings
    owner_id: str
    member_count: int
    last_seq: int
    created_at_ms: int
    updated_at_ms: int
    version: int
    # The post the group linked until its author hid or deleted it; "" otherwise.
    unlinked_post_id: str = ""
    last_message: Message | None = None
    announcement: Announcement | None = None
    # Newest pin first.
    pinned: tuple[Pin, ...] = ()
    # The group's recalled seqs (the latest RECALLED_KEPT): no longer unread.
    recalled_seqs: frozenset[int] = frozenset()

    @property
    def is_full(self) -> bool:
        return self.member_count >= self.settings.capacity

    @property
    def last_activity_ms(self) -> int:
        """When the newest message was sent, or when the group was created if it has none."""
        return self.last_message.sent_at_ms if self.last_message else self.created_at_ms

    def as_seen_by_outsider(self) -> Group:
        """What a non-member may see: what the plaza card shows (name, description,
        category, cover, size, linked post, announcement), never the conversation: no last
        message, no seq, no pins, no notice of an unlinked post."""
        return replace(
            self,
            last_message=None,
            last_seq=0,
            unlinked_post_id="",
            pinned=(),
            recalled_seqs=frozenset(),
        )


@dataclass(frozen=True)
class Announcement:
    text: str
    set_by: str
    set_at_ms: int


@dataclass(frozen=True)
class Pin:
    """A pinned message, as it was when pinned."""

    message: Message
    pinned_by: str
    pinned_at_ms: int


@dataclass(frozen=True)
class Membership:
    group_id: str
    user_id: str
    role: Role
    joined_at_ms: int
    muted_until_ms: int
    read_seq: int

    def is_muted(self, now_ms: int) -> bool:
        return self.muted_until_ms > now_ms


def unread_count(group: Group, member: Membership) -> int:
    """Messages after the member's read position, less those recalled since (a recalled
    message is no longer there to read)."""
    recalled = sum(1 for seq in group.recalled_seqs if member.read_seq < seq <= group.last_seq)
    return max(group.last_seq - member.read_seq - recalled, 0)


def activity_for_member(group: Group, member: Membership) -> int:
    """A group's place in a member's Messages tab: its last activity, or when they joined if
    that is later (a group joined just now comes first even if it has been quiet)."""
    return max(group.last_activity_ms, member.joined_at_ms)


def ensure_can_link(post: Post | None, post_id: str, user_id: str) -> None:
    """A group links only one of its caller's own published posts."""
    if post is not None and post.author_id != user_id:
        raise PostNotOwned("you can only link your own posts", post_id=post_id)
    ensure_published(post, post_id)


def unlinked_post_after_update(group: Group, settings: GroupSettings) -> str:
    """Linking a post again settles an earlier unlink; anything else keeps the notice."""
    return "" if settings.linked_post_id else group.unlinked_post_id


UPDATABLE_FIELDS = frozenset(
    {
        "name",
        "description",
        "category",
        "cover_url",
        "capacity",
        "listed",
        "linked_post_id",
        "slow_mode_seconds",
    }
)


def validate_update_mask(fields: list[str]) -> None:
    check = Validator()
    check.check(
        bool(fields) and set(fields) <= UPDATABLE_FIELDS,
        "update_mask",
        f"name one or more of {sorted(UPDATABLE_FIELDS)}",
    )
    check.raise_if_invalid()


def ensure_can_manage(actor: Membership) -> None:
    """Edit the group and ban non-members: admins and the owner."""
    if actor.role < Role.ADMIN:
        raise NotAllowed("only the owner and admins can do this")


def ensure_capacity_fits(settings: GroupSettings, member_count: int) -> None:
    if settings.capacity < member_count:
        raise CapacityBelowMembers(
            f"the group has {member_count} members: capacity cannot go below that"
        )


def assignable_role(value: int) -> Role:
    """SetMemberRole assigns MEMBER or ADMIN; ownership moves only by transfer."""
    check = Validator()
    check.check(value in (Role.MEMBER, Role.ADMIN), "role", "MEMBER or ADMIN")
    check.raise_if_invalid()
    return Role(value)


def validate_seqs(**seqs: int) -> None:
    check = Validator()
    for field, value in seqs.items():
        check.check(value >= 0, field, "must not be negative")
    check.raise_if_invalid()


def ensure_can_moderate(actor: Membership, target: Membership) -> None:
    """Remove, ban and mute: admins and the owner, over members of a lower role."""
    if actor.role < Role.ADMIN:
        raise NotAllowed("only the owner and admins can remove, ban or mute members")
    if target.role >= actor.role:
        raise NotAllowed("you can only moderate members whose role is below yours")


def ensure_can_set_role(actor: Membership, target: Membership, role: Role) -> None:
    """Promote and demote: the owner only, between member and admin."""
    if actor.role != Role.OWNER:
        raise NotAllowed("only the owner can change roles")
    if target.role == Role.OWNER:
        raise NotAllowed("the owner's role changes only by transferring ownership")


def ensure_can_transfer(actor: Membership, target: Membership) -> None:
    if actor.role != Role.OWNER:
        raise NotAllowed("only the owner can transfer ownership")
    if target.user_id == actor.user_id:
        raise NotAllowed("you already own this group")


def ensure_can_leave(member: Membership, member_count: int) -> None:
    if member.role == Role.OWNER and member_count > 1:
        raise OwnerMustTransfer(
            "the owner cannot leave while others remain: transfer ownership first"
        )


def ensure_can_send(member: Membership, now_ms: int) -> None:
    if member.is_muted(now_ms):
        raise Muted("you are muted in this group", muted_until_ms=str(member.muted_until_ms))


def slow_mode_applies(group: Group, member: Membership) -> bool:
    """Slow mode holds back members; the owner and admins, who set it, are exempt."""
    return group.settings.slow_mode_seconds > 0 and member.role < Role.ADMIN


def retry_after_seconds(last_ms: int, every_seconds: int, now_ms: int) -> int:
    """Whole seconds (at least 1) until `every_seconds` have passed since `last_ms`."""
    return max(1, -(-(last_ms + every_seconds * 1000 - now_ms) // 1000))


def slow_mode_refusal(group: Group, member: Membership, last_sent_ms: int, now_ms: int) -> SlowMode:
    """The refusal of a member's message within slow mode of their last one."""
    seconds = group.settings.slow_mode_seconds
    retry_after = retry_after_seconds(last_sent_ms, seconds, now_ms)
    return SlowMode(
        f"slow mode: one message per {seconds}s; try again in {retry_after}s",
        subject=f"user:{member.user_id}",
        retry_after_seconds=str(retry_after),
    )


# Invites: how a group that is not listed is joined.


class TooManyInvites(DomainError):
    reason = "TOO_MANY_INVITES"


class InviteNotFound(DomainError):
    """No usable invite by that code (for a listed group; of an unlisted one, the group
    itself is what is not found)."""

    kind = ErrorKind.NOT_FOUND
    reason = "INVITE_NOT_FOUND"


@dataclass(frozen=True)
class Invite:
    """A code that lets its holders join an unlisted group (revoking one deletes it)."""

    code: str
    group_id: str
    created_by: str
    created_at_ms: int
    # 0: never expires; max_uses 0: no limit on uses.
    expires_at_ms: int
    max_uses: int
    uses: int

    def usable(self, now_ms: int) -> bool:
        if self.expires_at_ms and now_ms >= self.expires_at_ms:
            return False
        return not self.max_uses or self.uses < self.max_uses


def validate_invite_terms(expires_in_seconds: int, max_uses: int) -> None:
    check = Validator()
    check.check(
        0 <= expires_in_seconds <= INVITE_MAX_SECONDS,
        "expires_in_seconds",
        f"between 0 (never) and {INVITE_MAX_SECONDS}",
    )
    check.check(
        0 <= max_uses <= INVITE_MAX_USES, "max_uses", f"between 0 (no limit) and {INVITE_MAX_USES}"
    )
    check.raise_if_invalid()


def validate_invite_code(code: str, *, required: bool) -> None:
    check = Validator()
    check.check_id(code, "invite_code", required=required)
    check.raise_if_invalid()


def ensure_may_enter(group: Group, invite_code: str, invite: Invite | None, now_ms: int) -> None:
    """Anyone may join a listed group; an unlisted one only with a usable invite of its own,
    and without one it is not found at all (its id alone must not let anyone in). `invite`
    is the group's invite by `invite_code`, None when it has none by that code."""
    if not invite_code and group.settings.listed:
        return
    if invite is not None and invite.group_id == group.group_id and invite.usable(now_ms):
        return
    if group.settings.listed:
        # A listed group with a bad invite: the invite is what is not found.
        raise InviteNotFound("no such invite, or it expired or is used up")
    raise group_not_found(group.group_id)


def group_not_found(group_id: str) -> GroupNotFound:
    """What a caller is told about a group that does not exist, and what a non-member is told
    about an unlisted group without a usable invite: the same words, nothing tells them
    apart."""
    return GroupNotFound(f"no group {excerpt(group_id)}", group_id=excerpt(group_id))


def ensure_outsider_may_see(group: Group, invite: Invite | None, now_ms: int) -> Group:
    """What a non-member sees of a group: the card of a listed one, or of an unlisted one
    they hold a usable invite to; an unlisted group is not found otherwise."""
    if not group.settings.listed and not (
        invite is not None and invite.group_id == group.group_id and invite.usable(now_ms)
    ):
        raise group_not_found(group.group_id)
    return group.as_seen_by_outsider()


def validate_message(
    text: str,
    mentions: list[str],
    client_msg_id: str,
    *,
    shared_post_id: str = "",
    reply_to_seq: int = 0,
) -> None:
    """A message has text (1-4,000 characters), or shares a post and then may have none."""
    check = Validator()
    if shared_post_id:
        check.check(len(text) <= TEXT_MAX, "text", f"at most {TEXT_MAX} characters")
    else:
        check.check(
            0 < len(text.strip()) and len(text) <= TEXT_MAX, "text", f"1-{TEXT_MAX} characters"
        )
    check.check_id(shared_post_id, "shared_post_id", required=False)
    check.check(reply_to_seq >= 0, "reply_to_seq", "must not be negative")
    check.check(len(mentions) <= MENTIONS_MAX, "mentions", f"at most {MENTIONS_MAX} users")
    check.check(
        all(ID_PATTERN.match(m) for m in mentions),
        "mentions",
        f"user ids: {ID_DESCRIPTION}",
    )
    check.check(
        not client_msg_id or len(client_msg_id) <= 128, "client_msg_id", "at most 128 characters"
    )
    check.raise_if_invalid()


def validate_request_id(request_id: str) -> None:
    check = Validator()
    check.check(
        len(request_id) <= REQUEST_ID_MAX, "request_id", f"at most {REQUEST_ID_MAX} characters"
    )
    check.raise_if_invalid()


def validate_id(value: str, field: str) -> None:
    check = Validator()
    check.check_id(value, field)
    check.raise_if_invalid()


def validate_mute_duration(seconds: int, maximum: int) -> None:
    check = Validator()
    check.check(0 <= seconds <= maximum, "duration_seconds", f"between 0 and {maximum}")
    check.raise_if_invalid()


@dataclass(frozen=True)
class Message:
    group_id: str
    seq: int
    sender_id: str
    text: str
    mentions: tuple[str, ...]
    client_msg_id: str
    sent_at_ms: int
    mention_all: bool = False
    shared_post: SharedPost | None = None
    reply_to: Quote | None = None
    # Emoji -> who reacted with it, in the order they did.
    reactions: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    recall: Recall | None = None
    # 1 when sent, one more per reaction change and for the recall.
    version: int = 1

    @property
    def dedup_key(self) -> str | None:
        """Unique per sender and client message id in a group: a retry finds the first send."""
        return dedup_key(self.group_id, self.sender_id, self.client_msg_id)


def dedup_key(group_id: str, sender_id: str, client_msg_id: str) -> str | None:
    return f"{group_id}:{sender_id}:{client_msg_id}" if client_msg_id else None
