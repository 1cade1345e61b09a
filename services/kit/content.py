"""What a message may carry besides its text, the same in groups and direct conversations:
the values, their documents and their protobuf messages (groupchat.content.v1).

A message may share a post's card and quote the earlier message of its conversation that it
replies to, both as they were when it was sent; once recalled it keeps only its tombstone.
How a stored message shows now (a post taken down since, a quote of a message recalled
since) is decided each time it is read (`as_shown`), never stored.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from groupchat.content.v1 import content_pb2

from services.kit.errors import DomainError, ErrorKind
from services.kit.posts import Post, as_removed
from services.kit.timestamps import timestamp_from_ms

# How much of the quoted message's text a reply shows.
QUOTE_EXCERPT_MAX = 100


class ActionNotAllowed(DomainError):
    """The caller may not do this to this message (recall someone else's; in a group,
    mention everyone without being the owner or an admin)."""

    kind = ErrorKind.PERMISSION_DENIED
    reason = "NOT_ALLOWED"


class RecallWindowPassed(DomainError):
    reason = "RECALL_WINDOW_PASSED"


class NoSharedPost(DomainError):
    """The message shares no post (or no longer: it was recalled)."""

    reason = "NO_SHARED_POST"


@dataclass(frozen=True)
class SharedPost:
    """The card of a post shared into a message, as the post was when shared. `removed` once
    its author took the post down (decided when read, never stored): it then shows only its
    post id (`shared_post_to_proto`), and keeps the rest for whoever asks who shared what."""

    post_id: str
    title: str
    cover_url: str
    author_id: str
    removed: bool = False

    @classmethod
    def of(cls, post: Post) -> SharedPost:
        return cls(post.post_id, post.title, post.cover_url, post.author_id)


@dataclass(frozen=True)
class Quote:
    """The earlier message of the conversation that a message replies to, as it was when
    quoted (`recalled` is decided again when read)."""

    seq: int
    sender_id: str
    excerpt: str
    recalled: bool = False
    shared_post_id: str = ""


@dataclass(frozen=True)
class Recall:
    """The tombstone a recalled message keeps. `moderation`: the group's owner or an admin
    removed someone else's message (never in a direct conversation)."""

    recalled_by: str
    recalled_at_ms: int
    moderation: bool = False


class SentMessage(Protocol):
    """A group message or a direct one, as far as what it carries goes."""

    @property
    def seq(self) -> int: ...
    @property
    def sender_id(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def sent_at_ms(self) -> int: ...
    @property
    def shared_post(self) -> SharedPost | None: ...
    @property
    def recall(self) -> Recall | None: ...


# The rules


def quote_of(message: SentMessage) -> Quote:
    """What a reply to `message` quotes of it: the first QUOTE_EXCERPT_MAX characters of its
    text and the id of the post it shares; nothing of its content once recalled."""
    if message.recall is not None:
        return Quote(message.seq, message.sender_id, "", recalled=True)
    return Quote(
        seq=message.seq,
        sender_id=message.sender_id,
        excerpt=message.text[:QUOTE_EXCERPT_MAX],
        shared_post_id=message.shared_post.post_id if message.shared_post else "",
    )


def as_shown(
    shared_post: SharedPost | None,
    reply_to: Quote | None,
    posts: Mapping[str, Post],
    recalled_seqs: Collection[int],
) -> tuple[SharedPost | None, Quote | None]:
    """What a message shares and quotes as a reader sees it now: its shared post removed
    unless the projection of `posts` holds it published, its quote recalled if the quoted
    seq is among `recalled_seqs` (of the message's conversation). Unchanged values come back
    as they were.

    A post the projection does not know counts as taken down: sharing needs a published
    post, so only a projection that lost it can not know it, and then the suite cannot tell
    that the post is still up. A live post shown removed comes back with its projection; a
    post its author took down must never show again."""
    if shared_post is not None and not shared_post.removed:
        post = posts.get(shared_post.post_id)
        if post is None or not post.published:
            shared_post = replace(shared_post, removed=True)
    if reply_to is not None and not reply_to.recalled and reply_to.seq in recalled_seqs:
        reply_to = replace(reply_to, excerpt="", recalled=True, shared_post_id="")
    return shared_post, reply_to


def shared_post_of(message: SentMessage) -> SharedPost:
    """The post `message` shares, which a reader may open."""
    if message.shared_post is None or message.recall is not None:
        raise NoSharedPost("the message shares no post")
    return message.shared_post


def ensure_within_recall_window(message: SentMessage, now_ms: int, window_seconds: int) -> None:
    """A sender recalls their own message only within `window_seconds` of sending it."""
    if now_ms - message.sent_at_ms > window_seconds * 1000:
        raise RecallWindowPassed(
            f"a message can be recalled within {window_seconds} seconds of sending",
            window_seconds=str(window_seconds),
        )


# Documents: how a message's document in MongoDB holds them


def shared_post_doc(card: SharedPost) -> dict[str, Any]:
    """The card as stored (`removed` never is: it is decided when read)."""
    return {
        "post_id": card.post_id,
        "title": card.title,
        "cover_url": card.cover_url,
        "author_id": card.author_id,
    }


def shared_post_from_doc(doc: Mapping[str, Any]) -> SharedPost:
    return SharedPost(doc["post_id"], doc["title"], doc["cover_url"], doc["author_id"])


def quote_doc(quote: Quote) -> dict[str, Any]:
    return {
        "seq": quote.seq,
        "sender_id": quote.sender_id,
        "excerpt": quote.excerpt,
        "recalled": quote.recalled,
        "shared_post_id": quote.shared_post_id,
    }


def quote_from_doc(doc: Mapping[str, Any]) -> Quote:
    return Quote(
        seq=int(doc["seq"]),
        sender_id=doc["sender_id"],
        excerpt=doc["excerpt"],
        recalled=bool(doc["recalled"]),
        shared_post_id=doc["shared_post_id"],
    )


def recall_doc(recall: Recall) -> dict[str, Any]:
    return {
        "recalled_by": recall.recalled_by,
        "recalled_at_ms": recall.recalled_at_ms,
        "moderation": recall.moderation,
    }


def recall_from_doc(doc: Mapping[str, Any]) -> Recall:
    # Direct messages recalled before the recall stored `moderation` have none: never one.
    return Recall(
        recalled_by=doc["recalled_by"],
        recalled_at_ms=int(doc["recalled_at_ms"]),
        moderation=bool(doc.get("moderation", False)),
    )


# Protobuf messages


def shared_post_to_proto(card: SharedPost) -> content_pb2.SharedPost:
    shown = content_pb2.SharedPost(
        post_id=card.post_id, title=card.title, cover_url=card.cover_url, author_id=card.author_id
    )
    return as_removed(shown) if card.removed else shown


def quote_to_proto(quote: Quote) -> content_pb2.Quote:
    return content_pb2.Quote(
        seq=quote.seq,
        sender_id=quote.sender_id,
        excerpt=quote.excerpt,
        recalled=quote.recalled,
        shared_post_id=quote.shared_post_id,
    )


def recall_to_proto(recall: Recall) -> content_pb2.Recall:
    return content_pb2.Recall(
        recalled_by=recall.recalled_by,
        recalled_at=timestamp_from_ms(recall.recalled_at_ms),
        moderation=recall.moderation,
    )
