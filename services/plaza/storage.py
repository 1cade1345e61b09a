"""The plaza's MongoDB documents: the read model (cards, posts, activity buckets, processed
event ids, page snapshots) and what a rebuild keeps: the plaza's own records (impressions
and the editors' selections with their versions) and the insights' counters (daily figures
and shared posts' shares and opens).

A card's group state is written with a compare-and-set on its `rev`, so two consumers (or
two replicas) never overwrite each other's change; activity counters are single `$inc`
upserts. An insights counter document also keeps the ids of the events it counted, and
counts an event only if its id is not among them, in the same single write: exact under
redelivery, a handler that failed halfway, two replicas or a replay. That is why a rebuild
keeps them: replaying what they counted changes nothing, and what they counted from events
that have expired since (card views and taps are in no snapshot) stays counted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from pymongo import ASCENDING, InsertOne, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError

from services.kit.documents import (
    DUPLICATE_KEY,
    bulk_upsert,
    bulk_upsert_collisions,
    bulk_upsert_where,
    upsert_where,
)
from services.kit.errors import ConcurrentUpdate
from services.kit.events import OutgoingEvent
from services.kit.mongo import ProcessedEvents
from services.kit.outbox import merged, pending, with_pending
from services.plaza.card_index import CardIndex, IndexedCard
from services.plaza.domain import (
    DAY_MS,
    Activity,
    ActivityBucket,
    Card,
    DayCounts,
    GroupFacts,
    GroupState,
    LinkedPost,
    Listing,
    Post,
    PostDay,
    Sort,
)

# Collections a rebuild drops and refills from snapshots and streams. The insights'
# counters (`daily`, `post_stats`) and impressions are kept (see the module's docstring).
READ_MODEL = (
    "cards",
    "category_counts",
    "posts",
    "activity",
    "processed_events",
    "snapshots",
)
# The cards' indexes that served browse, search, the Selected shelf and the rank refresh
# before CardIndex did.
_ORDERING_INDEXES = frozenset(
    [f"shown_1_{scope}{sort.value}_-1__id_1" for sort in Sort for scope in ("", "category_1_")]
    + ["keywords_1_shown_1_hot_score_-1", "shown_1_selected_1_hot_score_-1"]
    + ["hot_score_-1", "messages_last_day_-1"]
)
# Page snapshots kept in memory (at most 1,000 ids each).
SNAPSHOTS_KEPT = 256
# What the index in memory reads of a card.
_INDEX_FIELDS = {
    "shown": 1,
    "category": 1,
    "full": 1,
    "created_at_ms": 1,
    "member_count": 1,
    "keywords": 1,
    "hot_score": 1,
    "selected": 1,
}
# Daily counters outlive the longest insights window.
DAILY_KEEP_MS = 100 * DAY_MS

T = TypeVar("T")
# Editors choosing for one group at the same moment: each retry means another choice landed.
SELECTION_ATTEMPTS = 20


def _shown_category(state: GroupState, listing: Listing) -> str | None:
    """The category a card counts in: None while it is not shown."""
    return state.facts.category if listing.shown and state.facts else None


def _expires(at_ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(at_ms / 1000, tz=dt.UTC)


NO_ACTIVITY = Activity(0.0, 0, 0, 0)


class StoredCard:
    """A card document's group state, its compare-and-set revision, what it lists and its
    activity figures."""

    def __init__(
        self, state: GroupState, rev: int, listing: Listing, activity: Activity = NO_ACTIVITY
    ) -> None:
        self.state = state
        self.rev = rev
        self.listing = listing
        self.activity = activity


CardWrite = tuple[GroupState, Listing, "StoredCard | None"]  # new state, listing, as read


@dataclass(frozen=True)
class BucketAdd:
    """Events of one activity bucket, summed."""

    group_id: str
    start_ms: int
    expires_ms: int
    joins: int
    messages: int
    speakers: list[str]


@dataclass(frozen=True)
class DayCount:
    """One event's counts in its group's day."""

    group_id: str
    date: str
    day_start_ms: int
    event_id: str
    inc: dict[str, int]
    speaker: str | None = None


@dataclass(frozen=True)
class PostCount:
    """One event's shares or opens of a post shared in `where` (a group, or DIRECT)."""

    where: str
    date: str
    day_start_ms: int
    event_id: str
    post_id: str
    author_id: str
    shares: int = 0
    opens: int = 0


