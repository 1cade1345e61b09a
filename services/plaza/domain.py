"""The plaza's rules in plain Python: what a card shows, how hot a group is, how search words
are cut, what the insight window covers. No I/O; time comes in as milliseconds."""

from __future__ import annotations

import datetime as dt
import enum
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from services.kit.errors import DomainError, ErrorKind, FieldViolation, InvalidArgument

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
# Activity is counted in buckets this long; "last hour" and "last day" are to a bucket.
BUCKET_MS = 10 * 60_000
# Buckets older than this no longer count towards the hot score (0.5^8 with the default
# half-life of 6 hours: under half a percent) and expire from the store.
ACTIVITY_WINDOW_MS = 48 * HOUR_MS
# A join weighs as much as two messages, a distinct speaker as three: a room where many
# people talk is livelier than one where one person talks a lot.
SPEAKER_WEIGHT = 3.0
JOIN_WEIGHT = 2.0
# Hot scores are rounded to this; the least a group with any activity left scores.
MIN_HOT_SCORE = 1e-6

BROWSE_PAGE_DEFAULT, BROWSE_PAGE_MAX = 20, 100
SHELF_DEFAULT, SHELF_MAX = 10, 50
INSIGHT_DAYS_DEFAULT, INSIGHT_DAYS_MAX = 7, 90
QUERY_MAX = 200

# Category taxonomy names (groups.v1.Category) in the order the plaza lists them.
CATEGORY_DISPLAY_NAMES: dict[str, str] = {
    "WORK": "Work",
    "EDUCATION": "Education",
    "FOOD": "Food",
    "RELATIONSHIPS": "Relationships",
    "MAKEUP_BEAUTY": "Makeup & beauty",
    "FASHION": "Fashion",
    "TRAVEL": "Travel",
    "FITNESS": "Fitness",
    "PARENTING": "Parenting",
    "PETS": "Pets",
    "HOME_LIVING": "Home & living",
    "GAMING": "Gaming",
    "MUSIC": "Music",
    "MOVIES_TV": "Movies & TV",
    "BOOKS": "Books",
    "PHOTOGRAPHY": "Photography",
    "TECH": "Tech",
    "PERSONAL_FINANCE": "Personal finance",
    "ARTS_CRAFTS": "Arts & crafts",
    "OUTDOORS": "Outdoors",
    "WELLNESS": "Wellness",
}

# Join sources (groups.v1.JoinSource names) that count as traffic the plaza sent.
PLAZA_SOURCES = frozenset({"PLAZA", "SELECTED_SHELF", "SEARCH"})
OWNER, ADMIN = 3, 2  # groups.v1.Role values


class GroupNotFound(DomainError):
    kind = ErrorKind.NOT_FOUND
    reason = "GROUP_NOT_FOUND"


class EditorOnly(DomainError):
    kind = ErrorKind.PERMISSION_DENIED
    reason = "EDITOR_ONLY"


class NotGroupAdmin(DomainError):
    kind = ErrorKind.PERMISSION_DENIED
    reason = "NOT_GROUP_ADMIN"


class PageTokenExpired(DomainError):
    reason = "PAGE_TOKEN_EXPIRED"


class Sort(enum.Enum):
    HOT = "hot_score"
    NEW = "created_at_ms"
    MEMBERS = "member_count"


# Cards


@dataclass(frozen=True)
class GroupFacts:
    """What a group_created/group_updated event says about the group."""

    name: str
    description: str
    category: str | None
    cover_url: str
    capacity: int
    listed: bool
    linked_post_id: str
    owner_id: str
    member_count: int
    created_at_ms: int
    # The owner's or an admin's announcement; empty when none.
    announcement: str = ""


@dataclass(frozen=True)
class Post:
    """The platform's post as the plaza projects it."""

    post_id: str
    author_id: str
    title: str
    cover_url: str
    published: bool


@dataclass(frozen=True)
class GroupState:
    """A group as the groups events describe it. Settings and the member count are each
    versioned by the group version that last set them, so events applied in any order end
    in the same state; `dissolved` is final."""

    group_id: str
    facts: GroupFacts | None = None
    settings_version: int = 0
    member_count: int = 0
    count_version: int = 0
    dissolved: bool = False
    # user id -> (role, group version of the change); 0 once the member left.
    roles: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        """Whether the group exists for the plaza (created and not dissolved)."""
        return self.facts is not None and not self.dissolved

    @property
    def shown(self) -> bool:
        return self.known and self.facts is not None and self.facts.listed

    @property
    def full(self) -> bool:
        return self.facts is not None and self.member_count >= self.facts.capacity

    def is_admin(self, user_id: str) -> bool:
        """The owner or an admin of the group."""
        if self.facts is not None and self.facts.owner_id == user_id:
            return True
        return self.roles.get(user_id, (0, 0))[0] in (ADMIN, OWNER)


