"""The MongoDB connection: Motor to the server MONGODB_URI names."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

import structlog
from motor.motor_asyncio import AsyncIOMotorClient
from pymongo import monitoring
from pymongo.errors import BulkWriteError, DuplicateKeyError

from services.kit.metrics import MONGODB_COMMAND_SECONDS
from services.kit.tracing import mongo_listeners

if TYPE_CHECKING:
    from groupchat.events.v1 import events_pb2

    from services.kit.events import EventHandler

log = structlog.get_logger("mongo")

PROCESSED_EVENTS_KEPT_SECONDS = 7 * 86_400
DUPLICATE_KEY = 11000


def open_database(uri: str, name: str) -> tuple[Any, Any]:
    """Return (client, database) on the server `uri` names. Motor connects lazily: the first
    command waits for the server, at most 5 s."""
    client: Any = AsyncIOMotorClient(
        uri,
        serverSelectionTimeoutMS=5_000,
        appname=name,
        event_listeners=[CommandLatency(), *mongo_listeners()],
    )
    log.info("mongodb", hosts=hosts_of(uri), database=name)
    return client, client[name]


class CommandLatency(monitoring.CommandListener):
    """Observes how long each command took (pymongo measures it) in
    groupchat_mongodb_command_duration_seconds, by command name."""

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        MONGODB_COMMAND_SECONDS.labels(event.command_name).observe(event.duration_micros / 1e6)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        MONGODB_COMMAND_SECONDS.labels(event.command_name).observe(event.duration_micros / 1e6)


def hosts_of(uri: str) -> list[str]:
    """The hosts a MongoDB URI names, without its credentials or options (and without the
    DNS look-up that a mongodb+srv URI would need to list its members)."""
    authority = uri.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0]
    return authority.rpartition("@")[2].split(",")


async def log_server(db: Any) -> None:
    """Log what the server says it is, once at start: which MongoDB a service really uses."""
    hello = await db.command("hello")
    build = await db.command("buildInfo")
    log.info("mongodb_server", replica_set=hello.get("setName"), version=build.get("version"))


async def reachable(db: Any) -> bool:
    """Whether the database answers a ping (readiness)."""
    reply = await db.command("ping")
    return bool(reply.get("ok"))


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

    async def seen(self, event_ids: list[str]) -> set[str]:
        """Those of `event_ids` recorded before (one query), for handling events in batches."""
        if not event_ids:
            return set()
        docs = self._collection.find({"_id": {"$in": event_ids}}, {"_id": 1})
        return {d["_id"] async for d in docs}

    async def record(self, event_ids: list[str]) -> None:
        """Record `event_ids` in one write; ids recorded before stay as they are."""
        if not event_ids:
            return
        at = dt.datetime.now(dt.UTC)
        try:
            await self._collection.insert_many(
                [{"_id": i, "at": at} for i in event_ids], ordered=False
            )
        except BulkWriteError as error:
            if any(e.get("code") != DUPLICATE_KEY for e in error.details.get("writeErrors", [])):
                raise

    async def first_time(self, event_id: str) -> bool:
        """Record `event_id`; False when it was recorded before."""
        try:
            await self._collection.insert_one({"_id": event_id, "at": dt.datetime.now(dt.UTC)})
        except DuplicateKeyError:
            return False
        return True
