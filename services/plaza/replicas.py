"""How the plaza's replicas keep each other's order in memory (CardIndex) current.

The replicas share the durable consumers, so each event reaches one of them and each
replica writes only its part of the cards. Once its writes are acknowledged, a replica
tells the others which cards it wrote: one notice (PlazaCardsWritten: its replica id and
the cards' ids) for what it wrote at one moment, on core NATS, CARDS_WRITTEN_SUBJECT. A
replica told reads those cards again from the store, those of notices that came together
in one read, and puts them into its index, shown or not, with their scores: a notice names
cards, never their values, so the store stays the truth. Every replica refreshes the
scores' decay for itself (the rankings refresh), so that refresh tells no one.

Core NATS delivers at most once: a notice published while NATS or a replica was away is
lost. What it named comes in with the full reload of the index, which runs every
PLAZA_INDEX_RELOAD_SECONDS and once whenever NATS says messages may have been lost (a
reconnect, a slow consumer: `ReloadRequests`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Awaitable, Callable, Iterable

import structlog
from google.protobuf.message import DecodeError
from groupchat.events.v1 import events_pb2

log = structlog.get_logger("plaza.replicas")

# Outside every JetStream stream (`groupchat.plaza.>` is one): a notice is not an event.
CARDS_WRITTEN_SUBJECT = "replicas.groupchat.plaza.cards_written"
# Cards per notice, and per read of the cards told, at most: a notice stays far below
# NATS's payload limit and a read's `$in` modest.
IDS_AT_ONCE = 1000


class Gathered:
    """Runs `work` on the ids handed in with `add`, in the background; those handed in while
    it runs are gathered for its next run. A lone write or notice is worked on at once, a
    burst in a few runs of at most `limit` ids. A run that fails is logged and its ids
    dropped (the next reload of the index covers them); the next run goes on."""

    def __init__(
        self, work: Callable[[list[str]], Awaitable[None]], name: str, limit: int = IDS_AT_ONCE
    ) -> None:
        self._work = work
        self._name = name
        self._limit = limit
        self._pending: dict[str, None] = {}  # a set that keeps the order ids came in
        self._runner: asyncio.Task[None] | None = None
        self._closed = False

    def add(self, group_ids: Iterable[str]) -> None:
        if self._closed:
            return
        self._pending.update(dict.fromkeys(group_ids))
        if self._pending and (self._runner is None or self._runner.done()):
            self._runner = asyncio.create_task(self._run(), name=self._name)

    async def _run(self) -> None:
        while self._pending:
            group_ids = list(itertools.islice(self._pending, self._limit))
            for group_id in group_ids:
                del self._pending[group_id]
            try:
                await self._work(group_ids)
            except Exception:
                log.exception("replica_notice_failed", work=self._name, cards=len(group_ids))

    async def finish(self) -> None:
        """Take no more ids; return once those handed in so far were worked on."""
        self._closed = True
        if self._runner is not None:
            await self._runner

    async def cancel(self) -> None:
        """Take no more ids and drop those not worked on yet."""
        self._closed = True
        self._pending.clear()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner


# Reads the cards again into the index; returns those to read once more (written here
# meanwhile: PlazaStore.reread_index).
Reread = Callable[[list[str]], Awaitable[set[str]]]


class CardNotices:
    """This replica's side of the notices: `written` tells the others (through `publish`),
    `received` takes theirs (through `reread`)."""

    def __init__(
        self,
        publish: Callable[[bytes], Awaitable[None]],
        reread: Reread,
        replica_id: str | None = None,
    ) -> None:
        self.replica_id = replica_id or uuid.uuid4().hex
        self._publish = publish
        self._reread = reread
        self._telling = Gathered(self._tell, "plaza-cards-told")
        self._reading = Gathered(self._read_again, "plaza-cards-reread")

    def written(self, group_ids: Iterable[str]) -> None:
        """Cards this replica wrote, acknowledged (PlazaStore.on_cards_written)."""
        self._telling.add(group_ids)

    async def received(self, data: bytes) -> None:
        """A notice from CARDS_WRITTEN_SUBJECT: another replica's, or this one's own."""
        try:
            notice = events_pb2.PlazaCardsWritten.FromString(data)
        except DecodeError as exc:
            log.warning("cards_written_notice_ignored", why=f"unparseable: {exc}")
            return
        if not notice.replica_id:
            log.warning("cards_written_notice_ignored", why="no replica id")
            return
        if notice.replica_id != self.replica_id:
            self._reading.add(notice.group_ids)

    async def _tell(self, group_ids: list[str]) -> None:
        notice = events_pb2.PlazaCardsWritten(replica_id=self.replica_id, group_ids=group_ids)
        await self._publish(notice.SerializeToString())

    async def _read_again(self, group_ids: list[str]) -> None:
        self._reading.add(await self._reread(group_ids))

    async def stop_reading(self) -> None:
        """Read no more of the other replicas' cards (the store is closing)."""
        await self._reading.cancel()

    async def tell_the_rest(self) -> None:
        """Tell what was written and not told yet, and no more (NATS is closing)."""
        await self._telling.finish()


class ReloadRequests:
    """Runs `reload` in the background when asked (`request`: synchronous, as NATS's loss
    listeners are). Asked again while it runs, it runs once more after: the running one may
    have read a card before the write whose notice was lost."""

    def __init__(self, reload: Callable[[], Awaitable[object]]) -> None:
        self._reload = reload
        self._again = False
        self._runner: asyncio.Task[None] | None = None

    def request(self) -> None:
        if self._runner is not None and not self._runner.done():
            self._again = True
            return
        self._runner = asyncio.create_task(self._run(), name="plaza-index-reload")

    async def _run(self) -> None:
        while True:
            self._again = False
            try:
                await self._reload()
            except Exception:
                log.exception("card_index_reload_failed")
            if not self._again:
                return

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
