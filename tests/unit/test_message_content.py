"""What a group or direct message may carry besides its text (services.kit.content): the
shared post's card, the quote of an earlier message, the recall window, how a stored message
reads now, and how each is stored and sent."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
from groupchat.content.v1 import content_pb2

from services.kit.content import (
    QUOTE_EXCERPT_MAX,
    NoSharedPost,
    Quote,
    Recall,
    RecallWindowPassed,
    SharedPost,
    as_shown,
    ensure_within_recall_window,
    quote_doc,
    quote_from_doc,
    quote_of,
    recall_doc,
    recall_from_doc,
    recall_to_proto,
    shared_post_doc,
    shared_post_from_doc,
    shared_post_of,
    shared_post_to_proto,
)
from services.kit.errors import ErrorKind
from services.kit.posts import Post

SENT_AT = 1_000_000
WINDOW = 120


@dataclass(frozen=True)
class Sent:
    """Any message, group or direct, as far as what it carries goes."""

    seq: int = 3
    sender_id: str = "alice"
    text: str = "hello"
    sent_at_ms: int = SENT_AT
    shared_post: SharedPost | None = None
    recall: Recall | None = None


def post(published: bool = True) -> Post:
    return Post("p1", "carol", "Matcha", "https://c/p1", published, version=1)


CARD = SharedPost.of(post())
TOMBSTONE = Sent(text="", recall=Recall("alice", SENT_AT + 5))


def test_the_card_is_the_post_as_it_is_when_shared() -> None:
    assert CARD == SharedPost("p1", "Matcha", "https://c/p1", "carol", removed=False)


def test_a_quote_keeps_the_first_hundred_characters_and_the_shared_post_id() -> None:
    text = "x" * 99 + "é" + "tail"
    quote = quote_of(Sent(text=text, shared_post=CARD))
    assert quote == Quote(3, "alice", text[:QUOTE_EXCERPT_MAX], False, "p1")
    assert len(quote.excerpt) == 100 and quote.excerpt.endswith("é")
    assert quote_of(Sent(text="short")).excerpt == "short"


def test_a_quote_of_a_recalled_message_quotes_nothing_of_it() -> None:
    assert quote_of(TOMBSTONE) == Quote(3, "alice", "", recalled=True, shared_post_id="")


def test_a_message_is_recalled_within_the_window_of_sending_only() -> None:
    ensure_within_recall_window(Sent(), SENT_AT + WINDOW * 1000, WINDOW)
    with pytest.raises(RecallWindowPassed) as caught:
        ensure_within_recall_window(Sent(), SENT_AT + WINDOW * 1000 + 1, WINDOW)
    assert (caught.value.kind, caught.value.reason) == (
        ErrorKind.FAILED_PRECONDITION,
        "RECALL_WINDOW_PASSED",
    )
    assert caught.value.metadata == {"window_seconds": str(WINDOW)}


def test_a_reader_sees_a_post_taken_down_since_as_removed() -> None:
    removed = replace(CARD, removed=True)
    assert as_shown(CARD, None, {"p1": post(published=False)}, set()) == (removed, None)
    assert as_shown(CARD, None, {"p1": post()}, set()) == (CARD, None)


def test_a_post_the_projection_does_not_know_shows_removed() -> None:
    # Sharing needs a published post: only a projection that lost it does not know it.
    assert as_shown(CARD, None, {}, set()) == (replace(CARD, removed=True), None)


def test_a_reader_sees_a_quote_of_a_message_recalled_since_as_recalled() -> None:
    quote = Quote(1, "bob", "secret", False, "p1")
    assert as_shown(None, quote, {}, {1}) == (None, Quote(1, "bob", "", True, ""))
    assert as_shown(None, quote, {}, {2}) == (None, quote)


def test_a_removed_card_shows_nothing_but_its_post_id() -> None:
    assert shared_post_to_proto(replace(CARD, removed=True)) == content_pb2.SharedPost(
        post_id="p1", removed=True
    )
    assert shared_post_to_proto(CARD).title == "Matcha"


def test_only_a_message_that_still_shares_a_post_can_open_it() -> None:
    assert shared_post_of(Sent(shared_post=CARD)) == CARD
    for without in (Sent(), replace(TOMBSTONE, shared_post=CARD)):
        with pytest.raises(NoSharedPost) as caught:
            shared_post_of(without)
        assert caught.value.reason == "NO_SHARED_POST"


def test_documents_keep_their_stored_shape_and_read_back_the_same() -> None:
    quote = Quote(2, "bob", "hi", False, "p1")
    recall = Recall("mod", SENT_AT, moderation=True)
    assert shared_post_doc(replace(CARD, removed=True)) == {
        "post_id": "p1",
        "title": "Matcha",
        "cover_url": "https://c/p1",
        "author_id": "carol",
    }
    assert shared_post_from_doc(shared_post_doc(CARD)) == CARD
    assert quote_from_doc(quote_doc(quote)) == quote
    assert recall_from_doc(recall_doc(recall)) == recall


def test_a_recall_stored_without_moderation_is_none() -> None:
    # Direct messages recalled before the kit stored `moderation` have no such field.
    stored = {"recalled_by": "alice", "recalled_at_ms": SENT_AT}
    assert recall_from_doc(stored) == Recall("alice", SENT_AT, moderation=False)
    assert recall_to_proto(recall_from_doc(stored)).moderation is False
