"""Events that commit with the change they describe, and the relay that publishes them.

A command writes its events into the very document it changes, in the same single-document
write: `pending(events)` adds them to an update, `with_pending(doc, events)` to an insert.
MongoDB applies a write to one document atomically, so the change and its events commit
together or not at all, whatever stops the command (a cancel, a deadline, a crash), and no
transaction is needed.

Once the write is acknowledged, the command finishes what follows from it (the idempotent
follow-ups a collection is watched with: a group's last message after a message, say) and
hands the events to the relay (`committed`), which publishes them in the background (the
request never waits for NATS) and then removes them from the document. A document whose
events are still there after the retry delay belongs to a command that did not get that far
(cancelled, crashed) or whose events NATS refused: the relay's scan finds it, finishes it
again and publishes its events. So every committed change is finished and published, and an
event leaves its document only after its change was finished. The event id is the
`Nats-Msg-Id`, so JetStream drops an event that is published twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from groupchat.events.v1 import events_pb2

from services.kit.events import EventBus, OutgoingEvent
from services.kit.metrics import EVENTS_DEFERRED, OUTBOX_BACKLOG
from services.kit.timestamps import now_ms

log = structlog.get_logger("outbox")

# The fields of a document that holds events not yet published: the events in commit order,
# and since when the oldest has waited (only while there are some: a sparse index finds them).
EVENTS_FIELD = "_events"
WAITING_SINCE_FIELD = "_events_since"
# The filter for documents that hold events not yet published.
HOLDS_EVENTS = {f"{EVENTS_FIELD}.0": {"$exists": True}}
# How long a recorded event's document is kept (Outbox.record): long after it was published.
RECORDS_KEPT_SECONDS = 7 * 86400


def _stored(events: Iterable[OutgoingEvent]) -> list[dict[str, Any]]:
    return [
        {
            "id": e.envelope.event_id,
            "subject": e.subject,
            "data": e.envelope.SerializeToString(),
            **({"trace": dict(e.trace_context)} if e.trace_context else {}),
        }
        for e in events
    ]


def pending(events: list[OutgoingEvent], at_ms: int | None = None) -> dict[str, Any]:
    """The update operators that add `events` to a document; merge them into the command's
    own update with `merged`."""
    return {
        "$push": {EVENTS_FIELD: {"$each": _stored(events)}},
        "$min": {WAITING_SINCE_FIELD: now_ms() if at_ms is None else at_ms},
    }


def with_pending(doc: dict[str, Any], events: list[OutgoingEvent]) -> dict[str, Any]:
    """`doc` to insert, carrying `events`."""
    return {**doc, EVENTS_FIELD: _stored(events), WAITING_SINCE_FIELD: now_ms()}


def merged(*updates: dict[str, Any]) -> dict[str, Any]:
    """One update document from several: their operators' fields side by side."""
    result: dict[str, dict[str, Any]] = {}
    for update in updates:
        for operator, fields in update.items():
            target = result.setdefault(operator, {})
            if target.keys() & fields.keys():
                raise ValueError(f"{operator} names {target.keys() & fields.keys()} twice")
            target.update(fields)
    return result


# What follows from a committed document, done again by the relay for documents whose
# command may have stopped after its write: must be idempotent.
Finish = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class _Committed:
    collection: str
    doc_id: Any
    events: list[OutgoingEvent]


