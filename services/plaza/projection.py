"""Applies events to the plaza's read model: the one way anything gets into it.

The durable consumers (FEEDS), the rebuild and SetGroupSelected all hand envelopes to
`PlazaProjection.handle`, which is idempotent on the event id (ProcessedEvents.once) and
order-safe: group state and posts apply only when newer than what is held (by the
aggregate's version); messages and joins are activity, counted once per event id. The
insights' counters (a day's joins, messages, card views; a post's shares and opens) also
remember in their own documents which events they counted, so they stay exact even when an
event is handled again after failing halfway (see storage.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
from groupchat.events.v1 import events_pb2

from services.kit.timestamps import now_ms
from services.plaza import domain, mapping
from services.plaza.domain import Activity, GroupState
from services.plaza.storage import NO_ACTIVITY, BucketAdd, DayCount, PlazaStore, PostCount

log = structlog.get_logger("plaza.projection")

# What the plaza is fed from: (durable consumer, subject, the JetStream stream holding it).
FEEDS = (
    ("plaza-groups", "groupchat.groups.>", "GROUPCHAT_GROUPS"),
    ("plaza-posts", "posts.>", "PLATFORM_POSTS"),
    ("plaza-selections", "groupchat.plaza.>", "GROUPCHAT_PLAZA"),
    # Taps on posts shared in direct conversations, for their authors' insights: only those
    # of messaging's events (never the messages themselves).
    ("plaza-messaging", "groupchat.messaging.shared_post_opened.>", "GROUPCHAT_MESSAGING"),
)
# Events applied together at most, and the plaza's EVENT_MAX_IN_FLIGHT by default: a
# batch takes a few round trips whatever its size, so its size sets the rate at which the
# plaza absorbs a burst (bench.plaza: 460 events/s with 64, 800 with 1,024).
BATCH_LIMIT = 1024
# How long a batch waits for more events after a batch of several (never after a lone
# event: a quiet plaza applies each at once).
GATHER_SECONDS = 0.005
# Events that only count (a message, a card view, an open of a shared post) change nothing a
# page shows at once: hot scores move at the next ranking refresh, and the insights are read
# by the day. So while only those wait, a batch waits for more, up to COUNT_GATHER_SECONDS
# or COUNT_GATHER_EVENTS of them (well under what a consumer holds in flight): a busy
# group's messages are absorbed many to a round of writes instead of a round each. Any
# other event ends the wait at once.
COUNTED_KINDS = frozenset(
    {"group_message_posted", "group_message_changed", "group_card_viewed", "shared_post_opened"}
)
COUNT_GATHER_SECONDS = 0.5
COUNT_GATHER_EVENTS = 32
# Compare-and-set attempts on one card before the event is handed back for redelivery.
SAVE_ATTEMPTS = 20


# The kinds of events `handle_many` applies in bulk; the others go one by one.
BATCHED_KINDS = frozenset(
    {
        "group_created",
        "group_updated",
        "group_snapshot",
        "member_joined",
        "member_left",
        "member_removed",
        "member_role_changed",
        "group_dissolved",
        "group_message_posted",
        "group_message_changed",
        "group_card_viewed",
        "shared_post_opened",
    }
)
Change = Callable[[GroupState], GroupState | None]


def _batched(e: events_pb2.Envelope) -> bool:
    return e.WhichOneof("payload") in BATCHED_KINDS


def _counts_activity(e: events_pb2.Envelope) -> bool:
    return e.WhichOneof("payload") in ("member_joined", "group_message_posted")


@dataclass
class Effects:
    """What one event does to the read model: a change of its group's state, activity
    (group, when, joins, speaker), a group whose figures to refresh, and counters."""

    state: tuple[str, Change] | None = None
    activity: tuple[str, int, int, str | None] | None = None
    refresh: str | None = None
    days: list[DayCount] = field(default_factory=list)
    posts: list[PostCount] = field(default_factory=list)


def in_order(e: events_pb2.Envelope) -> bool:
    """Whether `e` must wait for its group's earlier events (the consumers' `in_order`).
    The batched kinds need not: each part of a group's state takes the newest version
    whatever the order (domain.apply_*), and counters count each event id once, so a storm
    of joins on one group is absorbed in a few batches, not one round of writes per join."""
    return e.WhichOneof("payload") not in BATCHED_KINDS


def _only_counts(e: events_pb2.Envelope) -> bool:
    return e.WhichOneof("payload") in COUNTED_KINDS


class EventBatches:
    """Gathers the events handed in while a batch is being applied into the next batch, so
    a lone event waits for nothing (unless it only counts: see COUNTED_KINDS) and a burst is
    applied in a few bulk writes. Each caller returns (or raises) when its own event is
    done, so a consumer still acks an event only after its writes."""

    def __init__(
        self,
        apply: Callable[[list[events_pb2.Envelope]], Awaitable[list[BaseException | None]]],
        limit: int = BATCH_LIMIT,
        count_gather_seconds: float = COUNT_GATHER_SECONDS,
    ) -> None:
        self._apply = apply
        self._limit = limit
        self._count_gather_seconds = count_gather_seconds
        self._waiting: list[tuple[events_pb2.Envelope, asyncio.Future[None]]] = []
        self._runner: asyncio.Task[None] | None = None
        # Set when what waits is to be applied now (see _gather_counted).
        self._due = asyncio.Event()

    async def submit(self, envelope: events_pb2.Envelope) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((envelope, done))
        if not _only_counts(envelope) or len(self._waiting) >= COUNT_GATHER_EVENTS:
            self._due.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        await done

    async def _run(self) -> None:
        busy = False
        while self._waiting:
            await self._gather_counted()
            if busy and len(self._waiting) < self._limit:
                # Under a burst, the consumers hand events in as acks free their places:
                # a moment gathers several.
                await asyncio.sleep(GATHER_SECONDS)
            batch = self._waiting[: self._limit]
            del self._waiting[: self._limit]
            busy = len(batch) > 1 or bool(self._waiting)
            try:
                outcomes = await self._apply([e for e, _ in batch])
            except Exception as exc:
                outcomes = [exc] * len(batch)
            except BaseException:
                for _, done in batch + self._waiting:
                    done.cancel()
                raise
            for (_, done), outcome in zip(batch, outcomes, strict=True):
                if done.done():  # its caller gave up (a handler's deadline)
                    continue
                if outcome is None:
                    done.set_result(None)
                else:
                    done.set_exception(outcome)

    async def _gather_counted(self) -> None:
        """While the waiting events only count and are few, wait for more."""
        self._due.clear()
        if (
            not self._count_gather_seconds
            or len(self._waiting) >= COUNT_GATHER_EVENTS
            or not all(_only_counts(e) for e, _ in self._waiting)
        ):
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._count_gather_seconds):
                await self._due.wait()


class CardChangedMeanwhile(Exception):
    """A card kept changing under one event; the event is redelivered later."""


class PlazaProjection:
    def __init__(
        self,
        store: PlazaStore,
        *,
        half_life_hours: float,
        time_zone: dt.tzinfo,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._store = store
        self._half_life = half_life_hours
        # The insights' days are the app's (APP_TIMEZONE).
        self._zone = time_zone
        self._clock = clock
        self._once = store.processed.once(self._apply)
        self._batches = EventBatches(self.handle_many)
        # A replay hands events in one at a time, each awaited: none may wait for company.
        self._replayed = EventBatches(self.handle_many, count_gather_seconds=0)

    async def handle(self, envelope: events_pb2.Envelope) -> None:
        """Apply `envelope` once: a redelivered event id changes nothing. The id is recorded
        after the event is applied, so one that failed midway is applied again in full;
        state and posts are version-checked, and the daily and post counters remember the
        events they counted, so only activity buckets could count twice, and only after
        such a failure. Events handed in together (the consumers' handlers in flight) are
        applied together, in bulk writes (`handle_many`)."""
        await self._batches.submit(envelope)

    async def handle_replayed(self, envelope: events_pb2.Envelope) -> None:
        """`handle`, for a caller that waits for each event before the next (a rebuild)."""
        await self._replayed.submit(envelope)

    async def handle_many(self, envelopes: list[events_pb2.Envelope]) -> list[BaseException | None]:
        """Apply a batch of events as `handle` would each, in a few bulk writes: one read of
        the processed ids, of the cards and of their posts, one compare-and-set bulk write of
        the cards, one of the activity buckets, one of the daily and post counters, one of
        the processed ids. An event whose card someone else changed first, and every event
        of a kind not batched (posts, selections), goes through `handle`. Returns what each
        event raised (None: applied), in order. A batch may hold several events of one
        group (see `in_order`): their changes are chained, in the batch's order."""
        results: list[BaseException | None] = [None] * len(envelopes)
        first: dict[str, int] = {}
        for i, e in enumerate(envelopes):
            first.setdefault(e.event_id, i)
        seen = await self._store.processed.seen(list(first))
        batched = [
            envelopes[i]
            for i in first.values()
            if envelopes[i].event_id not in seen and _batched(envelopes[i])
        ]
        one_by_one = [
            i
            for i, e in enumerate(envelopes)
            if e.event_id not in seen and not (_batched(e) and first[e.event_id] == i)
        ]
        try:
            again = await self._apply_many(batched)
        except Exception:
            log.exception("event_batch_failed", events=len(batched))
            again = batched  # each on its own: one bad event fails only itself
        else:
            retried = {e.event_id for e in again}
            # Only activity counts by event without remembering which: every other effect
            # is versioned or remembers its events itself, so handling one again changes
            # nothing and needs no record (one write fewer per group created).
            await self._store.processed.record(
                [e.event_id for e in batched if e.event_id not in retried and _counts_activity(e)]
            )
        retry_ids = {e.event_id for e in again}
        one_by_one += [i for i in first.values() if envelopes[i].event_id in retry_ids]
        outcomes = await asyncio.gather(
            *(self._once(envelopes[i]) for i in one_by_one), return_exceptions=True
        )
        for i, outcome in zip(one_by_one, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                results[i] = outcome
        return results

    async def _apply_many(self, events: list[events_pb2.Envelope]) -> list[events_pb2.Envelope]:
        """The bulk writes of `handle_many`; returns the events to apply one by one (their
        card changed meanwhile: none of their effects were written)."""
        effects = [(e, self._effects(e)) for e in events]
        lost, held = await self._change_many([fx.state for _, fx in effects if fx.state])
        again = [e for e, fx in effects if fx.state and fx.state[0] in lost]
        kept = [fx for _, fx in effects if not (fx.state and fx.state[0] in lost)]
        now = self._clock()
        buckets: dict[tuple[str, int], tuple[int, int, set[str]]] = {}
        touched: dict[str, int] = {}
        refresh: set[str] = set()
        for fx in kept:
            if fx.refresh:
                refresh.add(fx.refresh)
            if fx.activity is None:
                continue
            group_id, at_ms, joins, speaker = fx.activity
            if domain.counts_as_recent(at_ms, now):
                key = (group_id, domain.bucket_start(at_ms))
                j, m, speakers = buckets.get(key, (0, 0, set()))
                if speaker:
                    speakers.add(speaker)
                buckets[key] = (j + joins, m + (1 if speaker else 0), speakers)
            touched[group_id] = max(touched.get(group_id, 0), at_ms)
            refresh.add(group_id)
        await self._store.add_activity_many(
            [
                BucketAdd(
                    g, start, start + domain.BUCKET_MS + domain.ACTIVITY_WINDOW_MS, j, m, sorted(s)
                )
                for (g, start), (j, m, s) in buckets.items()
            ]
        )
        if refresh:
            buckets_now = await self._store.buckets(
                now - domain.ACTIVITY_WINDOW_MS, sorted(refresh)
            )
            figures = {
                g: domain.activity(buckets_now.get(g, []), now, self._half_life) for g in refresh
            }
            # A card read for this batch whose figures stay (a new group has none) is left
            # alone: one write fewer per group created.
            await self._store.set_activity(
                {g: a for g, a in figures.items() if g not in held or held[g] != a}, touched
            )
        await self._store.count_days([c for fx in kept for c in fx.days])
        await self._store.count_posts([c for fx in kept for c in fx.posts])
        return again

    async def _change_many(
        self, changes: list[tuple[str, Change]]
    ) -> tuple[set[str], dict[str, Activity]]:
        """`_change` for many groups at once, one compare-and-set attempt each; returns the
        groups whose card someone else changed first (nothing of theirs written), and the
        activity figures of the cards written as they were read (none for new ones)."""
        if not changes:
            return set(), {}
        stored = await self._store.load_many(sorted({g for g, _ in changes}))
        changed: dict[str, GroupState] = {}
        for group_id, change in changes:
            read = stored.get(group_id)
            state = changed.get(group_id) or (read.state if read else GroupState(group_id))
            after = change(state)
            if after is not None:
                changed[group_id] = after
        linked = sorted(
            {s.facts.linked_post_id for s in changed.values() if s.facts and s.facts.linked_post_id}
        )
        posts = await self._store.posts(linked)
        writes = []
        for group_id, state in changed.items():
            post_id = state.facts.linked_post_id if state.facts else ""
            writes.append((state, domain.listing(state, posts.get(post_id)), stored.get(group_id)))
        lost = await self._store.save_many(writes)
        for group_id, state in changed.items():
            if group_id not in lost and state.facts and state.facts.linked_post_id:
                # As in `_change`: the post may have changed while the card was written.
                await self._refresh_listing(group_id)
        held = {
            g: stored[g].activity if g in stored else NO_ACTIVITY for g in changed if g not in lost
        }
        return lost, held

    def _effects(self, e: events_pb2.Envelope) -> Effects:
        """What a batched event does to the read model, as data (`_apply` does the same one
        write at a time)."""
        kind = e.WhichOneof("payload")
        version = e.aggregate_version
        at_ms = mapping.timestamp_ms(e.occurred_at)
        fx = Effects()
        if kind in ("group_created", "group_updated"):
            group = getattr(e, kind).group
            facts = mapping.group_facts(group)
            fx.state = (group.group_id, lambda s: domain.apply_group_facts(s, facts, version))
            if kind == "group_created":
                fx.refresh = group.group_id
        elif kind == "group_snapshot":
            snapshot = e.group_snapshot
            facts = mapping.group_facts(snapshot.group)
            roles = {m.user_id: int(m.role) for m in snapshot.members}
            fx.state = (
                snapshot.group.group_id,
                lambda s: domain.apply_snapshot(s, facts, roles, snapshot.dissolved, version),
            )
            fx.refresh = snapshot.group.group_id
        elif kind == "member_joined":
            joined = e.member_joined
            member = (joined.member.user_id, int(joined.member.role))
            group_id = joined.member.group_id
            fx.state = (
                group_id,
                lambda s: domain.apply_member_count(s, joined.member_count, version, member),
            )
            fx.activity = (group_id, at_ms, 1, None)
            source = mapping.source_name(joined.source)
            fx.days.append(self._day_count(e, group_id, {f"joins.{source}": 1}))
        elif kind in ("member_left", "member_removed"):
            gone = getattr(e, kind)
            fx.state = (
                gone.group_id,
                lambda s: domain.apply_member_count(
                    s, gone.member_count, version, (gone.user_id, 0)
                ),
            )
            fx.days.append(self._day_count(e, gone.group_id, {"leaves": 1}))
        elif kind == "member_role_changed":
            m = e.member_role_changed.member
            fx.state = (m.group_id, lambda s: domain.apply_role(s, m.user_id, int(m.role), version))
        elif kind == "group_dissolved":
            fx.state = (e.group_dissolved.group_id, lambda s: domain.apply_dissolved(s, version))
        elif kind == "group_message_posted":
            # Its aggregate_version is the message seq, not the group's version: activity only.
            message = e.group_message_posted.message
            fx.activity = (message.group_id, at_ms, 0, message.sender_id)
            fx.days.append(self._day_count(e, message.group_id, {"messages": 1}, message.sender_id))
            shared = message.shared_post
            if message.HasField("shared_post") and shared.post_id:
                fx.posts.append(
                    self._post_count(
                        e, message.group_id, shared.post_id, shared.author_id, shares=1
                    )
                )
        elif kind == "group_card_viewed":
            fx.days.append(self._day_count(e, e.group_card_viewed.group_id, {"card_views": 1}))
        elif kind == "shared_post_opened":
            opened = e.shared_post_opened
            where = opened.group_id or domain.DIRECT
            fx.posts.append(self._post_count(e, where, opened.post_id, opened.author_id, opens=1))
        # group_message_changed: a reaction or a recall changes a message already counted:
        # it is neither a message nor activity, and a recalled share stays a share.
        return fx

    def _day_count(
        self, e: events_pb2.Envelope, group_id: str, inc: dict[str, int], speaker: str | None = None
    ) -> DayCount:
        date, start = self._day_of(e)
        return DayCount(group_id, date, start, e.event_id, inc, speaker)

    def _post_count(
        self,
        e: events_pb2.Envelope,
        where: str,
        post_id: str,
        author_id: str,
        *,
        shares: int = 0,
        opens: int = 0,
    ) -> PostCount:
        date, start = self._day_of(e)
        return PostCount(where, date, start, e.event_id, post_id, author_id, shares, opens)

    async def _apply(self, e: events_pb2.Envelope) -> None:
        if _batched(e):
            # The batch's effects, one write at a time, each card change with its retries.
            fx = self._effects(e)
            if fx.state:
                await self._change(*fx.state)
            if fx.activity:
                group_id, at_ms, joins, speaker = fx.activity
                await self._activity(group_id, at_ms, joins=joins, speaker=speaker)
            if fx.refresh:
                await self._refresh_activity(fx.refresh)
            await self._store.count_days(fx.days)
            await self._store.count_posts(fx.posts)
            return
        kind = e.WhichOneof("payload")
        version = e.aggregate_version
        if kind in ("post_published", "post_updated"):
            post = getattr(e, kind).post
            fields = {**mapping.post_fields(post), "published": True}
            if await self._store.save_post(post.post_id, version, **fields):
                await self._refresh_linking(post.post_id)
        elif kind == "post_removed":
            removed = e.post_removed
            if await self._store.save_post(
                removed.post_id, version, author_id=removed.author_id, published=False
            ):
                await self._refresh_linking(removed.post_id)
        elif kind == "group_selected":
            chosen = e.group_selected
            await self._store.set_selected(chosen.group_id, chosen.selected, version)

    async def _change(
        self, group_id: str, change: Callable[[GroupState], GroupState | None]
    ) -> None:
        """Apply a change to the group's state with a compare-and-set; a stale event (the
        change returns None) leaves it alone."""
        for _ in range(SAVE_ATTEMPTS):
            stored = await self._store.load(group_id)
            state = stored.state if stored else GroupState(group_id)
            changed = change(state)
            if changed is None:
                return
            post = await self._linked_post(changed)
            listing = domain.listing(changed, post)
            if await self._store.save(changed, listing, stored):
                if changed.facts and changed.facts.linked_post_id:
                    # The post may have changed while this was written; whichever of the two
                    # writers comes second sees both changes.
                    await self._refresh_listing(group_id)
                return
        raise CardChangedMeanwhile(group_id)

    async def _refresh_linking(self, post_id: str) -> None:
        for group_id in await self._store.cards_linking(post_id):
            await self._refresh_listing(group_id)

    async def _refresh_listing(self, group_id: str) -> None:
        """Bring the card's listing in step with the current post (a no-op when it is)."""
        for _ in range(SAVE_ATTEMPTS):
            stored = await self._store.load(group_id)
            if stored is None:
                return
            listing = domain.listing(stored.state, await self._linked_post(stored.state))
            if listing == stored.listing or await self._store.save(stored.state, listing, stored):
                return
        raise CardChangedMeanwhile(group_id)

    async def _linked_post(self, state: GroupState) -> domain.Post | None:
        if state.facts is None or not state.facts.linked_post_id:
            return None
        return await self._store.post(state.facts.linked_post_id)

    async def _activity(
        self, group_id: str, at_ms: int, *, joins: int = 0, speaker: str | None = None
    ) -> None:
        now = self._clock()
        if domain.counts_as_recent(at_ms, now):
            start = domain.bucket_start(at_ms)
            expires = start + domain.BUCKET_MS + domain.ACTIVITY_WINDOW_MS
            await self._store.add_activity(group_id, start, expires, joins=joins, speaker=speaker)
        await self._store.touch(group_id, at_ms)
        await self._refresh_activity(group_id)

    async def _refresh_activity(self, group_id: str) -> None:
        now = self._clock()
        buckets = await self._store.buckets(now - domain.ACTIVITY_WINDOW_MS, group_id)
        figures = domain.activity(buckets.get(group_id, []), now, self._half_life)
        await self._store.set_activity({group_id: figures})

    def _day_of(self, e: events_pb2.Envelope) -> tuple[str, int]:
        """The app's day the event happened on, and when that day began."""
        date = domain.day_key(mapping.timestamp_ms(e.occurred_at), self._zone)
        return date, domain.day_start_ms(date, self._zone)

    async def refresh_rankings(self) -> int:
        """Recompute the activity figures of every group with recent activity (or figures
        still above zero) as of now, so scores decay as time passes; returns how many."""
        now = self._clock()
        buckets = await self._store.buckets(now - domain.ACTIVITY_WINDOW_MS)
        group_ids = set(buckets) | set(self._store.groups_with_figures())
        figures = {g: domain.activity(buckets.get(g, []), now, self._half_life) for g in group_ids}
        # Every replica runs this refresh for itself: nothing to tell the others.
        await self._store.set_activity(figures, periodic=True)
        return len(figures)
