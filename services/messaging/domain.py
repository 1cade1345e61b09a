"""Direct messages' rules in plain Python: who is a stranger to whom, what the day's stranger
quota allows, how many messages may wait for an answer, what a message must be and who may
recall it. What it may carry besides its text (a shared post, a quote) and how that reads
now are the same in groups: services.kit.content.

The rules that must hold under concurrency are decided here and enforced by single atomic
operations in `services.messaging.storage`: a message's admission is decided from the state
its predecessor carries and holds because its seq can be taken only once; the day's quota is
one conditional update. Nothing here does I/O or reads a clock itself.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from zoneinfo import ZoneInfo

from services.kit.content import (
    ActionNotAllowed,
    Quote,
    Recall,
    SharedPost,
    ensure_within_recall_window,
)
from services.kit.errors import (
    ID_DESCRIPTION,
    ID_PATTERN,
    DomainError,
    ErrorKind,
    FieldViolation,
    InvalidArgument,
    QuotaExceeded,
    Validator,
)

TEXT_MAX = 4_000
CLIENT_MSG_ID_MAX = 128
# A day's quota record is kept a day past the day's end (TTL), so a late read still finds it.
QUOTA_RECORD_GRACE = dt.timedelta(days=1)


class Blocked(DomainError):
    """The recipient blocked the sender."""

    kind = ErrorKind.PERMISSION_DENIED
    reason = "BLOCKED"


class RecipientBlocked(DomainError):
    """The sender blocked the recipient: they must unblock them before writing."""

    reason = "RECIPIENT_BLOCKED"


class AwaitingReply(DomainError):
    """The starter of an unanswered conversation with a stranger has sent all they may."""

    reason = "AWAITING_REPLY"


class StrangerQuotaExceeded(QuotaExceeded):
    reason = "STRANGER_QUOTA_EXCEEDED"


class ConcurrentUpdate(DomainError):
    kind = ErrorKind.ABORTED
    reason = "CONCURRENT_UPDATE"


class MessageNotFound(DomainError):
    """No such message in a conversation of the caller's (or no such conversation of theirs:
    to others a conversation does not exist)."""

    kind = ErrorKind.NOT_FOUND
    reason = "MESSAGE_NOT_FOUND"


def conversation_id(user_a: str, user_b: str) -> str:
    """The id of the conversation between two users: both ids, sorted, joined by ':'."""
    return ":".join(sorted((user_a, user_b)))


def dedup_key(sender_id: str, client_msg_id: str) -> str | None:
    """Unique per sender and client message id: a retry finds the first send."""
    return f"{sender_id}:{client_msg_id}" if client_msg_id else None


@dataclass(frozen=True)
class DirectMessage:
    conversation_id: str
    seq: int
    sender_id: str
    recipient_id: str
    text: str
    client_msg_id: str
    sent_at_ms: int
    shared_post: SharedPost | None = None
    reply_to: Quote | None = None
    recall: Recall | None = None
    # 1 when sent; a recall makes it 2 (the newer of two copies has the higher version).
    version: int = 1


def should_recall(message: DirectMessage, user_id: str, now_ms: int, window_seconds: int) -> bool:
    """Whether `user_id` recalling `message` now changes it: only its sender may, within
    `window_seconds` of sending; a recalled message stays as it is (False)."""
    if user_id != message.sender_id:
        raise ActionNotAllowed("only the sender can recall a message")
    if message.recall is not None:
        return False
    ensure_within_recall_window(message, now_ms, window_seconds)
    return True


def recalled(message: DirectMessage, user_id: str, now_ms: int) -> DirectMessage:
    """The tombstone of `message`: its text and shared post gone, its version one up."""
    return replace(
        message,
        text="",
        shared_post=None,
        recall=Recall(user_id, now_ms),
        version=message.version + 1,
    )


def ensure_participant(conversation_id_: str, user_id: str) -> None:
    """`user_id` is one of the two users of `conversation_id_`; to anyone else it does not
    exist."""
    users = conversation_id_.split(":")
    if not (len(users) == 2 and user_id in users and conversation_id(*users) == conversation_id_):
        raise MessageNotFound("no such message in your conversations")


@dataclass(frozen=True)
class ConversationState:
    """What decides how the next message enters a conversation, as of one of its messages.

    Each message is stored with the state after it, and the state after message n follows
    from the state after message n-1 and how message n was admitted (`next_state`), so the
    newest message alone says how the next one may enter.

    `started_by` wrote the first message; `answered` becomes true, for good, with the other
    participant's first message. `unanswered` counts the starter's messages admitted while
    the other was a stranger to them; `charged_day` is the latest stranger-quota day the
    starter was charged for writing here (None: never).
    """

    started_by: str
    answered: bool = False
    unanswered: int = 0
    charged_day: str | None = None

    def is_request_from(self, sender_id: str) -> bool:
        """`sender_id` wrote first and the other has not answered yet: a message request."""
        return not self.answered and self.started_by == sender_id

    def charged(self, sender_id: str, day: str) -> bool:
        """Whether `sender_id`'s stranger messages here were charged to the quota of `day`."""
        return self.started_by == sender_id and self.charged_day == day


