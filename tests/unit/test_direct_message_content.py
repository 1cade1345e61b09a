"""What a direct message must be and how it may change, in plain Python: who may recall
within which window, who sees a conversation, and unread counts that skip recalled
messages. What it may carry, as in groups: test_message_content.py."""

from __future__ import annotations

import pytest

from services.kit.content import (
    ActionNotAllowed,
    Quote,
    Recall,
    RecallWindowPassed,
    SharedPost,
)
from services.kit.errors import ErrorKind, InvalidArgument
from services.kit.posts import Post
from services.messaging.domain import (
    Conversation,
    DirectMessage,
    MessageNotFound,
    ensure_participant,
    recalled,
    should_recall,
    validate_message,
    validate_open,
)

SENT_AT = 1_000_000
WINDOW = 120


def message(text: str = "hello", **fields: object) -> DirectMessage:
    base: dict[str, object] = {
        "conversation_id": "alice:bob",
        "seq": 3,
        "sender_id": "alice",
        "recipient_id": "bob",
        "text": text,
        "client_msg_id": "",
        "sent_at_ms": SENT_AT,
    }
    return DirectMessage(**{**base, **fields})  # type: ignore[arg-type]


def post(published: bool = True) -> Post:
    return Post("p1", "carol", "Matcha", "https://c/p1", published, version=1)


CARD = SharedPost.of(post())


def test_the_sender_recalls_within_the_window() -> None:
    assert should_recall(message(), "alice", SENT_AT + WINDOW * 1000, WINDOW)
    with pytest.raises(RecallWindowPassed) as caught:
        should_recall(message(), "alice", SENT_AT + WINDOW * 1000 + 1, WINDOW)
    assert caught.value.kind is ErrorKind.FAILED_PRECONDITION
    assert caught.value.reason == "RECALL_WINDOW_PASSED"
    assert caught.value.metadata == {"window_seconds": str(WINDOW)}


def test_the_recipient_may_never_recall() -> None:
    with pytest.raises(ActionNotAllowed) as caught:
        should_recall(message(), "bob", SENT_AT, WINDOW)
    assert (caught.value.kind, caught.value.reason) == (ErrorKind.PERMISSION_DENIED, "NOT_ALLOWED")


def test_recalling_a_recalled_message_changes_nothing_even_after_the_window() -> None:
    tombstone = recalled(message(), "alice", SENT_AT + 5)
    assert not should_recall(tombstone, "alice", SENT_AT + 10 * WINDOW * 1000, WINDOW)


def test_a_tombstone_has_no_text_nor_post_and_a_newer_version() -> None:
    quote = Quote(1, "bob", "hi", False, "")
    tombstone = recalled(message(shared_post=CARD, reply_to=quote), "alice", SENT_AT + 5)
    assert (tombstone.text, tombstone.shared_post, tombstone.version) == ("", None, 2)
    assert tombstone.recall == Recall("alice", SENT_AT + 5)
    assert tombstone.reply_to == quote


def test_only_participants_see_a_conversation() -> None:
    ensure_participant("alice:bob", "bob")
    for conversation_id, user in [
        ("alice:bob", "mallory"),
        ("bob:alice", "bob"),  # not how an id is written: no such conversation
        ("alice:bob:mallory", "mallory"),
        ("bob", "bob"),
    ]:
        with pytest.raises(MessageNotFound):
            ensure_participant(conversation_id, user)


def test_a_message_needs_text_unless_it_shares_a_post() -> None:
    validate_message("alice", "bob", "", "", shared_post_id="p1")
    with pytest.raises(InvalidArgument) as caught:
        validate_message("alice", "bob", "  ", "")
    assert [v.field for v in caught.value.violations] == ["text"]
    with pytest.raises(InvalidArgument) as caught:
        validate_message(
            "alice", "bob", "x" * 4001, "", shared_post_id="not an id!", reply_to_seq=-1
        )
    assert [v.field for v in caught.value.violations] == ["text", "shared_post_id", "reply_to_seq"]


def test_messaging_opens_only_direct_conversations_posts() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_open("", "g_1", 0)
    assert [v.field for v in caught.value.violations] == ["group_id", "conversation_id", "seq"]


def conversation(read: int, recalled_seqs: frozenset[int]) -> Conversation:
    return Conversation(
        "alice:bob",
        ("alice", "bob"),
        "alice",
        True,
        last_seq=6,
        last_message=None,
        last_activity_ms=SENT_AT,
        read_seqs={"bob": read},
        recalled_seqs=recalled_seqs,
    )


def test_a_recalled_message_not_read_yet_is_not_unread() -> None:
    assert conversation(2, frozenset()).unread_count("bob") == 4
    assert conversation(2, frozenset({1, 4})).unread_count("bob") == 3
    assert conversation(6, frozenset({6})).unread_count("bob") == 0
    assert conversation(5, frozenset({6})).unread_count("bob") == 0