class Outbox:
    """Publishes the events that commands commit into the documents of the watched
    collections; `run` is the relay, one task per process."""

    def __init__(
        self,
        bus: EventBus,
        *,
        retry_after_seconds: float = 2.0,
        scan_interval_seconds: float = 1.0,
        queue_limit: int = 10_000,
    ) -> None:
        self._bus = bus
        self._retry_after_ms = int(retry_after_seconds * 1000)
        self._scan_interval = scan_interval_seconds
        self._collections: dict[str, Any] = {}
        self._finishers: dict[str, Finish] = {}
        # Bounded: when the relay falls behind, what does not fit waits for the scan.
        self._queue: asyncio.Queue[_Committed] = asyncio.Queue(queue_limit)
        # Documents whose events are queued here: the scan leaves them to the queue, so that
        # a relay running behind under load does not do their work twice.
        self._in_hand: Counter[tuple[str, Any]] = Counter()
        # The backlog (groupchat_outbox_backlog): events in the queue, and those the last
        # scan found waiting in documents and could not publish.
        self._queued_events = 0
        self._waiting_events = 0

    async def watch(self, collection: Any, finish: Finish | None = None) -> None:
        """Let the relay publish the events that commands write into `collection`, finishing
        each document it finds still holding events with `finish` first."""
        await collection.create_index(WAITING_SINCE_FIELD, sparse=True)
        self._collections[collection.name] = collection
        if finish is not None:
            self._finishers[collection.name] = finish

    async def record(self, collection: Any, event: OutgoingEvent) -> None:
        """Commit an event that changes no document of its own (a view, a tap): a document
        of its own in `collection` (watched, with a TTL index on `expires_at`) carries it."""
        doc = {"_id": event.envelope.event_id, "expires_at": _expires_at(RECORDS_KEPT_SECONDS)}
        await collection.insert_one(with_pending(doc, [event]))
        self.committed(collection, doc["_id"], [event])

    def committed(self, collection: Any, doc_id: Any, events: list[OutgoingEvent]) -> None:
        """Publish soon the `events` just committed into `collection`'s document `doc_id`."""
        if not events:
            return
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(_Committed(collection.name, doc_id, events))
            self._in_hand[(collection.name, doc_id)] += 1
            self._queued_events += len(events)

    async def run(self) -> None:
        """The relay, until cancelled: publish what commands hand over as it comes, and every
        scan interval whatever is still waiting in the documents."""
        OUTBOX_BACKLOG.labels("queue").set_function(lambda: self._queued_events)
        OUTBOX_BACKLOG.labels("documents").set_function(lambda: self._waiting_events)
        scan_at = asyncio.get_running_loop().time()
        while True:
            first = None
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that comes
            # with the item, and the relay would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(scan_at):
                    first = await self._queue.get()
            if first is not None:
                batch = [first]
                while len(batch) < 256 and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                try:
                    await self._publish(batch)
                except Exception:
                    log.exception("outbox_publish_failed")
                finally:
                    for item in batch:
                        self._queued_events -= len(item.events)
                        key = (item.collection, item.doc_id)
                        self._in_hand[key] -= 1
                        if not self._in_hand[key]:
                            del self._in_hand[key]
            if asyncio.get_running_loop().time() >= scan_at:
                try:
                    await self._scan(leave_queued=True)
                except Exception:
                    log.exception("outbox_relay_failed")
                scan_at = asyncio.get_running_loop().time() + self._scan_interval

    async def relay_once(self, limit: int = 500) -> int:
        """Publish the events that have waited longer than the retry delay; returns how many
        went out."""
        return await self._scan(limit, leave_queued=False)

    async def _scan(self, limit: int = 500, *, leave_queued: bool) -> int:
        """relay_once; with `leave_queued`, the documents whose events wait in this relay's
        queue are left to it."""
        cutoff = now_ms() - self._retry_after_ms
        batch: list[_Committed] = []
        for name, collection in self._collections.items():
            # Documents whose events were all published though they got more while the
            # first ones went out: no longer waiting (a command adding events meanwhile
            # leaves its document out of this).
            await collection.update_many(
                {WAITING_SINCE_FIELD: {"$exists": True}, EVENTS_FIELD: {"$size": 0}},
                {"$unset": {EVENTS_FIELD: "", WAITING_SINCE_FIELD: ""}},
            )
            finish = self._finishers.get(name)
            docs = (
                await collection.find(
                    {WAITING_SINCE_FIELD: {"$lte": cutoff}},
                    None if finish else {EVENTS_FIELD: 1},
                )
                .sort(WAITING_SINCE_FIELD, 1)
                .limit(limit)
                .to_list(None)
            )
            for doc in docs:
                if leave_queued and (name, doc["_id"]) in self._in_hand:
                    continue
                if finish is not None:
                    await finish(doc)
                events = [_outgoing(stored) for stored in doc.get(EVENTS_FIELD) or []]
                batch.append(_Committed(name, doc["_id"], events))
        sent = await self._publish(batch)
        self._waiting_events = sum(len(item.events) for item in batch) - sent
        if sent:
            log.info("outbox_relayed", events=sent)
        return sent

    async def _publish(self, batch: list[_Committed]) -> int:
        """Publish each document's events in order (a document's later events wait for its
        earlier ones), documents side by side: the relay waits for JetStream's
        acknowledgements of a batch together, not one after another. Then remove the
        published ones from their documents."""
        by_doc: dict[tuple[str, Any], list[_Committed]] = defaultdict(list)
        for item in batch:
            by_doc[(item.collection, item.doc_id)].append(item)
        outcomes = await asyncio.gather(
            *(self._publish_in_order(items) for items in by_doc.values())
        )
        published = [pair for pairs in outcomes for pair in pairs]
        deferred = sum(len(item.events) for item in batch) - sum(len(ids) for _, ids in published)
        if deferred:
            EVENTS_DEFERRED.inc(deferred)
        await self._clear(published)
        return sum(len(ids) for _, ids in published)

    async def _publish_in_order(
        self, items: list[_Committed]
    ) -> list[tuple[_Committed, list[str]]]:
        """One document's events, in commit order, until NATS refuses one (the scan takes
        over from there)."""
        published: list[tuple[_Committed, list[str]]] = []
        for item in items:
            ids: list[str] = []
            for event in item.events:
                try:
                    await self._bus.publish(event)
                except Exception as exc:  # NATS down or slow: the scan takes over
                    log.warning("outbox_publish_deferred", error=repr(exc))
                    if ids:
                        published.append((item, ids))
                    return published
                ids.append(event.envelope.event_id)
            if ids:
                published.append((item, ids))
        return published

    async def _clear(self, published: list[tuple[_Committed, list[str]]]) -> None:
        """Take the published events out of their documents: one write per collection for
        the whole batch (a storm of joins, many sends). A document left with no events loses
        its waiting mark in that write too; one that got more meanwhile keeps those."""
        by_collection: dict[str, dict[Any, list[str]]] = defaultdict(dict)
        for item, ids in published:
            by_collection[item.collection].setdefault(item.doc_id, []).extend(ids)
        for name, by_doc in by_collection.items():
            ids = list(dict.fromkeys(i for doc_ids in by_doc.values() for i in doc_ids))
            # Only documents that still hold one of them: another relay may have been first.
            await self._collections[name].update_many(
                {"_id": {"$in": list(by_doc)}, f"{EVENTS_FIELD}.id": {"$in": ids}},
                _without_events(ids),
            )


def _without_events(ids: list[str]) -> list[dict[str, Any]]:
    """An update pipeline (MongoDB 4.2+) that removes the events `ids` from a document, and
    its events and waiting mark altogether when none are left: applied atomically to each
    document, so an event a command adds meanwhile stays, with the mark."""
    left = f"${EVENTS_FIELD}"
    none_left = {"$eq": [{"$size": left}, 0]}
    return [
        {
            "$set": {
                EVENTS_FIELD: {
                    "$filter": {"input": left, "cond": {"$not": [{"$in": ["$$this.id", ids]}]}}
                }
            }
        },
        {
            "$set": {
                EVENTS_FIELD: {"$cond": [none_left, "$$REMOVE", left]},
                WAITING_SINCE_FIELD: {"$cond": [none_left, "$$REMOVE", f"${WAITING_SINCE_FIELD}"]},
            }
        },
    ]


def _expires_at(seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(now_ms() / 1000 + seconds, tz=dt.UTC)


def _outgoing(stored: dict[str, Any]) -> OutgoingEvent:
    envelope = events_pb2.Envelope()
    envelope.ParseFromString(stored["data"])
    return OutgoingEvent(stored["subject"], envelope, stored.get("trace") or {})
