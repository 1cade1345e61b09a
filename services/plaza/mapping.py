"""The plaza's domain values as protobuf messages and back: the one place the two meet."""

from __future__ import annotations

import functools

from google.protobuf.timestamp_pb2 import Timestamp
from groupchat.events.v1 import events_pb2
from groupchat.groups.v1 import groups_pb2
from groupchat.plaza.v1 import plaza_pb2 as pb

from services.kit.timestamps import timestamp_from_ms
from services.plaza.domain import (
    Card,
    DayInsights,
    GroupFacts,
    GroupSummary,
    Insights,
    PostInsights,
    Sort,
)

_SORTS: dict[int, Sort] = {pb.HOT: Sort.HOT, pb.NEW: Sort.NEW, pb.MEMBERS: Sort.MEMBERS}


def timestamp_ms(ts: Timestamp) -> int:
    return int(ts.ToMilliseconds())


def category_name(value: int) -> str | None:
    """The taxonomy name of a Category value; None for unspecified or unknown values."""
    if value == groups_pb2.CATEGORY_UNSPECIFIED or value not in groups_pb2.Category.values():
        return None
    return groups_pb2.Category.Name(value)


@functools.cache
def category_value(name: str | None) -> int:
    # Cached: Category.keys() builds a list on every call, twenty times per page.
    if name is None or name not in groups_pb2.Category.keys():
        return groups_pb2.CATEGORY_UNSPECIFIED
    return groups_pb2.Category.Value(name)


def source_name(value: int) -> str:
    """A JoinSource value as its name (unknown values count as unspecified)."""
    if value not in groups_pb2.JoinSource.values():
        value = groups_pb2.JOIN_SOURCE_UNSPECIFIED
    return groups_pb2.JoinSource.Name(value)


def sort_from(value: int) -> Sort:
    """HOT unless NEW or MEMBERS is asked for."""
    return _SORTS.get(value, Sort.HOT)


def group_facts(group: groups_pb2.Group) -> GroupFacts:
    return GroupFacts(
        name=group.name,
        description=group.description,
        category=category_name(group.category),
        cover_url=group.cover_url,
        capacity=group.capacity,
        listed=group.listed,
        linked_post_id=group.linked_post_id,
        owner_id=group.owner_id,
        member_count=group.member_count,
        created_at_ms=timestamp_ms(group.created_at),
        announcement=group.announcement.text if group.HasField("announcement") else "",
    )


def post_fields(post: events_pb2.Post) -> dict[str, object]:
    return {"author_id": post.author_id, "title": post.title, "cover_url": post.cover_url}


def card_to_proto(card: Card) -> pb.GroupCard:
    proto = pb.GroupCard(
        group_id=card.group_id,
        name=card.name,
        description=card.description,
        category=category_value(card.category),  # type: ignore[arg-type]
        cover_url=card.cover_url,
        member_count=card.member_count,
        capacity=card.capacity,
        full=card.full,
        messages_last_hour=card.messages_last_hour,
        messages_last_day=card.messages_last_day,
        active_members=card.active_members,
        owner_id=card.owner_id,
        selected=card.selected,
        filler=card.filler,
        created_at=timestamp_from_ms(card.created_at_ms),
        hot_score=card.hot_score,
        announcement=card.announcement,
    )
    if card.last_active_at_ms is not None:
        proto.last_active_at.FromMilliseconds(card.last_active_at_ms)
    if card.linked_post is not None:
        p = card.linked_post
        proto.linked_post.CopyFrom(
            pb.LinkedPost(
                post_id=p.post_id, title=p.title, cover_url=p.cover_url, author_id=p.author_id
            )
        )
    return proto


def _day_to_proto(day: DayInsights) -> pb.DayInsights:
    funnel = day.funnel
    return pb.DayInsights(
        date=day.date,
        joins_by_source=[
            pb.SourceCount(source=groups_pb2.JoinSource.Value(s), joins=n)  # type: ignore[arg-type]
            for s, n in day.joins_by_source.items()
        ],
        joins=day.joins,
        leaves=day.leaves,
        messages=day.messages,
        active_members=day.active_members,
        plaza_impressions=day.plaza_impressions,
        plaza_joins=day.plaza_joins,
        card_views=day.card_views,
        posts_shared=day.posts_shared,
        own_posts_shared=day.own_posts_shared,
        shared_post_opens=day.shared_post_opens,
        own_post_opens=day.own_post_opens,
        funnel=pb.Funnel(
            view_rate=funnel.view_rate,
            join_rate=funnel.join_rate,
            write_rate=funnel.write_rate,
            share_rate=funnel.share_rate,
            open_rate=funnel.open_rate,
        ),
    )


def _post_to_proto(post: PostInsights) -> pb.PostInsights:
    return pb.PostInsights(
        post_id=post.post_id,
        author_id=post.author_id,
        title=post.title,
        own=post.own,
        shares=post.shares,
        opens=post.opens,
    )


def insights_to_proto(
    group_id: str, insights: Insights, time_zone: str
) -> pb.GetGroupInsightsResponse:
    return pb.GetGroupInsightsResponse(
        group_id=group_id,
        days=[_day_to_proto(d) for d in insights.days],
        total=_day_to_proto(insights.total),
        plaza_conversion=insights.plaza_conversion,
        posts=[_post_to_proto(p) for p in insights.posts],
        time_zone=time_zone,
    )


def summary_to_proto(summary: GroupSummary) -> pb.GroupInsightsSummary:
    return pb.GroupInsightsSummary(
        group_id=summary.group_id, name=summary.name, total=_day_to_proto(summary.total)
    )
