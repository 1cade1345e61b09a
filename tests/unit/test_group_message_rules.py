"""What a group message may carry and what may happen to it afterwards: the rules, with no
I/O."""

from __future__ import annotations

import pytest

from services.groups import domain
from services.groups import message_rules as rules
from services.groups.config import content_limits
from services.groups.domain import (
    Announcement,
    Group,
    GroupSettings,
    Membership,
    Message,
    Pin,
    Role,
)
from services.kit import content
from services.kit.config import ConfigError, Env
from services.kit.content import Quote, Recall, SharedPost
from services.kit.errors import ErrorKind, InvalidArgument

WINDOW = 120


def member(role: Role, user: str = "u") -> Membership:
    return Membership("g", user, role, 0, 0, 0)


def message(seq: int = 1, sender: str = "bob", **fields: object) -> Message:
    values: dict[str, object] = {
        "group_id": "g",
        "seq": seq,
        "sender_id": sender,
        "text": f"message {seq}",
        "mentions": (),
        "client_msg_id": "",
        "sent_at_ms": 1_000_000,
    }
    values.update(fields)
    return Message(**values)  # type: ignore[arg-type]


def group(**fields: object) -> Group:
    values: dict[str, object] = {
        "group_id": "g",
        "settings": GroupSettings("Tea", "", "FOOD", "", 500, True, ""),
        "owner_id": "owner",
        "member_count": 3,
        "last_seq": 10,
        "created_at_ms": 0,
        "updated_at_ms": 0,
        "version": 1,
    }
    values.update(fields)
    return Group(**values)  # type: ignore[arg-type]


