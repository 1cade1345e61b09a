"""The plaza's rules: hot score, search tokens, insight windows, what a card shows."""

from __future__ import annotations

import asyncio
import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from services.kit.errors import InvalidArgument
from services.plaza import domain
from services.plaza.app import RankingCache
from services.plaza.domain import (
    BUCKET_MS,
    HOUR_MS,
    ActivityBucket,
    DayCounts,
    DayInsights,
    GroupFacts,
    GroupState,
    GroupSummary,
    Post,
    PostDay,
)

NOW = 1_750_000_000_000 - 1_750_000_000_000 % BUCKET_MS
SHANGHAI = ZoneInfo("Asia/Shanghai")


def utc_ms(moment: str) -> int:
    return int(dt.datetime.fromisoformat(moment).replace(tzinfo=dt.UTC).timestamp() * 1000)


def bucket(
    hours_ago: float, messages: int = 0, joins: int = 0, speakers: int = 0
) -> ActivityBucket:
    start = domain.bucket_start(NOW - int(hours_ago * HOUR_MS))
    return ActivityBucket(start, messages, joins, frozenset(f"u{i}" for i in range(speakers)))


def facts(**changes: object) -> GroupFacts:
    values: dict[str, object] = {
        "name": "Matcha lovers",
        "description": "Whisk and chat",
        "category": "FOOD",
        "cover_url": "",
        "capacity": 3,
        "listed": True,
        "linked_post_id": "",
        "owner_id": "alice",
        "member_count": 1,
        "created_at_ms": NOW,
    }
    values.update(changes)
    return GroupFacts(**values)  # type: ignore[arg-type]


# Hot score