class PlazaStore:
    def __init__(self, db: Any, index: CardIndex | None = None) -> None:
        self._db = db
        # The order of the shown cards in memory, fed every card write made here once it
        # is acknowledged; ordered_ids reads it once loaded.
        self.index = index or CardIndex()
        # Told the ids of the cards each write made here changed, once it is acknowledged
        # (the other replicas hear of them so: services/plaza/replicas.py).
        self._write_listeners: list[Callable[[Collection[str]], None]] = []
        # While the index loads: what was fed meanwhile, applied again over what was read.
        self._fed_while_loading: list[Callable[[], None]] | None = None
        # One load at a time (the periodic one and one after NATS lost messages).
        self._loading = asyncio.Lock()
        # The latest page snapshots: id -> (kind, ids, expires_ms).
        self._snapshot_cache: dict[str, tuple[str, list[str], int]] = {}
        self._cards = db["cards"]
        self._category_counts = db["category_counts"]
        self._posts = db["posts"]
        self._activity = db["activity"]
        self._daily = db["daily"]
        self._post_stats = db["post_stats"]
        self._snapshots = db["snapshots"]
        self._impressions = db["impressions"]
        self.selection_versions = db["selection_versions"]
        self.processed = ProcessedEvents(db["processed_events"])

    async def create_indexes(self) -> None:
        await self.processed.create_indexes()
        # Browse, search and the Selected shelf order the cards in memory (CardIndex), and
        # the rank refresh finds the scored ones there, not with the store's indexes: each
        # of those would cost every card write and every score refresh an index update
        # (the keywords' one a key per word), and the plaza writes far more often than it
        # starts. Those that earlier releases made go.
        existing = await self._cards.index_information()
        for name in existing:
            if name in _ORDERING_INDEXES:
                await self._cards.drop_index(name)
        await self._cards.create_index("linked_post_id")
        await self._activity.create_index([("group_id", ASCENDING), ("start_ms", ASCENDING)])
        await self._activity.create_index("start_ms")
        await self._activity.create_index("expires_at", expireAfterSeconds=0)
        # A creator's groups (ListMyGroupInsights), transfers included: owner_id follows the
        # group's events.
        await self._cards.create_index([("owner_id", ASCENDING), ("_id", ASCENDING)])
        # The days of a window, for one group or all of a creator's.
        for days in (self._daily, self._impressions, self._post_stats):
            await days.create_index([("group_id", ASCENDING), ("date", ASCENDING)])
        # Taps on one author's posts wherever they were shared.
        await self._post_stats.create_index([("author_id", ASCENDING), ("date", ASCENDING)])
        await self._daily.create_index("expires_at", expireAfterSeconds=0)
        await self._post_stats.create_index("expires_at", expireAfterSeconds=0)
        await self._impressions.create_index("expires_at", expireAfterSeconds=0)
        await self._snapshots.create_index("expires_at", expireAfterSeconds=0)

    async def drop_read_model(self) -> None:
        """Drop what a rebuild fills again from snapshots and streams (not impressions,
        selection versions nor the insights' counters)."""
        for name in READ_MODEL:
            await self._db.drop_collection(name)
        await self.create_indexes()
        self.index.load([], {})
        self._snapshot_cache.clear()

    # The index in memory

    def on_cards_written(self, listener: Callable[[Collection[str]], None]) -> None:
        """Call `listener` with the ids of the cards each write made here changed, once the
        write is acknowledged; not for the activity scores' periodic refresh, which every
        replica runs for itself."""
        self._write_listeners.append(listener)

    def _written_here(self, group_ids: Collection[str]) -> None:
        if group_ids:
            for listener in self._write_listeners:
                listener(group_ids)

    async def load_index(self) -> int:
        """Load the index from the cards (at start, and again every so often: what the
        notices of other replicas' writes missed reaches it so); returns how many cards it
        shows."""
        async with self._loading:
            return await self._load_index()

    async def _load_index(self) -> int:
        self._fed_while_loading = []
        try:
            shown: list[IndexedCard] = []
            hot: dict[str, float] = {}
            selected: list[str] = []
            async for d in self._cards.find({}, _INDEX_FIELDS):
                if d.get("hot_score"):
                    hot[d["_id"]] = float(d["hot_score"])
                if d.get("shown"):
                    shown.append(_indexed(d))
                if d.get("selected"):
                    selected.append(d["_id"])
            fed = self._fed_while_loading
            self.index.load(shown, hot, selected)
            for feed in fed:  # written here after the read may have passed them
                feed()
        finally:
            self._fed_while_loading = None
        return len(self.index)

    async def reread_index(self, group_ids: list[str]) -> set[str]:
        """Put the cards of `group_ids` into the index as the store holds them now, shown
        or not, with their hot scores and selections, in one read (another replica wrote
        them). Returns those this process wrote while they were read: which of the two
        writes is the later one cannot be told, so they are left as they are, to be read
        again."""
        stamp = self.index.stamp
        docs = {
            d["_id"]: d async for d in self._cards.find({"_id": {"$in": group_ids}}, _INDEX_FIELDS)
        }
        meanwhile = self.index.written_since(group_ids, stamp)
        fresh = [g for g in group_ids if g not in meanwhile]
        cards = {g: _indexed(docs[g]) if docs.get(g, {}).get("shown") else None for g in fresh}
        hot = {g: float(docs.get(g, {}).get("hot_score") or 0.0) for g in fresh}
        selected = {g: bool(docs.get(g, {}).get("selected")) for g in fresh}

        def feed() -> None:
            for group_id, card in cards.items():
                self.index.put(group_id, card)
            self.index.set_hot(hot)
            self.index.select(selected)

        self._feed(feed)
        return meanwhile

    def _feed(self, feed: Callable[[], None]) -> None:
        feed()
        if self._fed_while_loading is not None:
            self._fed_while_loading.append(feed)

    def _index_card(self, state: GroupState, listing: Listing) -> None:
        card = None
        if listing.shown and state.facts is not None:
            card = IndexedCard(
                state.group_id,
                state.facts.category,
                listing.full,
                state.facts.created_at_ms,
                state.member_count,
                listing.keywords,
            )
        self._feed(lambda: self.index.put(state.group_id, card))

    # Cards: group state

    async def load(self, group_id: str) -> StoredCard | None:
        doc = await self._cards.find_one({"_id": group_id})
        return _stored(doc) if doc else None

    async def save(self, state: GroupState, listing: Listing, previous: StoredCard | None) -> bool:
        """Write the group state and listing if the card is still as `previous` (None: not
        stored yet); False when someone else changed it first. The count of shown cards per
        category follows the card (ListCategories reads those counts, not the cards)."""
        fields = {**_state_doc(state), **_listing_doc(listing)}
        if previous is None:
            try:
                await self._cards.insert_one({**_blank_card(state.group_id), **fields, "rev": 1})
            except DuplicateKeyError:
                return False
        else:
            result = await self._cards.update_one(
                {"_id": state.group_id, "rev": previous.rev},
                {"$set": {**fields, "rev": previous.rev + 1}},
            )
            if not result.matched_count:
                return False
        self._index_card(state, listing)
        self._written_here([state.group_id])
        was = _shown_category(previous.state, previous.listing) if previous else None
        await self._move_category_count(was, _shown_category(state, listing))
        return True

    async def load_many(self, group_ids: list[str]) -> dict[str, StoredCard]:
        """The stored cards of `group_ids` (those that exist), in one query."""
        docs = self._cards.find({"_id": {"$in": group_ids}})
        return {d["_id"]: _stored(d) async for d in docs}

    async def save_many(self, writes: list[CardWrite]) -> set[str]:
        """`save` for many cards in one unordered bulk write, each with its own
        compare-and-set; returns the ids of the cards someone else changed first (nothing
        of theirs was written). An update whose `rev` no longer matches is an upsert that
        collides on `_id`, so MongoDB names each one that lost in the bulk's write errors.
        The counts of shown cards per category follow the writes that landed."""
        ops: list[Any] = []
        for state, listing, previous in writes:
            fields = {**_state_doc(state), **_listing_doc(listing)}
            if previous is None:
                ops.append(InsertOne({**_blank_card(state.group_id), **fields, "rev": 1}))
            else:
                fields["rev"] = previous.rev + 1
                ops.append(
                    UpdateOne(
                        {"_id": state.group_id, "rev": previous.rev},
                        # Only when the card was dropped meanwhile (a rebuild).
                        {"$set": fields, "$setOnInsert": _blank_card(state.group_id, fields)},
                        upsert=True,
                    )
                )
        if not ops:
            return set()
        lost: set[str] = set()
        try:
            await self._cards.bulk_write(ops, ordered=False)
        except BulkWriteError as error:
            failed = error.details.get("writeErrors", [])
            if any(e.get("code") != DUPLICATE_KEY for e in failed):
                raise
            lost = {writes[e["index"]][0].group_id for e in failed}
        moves: dict[str, int] = {}
        written = []
        for state, listing, previous in writes:
            if state.group_id in lost:
                continue
            self._index_card(state, listing)
            written.append(state.group_id)
            was = _shown_category(previous.state, previous.listing) if previous else None
            now = _shown_category(state, listing)
            if was != now:
                if was is not None:
                    moves[was] = moves.get(was, 0) - 1
                if now is not None:
                    moves[now] = moves.get(now, 0) + 1
        self._written_here(written)
        await bulk_upsert(
            self._category_counts,
            [
                UpdateOne({"_id": c}, {"$inc": {"shown": n}}, upsert=True)
                for c, n in moves.items()
                if n
            ],
        )
        return lost

    async def _move_category_count(self, was: str | None, now: str | None) -> None:
        if was == now:
            return
        if was is not None:
            await self._category_counts.update_one({"_id": was}, {"$inc": {"shown": -1}})
        if now is not None:
            await upsert_where(self._category_counts, now, {}, {"$inc": {"shown": 1}})

    async def owned(self, owner_id: str) -> list[GroupState]:
        """The groups `owner_id` owns now, dissolved ones left out, unlisted ones included."""
        docs = await self._cards.find({"owner_id": owner_id, "dissolved": False}).to_list(None)
        return [_stored(d).state for d in docs]

    async def cards_linking(self, post_id: str) -> list[str]:
        docs = await self._cards.find({"linked_post_id": post_id}, {"_id": 1}).to_list(None)
        return [d["_id"] for d in docs]

    async def set_selected(self, group_id: str, selected: bool, version: int) -> bool:
        """Apply an editor's choice if newer than the card's; False when stale."""
        fields = {"selected": selected, "selection_version": version}
        if not await upsert_where(
            self._cards,
            group_id,
            {"selection_version": {"$lt": version}},
            {"$set": fields, "$setOnInsert": _blank_card(group_id, but=fields)},
        ):
            return False
        self._feed(lambda: self.index.select({group_id: selected}))
        self._written_here([group_id])
        await upsert_where(
            self.selection_versions,
            group_id,
            {"version": {"$lt": version}},
            {"$set": {"version": version, "selected": selected}},
        )
        return True

    async def selections(self) -> list[tuple[str, bool, int]]:
        """The editors' choices as recorded here: (group id, selected, version) per group.
        The plaza's own record, so the Selected shelf outlives the events that told it."""
        docs = await self.selection_versions.find(
            {"selected": {"$exists": True}}, {"selected": 1, "version": 1}
        ).to_list(None)
        return [(d["_id"], bool(d["selected"]), int(d["version"])) for d in docs]

    async def record_selection(
        self, group_id: str, selected: bool, selection_event: Callable[[int], OutgoingEvent]
    ) -> OutgoingEvent:
        """Take the group's next selection version and store the editor's choice with it,
        and its event, made by `selection_event(version)`, in one write: the choice is then
        kept (see `selections`) and certain to be published (the relay watches
        `selection_versions`)."""
        for _ in range(SELECTION_ATTEMPTS):
            doc = await self.selection_versions.find_one({"_id": group_id}, {"version": 1})
            version = int(doc["version"]) + 1 if doc else 1
            event = selection_event(version)
            if doc is None:
                try:
                    await self.selection_versions.insert_one(
                        with_pending(
                            {"_id": group_id, "version": version, "selected": selected}, [event]
                        )
                    )
                except DuplicateKeyError:
                    continue
                return event
            result = await self.selection_versions.update_one(
                {"_id": group_id, "version": version - 1},
                merged({"$set": {"version": version, "selected": selected}}, pending([event])),
            )
            if result.matched_count:
                return event
        raise ConcurrentUpdate("the group's selection kept changing; try again")

    # Cards: activity figures

    async def set_activity(
        self,
        figures: dict[str, Activity],
        last_active: dict[str, int] | None = None,
        *,
        periodic: bool = False,
    ) -> None:
        """Write the groups' activity figures and, in the same write per card, when
        something last happened in them (`touch`). `periodic`: the scores' refresh as time
        passes, which every replica runs for itself (its write listeners are not told)."""
        last_active = last_active or {}
        ops = []
        for group_id in figures.keys() | last_active.keys():
            update: dict[str, Any] = {}
            if group_id in figures:
                update["$set"] = asdict(figures[group_id])
            if group_id in last_active:
                update["$max"] = {"last_active_at_ms": last_active[group_id]}
            ops.append(UpdateOne({"_id": group_id}, update))
        if not ops:
            return
        await self._cards.bulk_write(ops, ordered=False)
        scores = {g: a.hot_score for g, a in figures.items()}
        self._feed(lambda: self.index.set_hot(scores))
        self._feed(lambda: self.index.written(last_active))
        if not periodic:
            self._written_here(figures.keys() | last_active.keys())

    async def touch(self, group_id: str, at_ms: int) -> None:
        """Record that something happened in the group at `at_ms`."""
        await self._cards.update_one({"_id": group_id}, {"$max": {"last_active_at_ms": at_ms}})
        self._feed(lambda: self.index.written([group_id]))
        self._written_here([group_id])

    def groups_with_figures(self) -> list[str]:
        """Cards whose activity figures are not all zero (they decay towards zero): those
        with a hot score, which any activity left gives (domain.activity)."""
        return self.index.scored()

    # Cards: queries

    def changed_since(self, group_ids: list[str], stamp: int) -> bool:
        """Whether any of the cards was written since the index's `stamp`: by this process,
        or by another replica that told it (`reread_index`)."""
        return self.index.changed_since(group_ids, stamp)

    def ordered_ids(
        self,
        sort: Sort,
        limit: int,
        *,
        category: str | None = None,
        only_with_space: bool = False,
        keywords: list[str] | None = None,
        selected: bool | None = None,
    ) -> list[str]:
        """The ids of the first `limit` shown cards that match, in the sort's order (value
        descending, then id), from the index in memory (`load_index` first)."""
        assert self.index.loaded, "ordered_ids before load_index"
        return self.index.ordered(
            sort,
            limit,
            category=category,
            only_with_space=only_with_space,
            keywords=keywords,
            selected=selected,
        )

    async def shown_cards(self, group_ids: list[str]) -> list[Card]:
        """The cards of `group_ids` still shown, in the order given."""
        # By id alone, `shown` checked here: the filter stays a lookup on the _id index.
        docs = await self._cards.find({"_id": {"$in": group_ids}}).to_list(None)
        by_id = {d["_id"]: d for d in docs if d.get("shown")}
        return [_card(by_id[g]) for g in group_ids if g in by_id]

    async def card(self, group_id: str) -> Card | None:
        doc = await self._cards.find_one({"_id": group_id})
        return _card(doc) if doc and doc.get("name") is not None else None

    async def hottest(self, category: str | None, selected: bool, limit: int) -> list[Card]:
        """The hottest shown cards of the category (None: all) among the editors' picks,
        or among the others."""
        ids = self.ordered_ids(Sort.HOT, limit, category=category, selected=selected)
        return [c for c in await self.shown_cards(ids) if c.selected == selected]

    async def shown_per_category(self) -> dict[str, int]:
        rows = await self._category_counts.find().to_list(None)
        return {r["_id"]: int(r["shown"]) for r in rows}

    # Page snapshots

    async def save_snapshot(self, kind: str, ids: list[str], expires_ms: int) -> str:
        snapshot_id = uuid.uuid4().hex
        await self._snapshots.insert_one(
            {
                "_id": snapshot_id,
                "kind": kind,
                # One string rather than an array of 1,000: one BSON element to encode and
                # decode instead of a thousand (ids never hold a space).
                "ids": " ".join(ids),
                "expires_ms": expires_ms,
                "expires_at": _expires(expires_ms),
            }
        )
        self._remember_snapshot(snapshot_id, (kind, ids, expires_ms))
        return snapshot_id

    async def snapshot(self, snapshot_id: str, kind: str, now_ms: int) -> list[str] | None:
        """The ids of a live snapshot; None once expired (the TTL monitor deletes late).
        A snapshot never changes, so the latest ones are kept in memory too: a walk that
        comes back to this replica reads no 1,000 ids from the store per page."""
        held = self._snapshot_cache.get(snapshot_id)
        if held is None:
            doc = await self._snapshots.find_one({"_id": snapshot_id})
            if doc is None:
                return None
            stored = doc["ids"]  # an array in snapshots of earlier releases
            ids = stored.split(" ") if isinstance(stored, str) else list(stored)
            held = (doc["kind"], ids, doc["expires_ms"])
            self._remember_snapshot(snapshot_id, held)
        held_kind, walk, expires_ms = held
        if held_kind != kind or expires_ms <= now_ms:
            return None
        return walk

    def _remember_snapshot(self, snapshot_id: str, snapshot: tuple[str, list[str], int]) -> None:
        if len(self._snapshot_cache) >= SNAPSHOTS_KEPT:
            del self._snapshot_cache[next(iter(self._snapshot_cache))]  # the oldest
        self._snapshot_cache[snapshot_id] = snapshot

    # Posts

    async def post(self, post_id: str) -> Post | None:
        doc = await self._posts.find_one({"_id": post_id})
        if doc is None:
            return None
        return Post(doc["_id"], doc["author_id"], doc["title"], doc["cover_url"], doc["published"])

    async def posts(self, post_ids: list[str]) -> dict[str, Post]:
        """The posts of `post_ids` the plaza holds, in one query."""
        if not post_ids:
            return {}
        return {
            d["_id"]: Post(d["_id"], d["author_id"], d["title"], d["cover_url"], d["published"])
            async for d in self._posts.find({"_id": {"$in": post_ids}})
        }

    async def titles(self, post_ids: list[str]) -> dict[str, str]:
        """The titles of those of `post_ids` the plaza knows published."""
        docs = await self._posts.find(
            {"_id": {"$in": post_ids}, "published": True}, {"title": 1}
        ).to_list(None)
        return {d["_id"]: d["title"] for d in docs}

    async def save_post(self, post_id: str, version: int, **fields: Any) -> bool:
        """Apply a post event if newer than what is held; False when stale."""
        blank = {"author_id": "", "title": "", "cover_url": "", "published": False}
        insert_only = {k: v for k, v in blank.items() if k not in fields}
        update: dict[str, Any] = {"$set": {**fields, "version": version}}
        if insert_only:
            update["$setOnInsert"] = insert_only
        return await upsert_where(self._posts, post_id, {"version": {"$lt": version}}, update)

    # Activity buckets

    async def add_activity(
        self, group_id: str, start_ms: int, expires_ms: int, *, joins: int, speaker: str | None
    ) -> None:
        update: dict[str, Any] = {
            "$inc": {"joins": joins, "messages": 1 if speaker else 0},
            "$setOnInsert": {
                "group_id": group_id,
                "start_ms": start_ms,
                "expires_at": _expires(expires_ms),
            },
        }
        if speaker:
            update["$addToSet"] = {"speakers": speaker}
        await upsert_where(self._activity, f"{group_id}:{start_ms}", {}, update)

    async def add_activity_many(self, buckets: list[BucketAdd]) -> None:
        """`add_activity` for many buckets in one bulk write (each bucket once, its
        events summed)."""
        await bulk_upsert(
            self._activity,
            [
                UpdateOne(
                    {"_id": f"{b.group_id}:{b.start_ms}"},
                    {
                        "$inc": {"joins": b.joins, "messages": b.messages},
                        "$setOnInsert": {
                            "group_id": b.group_id,
                            "start_ms": b.start_ms,
                            "expires_at": _expires(b.expires_ms),
                        },
                        **(
                            {"$addToSet": {"speakers": {"$each": b.speakers}}} if b.speakers else {}
                        ),
                    },
                    upsert=True,
                )
                for b in buckets
            ],
        )

    async def buckets(
        self, since_ms: int, group_id: str | list[str] | None = None
    ) -> dict[str, list[ActivityBucket]]:
        """Activity buckets starting after `since_ms`, per group (one group, some, or all)."""
        # The group first: a simple planner (the local server's) picks the index of the
        # first field, and every recent bucket of all groups is not what is asked.
        query: dict[str, Any] = {}
        if isinstance(group_id, list):
            query["group_id"] = {"$in": group_id}
        elif group_id is not None:
            query["group_id"] = group_id
        query["start_ms"] = {"$gt": since_ms}
        found: dict[str, list[ActivityBucket]] = {}
        async for d in self._activity.find(query):
            found.setdefault(d["group_id"], []).append(
                ActivityBucket(
                    d["start_ms"], d["messages"], d["joins"], frozenset(d.get("speakers", ()))
                )
            )
        return found

    # Insights counters and impressions

    async def count_days(self, counts: list[DayCount]) -> None:
        """Count each event in its group's day, once (see `_count_once`)."""
        await _count_once(
            self._daily,
            [
                _OnceCount(
                    f"{c.group_id}:{c.date}",
                    c.event_id,
                    c.inc,
                    {
                        "group_id": c.group_id,
                        "date": c.date,
                        "expires_at": _expires(c.day_start_ms + DAILY_KEEP_MS),
                    },
                    {"speakers": c.speaker} if c.speaker else {},
                )
                for c in counts
            ],
        )

    async def count_posts(self, counts: list[PostCount]) -> None:
        """Count each event's shares or opens of a post shared in a group (or DIRECT) on its
        day, once (see `_count_once`)."""
        await _count_once(
            self._post_stats,
            [
                _OnceCount(
                    f"{c.where}:{c.date}:{c.post_id}",
                    c.event_id,
                    {"shares": c.shares, "opens": c.opens},
                    {
                        "group_id": c.where,
                        "date": c.date,
                        "post_id": c.post_id,
                        "author_id": c.author_id,
                        "expires_at": _expires(c.day_start_ms + DAILY_KEEP_MS),
                    },
                    {},
                )
                for c in counts
            ],
        )

    async def days(
        self, group_ids: list[str], window: list[str]
    ) -> dict[str, dict[str, DayCounts]]:
        """The daily counters of `group_ids` over `window` (consecutive dates, oldest
        first): group id -> date -> counts."""
        found: dict[str, dict[str, DayCounts]] = {g: {} for g in group_ids}
        async for d in self._daily.find(_window_filter(group_ids, window), {"counted": 0}):
            found[d["group_id"]][d["date"]] = DayCounts(
                joins_by_source=dict(d.get("joins", {})),
                leaves=d.get("leaves", 0),
                messages=d.get("messages", 0),
                speakers=frozenset(d.get("speakers", ())),
                card_views=d.get("card_views", 0),
            )
        return found

    async def shared_posts(
        self, group_ids: list[str], window: list[str]
    ) -> dict[str, list[PostDay]]:
        """Posts shared in `group_ids` over `window`, per group, per post and day."""
        found: dict[str, list[PostDay]] = {g: [] for g in group_ids}
        async for d in self._post_stats.find(_window_filter(group_ids, window), {"counted": 0}):
            found[d["group_id"]].append(
                PostDay(d["date"], d["post_id"], d["author_id"], d["shares"], d["opens"])
            )
        return found

    async def author_opens(self, author_id: str, window: list[str]) -> int:
        """Taps on `author_id`'s posts over `window`, in groups and direct conversations."""
        query = {"author_id": author_id, "date": {"$gte": window[0], "$lte": window[-1]}}
        return sum([d["opens"] async for d in self._post_stats.find(query, {"opens": 1})])

    async def add_impressions(self, counts: dict[tuple[str, str], int]) -> None:
        """Add `counts` per (group, date) in one bulk write."""
        if not counts:
            return
        await bulk_upsert(
            self._impressions,
            [
                UpdateOne(
                    {"_id": f"{group_id}:{date}"},
                    {
                        "$inc": {"count": n},
                        "$setOnInsert": {
                            "group_id": group_id,
                            "date": date,
                            "expires_at": _expires(_day_start_ms(date) + DAILY_KEEP_MS),
                        },
                    },
                    upsert=True,
                )
                for (group_id, date), n in counts.items()
            ],
        )

    async def impressions(
        self, group_ids: list[str], window: list[str]
    ) -> dict[str, dict[str, int]]:
        """Impressions of `group_ids` over `window`: group id -> date -> count."""
        found: dict[str, dict[str, int]] = {g: {} for g in group_ids}
        async for d in self._impressions.find(_window_filter(group_ids, window)):
            found[d["group_id"]][d["date"]] = int(d["count"])
        return found


