"""The platform's posts as a service of the suite knows them: a projection of the `posts.*`
events, kept by each service that needs it in its own database (groups to check a linked
post, groups and messaging to share one), and the card a shared post shows.

A post's version is the platform's: an event older than what the projection holds is
stale and changes nothing, whatever order the broker delivers in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from groupchat.content.v1 import content_pb2
from groupchat.events.v1 import events_pb2

from services.kit.documents import upsert_where
from services.kit.errors import DomainError, ErrorKind, excerpt

POSTS_SUBJECT = "posts.>"


class PostNotFound(DomainError):
    kind = ErrorKind.NOT_FOUND
    reason = "POST_NOT_FOUND"


class PostNotPublished(DomainError):
    reason = "POST_NOT_PUBLISHED"


@dataclass(frozen=True)
class Post:
    post_id: str
    author_id: str
    title: str
    cover_url: str
    published: bool
    version: int


@dataclass(frozen=True)
class PostChange:
    """One platform post event. `published` is None for an edit, which leaves it as it was
    (an edit of a hidden post must not publish it); `title` and `cover_url` are None when
    the event has none."""

    post_id: str
    author_id: str
    version: int
    published: bool | None
    title: str | None
    cover_url: str | None = None


def ensure_published(post: Post | None, post_id: str) -> Post:
    """The post, if it exists and is published."""
    if post is None:
        raise PostNotFound(f"no post {excerpt(post_id)}", post_id=excerpt(post_id))
    if not post.published:
        raise PostNotPublished("the post is hidden or deleted", post_id=post_id)
    return post


def shared_card(post: Post) -> content_pb2.SharedPost:
    """What a message that shares the post shows, as the post is now."""
    return content_pb2.SharedPost(
        post_id=post.post_id, title=post.title, cover_url=post.cover_url, author_id=post.author_id
    )


def as_removed(card: content_pb2.SharedPost) -> content_pb2.SharedPost:
    """A shared post whose author took it down since: nothing of its old card."""
    return content_pb2.SharedPost(post_id=card.post_id, removed=True)


def post_change_from_event(envelope: events_pb2.Envelope) -> PostChange | None:
    """The post change a platform post event stands for; None for any other event."""
    kind = envelope.WhichOneof("payload")
    version = envelope.aggregate_version
    if kind in ("post_published", "post_updated"):
        post = getattr(envelope, kind).post
        return PostChange(
            post_id=post.post_id,
            author_id=post.author_id,
            version=version,
            published=True if kind == "post_published" else None,
            title=post.title,
            cover_url=post.cover_url,
        )
    if kind == "post_removed":
        removed = envelope.post_removed
        return PostChange(
            post_id=removed.post_id,
            author_id=removed.author_id,
            version=version,
            published=False,
            title=None,
        )
    return None


class PostsStore:
    """The projection, one document per post in `collection`."""

    def __init__(self, collection: Any) -> None:
        self._posts = collection

    async def apply(self, change: PostChange) -> bool:
        """Apply a platform post event if it is newer than the post's projection; False when
        it is stale or a redelivery."""
        set_fields: dict[str, Any] = {"author_id": change.author_id, "version": change.version}
        on_insert: dict[str, Any] = {}
        if change.published is None:
            on_insert["published"] = True  # an edit of a post not seen yet: it is live
        else:
            set_fields["published"] = change.published
        for name in ("title", "cover_url"):
            if (value := getattr(change, name)) is not None:
                set_fields[name] = value
            else:
                on_insert[name] = ""
        update: dict[str, Any] = {"$set": set_fields}
        if on_insert:
            update["$setOnInsert"] = on_insert
        return await upsert_where(
            self._posts, change.post_id, {"version": {"$lt": change.version}}, update
        )

    async def get(self, post_id: str) -> Post | None:
        doc = await self._posts.find_one({"_id": post_id})
        return _post(doc) if doc else None

    async def get_many(self, post_ids: set[str]) -> dict[str, Post]:
        if not post_ids:
            return {}
        docs = await self._posts.find({"_id": {"$in": sorted(post_ids)}}).to_list(None)
        return {doc["_id"]: _post(doc) for doc in docs}


def _post(doc: dict[str, Any]) -> Post:
    return Post(
        post_id=doc["_id"],
        author_id=doc["author_id"],
        title=doc.get("title", ""),
        cover_url=doc.get("cover_url", ""),
        published=doc["published"],
        version=doc["version"],
    )
