"""The MongoDB connection: Motor to MONGODB_URI, or the in-process stand-in when unset."""

from __future__ import annotations

import datetime as dt
import functools
from typing import TYPE_CHECKING, Any

import structlog
from pymongo.errors import DuplicateKeyError

if TYPE_CHECKING:
    from groupchat.events.v1 import events_pb2

    from services.kit.events import EventHandler

log = structlog.get_logger("mongo")

PROCESSED_EVENTS_KEPT_SECONDS = 7 * 86_400
# How often MongoDB's TTL monitor removes expired documents (and so the stand-in's).
TTL_MONITOR_SECONDS = 60.0


def open_database(uri: str | None, name: str) -> tuple[Any, Any]:
    """Return (client, database). Without a URI, data lives in this process and is lost at exit."""
    if uri:
        from motor.motor_asyncio import AsyncIOMotorClient

        client: Any = AsyncIOMotorClient(uri, serverSelectionTimeoutMS=5_000, appname=name)
        log.info("mongodb", database=name, store="mongodb")
    else:
        from mongomock_motor import AsyncMongoMockClient

        _look_up_ids_directly()
        _accept_bulk_updates()
        _expire_documents_now_and_then()
        client = AsyncMongoMockClient(_store=_embedded_server())
        log.warning(
            "mongodb",
            database=name,
            store="embedded",
            detail="MONGODB_URI is not set: using the in-process store; data is NOT kept",
        )
    return client, client[name]


@functools.cache
def _embedded_server() -> Any:
    """One in-process "server" per process: every client opened here sees the same
    databases, as every replica of a service sees the same MongoDB (two instances of a
    service in one test process share their store)."""
    from mongomock.store import ServerStore

    return ServerStore()


async def reachable(db: Any) -> bool:
    """Whether the database answers a ping (readiness)."""
    reply = await db.command("ping")
    return bool(reply.get("ok"))


def _look_up_ids_directly() -> None:
    """Let the stand-in answer `{"_id": value, ...}` and `{"_id": {"$in": [...]}, ...}`
    filters from its id map, as MongoDB answers them from the _id index, instead of scanning
    every document (which makes a thousand joins quadratic, and loading a page of cards by id
    as slow as the whole collection). Results are unchanged: the whole filter is still
    applied (in no particular order, as with MongoDB when no sort is asked for)."""
    from mongomock import filtering
    from mongomock.collection import Collection

    if getattr(Collection, "_groupchat_id_lookup", False):
        return
    scan = Collection._iter_documents

    def iter_documents(self: Any, filter: Any) -> Any:
        keys = _ids_named(filter.get("_id")) if isinstance(filter, dict) else None
        if keys is None:
            return scan(self, filter)
        store = self._store
        store._remove_expired_documents()
        documents = store._documents
        found = (documents[k] for k in keys if k in documents)
        return iter([d for d in found if filtering.filter_applies(filter, d)])

    Collection._iter_documents = iter_documents  # type: ignore[method-assign]
    Collection._groupchat_id_lookup = True  # type: ignore[attr-defined]


def _ids_named(condition: Any) -> list[Any] | None:
    """The _id values an `_id` condition can match, when it names them (a value or $in)."""

    def plain(value: Any) -> bool:
        return isinstance(value, str | int) and not isinstance(value, bool)

    if plain(condition):
        return [condition]
    if isinstance(condition, dict) and condition.keys() == {"$in"}:
        values = condition["$in"]
        if isinstance(values, list | tuple) and all(plain(v) for v in values):
            return list(dict.fromkeys(values))
    return None


def _expire_documents_now_and_then() -> None:
    """Let the stand-in remove TTL-expired documents once a minute per collection, as
    MongoDB's TTL monitor does, instead of scanning the whole collection on every read and
    write (which makes every collection with a TTL index quadratic). Code never relies on
    expiry being prompt: MongoDB gives no such promise either."""
    import time

    from mongomock.store import CollectionStore

    if getattr(CollectionStore, "_groupchat_ttl_monitor", False):
        return
    remove_expired = CollectionStore._remove_expired_documents

    def remove_expired_now_and_then(self: Any) -> None:
        now = time.monotonic()
        if (
            now - getattr(self, "_groupchat_expired_at", -TTL_MONITOR_SECONDS)
            >= TTL_MONITOR_SECONDS
        ):
            self._groupchat_expired_at = now
            remove_expired(self)

    CollectionStore._remove_expired_documents = remove_expired_now_and_then  # type: ignore[method-assign]
    CollectionStore._groupchat_ttl_monitor = True  # type: ignore[attr-defined]


def _accept_bulk_updates() -> None:
    """Let the stand-in take `bulk_write([UpdateOne(...)])` from pymongo 4.9 and newer, which
    passes a `sort` option (always None here: UpdateOne without sort) the stand-in predates."""
    from mongomock.collection import BulkOperationBuilder

    if getattr(BulkOperationBuilder, "_groupchat_accepts_sort", False):
        return
    add_update = BulkOperationBuilder.add_update

    def add_update_without_sort(self: Any, *args: Any, sort: Any = None, **kwargs: Any) -> Any:
        if sort is not None:
            raise NotImplementedError("the in-process store cannot sort bulk updates")
        return add_update(self, *args, **kwargs)

    BulkOperationBuilder.add_update = add_update_without_sort  # type: ignore[method-assign]
    BulkOperationBuilder._groupchat_accepts_sort = True  # type: ignore[attr-defined]


class ProcessedEvents:
    """Remembers handled event ids so that a redelivered event changes nothing."""

    def __init__(self, collection: Any) -> None:
        self._collection = collection

    def once(self, handler: EventHandler) -> EventHandler:
        """`handler`, skipping events it handled before. An event is recorded only after the
        handler returned, so one that failed midway runs again in full on redelivery: the
        handler's steps must tolerate being repeated (conditional, versioned writes)."""

        async def handle(envelope: events_pb2.Envelope) -> None:
            if await self._collection.find_one({"_id": envelope.event_id}) is not None:
                return
            await handler(envelope)
            await self.first_time(envelope.event_id)

        return handle

    async def create_indexes(self) -> None:
        # A redelivery comes within minutes; a week of ids is plenty and the rest is dropped.
        await self._collection.create_index("at", expireAfterSeconds=PROCESSED_EVENTS_KEPT_SECONDS)

    async def first_time(self, event_id: str) -> bool:
        """Record `event_id`; False when it was recorded before."""
        try:
            await self._collection.insert_one({"_id": event_id, "at": dt.datetime.now(dt.UTC)})
        except DuplicateKeyError:
            return False
        return True