def apply_group_facts(state: GroupState, facts: GroupFacts, version: int) -> GroupState | None:
    """A group_created/group_updated at `version`; None when it is not newer than the state."""
    if state.dissolved or version <= state.settings_version:
        return None
    newer_count = version > state.count_version
    return replace(
        state,
        facts=facts,
        settings_version=version,
        member_count=facts.member_count if newer_count else state.member_count,
        count_version=version if newer_count else state.count_version,
    )


def apply_member_count(
    state: GroupState, count: int, version: int, member: tuple[str, int] | None = None
) -> GroupState | None:
    """A join, leave or removal at `version`; `member` is (user id, role afterwards)."""
    changed = state
    if version > state.count_version:
        changed = replace(changed, member_count=count, count_version=version)
    if member is not None:
        changed = apply_role(changed, member[0], member[1], version) or changed
    return None if changed is state else changed


def apply_role(state: GroupState, user_id: str, role: int, version: int) -> GroupState | None:
    """A member's role at `version` (0: no longer a member)."""
    if version <= state.roles.get(user_id, (0, 0))[1]:
        return None
    return replace(state, roles={**state.roles, user_id: (role, version)})


def apply_dissolved(state: GroupState, version: int) -> GroupState | None:
    if state.dissolved:
        return None
    return replace(state, dissolved=True, settings_version=max(version, state.settings_version))


def apply_snapshot(
    state: GroupState, facts: GroupFacts, roles: dict[str, int], dissolved: bool, version: int
) -> GroupState | None:
    """A group's whole state at `version` (republished for a rebuild: its members' roles,
    and whether it is dissolved). Each part applies where it is newer than what is held,
    so the snapshot and the events still in the stream end alike in any order."""
    changed = apply_group_facts(state, facts, version) or state
    gone = {
        user_id: 0 for user_id, (role, _) in changed.roles.items() if role and user_id not in roles
    }
    for user_id, role in {**gone, **roles}.items():
        changed = apply_role(changed, user_id, role, version) or changed
    if dissolved:
        changed = apply_dissolved(changed, version) or changed
    return None if changed is state else changed


def shown_post(state: GroupState, post: Post | None) -> Post | None:
    """The post a card shows: the linked one, while published and written by the owner."""
    facts = state.facts
    if facts is None or post is None or not facts.linked_post_id:
        return None
    if post.post_id != facts.linked_post_id or not post.published:
        return None
    return post if post.author_id == facts.owner_id else None


@dataclass(frozen=True)
class LinkedPost:
    post_id: str
    title: str
    cover_url: str
    author_id: str


@dataclass(frozen=True)
class Listing:
    """What the read model derives from a group's state and its linked post."""

    shown: bool
    full: bool
    keywords: tuple[str, ...]
    linked_post: LinkedPost | None


def listing(state: GroupState, post: Post | None) -> Listing:
    """Whether and how the group is listed: shown while listed and alive, searchable by the
    words of its name, description and shown post's title."""
    shown = shown_post(state, post)
    linked = (
        LinkedPost(shown.post_id, shown.title, shown.cover_url, shown.author_id) if shown else None
    )
    keywords: set[str] = set()
    if state.facts is not None:
        for text in (state.facts.name, state.facts.description, shown.title if shown else ""):
            keywords |= index_tokens(text)
    return Listing(state.shown, state.full, tuple(sorted(keywords)), linked)


@dataclass(frozen=True)
class Card:
    """A group card as the plaza shows it."""

    group_id: str
    name: str
    description: str
    category: str | None
    cover_url: str
    member_count: int
    capacity: int
    owner_id: str
    created_at_ms: int
    selected: bool
    linked_post: LinkedPost | None
    hot_score: float
    messages_last_hour: int
    messages_last_day: int
    active_members: int
    last_active_at_ms: int | None
    filler: bool = False
    announcement: str = ""

    @property
    def full(self) -> bool:
        return self.member_count >= self.capacity


# Activity and the hot score