def test_hot_score_halves_every_half_life() -> None:
    fresh = domain.activity([bucket(0, messages=10)], NOW + BUCKET_MS // 2, 6)
    aged = domain.activity([bucket(0, messages=10)], NOW + BUCKET_MS // 2 + 6 * HOUR_MS, 6)
    assert fresh.hot_score == pytest.approx(10)
    assert aged.hot_score == pytest.approx(5)


def test_speakers_and_joins_weigh_more_than_messages() -> None:
    chatty = domain.activity([bucket(0, messages=6, speakers=1)], NOW, 6)
    lively = domain.activity([bucket(0, messages=3, speakers=3)], NOW, 6)
    joined = domain.activity([bucket(0, joins=2)], NOW, 6)
    assert lively.hot_score > chatty.hot_score > joined.hot_score > 0


def test_recent_activity_outranks_more_but_older_activity() -> None:
    recent = domain.activity([bucket(0.5, messages=10)], NOW, 6)
    older = domain.activity([bucket(20, messages=50)], NOW, 6)
    assert recent.hot_score > older.hot_score


def test_activity_figures_count_the_last_hour_and_day() -> None:
    figures = domain.activity(
        [
            bucket(0.2, messages=2, speakers=1),
            bucket(5, messages=3, speakers=2),
            bucket(30, messages=7),
        ],
        NOW,
        6,
    )
    assert (figures.messages_last_hour, figures.messages_last_day, figures.active_members) == (
        2,
        5,
        2,
    )


def test_any_activity_left_in_the_window_scores_above_zero() -> None:
    # One message a day ago with a half-life of an hour: 2^-24 of it, under the rounding.
    faint = domain.activity([bucket(24, messages=1)], NOW, 1)
    assert faint.messages_last_day == 1
    assert faint.hot_score == domain.MIN_HOT_SCORE


def test_activity_beyond_the_window_counts_for_nothing() -> None:
    assert domain.activity([bucket(49, messages=100)], NOW, 6).hot_score == 0
    assert not domain.counts_as_recent(NOW - 49 * HOUR_MS, NOW)


# Search tokens


def test_words_are_lowercased_and_whole() -> None:
    assert domain.index_tokens("Matcha LOVERS, whisk-and-chat!") == {
        "matcha",
        "lovers",
        "whisk",
        "and",
        "chat",
    }
    assert "mat" not in domain.index_tokens("Matcha")


def test_cjk_text_is_indexed_as_characters_and_pairs() -> None:
    assert domain.index_tokens("抹茶控") == {"抹", "茶", "控", "抹茶", "茶控"}


def test_a_cjk_query_needs_every_pair_and_a_latin_query_every_word() -> None:
    assert domain.query_tokens("抹茶拿铁") == ["抹茶", "拿铁", "茶拿"]
    assert domain.query_tokens("茶") == ["茶"]
    assert domain.query_tokens("Matcha  Latte") == ["latte", "matcha"]


@pytest.mark.parametrize("query", ["", "   ", "!!"])
def test_a_query_without_words_is_refused(query: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        domain.query_tokens(query)
    assert refused.value.violations[0].field == "query"


# Cards


def test_a_card_shows_the_owners_published_linked_post_only() -> None:
    state = GroupState("g1", facts(linked_post_id="p1"), settings_version=1)
    own = Post("p1", "alice", "My matcha routine", "", True)
    assert domain.listing(state, own).linked_post is not None
    assert "routine" in domain.listing(state, own).keywords
    assert domain.listing(state, Post("p1", "bob", "t", "", True)).linked_post is None
    assert domain.listing(state, Post("p1", "alice", "t", "", False)).linked_post is None


def test_an_older_settings_event_changes_nothing_and_dissolution_is_final() -> None:
    state = domain.apply_group_facts(GroupState("g1"), facts(name="New"), 5)
    assert state is not None
    assert domain.apply_group_facts(state, facts(name="Old"), 3) is None
    gone = domain.apply_dissolved(state, 6)
    assert gone is not None and not gone.shown
    assert domain.apply_group_facts(gone, facts(), 7) is None


def test_member_count_from_a_newer_join_survives_an_older_settings_event() -> None:
    joined = domain.apply_member_count(GroupState("g1"), 3, 4, ("bob", 1))
    assert joined is not None
    created = domain.apply_group_facts(joined, facts(member_count=1), 1)
    assert created is not None
    assert (created.member_count, created.full, created.shown) == (3, True, True)


def test_a_snapshot_sets_the_whole_state_and_drops_members_it_no_longer_lists() -> None:
    held = domain.apply_member_count(GroupState("g1"), 2, 2, ("bob", 1))
    assert held is not None

    restored = domain.apply_snapshot(held, facts(member_count=2), {"carol": 2}, False, 5)

    assert restored is not None
    assert (restored.member_count, restored.settings_version) == (2, 5)
    assert restored.roles == {"bob": (0, 5), "carol": (2, 5)}


def test_a_snapshot_older_than_what_is_held_changes_nothing() -> None:
    held = domain.apply_member_count(GroupState("g1"), 3, 7, ("bob", 1))
    assert held is not None
    held = domain.apply_group_facts(held, facts(name="New"), 8)
    assert held is not None

    assert domain.apply_snapshot(held, facts(name="Old"), {"bob": 1}, False, 6) is None


# Insights


def test_the_insight_window_ends_today_oldest_first() -> None:
    window = domain.insight_window(3, NOW, SHANGHAI)
    assert window[-1] == domain.day_key(NOW, SHANGHAI)
    assert len(window) == 3 and window == sorted(window)
    assert len(domain.insight_window(0, NOW, SHANGHAI)) == 7


@pytest.mark.parametrize("days", [-1, 91])
def test_an_insight_window_outside_1_to_90_days_is_refused(days: int) -> None:
    with pytest.raises(InvalidArgument):
        domain.insight_window(days, NOW, SHANGHAI)


def test_a_day_is_the_apps_not_utcs() -> None:
    # Shanghai is UTC+8: 16:30 UTC is already half past midnight of the next day there.
    assert domain.day_key(utc_ms("2026-03-01T16:30:00"), SHANGHAI) == "2026-03-02"
    assert domain.day_key(utc_ms("2026-03-01T15:59:59"), SHANGHAI) == "2026-03-01"
    assert domain.day_key(utc_ms("2026-03-01T16:30:00"), dt.UTC) == "2026-03-01"
    assert domain.day_start_ms("2026-03-02", SHANGHAI) == utc_ms("2026-03-01T16:00:00")
    # Just after Shanghai's midnight, its window ends on its today, not UTC's.
    window = domain.insight_window(2, utc_ms("2026-03-01T16:30:00"), SHANGHAI)
    assert window == ["2026-03-01", "2026-03-02"]


def test_insights_total_the_window_and_convert_plaza_impressions() -> None:
    d1, d2 = domain.insight_window(2, NOW, SHANGHAI)
    counts = {
        d1: DayCounts({"PLAZA": 1, "POST": 1}, leaves=1, messages=2, speakers=frozenset({"a"})),
        d2: DayCounts({"SEARCH": 1}, messages=1, speakers=frozenset({"a", "b"})),
    }
    report = domain.insights([d1, d2], counts, {d1: 4, d2: 6})
    assert [d.joins for d in report.days] == [2, 1]
    assert report.total.joins_by_source == {"PLAZA": 1, "POST": 1, "SEARCH": 1}
    assert (report.total.plaza_joins, report.total.active_members) == (2, 2)
    assert report.plaza_conversion == pytest.approx(2 / 10)
    assert domain.insights([d1], {}, {}).plaza_conversion == 0


def test_the_funnel_is_each_step_over_the_one_before() -> None:
    (day,) = domain.insight_window(1, NOW, SHANGHAI)
    counts = {
        day: DayCounts({"PLAZA": 4}, messages=9, speakers=frozenset({"a", "b"}), card_views=10)
    }
    shared = [PostDay(day, "p1", "owner", shares=1, opens=3), PostDay(day, "p2", "x", 3, 1)]
    funnel = domain.insights([day], counts, {day: 40}, shared, owner_id="owner").total.funnel
    assert funnel.view_rate == pytest.approx(10 / 40)
    assert funnel.join_rate == pytest.approx(4 / 10)
    assert funnel.write_rate == pytest.approx(2 / 4)
    assert funnel.share_rate == pytest.approx(4 / 2)  # posts shared per member who wrote
    assert funnel.open_rate == pytest.approx(4 / 4)


def test_a_funnel_step_after_an_empty_one_is_zero_not_an_error() -> None:
    (day,) = domain.insight_window(1, NOW, SHANGHAI)
    # Joins through a link with no impression nor card view: the rates before are 0.
    counts = {day: DayCounts({"INVITE_LINK": 2})}
    funnel = domain.insights([day], counts, {}).days[0].funnel
    assert (funnel.view_rate, funnel.join_rate, funnel.write_rate) == (0.0, 0.0, 0.0)
    assert (funnel.share_rate, funnel.open_rate) == (0.0, 0.0)


def test_shared_posts_total_per_post_most_opened_first_and_own_by_the_owner() -> None:
    d1, d2 = domain.insight_window(2, NOW, SHANGHAI)
    shared = [
        PostDay(d1, "p_mine", "owner", shares=2, opens=1),
        PostDay(d2, "p_mine", "owner", shares=1, opens=1),
        PostDay(d2, "p_hit", "other", shares=1, opens=5),
        PostDay("1999-01-01", "p_old", "owner", shares=9, opens=9),  # outside the window
    ]
    report = domain.insights([d1, d2], {}, {}, shared, "owner", {"p_hit": "Matcha"})
    assert [(p.post_id, p.shares, p.opens, p.own, p.title) for p in report.posts] == [
        ("p_hit", 1, 5, False, "Matcha"),
        ("p_mine", 3, 2, True, ""),
    ]
    total = report.total
    assert (total.posts_shared, total.own_posts_shared) == (4, 3)
    assert (total.shared_post_opens, total.own_post_opens) == (7, 2)
    assert [d.posts_shared for d in report.days] == [2, 2]


def summary(group_id: str, joins: int, opens: int, messages: int) -> GroupSummary:
    total = DayInsights("", {"PLAZA": joins}, joins, 0, messages, 0, 0, 0, shared_post_opens=opens)
    return GroupSummary(group_id, group_id, total)


def test_a_creators_groups_rank_by_joins_then_opens_then_messages_then_id() -> None:
    groups = [
        summary("g_quiet", 0, 0, 0),
        summary("g_chatty", 1, 0, 50),
        summary("g_opened", 1, 3, 0),
        summary("g_joined", 5, 0, 0),
        summary("g_also_chatty", 1, 0, 50),
    ]
    first, position = domain.summaries_page(groups, None, 2)
    second, position2 = domain.summaries_page(groups, position, 2)
    third, last = domain.summaries_page(groups, position2, 2)
    assert [s.group_id for s in first + second + third] == [
        "g_joined",
        "g_opened",
        "g_also_chatty",
        "g_chatty",
        "g_quiet",
    ]
    assert last is None and position is not None


def test_a_summary_page_token_is_only_for_its_window() -> None:
    position = {"d": 7, "r": [-1, 0, 0, "g1"]}
    assert domain.summary_position(position, 7) == (-1, 0, 0, "g1")
    with pytest.raises(InvalidArgument):
        domain.summary_position(position, 30)
    with pytest.raises(InvalidArgument):
        domain.summary_position({"d": 7, "r": ["x", 0, 0, "g1"]}, 7)


# The ranking cache


async def test_first_pages_of_one_query_share_one_ranking_within_the_interval() -> None:
    now = [0]
    cache = RankingCache(1.0, clock=lambda: now[0])
    computed: list[int] = []

    async def rank() -> tuple[list[str], str | None]:
        computed.append(now[0])
        await asyncio.sleep(0)  # others ask while this one computes
        return ["g1", "g2"], f"snapshot-{len(computed)}"

    together = await asyncio.gather(*(cache.get(("browse", "HOT"), rank) for _ in range(5)))
    now[0] = 999
    within = await cache.get(("browse", "HOT"), rank)
    other_query = await cache.get(("browse", "NEW"), rank)
    now[0] = 1000
    after = await cache.get(("browse", "HOT"), rank)

    assert {snapshot for _, snapshot in together} == {"snapshot-1"}
    assert within[1] == "snapshot-1"
    assert (other_query[1], after[1]) == ("snapshot-2", "snapshot-3")


async def test_a_failed_ranking_is_not_kept() -> None:
    cache = RankingCache(60.0, clock=lambda: 0)
    attempts: list[int] = []

    async def rank() -> tuple[list[str], str | None]:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("store unreachable")
        return ["g1"], None

    with pytest.raises(ConnectionError):
        await cache.get(("search", "tea"), rank)
    assert await cache.get(("search", "tea"), rank) == (["g1"], None)