@dataclass(frozen=True)
class _OnceCount:
    """One event's counts in one counter document, and what it adds to the document's sets."""

    doc_id: str
    event_id: str
    inc: dict[str, int]
    on_insert: dict[str, Any]
    added: dict[str, Any]


async def _count_once(collection: Any, counts: list[_OnceCount]) -> None:
    """Count each event once: a counter document keeps the ids of the events it counted and
    counts events only if none of them is among those, in the same write. A batch's events
    of one document go in one write; a document that counted one of them already (a
    redelivery, a replay) takes them one by one instead, each only if it is not counted."""
    by_doc: dict[str, dict[str, _OnceCount]] = {}
    for count in counts:
        by_doc.setdefault(count.doc_id, {}).setdefault(count.event_id, count)
    together = [list(events.values()) for events in by_doc.values()]
    upserts = [
        UpdateOne({"_id": d, **c}, u, upsert=True) for d, c, u in map(_counted_as_one, together)
    ]
    # Collided on _id: the document exists and did not match (or was created meanwhile).
    collided = await bulk_upsert_collisions(collection, upserts)
    await bulk_upsert_where(
        collection, [_counted_as_one([c]) for i in collided for c in together[i]]
    )


def _counted_as_one(
    counts: list[_OnceCount],
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(doc id, condition, update) of counting the events `counts` of one counter document
    at once, if it counted none of them."""
    inc: Counter[str] = Counter()
    added: dict[str, list[Any]] = {}
    for count in counts:
        inc.update(count.inc)
        for field, value in count.added.items():
            added.setdefault(field, []).append(value)
    ids = [count.event_id for count in counts]
    update: dict[str, Any] = {
        "$inc": dict(inc),
        "$push": {"counted": {"$each": ids}},
        "$setOnInsert": counts[0].on_insert,
    }
    if added:
        update["$addToSet"] = {field: {"$each": values} for field, values in added.items()}
    return counts[0].doc_id, {"counted": {"$nin": ids}}, update


def _window_filter(group_ids: list[str], window: list[str]) -> dict[str, Any]:
    # Dates are YYYY-MM-DD, so their order is the string order.
    return {"group_id": {"$in": group_ids}, "date": {"$gte": window[0], "$lte": window[-1]}}


def _day_start_ms(date: str) -> int:
    day = dt.datetime.fromisoformat(date).replace(tzinfo=dt.UTC)
    return int(day.timestamp() * 1000)


def _blank_card(group_id: str, but: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every field of a card document, at its value before any event."""
    blank: dict[str, Any] = {
        "_id": group_id,
        "rev": 0,
        "settings_version": 0,
        "count_version": 0,
        "member_count": 0,
        "dissolved": False,
        "roles": {},
        "shown": False,
        "full": False,
        "keywords": [],
        "linked_post": None,
        "selected": False,
        "selection_version": 0,
        "hot_score": 0.0,
        "messages_last_hour": 0,
        "messages_last_day": 0,
        "active_members": 0,
        "last_active_at_ms": 0,  # 0 until something happens
    }
    if but is not None:
        blank = {k: v for k, v in blank.items() if k not in but and k != "_id"}
    return blank


def _state_doc(s: GroupState) -> dict[str, Any]:
    facts = asdict(s.facts) if s.facts else {}
    # member_count is kept from the member events, whatever the settings event said.
    facts.pop("member_count", None)
    return {
        **facts,
        "settings_version": s.settings_version,
        "member_count": s.member_count,
        "count_version": s.count_version,
        "dissolved": s.dissolved,
        "roles": {user: list(rv) for user, rv in s.roles.items()},
    }


def _listing_doc(listing: Listing) -> dict[str, Any]:
    return {
        "shown": listing.shown,
        "full": listing.full,
        "keywords": list(listing.keywords),
        "linked_post": asdict(listing.linked_post) if listing.linked_post else None,
    }


def _stored(doc: dict[str, Any]) -> StoredCard:
    facts = None
    if doc.get("name") is not None:
        facts = GroupFacts(
            name=doc["name"],
            description=doc["description"],
            category=doc["category"],
            cover_url=doc["cover_url"],
            capacity=doc["capacity"],
            listed=doc["listed"],
            linked_post_id=doc["linked_post_id"],
            owner_id=doc["owner_id"],
            member_count=doc["member_count"],
            created_at_ms=doc["created_at_ms"],
            # Cards stored before announcements existed have none.
            announcement=doc.get("announcement", ""),
        )
    state = GroupState(
        group_id=doc["_id"],
        facts=facts,
        settings_version=doc["settings_version"],
        member_count=doc["member_count"],
        count_version=doc["count_version"],
        dissolved=doc["dissolved"],
        roles={user: (rv[0], rv[1]) for user, rv in doc["roles"].items()},
    )
    linked = doc.get("linked_post")
    listing = Listing(
        shown=doc["shown"],
        full=doc["full"],
        keywords=tuple(doc["keywords"]),
        linked_post=LinkedPost(**linked) if linked else None,
    )
    activity = Activity(
        doc.get("hot_score", 0.0),
        doc.get("messages_last_hour", 0),
        doc.get("messages_last_day", 0),
        doc.get("active_members", 0),
    )
    return StoredCard(state, doc["rev"], listing, activity)


def _indexed(doc: dict[str, Any]) -> IndexedCard:
    """What the index needs of a shown card, from its document (_INDEX_FIELDS)."""
    return IndexedCard(
        doc["_id"],
        doc.get("category"),
        bool(doc.get("full")),
        int(doc.get("created_at_ms") or 0),
        int(doc.get("member_count") or 0),
        tuple(doc.get("keywords") or ()),
    )


def _card(doc: dict[str, Any], filler: bool = False) -> Card:
    linked = doc.get("linked_post")
    return Card(
        group_id=doc["_id"],
        name=doc.get("name") or "",
        description=doc.get("description") or "",
        category=doc.get("category"),
        cover_url=doc.get("cover_url") or "",
        member_count=doc["member_count"],
        capacity=doc.get("capacity") or 0,
        owner_id=doc.get("owner_id") or "",
        created_at_ms=doc.get("created_at_ms") or 0,
        selected=doc["selected"],
        linked_post=LinkedPost(**linked) if linked else None,
        hot_score=doc["hot_score"],
        messages_last_hour=doc["messages_last_hour"],
        messages_last_day=doc["messages_last_day"],
        active_members=doc["active_members"],
        last_active_at_ms=doc.get("last_active_at_ms") or None,
        filler=filler,
        announcement=doc.get("announcement") or "",
    )