def violated(error: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return [v.field for v in error.value.violations]


# Sending


def test_a_shared_post_makes_the_text_optional_but_still_bounded() -> None:
    domain.validate_message("", [], "", shared_post_id="p1")
    with pytest.raises(InvalidArgument) as empty:
        domain.validate_message("", [], "")
    assert violated(empty) == ["text"]
    with pytest.raises(InvalidArgument) as long:
        domain.validate_message("x" * 4_001, [], "", shared_post_id="p1")
    assert violated(long) == ["text"]


def test_a_bad_post_id_or_negative_reply_seq_is_named() -> None:
    with pytest.raises(InvalidArgument) as caught:
        domain.validate_message("hi", [], "", shared_post_id="not a post!", reply_to_seq=-1)
    assert violated(caught) == ["shared_post_id", "reply_to_seq"]


@pytest.mark.parametrize("role", [Role.ADMIN, Role.OWNER])
def test_the_owner_and_admins_may_mention_everyone(role: Role) -> None:
    rules.ensure_may_mention_all(member(role))


def test_a_member_may_not_mention_everyone() -> None:
    with pytest.raises(content.ActionNotAllowed) as caught:
        rules.ensure_may_mention_all(member(Role.MEMBER))
    assert (caught.value.kind, caught.value.reason) == (ErrorKind.PERMISSION_DENIED, "NOT_ALLOWED")


def test_mention_all_refusal_says_when_to_try_again() -> None:
    refusal = rules.mention_all_refusal("g", last_ms=10_000, interval_seconds=300, now_ms=70_500)
    assert (refusal.kind, refusal.reason) == (
        ErrorKind.RESOURCE_EXHAUSTED,
        "MENTION_ALL_RATE_LIMITED",
    )
    assert refusal.metadata["retry_after_seconds"] == "240"
    assert refusal.subject == "group:g"


# Reactions


def test_one_reaction_per_member_per_emoji() -> None:
    first = rules.reacted(message(), "ann", "👍", remove=False)
    assert first is not None and first.reactions == {"👍": ("ann",)} and first.version == 2
    assert rules.reacted(first, "ann", "👍", remove=False) is None
    assert rules.reacted(first, "ann", "🔥", remove=True) is None
    both = rules.reacted(first, "bob", "👍", remove=False)
    assert both is not None and both.reactions == {"👍": ("ann", "bob")}
    gone = rules.reacted(first, "ann", "👍", remove=True)
    assert gone is not None and gone.reactions == {} and gone.version == 3


def test_reaction_counts_come_most_first_with_the_viewers_own() -> None:
    reacted = message(reactions={"🔥": ("ann",), "👍": ("ann", "bob", "cy"), "😂": ("bob", "cy")})
    assert rules.reaction_counts(reacted, "bob") == [
        ("👍", 3, True),
        ("😂", 2, True),
        ("🔥", 1, False),
    ]
    assert [mine for _, _, mine in rules.reaction_counts(reacted, None)] == [False] * 3


def test_an_emoji_outside_the_set_or_a_recalled_message_is_refused() -> None:
    with pytest.raises(InvalidArgument) as caught:
        rules.ensure_can_react(message(), "🦄", ("👍",))
    assert violated(caught) == ["emoji"]
    tombstone = rules.recalled(message(), "bob", 1, moderation=False)
    with pytest.raises(rules.MessageRecalled):
        rules.ensure_can_react(tombstone, "👍", ("👍",))


# Recall


@pytest.mark.parametrize("role", [Role.MEMBER, Role.ADMIN, Role.OWNER])
def test_a_sender_recalls_their_own_message_within_the_window_only(role: Role) -> None:
    sent = message(sender="bob")
    assert rules.recall_is_moderation(member(role, "bob"), sent) is False
    at_the_end = sent.sent_at_ms + WINDOW * 1000
    content.ensure_within_recall_window(sent, at_the_end, WINDOW)
    with pytest.raises(content.RecallWindowPassed) as late:
        content.ensure_within_recall_window(sent, at_the_end + 1, WINDOW)
    assert late.value.kind == ErrorKind.FAILED_PRECONDITION


@pytest.mark.parametrize("role", [Role.ADMIN, Role.OWNER])
def test_the_owner_and_admins_remove_someone_elses_message_as_moderation(role: Role) -> None:
    assert rules.recall_is_moderation(member(role, "mod"), message(sender="bob")) is True


def test_another_member_may_not_recall() -> None:
    with pytest.raises(content.ActionNotAllowed) as caught:
        rules.recall_is_moderation(member(Role.MEMBER, "cy"), message(sender="bob"))
    assert (caught.value.kind, caught.value.reason) == (ErrorKind.PERMISSION_DENIED, "NOT_ALLOWED")


def test_the_tombstone_keeps_nothing_of_the_content() -> None:
    full = message(
        text="secret",
        mentions=("ann",),
        mention_all=True,
        shared_post=SharedPost("p1", "t", "", "carol"),
        reply_to=Quote(1, "ann", "x"),
        reactions={"👍": ("ann",)},
        version=4,
    )
    tombstone = rules.recalled(full, "mod", 5_000, moderation=True)
    assert tombstone == message(recall=Recall("mod", 5_000, True), text="", version=5)


def test_recalled_messages_after_the_read_position_are_not_unread() -> None:
    reader = Membership("g", "ann", Role.MEMBER, 0, 0, read_seq=4)
    # 3 was read before it was recalled; 6 and 9 were not; 12 is beyond the last seq.
    recalled = group(last_seq=10, recalled_seqs=frozenset({3, 6, 9, 12}))
    assert domain.unread_count(recalled, reader) == 10 - 4 - 2


# The announcement and pins


def test_an_announcement_is_at_most_1000_characters() -> None:
    rules.validate_announcement("x" * 1_000)
    with pytest.raises(InvalidArgument):
        rules.validate_announcement("x" * 1_001)


def test_setting_the_same_announcement_or_clearing_none_changes_nothing() -> None:
    assert rules.announcement_after(group(), "", "ada", 5) == (False, None)
    changed, set_now = rules.announcement_after(group(), "Tea at 5", "ada", 5)
    assert (changed, set_now) == (True, Announcement("Tea at 5", "ada", 5))
    announced = group(announcement=set_now)
    assert rules.announcement_after(announced, "Tea at 5", "owner", 9) == (False, set_now)
    assert rules.announcement_after(announced, "  ", "owner", 9) == (True, None)


def test_pins_are_newest_first_and_limited() -> None:
    one, two, three = message(1), message(2), message(3)
    pins = rules.pins_after(group(), one, "ada", 10, unpin=False, limit=2)
    assert pins is not None
    pins = rules.pins_after(group(pinned=pins), two, "owner", 20, unpin=False, limit=2)
    assert pins == (Pin(two, "owner", 20), Pin(one, "ada", 10))
    pinned = group(pinned=pins)
    assert rules.pins_after(pinned, two, "ada", 30, unpin=False, limit=2) is None
    with pytest.raises(rules.TooManyPins):
        rules.pins_after(pinned, three, "ada", 30, unpin=False, limit=2)
    assert rules.pins_after(pinned, three, "ada", 30, unpin=True, limit=2) is None
    assert rules.pins_after(pinned, one, "ada", 30, unpin=True, limit=2) == (pins[0],)


def test_a_recalled_message_cannot_be_pinned_but_can_be_unpinned() -> None:
    tombstone = rules.recalled(message(1), "bob", 5, moderation=False)
    with pytest.raises(rules.MessageRecalled):
        rules.pins_after(group(), tombstone, "ada", 10, unpin=False, limit=5)
    pinned = group(pinned=(Pin(message(1), "ada", 1),))
    assert rules.pins_after(pinned, tombstone, "ada", 10, unpin=True, limit=5) == ()


def test_an_outsider_sees_the_announcement_but_no_pins() -> None:
    announcement = Announcement("Welcome", "owner", 1)
    inside = group(announcement=announcement, pinned=(Pin(message(), "owner", 1),))
    outside = inside.as_seen_by_outsider()
    assert (outside.announcement, outside.pinned) == (announcement, ())


# Configuration


def test_the_content_limits_are_read_from_the_environment() -> None:
    limits = content_limits(
        Env(
            {
                "RECALL_WINDOW_SECONDS": "30",
                "MENTION_ALL_INTERVAL_SECONDS": "60",
                "MAX_PINNED_MESSAGES": "3",
                "REACTION_EMOJIS": "🍵 🦄",
            }
        )
    )
    assert limits == rules.ContentLimits(30, 60, 3, ("🍵", "🦄"))
    assert content_limits(Env({})) == rules.ContentLimits()


def test_a_reaction_that_cannot_be_a_field_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="REACTION_EMOJIS"):
        content_limits(Env({"REACTION_EMOJIS": "👍 a.b"}))
