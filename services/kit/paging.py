"""Opaque page tokens, page sizes and pages of a sequence, the same for every list RPC."""

from __future__ import annotations

import base64
import json
from typing import Any

from pymongo import ASCENDING, DESCENDING

from services.kit.errors import FieldViolation, InvalidArgument

# Longer than any token this API returns; a longer one is refused before it is decoded.
PAGE_TOKEN_MAX = 1024


def encode_page_token(position: dict[str, Any]) -> str:
    raw = json.dumps(position, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> dict[str, Any] | None:
    """The position a token stands for; None for the first page."""
    if not token:
        return None
    if len(token) > PAGE_TOKEN_MAX:
        raise InvalidArgument([FieldViolation("page_token", "not a token this API returned")])
    try:
        padded = token + "=" * (-len(token) % 4)
        position = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except ValueError:
        position = None
    if not isinstance(position, dict):
        raise InvalidArgument([FieldViolation("page_token", "not a token this API returned")])
    return position


def page_size(requested: int, *, default: int = 50, maximum: int = 500) -> int:
    if requested < 0:
        raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
    return min(requested or default, maximum)


async def seq_page(
    collection: Any, sequence: dict[str, Any], after_seq: int, before_seq: int, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """One page of a sequence's documents (`sequence` selects them: a group's messages, a
    conversation's) in ascending seq order, and whether more lie in the same direction:
    after `after_seq` (catching up), or when `before_seq` is set, the newest before it
    (scrolling back)."""
    seqs: dict[str, int] = {"$gt": after_seq}
    if before_seq:
        seqs["$lt"] = before_seq
    order = DESCENDING if before_seq else ASCENDING
    cursor = collection.find({**sequence, "seq": seqs}).sort("seq", order).limit(limit + 1)
    docs = await cursor.to_list(None)
    page = docs[:limit]
    return (page[::-1] if before_seq else page), len(docs) > limit
