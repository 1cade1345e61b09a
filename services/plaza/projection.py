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

import datetime as dt
from collections.abc import Callable

import structlog
from groupchat.events.v1 import events_pb2

from services.kit.timestamps import now_ms
from services.plaza import domain, mapping
from services.plaza.domain import GroupState
from services.plaza.storage import PlazaStore

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
# Compare-and-set attempts on one card before the event is handed back for redelivery.
SAVE_ATTEMPTS = 20


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

    async def handle(self, envelope: events_pb2.Envelope) -> None:
        """Apply `envelope` once: a redelivered event id changes nothing. The id is recorded
        after the event is applied, so one that failed midway is applied again in full;
        state and posts are version-checked, so only counters (activity, daily) could count
        twice, and only after such a failure."""
        await self._once(envelope)

    async def _apply(self, e: events_pb2.Envelope) -> None:
        kind = e.WhichOneof("payload")
        version = e.aggregate_version
        at_ms = mapping.timestamp_ms(e.occurred_at)
        if kind in ("group_created", "group_updated"):
            group = getattr(e, kind).group
            facts = mapping.group_facts(group)
            await self._change(
                group.group_id, lambda s: domain.apply_group_facts(s, facts, version)
            )
            if kind == "group_created":
                await self._refresh_activity(group.group_id)
        elif kind == "group_snapshot":
            snapshot = e.group_snapshot
            facts = mapping.group_facts(snapshot.group)
            roles = {m.user_id: int(m.role) for m in snapshot.members}
            await self._change(
                snapshot.group.group_id,
                lambda s: domain.apply_snapshot(s, facts, roles, snapshot.dissolved, version),
            )
            await self._refresh_activity(snapshot.group.group_id)
        elif kind == "member_joined":
            joined = e.member_joined
            member = (joined.member.user_id, int(joined.member.role))
            group_id = joined.member.group_id
            await self._change(
                group_id,
                lambda s: domain.apply_member_count(s, joined.member_count, version, member),
            )
            await self._activity(group_id, at_ms, joins=1)
            source = mapping.source_name(joined.source)
            await self._count_day(e, group_id, {f"joins.{source}": 1})
        elif kind in ("member_left", "member_removed"):
            gone = getattr(e, kind)
            await self._change(
                gone.group_id,
                lambda s: domain.apply_member_count(
                    s, gone.member_count, version, (gone.user_id, 0)
                ),
            )
            await self._count_day(e, gone.group_id, {"leaves": 1})
        elif kind == "member_role_changed":
            m = e.member_role_changed.member
            await self._change(
                m.group_id, lambda s: domain.apply_role(s, m.user_id, int(m.role), version)
            )
        elif kind == "group_dissolved":
            await self._change(
                e.group_dissolved.group_id, lambda s: domain.apply_dissolved(s, version)
            )
        elif kind == "group_message_posted":
            # Its aggregate_version is the message seq, not the group's version: activity only.
            message = e.group_message_posted.message
            await self._activity(message.group_id, at_ms, speaker=message.sender_id)
            await self._count_day(e, message.group_id, {"messages": 1}, speaker=message.sender_id)
            shared = message.shared_post
            if message.HasField("shared_post") and shared.post_id:
                post = (shared.post_id, shared.author_id)
                await self._count_post(e, message.group_id, post, shares=1)
        elif kind == "group_message_changed":
            # A reaction or a recall changes a message already counted: it is neither a
            # message nor activity, and a recalled share stays a share that happened.
            return
        elif kind == "group_card_viewed":
            await self._count_day(e, e.group_card_viewed.group_id, {"card_views": 1})
        elif kind == "shared_post_opened":
            opened = e.shared_post_opened
            where = opened.group_id or domain.DIRECT
            await self._count_post(e, where, (opened.post_id, opened.author_id), opens=1)
        elif kind in ("post_published", "post_updated"):
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

    async def _count_day(
        self,
        e: events_pb2.Envelope,
        group_id: str,
        inc: dict[str, int],
        speaker: str | None = None,
    ) -> None:
        date, start = self._day_of(e)
        await self._store.count_day(group_id, date, start, e.event_id, inc=inc, speaker=speaker)

    async def _count_post(
        self,
        e: events_pb2.Envelope,
        where: str,
        post: tuple[str, str],
        *,
        shares: int = 0,
        opens: int = 0,
    ) -> None:
        date, start = self._day_of(e)
        await self._store.count_post(
            where, date, start, e.event_id, post, shares=shares, opens=opens
        )

    async def refresh_rankings(self) -> int:
        """Recompute the activity figures of every group with recent activity (or figures
        still above zero) as of now, so scores decay as time passes; returns how many."""
        now = self._clock()
        buckets = await self._store.buckets(now - domain.ACTIVITY_WINDOW_MS)
        group_ids = set(buckets) | set(await self._store.groups_with_figures())
        figures = {g: domain.activity(buckets.get(g, []), now, self._half_life) for g in group_ids}
        await self._store.set_activity(figures)
        return len(figures)