@dataclass(frozen=True)
class MessageWithState:
    """A stored message and the conversation's state after it."""

    message: DirectMessage
    state: ConversationState


@dataclass(frozen=True)
class Conversation:
    """A conversation between two users as its messages left it: who started it, whether it
    is answered, the last message and each participant's read position. A projection of the
    messages for listing and reading; admissions are decided from the messages themselves.
    """

    conversation_id: str
    participants: tuple[str, str]
    started_by: str
    answered: bool
    last_seq: int
    last_message: DirectMessage | None
    last_activity_ms: int
    read_seqs: Mapping[str, int] = field(default_factory=dict)
    # The seqs of its recalled messages, which nobody has left to read.
    recalled_seqs: frozenset[int] = frozenset()

    @property
    def established(self) -> bool:
        return self.answered

    def peer_of(self, user_id: str) -> str:
        first, second = self.participants
        return second if user_id == first else first

    def read_seq(self, user_id: str) -> int:
        return self.read_seqs.get(user_id, 0)

    def unread_count(self, user_id: str) -> int:
        """The messages after the user's read position, a recalled one not counting."""
        read = self.read_seq(user_id)
        gone = sum(1 for seq in self.recalled_seqs if read < seq <= self.last_seq)
        return max(self.last_seq - read - gone, 0)

    def is_request_for(self, user_id: str) -> bool:
        """The peer wrote first and `user_id` has not answered yet: a message request."""
        return not self.answered and self.started_by == self.peer_of(user_id)


class Admission(enum.Enum):
    """How a message gets into a conversation."""

    # The recipient wrote first and waits for this answer: it establishes the conversation.
    ANSWER = "answer"
    # The two are not strangers here (established, or they follow each other): no limits.
    FREE = "free"
    # The sender writes to a stranger: it counts against the unanswered allowance and uses
    # the day's stranger quota (once per stranger and day).
    STRANGER = "stranger"


def follows_matter(state: ConversationState | None, sender_id: str) -> bool:
    """Whether `admit` needs to know if the two follow each other: only for the first
    message and for the starter of an unanswered conversation."""
    return state is None or state.is_request_from(sender_id)


def admit(
    state: ConversationState | None,
    sender_id: str,
    *,
    mutual_follow: bool,
    unanswered_limit: int,
) -> Admission:
    """Decide how `sender_id`'s next message enters a conversation in `state` (the state
    after its newest message; None: nobody wrote yet).

    The recipient is a stranger to the sender unless they follow each other or the
    conversation is established; an established conversation stays so whatever happens to
    the follow graph. Answering someone who wrote first is never limited.

    The unanswered allowance applies only while the recipient is a stranger: messages sent
    while the two follow each other are not counted and not refused, even when the
    conversation was never answered. If they stop following each other before an answer,
    the starter is back under the allowance, counting only the messages sent as a stranger.

    Raises AwaitingReply when the starter has used the allowance. The decision holds only if
    the message is stored right after the one `state` is from (its seq is the next one).
    """
    if state is not None and state.answered:
        return Admission.FREE
    if state is not None and state.started_by != sender_id:
        return Admission.ANSWER
    if mutual_follow:
        return Admission.FREE
    if state is not None and state.unanswered >= unanswered_limit:
        raise AwaitingReply(
            f"wait for an answer: at most {unanswered_limit} messages before the recipient replies",
            limit=str(unanswered_limit),
        )
    return Admission.STRANGER


def needs_charge(state: ConversationState | None, admission: Admission, day: str) -> bool:
    """Whether a message admitted as `admission` must charge the stranger to the sender's
    quota of `day`: a stranger message, unless an earlier one here was charged that day."""
    if admission is not Admission.STRANGER:
        return False
    return state is None or state.charged_day != day


def next_state(
    state: ConversationState | None, sender_id: str, admission: Admission, day: str
) -> ConversationState:
    """The state after `sender_id`'s message, admitted as `admission` on quota day `day`,
    follows `state` (None: it is the first message)."""
    if state is None:
        state = ConversationState(started_by=sender_id)
    if admission is Admission.ANSWER:
        return replace(state, answered=True)
    if admission is Admission.STRANGER:
        return replace(state, unanswered=state.unanswered + 1, charged_day=day)
    return state


class QuotaCharge(enum.Enum):
    CHARGED = "charged"
    ALREADY_CHARGED = "already_charged"
    EXHAUSTED = "exhausted"


