"""Conditional writes to one MongoDB document that may not exist yet, done the one way
every store shares.

An upsert whose filter carries a condition (`version` older than the event's, `count` under
a limit) inserts the document when none matches. Two writers racing to create the same
document collide on `_id`: the loser gets DuplicateKeyError although its condition may well
hold on the document the winner created. So a DuplicateKeyError is not a refusal: the
document exists by then, and the same conditional update without upsert says for certain
whether the condition holds.
"""

from __future__ import annotations

from typing import Any

from pymongo import ReturnDocument, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError

DUPLICATE_KEY = 11000


async def upsert_where(
    collection: Any, doc_id: Any, condition: dict[str, Any], update: dict[str, Any]
) -> bool:
    """Apply `update` to document `doc_id` if it matches `condition`, creating it when it
    does not exist; False when it exists and does not match (nothing changed)."""
    selector = {"_id": doc_id, **condition}
    try:
        await collection.update_one(selector, update, upsert=True)
    except DuplicateKeyError:
        result = await collection.update_one(selector, update)
        return bool(result.matched_count)
    return True


async def upsert_and_read(
    collection: Any, doc_id: Any, update: dict[str, Any], projection: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Apply `update` to document `doc_id`, creating it when missing; the document after."""
    try:
        doc = await collection.find_one_and_update(
            {"_id": doc_id},
            update,
            projection=projection,
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
    except DuplicateKeyError:  # a concurrent first insert won: the document exists now
        doc = await collection.find_one_and_update(
            {"_id": doc_id}, update, projection=projection, return_document=ReturnDocument.AFTER
        )
    if doc is None:
        # MongoDB always returns the document after an upsert; some wire-compatible servers
        # (SecantusDB under concurrency) answer None although the write applied. The write
        # is done either way, so read it back.
        doc = await collection.find_one({"_id": doc_id}, projection)
    assert doc is not None, f"{collection.name} {doc_id!r} vanished after its upsert"
    return dict(doc)


async def bulk_upsert_collisions(collection: Any, upserts: list[UpdateOne]) -> list[int]:
    """Apply upserts in one unordered bulk write; the indexes of those that collided on
    `_id` (their documents exist by then). Any other failure is raised as it is."""
    if not upserts:
        return []
    try:
        await collection.bulk_write(upserts, ordered=False)
    except BulkWriteError as error:
        failed = error.details.get("writeErrors", [])
        if any(e.get("code") != DUPLICATE_KEY for e in failed):
            raise
        return [e["index"] for e in failed]
    return []


async def bulk_upsert(collection: Any, upserts: list[UpdateOne]) -> None:
    """Apply unconditional upserts in one unordered bulk write. The ones that collided with
    a concurrent first insert are applied again: their documents exist by then."""
    if collided := await bulk_upsert_collisions(collection, upserts):
        await collection.bulk_write([upserts[i] for i in collided], ordered=False)


async def bulk_upsert_where(
    collection: Any, writes: list[tuple[Any, dict[str, Any], dict[str, Any]]]
) -> None:
    """`upsert_where` for many (doc id, condition, update) in one unordered bulk write: each
    applies where its document matches its condition or does not exist yet. Those that
    collided on `_id` (a concurrent first insert, or a document that exists and does not
    match) are sent again without upsert, which applies them only where the condition
    holds. Several writes to one document are each applied on their own condition."""
    collided = await bulk_upsert_collisions(
        collection, [UpdateOne({"_id": d, **c}, u, upsert=True) for d, c, u in writes]
    )
    if collided:
        await collection.bulk_write(
            [UpdateOne({"_id": d, **c}, u) for d, c, u in (writes[i] for i in collided)],
            ordered=False,
        )