@dataclass(frozen=True)
class ActivityBucket:
    """What happened in one group during [start_ms, start_ms + BUCKET_MS)."""

    start_ms: int
    messages: int = 0
    joins: int = 0
    speakers: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Activity:
    hot_score: float
    messages_last_hour: int
    messages_last_day: int
    active_members: int


def bucket_start(at_ms: int) -> int:
    return at_ms - at_ms % BUCKET_MS


def counts_as_recent(at_ms: int, now_ms: int) -> bool:
    """Whether activity at `at_ms` still counts (and is worth storing) at `now_ms`."""
    return bucket_start(at_ms) + BUCKET_MS > now_ms - ACTIVITY_WINDOW_MS


def activity(buckets: Iterable[ActivityBucket], now_ms: int, half_life_hours: float) -> Activity:
    """How lively a group is at `now_ms`: score = sum over buckets of
    (messages + 3 * distinct speakers + 2 * joins) * 0.5 ** (age in hours / half-life),
    the age taken from the middle of the bucket. Buckets from the future count as new."""
    score = 0.0
    hour = day = 0
    speakers: set[str] = set()
    for b in buckets:
        end = b.start_ms + BUCKET_MS
        if end <= now_ms - ACTIVITY_WINDOW_MS:
            continue
        age_hours = max(now_ms - (b.start_ms + BUCKET_MS // 2), 0) / HOUR_MS
        weight = b.messages + SPEAKER_WEIGHT * len(b.speakers) + JOIN_WEIGHT * b.joins
        score += weight * 0.5 ** (age_hours / half_life_hours)
        if end > now_ms - HOUR_MS:
            hour += b.messages
        if end > now_ms - DAY_MS:
            day += b.messages
            speakers |= b.speakers
    # Rounded, but a group with any weight left never scores zero: the rank refresh finds
    # the groups whose figures still have to decay by their score (CardIndex.scored).
    rounded = round(score, 6) or (MIN_HOT_SCORE if score > 0 else 0.0)
    return Activity(rounded, hour, day, len(speakers))


# Search

# Scripts written without spaces between words: indexed as characters and pairs of them.
_CJK = (
    r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
    r"\U00020000-\U0002fa1f"
)
_RUNS = re.compile(rf"([{_CJK}]+)|([^\W{_CJK}]+)")


def _normalized(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def index_tokens(text: str) -> set[str]:
    """Tokens stored for `text`: each word (lowercase), and for CJK runs each character and
    each pair of neighbouring characters."""
    tokens: set[str] = set()
    for cjk, word in _RUNS.findall(_normalized(text)):
        if word:
            tokens.add(word)
        else:
            tokens.update(cjk)
            tokens.update(cjk[i : i + 2] for i in range(len(cjk) - 1))
    return tokens


def query_tokens(query: str) -> list[str]:
    """Tokens a card must all carry to match `query`: each word; a CJK run of two or more
    characters becomes its character pairs (so 抹茶拿铁 matches only text holding it
    whole or in overlapping pieces). INVALID_ARGUMENT when the query has no word."""
    if len(query) > QUERY_MAX:
        raise InvalidArgument([FieldViolation("query", f"at most {QUERY_MAX} characters")])
    tokens: set[str] = set()
    for cjk, word in _RUNS.findall(_normalized(query)):
        if word:
            tokens.add(word)
        elif len(cjk) == 1:
            tokens.add(cjk)
        else:
            tokens.update(cjk[i : i + 2] for i in range(len(cjk) - 1))
    if not tokens:
        raise InvalidArgument([FieldViolation("query", "one or more words")])
    return sorted(tokens)


# Paging and authorisation


def page_limit(requested: int, default: int, maximum: int) -> int:
    """A page size: 0 means `default`, at most `maximum`, negative is refused."""
    if requested < 0:
        raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
    return min(requested or default, maximum)


def ensure_editor(is_editor: bool) -> None:
    if not is_editor:
        raise EditorOnly("only editors choose the Selected shelf")


def ensure_can_see_insights(state: GroupState | None, user_id: str) -> GroupState:
    if state is None or not state.known:
        raise GroupNotFound("no such group", group_id=state.group_id if state else "")
    if not state.is_admin(user_id):
        raise NotGroupAdmin("only the group's owner and admins see its insights")
    return state


# Insights

# Where a post's open was tapped when it was not in a group: a direct conversation.
DIRECT = "direct"
SUMMARY_PAGE_DEFAULT, SUMMARY_PAGE_MAX = 20, 100


def day_key(at_ms: int, zone: dt.tzinfo) -> str:
    """The day of `at_ms` in `zone` (the app's), as YYYY-MM-DD."""
    return dt.datetime.fromtimestamp(at_ms / 1000, tz=zone).date().isoformat()


def day_start_ms(date: str, zone: dt.tzinfo) -> int:
    """When the day `date` (YYYY-MM-DD) begins in `zone`."""
    midnight = dt.datetime.combine(dt.date.fromisoformat(date), dt.time(0), tzinfo=zone)
    return int(midnight.timestamp() * 1000)


def insight_window(days: int, now_ms: int, zone: dt.tzinfo) -> list[str]:
    """The days (in `zone`) of an insights window ending today, oldest first (0 means 7,
    1-90)."""
    if days == 0:
        days = INSIGHT_DAYS_DEFAULT
    if not 1 <= days <= INSIGHT_DAYS_MAX:
        raise InvalidArgument([FieldViolation("days", f"between 1 and {INSIGHT_DAYS_MAX}")])
    today = dt.date.fromisoformat(day_key(now_ms, zone))
    return [(today - dt.timedelta(days=back)).isoformat() for back in range(days - 1, -1, -1)]


@dataclass(frozen=True)
class DayCounts:
    """What the events of one group said about one day."""

    joins_by_source: dict[str, int] = field(default_factory=dict)
    leaves: int = 0
    messages: int = 0
    speakers: frozenset[str] = frozenset()
    card_views: int = 0


@dataclass(frozen=True)
class PostDay:
    """One post in one group on one day: how often it was shared there and its card tapped."""

    date: str
    post_id: str
    author_id: str
    shares: int = 0
    opens: int = 0


@dataclass(frozen=True)
class Funnel:
    """Each step of the creator's funnel as a share of the step before (0 when that is 0):
    plaza impressions -> card views -> joins -> members who wrote -> posts shared -> opens.
    Steps are counted apart (a join through a link never saw a card), so a rate may pass 1."""

    view_rate: float
    join_rate: float
    write_rate: float
    share_rate: float
    open_rate: float


def rate(step: int, before: int) -> float:
    """`step` as a share of the step before it; 0 when nothing came before."""
    return step / before if before else 0.0


@dataclass(frozen=True)
class DayInsights:
    date: str
    joins_by_source: dict[str, int]
    joins: int
    leaves: int
    messages: int
    active_members: int
    plaza_impressions: int
    plaza_joins: int
    card_views: int = 0
    posts_shared: int = 0
    own_posts_shared: int = 0
    shared_post_opens: int = 0
    own_post_opens: int = 0

    @property
    def funnel(self) -> Funnel:
        return Funnel(
            view_rate=rate(self.card_views, self.plaza_impressions),
            join_rate=rate(self.joins, self.card_views),
            write_rate=rate(self.active_members, self.joins),
            share_rate=rate(self.posts_shared, self.active_members),
            open_rate=rate(self.shared_post_opens, self.posts_shared),
        )


@dataclass(frozen=True)
class PostInsights:
    """A post shared into the group over the window."""

    post_id: str
    author_id: str
    title: str
    own: bool
    shares: int
    opens: int


@dataclass(frozen=True)
class Insights:
    days: list[DayInsights]
    total: DayInsights
    plaza_conversion: float
    posts: list[PostInsights] = field(default_factory=list)


def _day(
    date: str, counts: DayCounts, impressions: int, shared: list[PostDay], owner_id: str
) -> DayInsights:
    by_source = {s: n for s, n in sorted(counts.joins_by_source.items()) if n}
    own = [p for p in shared if p.author_id == owner_id]
    return DayInsights(
        date=date,
        joins_by_source=by_source,
        joins=sum(by_source.values()),
        leaves=counts.leaves,
        messages=counts.messages,
        active_members=len(counts.speakers),
        plaza_impressions=impressions,
        plaza_joins=sum(n for s, n in by_source.items() if s in PLAZA_SOURCES),
        card_views=counts.card_views,
        posts_shared=sum(p.shares for p in shared),
        own_posts_shared=sum(p.shares for p in own),
        shared_post_opens=sum(p.opens for p in shared),
        own_post_opens=sum(p.opens for p in own),
    )


def _posts(shared: list[PostDay], owner_id: str, titles: dict[str, str]) -> list[PostInsights]:
    """Per post over the window, most opened first (then most shared, then by id)."""
    totals: dict[str, PostDay] = {}
    for p in shared:
        held = totals.get(p.post_id, PostDay("", p.post_id, p.author_id))
        totals[p.post_id] = replace(held, shares=held.shares + p.shares, opens=held.opens + p.opens)
    posts = [
        PostInsights(
            post_id=p.post_id,
            author_id=p.author_id,
            title=titles.get(p.post_id, ""),
            own=p.author_id == owner_id,
            shares=p.shares,
            opens=p.opens,
        )
        for p in totals.values()
    ]
    return sorted(posts, key=lambda p: (-p.opens, -p.shares, p.post_id))


def insights(
    window: list[str],
    counts: dict[str, DayCounts],
    impressions: dict[str, int],
    shared: Iterable[PostDay] = (),
    owner_id: str = "",
    titles: dict[str, str] | None = None,
) -> Insights:
    """Per-day rows, a total row (distinct speakers over the whole window), the share of
    plaza impressions that turned into plaza joins, and the posts shared in the window.
    A post is the owner's own when its author is the group's owner now (`owner_id`), so
    the figures do not depend on the order events came in; after a transfer, the new
    owner's posts are the own ones."""
    in_window = set(window)
    shared_by_day: dict[str, list[PostDay]] = {}
    for p in shared:
        if p.date in in_window:
            shared_by_day.setdefault(p.date, []).append(p)
    days = [
        _day(
            d, counts.get(d, DayCounts()), impressions.get(d, 0), shared_by_day.get(d, []), owner_id
        )
        for d in window
    ]
    by_source: dict[str, int] = {}
    speakers: set[str] = set()
    for d in window:
        c = counts.get(d, DayCounts())
        for source, n in c.joins_by_source.items():
            by_source[source] = by_source.get(source, 0) + n
        speakers |= c.speakers
    whole = DayCounts(
        joins_by_source=by_source,
        leaves=sum(d.leaves for d in days),
        messages=sum(d.messages for d in days),
        speakers=frozenset(speakers),
        card_views=sum(d.card_views for d in days),
    )
    every_share = [p for d in window for p in shared_by_day.get(d, [])]
    total = _day("", whole, sum(d.plaza_impressions for d in days), every_share, owner_id)
    conversion = total.plaza_joins / total.plaza_impressions if total.plaza_impressions else 0.0
    return Insights(
        days=days,
        total=total,
        plaza_conversion=conversion,
        posts=_posts(every_share, owner_id, titles or {}),
    )


# A creator's groups, best first


@dataclass(frozen=True)
class GroupSummary:
    """One of a creator's groups with its totals over the window."""

    group_id: str
    name: str
    total: DayInsights

    @property
    def rank(self) -> tuple[int, int, int, str]:
        """Best first: most joins, then most shared-post opens, then most messages, then
        by group id (so the order is total and a page position is exact)."""
        t = self.total
        return (-t.joins, -t.shared_post_opens, -t.messages, self.group_id)


SummaryPosition = tuple[int, int, int, str]


def summaries_page(
    summaries: Iterable[GroupSummary], after: SummaryPosition | None, page_size: int
) -> tuple[list[GroupSummary], SummaryPosition | None]:
    """The page of `summaries` (best first) that follows the position `after` (None: the
    first page), and the position after it (None on the last page). Positions are ranks,
    not offsets: a group whose figures change between pages moves, the others keep their
    places relative to the position."""
    size = page_limit(page_size, SUMMARY_PAGE_DEFAULT, SUMMARY_PAGE_MAX)
    ordered = sorted(summaries, key=lambda s: s.rank)
    rest = [s for s in ordered if after is None or s.rank > after]
    page = rest[:size]
    return page, (page[-1].rank if len(rest) > size else None)


def summary_position(position: dict[str, object], days: int) -> SummaryPosition:
    """A page token's position, valid only for the window (`days`) it was made for."""
    rank, token_days = position.get("r"), position.get("d")
    if token_days != days or not isinstance(rank, list) or len(rank) != 4:
        raise InvalidArgument([FieldViolation("page_token", "not a token for this request")])
    joins, opens, messages, group_id = rank
    if not all(isinstance(n, int) for n in (joins, opens, messages)) or not isinstance(
        group_id, str
    ):
        raise InvalidArgument([FieldViolation("page_token", "not a token this API returned")])
    return (joins, opens, messages, group_id)