def quota_charge(charged_today: Collection[str], recipient_id: str, limit: int) -> QuotaCharge:
    """What writing to the stranger `recipient_id` costs, given who was charged today."""
    if recipient_id in charged_today:
        return QuotaCharge.ALREADY_CHARGED
    if len(charged_today) >= limit:
        return QuotaCharge.EXHAUSTED
    return QuotaCharge.CHARGED


@dataclass(frozen=True)
class QuotaUsage:
    limit: int
    used: int
    resets_at: dt.datetime

    @property
    def remaining(self) -> int:
        return max(self.limit - self.used, 0)


@dataclass(frozen=True)
class StrangerQuota:
    """How many strangers a user may start writing to per day, days being local to `zone`."""

    limit: int
    zone: ZoneInfo

    def day(self, now_ms: int) -> str:
        """The local day of `now_ms`, as YYYY-MM-DD."""
        return self._local(now_ms).date().isoformat()

    def resets_at(self, now_ms: int) -> dt.datetime:
        """The next local midnight after `now_ms`, in UTC."""
        tomorrow = self._local(now_ms).date() + dt.timedelta(days=1)
        midnight = dt.datetime.combine(tomorrow, dt.time(0), tzinfo=self.zone)
        return midnight.astimezone(dt.UTC)

    def record_expires_at(self, now_ms: int) -> dt.datetime:
        """When the record of the day of `now_ms` may be forgotten."""
        return self.resets_at(now_ms) + QUOTA_RECORD_GRACE

    def usage(self, used: int, now_ms: int) -> QuotaUsage:
        return QuotaUsage(self.limit, used, self.resets_at(now_ms))

    def exceeded(self, sender_id: str, now_ms: int) -> StrangerQuotaExceeded:
        return StrangerQuotaExceeded(
            f"you can start conversations with {self.limit} strangers a day; "
            "try again after the reset",
            subject=f"user:{sender_id}",
            resets_at=rfc3339(self.resets_at(now_ms)),
            limit=str(self.limit),
        )

    def _local(self, now_ms: int) -> dt.datetime:
        return dt.datetime.fromtimestamp(now_ms / 1000, tz=self.zone)


def rfc3339(moment: dt.datetime) -> str:
    """`moment` in UTC as RFC 3339 with a 'Z', e.g. 2026-01-01T16:00:00Z."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate_message(
    sender_id: str,
    recipient_id: str,
    text: str,
    client_msg_id: str,
    shared_post_id: str = "",
    reply_to_seq: int = 0,
) -> None:
    """A message has text, unless it shares a post; it may quote an earlier one."""
    check = Validator()
    _check_peer(check, sender_id, recipient_id, "recipient_id")
    if shared_post_id:
        check.check(len(text) <= TEXT_MAX, "text", f"at most {TEXT_MAX} characters")
        check.check_id(shared_post_id, "shared_post_id")
    else:
        check.check(
            0 < len(text.strip()) and len(text) <= TEXT_MAX, "text", f"1-{TEXT_MAX} characters"
        )
    check.check(reply_to_seq >= 0, "reply_to_seq", "must not be negative")
    check.check(
        len(client_msg_id) <= CLIENT_MSG_ID_MAX,
        "client_msg_id",
        f"at most {CLIENT_MSG_ID_MAX} characters",
    )
    check.raise_if_invalid()


def validate_peer(user_id: str, peer_id: str, field_name: str) -> None:
    """`peer_id` names another user than `user_id`."""
    check = Validator()
    _check_peer(check, user_id, peer_id, field_name)
    check.raise_if_invalid()


def validate_recall(user_id: str, peer_id: str, seq: int) -> None:
    check = Validator()
    _check_peer(check, user_id, peer_id, "peer_id")
    check.check(seq >= 1, "seq", "a message's seq: 1 or more")
    check.raise_if_invalid()


def validate_open(conversation_id_: str, group_id: str, seq: int) -> None:
    """An open of a post shared into a direct conversation (groups open theirs)."""
    check = Validator()
    check.check(not group_id, "group_id", "open posts shared into groups with the groups service")
    check.check(bool(conversation_id_), "conversation_id", "the direct conversation's id")
    check.check(seq >= 1, "seq", "a message's seq: 1 or more")
    check.raise_if_invalid()


def no_message_to_reply_to(seq: int) -> InvalidArgument:
    return InvalidArgument(
        [FieldViolation("reply_to_seq", f"no message {seq} in this conversation to reply to")]
    )


def validate_non_negative(**values: int) -> None:
    check = Validator()
    for name, value in values.items():
        check.check(value >= 0, name, "must not be negative")
    check.raise_if_invalid()


def _check_peer(check: Validator, user_id: str, peer_id: str, field_name: str) -> None:
    if not ID_PATTERN.match(peer_id):
        check.check(False, field_name, f"a user id: {ID_DESCRIPTION}")
    else:
        check.check(peer_id != user_id, field_name, "another user than yourself")
