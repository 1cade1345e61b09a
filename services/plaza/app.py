"""The plaza's use cases: one method per query or command, handed its store and outbox."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from services.kit.config import DEFAULT_APP_TIMEZONE
from services.kit.errors import FieldViolation, InvalidArgument, excerpt, validate_ids
from services.kit.events import new_event
from services.kit.outbox import Outbox
from services.kit.timestamps import now_ms
from services.plaza import domain
from services.plaza.domain import (
    BROWSE_PAGE_DEFAULT,
    BROWSE_PAGE_MAX,
    CATEGORY_DISPLAY_NAMES,
    SHELF_DEFAULT,
    SHELF_MAX,
    Card,
    DayCounts,
    GroupNotFound,
    GroupState,
    GroupSummary,
    Insights,
    PageTokenExpired,
    PostDay,
    Sort,
    SummaryPosition,
)
from services.plaza.projection import PlazaProjection
from services.plaza.storage import PlazaStore

log = structlog.get_logger("plaza")


@dataclass(frozen=True)
class PlazaSettings:
    hot_half_life_hours: float = 6.0
    max_browse_depth: int = 1000
    page_token_ttl_seconds: int = 1800
    rank_interval_seconds: int = 60
    ranking_cache_seconds: float = 1.0
    # How often the index in memory is loaded again from the cards: the safety net under
    # the other replicas' notices of their writes (services/plaza/replicas.py).
    index_reload_seconds: int = 900
    # The app's time zone (APP_TIMEZONE): the insights' days.
    time_zone: dt.tzinfo = field(default_factory=lambda: ZoneInfo(DEFAULT_APP_TIMEZONE))


# The ordered ids of a walk, its snapshot id, the cards of its first page and the index's
# stamp when they were read.
Ranking = tuple[list[str], str | None, list[Card], int]


class RankingCache:
    """First pages of the same query within `seconds` share one ranking, its snapshot and
    the cards of the page: however many people open the grid at once, it is computed once
    per query and interval, not once per request. The cards are read again when one of
    them was written since (by this process, or by another replica that told it); a
    changed order shows within `seconds`.
    Concurrent misses wait for the one computation."""

    def __init__(self, seconds: float, clock: Callable[[], int] = now_ms) -> None:
        self._ttl_ms = seconds * 1000
        self._clock = clock
        self._entries: dict[tuple[Any, ...], tuple[int, asyncio.Future[Ranking]]] = {}

    async def get(self, key: tuple[Any, ...], compute: Callable[[], Awaitable[Ranking]]) -> Ranking:
        now = self._clock()

        def usable(entry: tuple[int, asyncio.Future[Ranking]]) -> bool:
            being_computed = not entry[1].done()
            return being_computed or now - entry[0] < self._ttl_ms

        cached = self._entries.get(key)
        if cached is not None and usable(cached):
            return await asyncio.shield(cached[1])
        self._entries = {k: e for k, e in self._entries.items() if usable(e)}
        ranking = asyncio.ensure_future(compute())
        if self._ttl_ms > 0:
            self._entries[key] = (now, ranking)
        try:
            result = await asyncio.shield(ranking)
        except Exception:
            self._entries.pop(key, None)
            raise
        if self._ttl_ms > 0:  # fresh for the interval from when it is ready
            self._entries[key] = (self._clock(), ranking)
        return result


@dataclass(frozen=True)
class CardPage:
    cards: list[Card]
    # Where the next page starts; None on the last page.
    next_position: dict[str, Any] | None


@dataclass(frozen=True)
class MyInsights:
    """A page of a creator's groups, best first, and the taps on their posts anywhere."""

    groups: list[GroupSummary]
    # Where the next page starts; None on the last page.
    next_position: dict[str, Any] | None
    own_post_opens: int


class ImpressionCounter:
    """Counts the cards the plaza returned, per group and day (the app's), in memory; `flush` adds
    them to the store in one bulk write (every second, and at shutdown).

    The trade-off: a request never waits on a write per card, at the price of losing up to
    a second of impressions if the process dies without a clean shutdown, and of insights
    lagging up to a second behind. Impressions are a statistic, not a ledger."""

    def __init__(
        self, store: PlazaStore, time_zone: dt.tzinfo, clock: Callable[[], int] = now_ms
    ) -> None:
        self._store = store
        self._zone = time_zone
        self._clock = clock
        self._pending: dict[tuple[str, str], int] = {}

    def count(self, cards: list[Card]) -> None:
        date = domain.day_key(self._clock(), self._zone)
        for card in cards:
            key = (card.group_id, date)
            self._pending[key] = self._pending.get(key, 0) + 1

    async def flush(self) -> None:
        pending, self._pending = self._pending, {}
        try:
            await self._store.add_impressions(pending)
        except BaseException:
            for key, n in pending.items():  # try again with the next flush
                self._pending[key] = self._pending.get(key, 0) + n
            raise


