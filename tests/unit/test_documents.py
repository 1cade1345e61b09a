"""The kit's upserts: a collision with a concurrent first insert is not a refusal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from pymongo import UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError

from services.kit.documents import bulk_upsert, upsert_where


@dataclass
class Updated:
    matched_count: int


class RacedCollection:
    """A collection whose document `doc_id` another writer creates just as the first upsert
    arrives: that upsert collides; afterwards the document is there, matching or not."""

    def __init__(self, matches_after_the_race: bool) -> None:
        self.matches = matches_after_the_race
        self.calls: list[tuple[dict[str, Any], bool]] = []

    async def update_one(
        self, selector: dict[str, Any], update: dict[str, Any], upsert: bool = False
    ) -> Updated:
        self.calls.append((selector, upsert))
        if upsert:
            raise DuplicateKeyError("E11000 duplicate key error")
        return Updated(matched_count=int(self.matches))


async def test_a_collision_whose_condition_holds_is_applied_as_a_plain_update() -> None:
    collection = RacedCollection(matches_after_the_race=True)
    condition = {"version": {"$lt": 3}}

    assert await upsert_where(collection, "post1", condition, {"$set": {"version": 3}})

    selector = {"_id": "post1", **condition}
    assert collection.calls == [(selector, True), (selector, False)]


async def test_a_collision_whose_condition_fails_is_a_refusal() -> None:
    collection = RacedCollection(matches_after_the_race=False)

    assert not await upsert_where(collection, "post1", {"version": {"$lt": 3}}, {})


class BulkCollection:
    def __init__(self, codes: dict[int, int]) -> None:
        self.codes = codes  # failing index -> error code, on the first bulk write only
        self.writes: list[list[UpdateOne]] = []

    async def bulk_write(self, operations: list[UpdateOne], ordered: bool) -> None:
        self.writes.append(operations)
        if len(self.writes) == 1 and self.codes:
            errors = [{"index": i, "code": code} for i, code in self.codes.items()]
            raise BulkWriteError({"writeErrors": errors})


def upserts(n: int) -> list[UpdateOne]:
    return [UpdateOne({"_id": i}, {"$inc": {"count": 1}}, upsert=True) for i in range(n)]


async def test_only_the_upserts_that_collided_are_applied_again() -> None:
    operations = upserts(4)
    collection = BulkCollection({1: 11000, 3: 11000})

    await bulk_upsert(collection, operations)

    assert collection.writes == [operations, [operations[1], operations[3]]]


async def test_any_other_bulk_failure_is_raised() -> None:
    collection = BulkCollection({0: 11000, 2: 121})

    with pytest.raises(BulkWriteError):
        await bulk_upsert(collection, upserts(3))
    assert len(collection.writes) == 1
