"""Groups' rules in plain Python: what a group is, who may do what, what a message must be."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from services.kit.errors import (
    DomainError,
    ErrorKind,
    QuotaExceeded,
    Validator,
)

NAME_MAX = 50
DESCRIPTION_MAX = 500
TEXT_MAX = 4_000
MENTIONS_MAX = 50
URL_MAX = 2_048
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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


class PostNotFound(DomainError):
    kind = ErrorKind.NOT_FOUND
    reason = "POST_NOT_FOUND"


class PostNotOwned(DomainError):
    kind = ErrorKind.PERMISSION_DENIED
    reason = "POST_NOT_OWNED"


class PostNotPublished(DomainError):
    reason = "POST_NOT_PUBLISHED"


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
            "a post id: 1-64 letters, digits, '_' or '-'",
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

    @property
    def is_full(self) -> bool:
        return self.member_count >= self.settings.capacity

    @property
    def last_activity_ms(self) -> int:
        """When the newest message was sent, or when the group was created if it has none."""
        return self.last_message.sent_at_ms if self.last_message else self.created_at_ms


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
    return max(group.last_seq - member.read_seq, 0)


def activity_for_member(group: Group, member: Membership) -> int:
    """A group's place in a member's Messages tab: its last activity, or when they joined if
    that is later (a group joined just now comes first even if it has been quiet)."""
    return max(group.last_activity_ms, member.joined_at_ms)


@dataclass(frozen=True)
class Post:
    """The groups service's view of a platform post: enough to decide whether it may be linked."""

    post_id: str
    author_id: str
    title: str
    published: bool
    version: int


@dataclass(frozen=True)
class PostChange:
    """One platform post event. `published` is None for an edit, which leaves it as it was
    (an edit of a hidden post must not publish it); `title` is None when the event has none."""

    post_id: str
    author_id: str
    version: int
    published: bool | None
    title: str | None


def ensure_can_link(post: Post | None, post_id: str, user_id: str) -> None:
    """A group links only one of its caller's own published posts."""
    if post is None:
        raise PostNotFound(f"no post {post_id}", post_id=post_id)
    if post.author_id != user_id:
        raise PostNotOwned("you can only link your own posts", post_id=post_id)
    if not post.published:
        raise PostNotPublished("the post is hidden or deleted", post_id=post_id)


def unlinked_post_after_update(group: Group, settings: GroupSettings) -> str:
    """Linking a post again settles an earlier unlink; anything else keeps the notice."""
    return "" if settings.linked_post_id else group.unlinked_post_id


UPDATABLE_FIELDS = frozenset(
    {"name", "description", "category", "cover_url", "capacity", "listed", "linked_post_id"}
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


def validate_message(text: str, mentions: list[str], client_msg_id: str) -> None:
    check = Validator()
    check.check(0 < len(text.strip()) and len(text) <= TEXT_MAX, "text", f"1-{TEXT_MAX} characters")
    check.check(len(mentions) <= MENTIONS_MAX, "mentions", f"at most {MENTIONS_MAX} users")
    check.check(
        all(ID_PATTERN.match(m) for m in mentions),
        "mentions",
        "user ids: 1-64 letters, digits, '_' or '-'",
    )
    check.check(
        not client_msg_id or len(client_msg_id) <= 128, "client_msg_id", "at most 128 characters"
    )
    check.raise_if_invalid()


def validate_id(value: str, field: str) -> None:
    check = Validator()
    check.check(bool(ID_PATTERN.match(value)), field, "1-64 letters, digits, '_' or '-'")
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

    @property
    def dedup_key(self) -> str | None:
        """Unique per sender and client message id in a group: a retry finds the first send."""
        return dedup_key(self.group_id, self.sender_id, self.client_msg_id)


def dedup_key(group_id: str, sender_id: str, client_msg_id: str) -> str | None:
    return f"{group_id}:{sender_id}:{client_msg_id}" if client_msg_id else None