class PlazaApp:
    def __init__(
        self,
        store: PlazaStore,
        projection: PlazaProjection,
        outbox: Outbox,
        impressions: ImpressionCounter,
        settings: PlazaSettings,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._store = store
        self._projection = projection
        self._outbox = outbox
        self._impressions = impressions
        self._settings = settings
        self._clock = clock
        self._rankings = RankingCache(settings.ranking_cache_seconds, clock)

    # The grid and search

    async def browse(
        self,
        category: str | None,
        only_with_space: bool,
        sort: Sort,
        page_size: int,
        position: dict[str, Any] | None,
    ) -> CardPage:
        """A page of listed cards. The first page fixes the order of the whole walk."""

        def ranked() -> list[str]:
            return self._store.ordered_ids(
                sort,
                self._settings.max_browse_depth,
                category=category,
                only_with_space=only_with_space,
            )

        walk = ("browse", sort, category, only_with_space)
        return await self._walk(walk, ranked, page_size, position)

    async def search(
        self,
        query: str,
        category: str | None,
        only_with_space: bool,
        page_size: int,
        position: dict[str, Any] | None,
    ) -> CardPage:
        """Cards whose name, description or linked post title hold every word, hottest first."""
        keywords = domain.query_tokens(query)

        def ranked() -> list[str]:
            return self._store.ordered_ids(
                Sort.HOT,
                self._settings.max_browse_depth,
                category=category,
                only_with_space=only_with_space,
                keywords=keywords,
            )

        walk = ("search", category, only_with_space, tuple(keywords))
        return await self._walk(walk, ranked, page_size, position)

    async def _walk(
        self,
        walk: tuple[Any, ...],
        ranked: Callable[[], list[str]],
        page_size: int,
        position: dict[str, Any] | None,
    ) -> CardPage:
        """Page through an order fixed on the first page (`walk` names the query, its first
        item says browse or search): later pages show the current state of the cards that
        order holds (leaving out those no longer listed)."""
        kind = walk[0]
        size = domain.page_limit(page_size, BROWSE_PAGE_DEFAULT, BROWSE_PAGE_MAX)
        if position is None:
            ids, snapshot_id, cards, stamp = await self._rankings.get(
                (*walk, size), lambda: self._rank(kind, ranked, size)
            )
            if self._store.changed_since(ids[:size], stamp):
                cards = await self._store.shown_cards(ids[:size])
            next_position = {"s": snapshot_id, "o": size} if size < len(ids) else None
            self._impressions.count(cards)
            return CardPage(cards, next_position)
        snapshot_id, offset = _snapshot_position(position)
        walked = await self._store.snapshot(snapshot_id, kind, self._clock())
        if walked is None:
            raise PageTokenExpired("the page token expired: start again from the first page")
        page_ids = walked[offset : offset + size]
        next_position = None
        if offset + size < len(walked):
            next_position = {"s": snapshot_id, "o": offset + size}
        cards = await self._store.shown_cards(page_ids)
        self._impressions.count(cards)
        return CardPage(cards, next_position)

    async def _rank(self, kind: str, ranked: Callable[[], list[str]], size: int) -> Ranking:
        """The order of a new walk, kept as a snapshot when it takes more than the first
        page, and that page's cards."""
        ids = ranked()
        stamp = self._store.index.stamp
        if len(ids) <= size:
            return ids, None, await self._store.shown_cards(ids), stamp
        expires = self._clock() + self._settings.page_token_ttl_seconds * 1000
        # Two independent round trips, at once.
        snapshot_id, cards = await asyncio.gather(
            self._store.save_snapshot(kind, ids, expires), self._store.shown_cards(ids[:size])
        )
        return ids, snapshot_id, cards, stamp

    # The Selected shelf

    async def selected_shelf(self, category: str | None, page_size: int) -> list[Card]:
        """Editors' picks, hottest first, topped up with the hottest other groups."""
        size = domain.page_limit(page_size, SHELF_DEFAULT, SHELF_MAX)
        picks = await self._store.hottest(category, True, size)
        if len(picks) < size:
            fillers = await self._store.hottest(category, False, size - len(picks))
            picks += [replace(card, filler=True) for card in fillers]
        self._impressions.count(picks)
        return picks

    async def set_selected(
        self, editor_id: str, is_editor: bool, group_id: str, selected: bool
    ) -> Card:
        """Put a group on (or take it off) the Selected shelf. The choice is an event, so a
        rebuild keeps it; it is applied here at once as well, and its later consumption
        changes nothing."""
        domain.ensure_editor(is_editor)
        validate_ids(group_id=group_id)
        stored = await self._store.load(group_id)
        if stored is None or not stored.state.known:
            raise GroupNotFound(f"no group {excerpt(group_id)}", group_id=excerpt(group_id))
        event = await self._store.record_selection(
            group_id,
            selected,
            lambda version: new_event(
                "plaza",
                "group_selected",
                aggregate_id=group_id,
                aggregate_version=version,
                user_id=editor_id,
                group_selected={
                    "group_id": group_id,
                    "selected": selected,
                    "editor_id": editor_id,
                },
            ),
        )
        self._outbox.committed(self._store.selection_versions, group_id, [event])
        await self._projection.handle(event.envelope)
        log.info("group_selected", group_id=group_id, selected=selected, editor_id=editor_id)
        card = await self._store.card(group_id)
        if card is None:
            raise GroupNotFound(f"no group {excerpt(group_id)}", group_id=excerpt(group_id))
        return card

    # Categories

    async def categories(self) -> list[tuple[str, str, int]]:
        """(category, display name, listed groups) for every category, in taxonomy order."""
        counts = await self._store.shown_per_category()
        return [(c, name, counts.get(c, 0)) for c, name in CATEGORY_DISPLAY_NAMES.items()]

    # Insights

    @property
    def time_zone(self) -> str:
        """The IANA name of the zone the insights' days are in."""
        return str(self._settings.time_zone)

    async def insights(self, user_id: str, group_id: str, days: int) -> Insights:
        """A group's funnel per day over the last `days` days, for its owner and admins."""
        window = domain.insight_window(days, self._clock(), self._settings.time_zone)
        validate_ids(group_id=group_id)
        stored = await self._store.load(group_id)
        state = domain.ensure_can_see_insights(stored.state if stored else None, user_id)
        counts, impressions, shared = await self._figures([group_id], window)
        titles = await self._store.titles(sorted({p.post_id for p in shared[group_id]}))
        return domain.insights(
            window,
            counts[group_id],
            impressions[group_id],
            shared[group_id],
            owner_id=_owner(state),
            titles=titles,
        )

    async def my_insights(
        self, user_id: str, days: int, page_size: int, position: dict[str, Any] | None
    ) -> MyInsights:
        """The groups `user_id` owns (unlisted ones too), each with its totals over the
        window, best first, one page after `position`; and the taps on the user's posts
        shared anywhere, direct conversations included."""
        window = domain.insight_window(days, self._clock(), self._settings.time_zone)
        after: SummaryPosition | None = None
        if position is not None:
            after = domain.summary_position(position, len(window))
        # The ranking is over the window's figures, known only once summed: all of the
        # user's groups are read (a user is in at most MAX_GROUPS_PER_USER groups, 500).
        owned = await self._store.owned(user_id)
        ids = [g.group_id for g in owned]
        counts, impressions, shared = await self._figures(ids, window)
        summaries = [
            GroupSummary(
                g.group_id,
                g.facts.name if g.facts else "",
                domain.insights(
                    window,
                    counts[g.group_id],
                    impressions[g.group_id],
                    shared[g.group_id],
                    owner_id=user_id,
                ).total,
            )
            for g in owned
        ]
        page, last = domain.summaries_page(summaries, after, page_size)
        next_position = {"d": len(window), "r": list(last)} if last else None
        opens = await self._store.author_opens(user_id, window)
        return MyInsights(page, next_position, opens)

    async def _figures(
        self, group_ids: list[str], window: list[str]
    ) -> tuple[
        dict[str, dict[str, DayCounts]], dict[str, dict[str, int]], dict[str, list[PostDay]]
    ]:
        """The counters of `group_ids` over `window`: daily counts, impressions and shared
        posts, each by group id."""
        if not group_ids:
            return {}, {}, {}
        return (
            await self._store.days(group_ids, window),
            await self._store.impressions(group_ids, window),
            await self._store.shared_posts(group_ids, window),
        )


def _owner(state: GroupState) -> str:
    return state.facts.owner_id if state.facts else ""


def _snapshot_position(position: dict[str, Any]) -> tuple[str, int]:
    snapshot_id, offset = position.get("s"), position.get("o")
    if not isinstance(snapshot_id, str) or not isinstance(offset, int) or offset < 0:
        raise InvalidArgument([FieldViolation("page_token", "not a token this API returned")])
    return snapshot_id, offset
