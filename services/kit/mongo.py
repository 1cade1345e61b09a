"""The MongoDB connection: Motor to MONGODB_URI, or the in-process stand-in when unset."""

from __future__ import annotations

from typing import Any

import structlog
from pymongo.errors import DuplicateKeyError

log = structlog.get_logger("mongo")


def open_database(uri: str | None, name: str) -> tuple[Any, Any]:
    """Return (client, database). Without a URI, data lives in this process and is lost at exit."""
    if uri:
        from motor.motor_asyncio import AsyncIOMotorClient

        client: Any = AsyncIOMotorClient(uri, serverSelectionTimeoutMS=5_000, appname=name)
        log.info("mongodb", database=name, store="mongodb")
    else:
        from mongomock_motor import AsyncMongoMockClient

        client = AsyncMongoMockClient()
        log.warning(
            "mongodb",
            database=name,
            store="embedded",
            detail="MONGODB_URI is not set: using the in-process store; data is NOT kept",
        )
    return client, client[name]


class ProcessedEvents:
    """Remembers handled event ids so that a redelivered event changes nothing."""

    def __init__(self, collection: Any) -> None:
        self._collection = collection

    async def first_time(self, event_id: str) -> bool:
        """Record `event_id`; False when it was recorded before."""
        try:
            await self._collection.insert_one({"_id": event_id})
        except DuplicateKeyError:
            return False
        return True
