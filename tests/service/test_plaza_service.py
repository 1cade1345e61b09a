"""The plaza service over real gRPC, fed by real events on its own nats-server."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import nats
import pytest
from google.protobuf.message import Message
from groupchat.content.v1 import content_pb2
from groupchat.events.v1 import events_pb2
from groupchat.groups.v1 import groups_pb2 as gpb
from groupchat.plaza.v1 import plaza_pb2 as pb
from groupchat.plaza.v1 import plaza_pb2_grpc
from structlog.testing import capture_logs

from services.kit.events import EventBus, OutgoingEvent, new_event
from services.kit.paging import encode_page_token
from services.kit.rpc_status import error_info
from services.plaza import domain
from services.plaza.config import PlazaConfig
from services.plaza.projection import PlazaProjection
from services.plaza.rebuild import rebuild
from services.plaza.service import build
from services.plaza.storage import DayCount, PlazaStore
from tests.conftest import HARNESS, eventually
from tests.service.conftest import GroupsCaller, ServiceEnv, serving
from tools.nats_users import NatsUsers
from tools.platform import post_event, publish
from tools.suite import running_nats_server

PlazaCaller = Callable[..., tuple[plaza_pb2_grpc.PlazaStub, Any]]


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory, nats_users: NatsUsers) -> Iterator[str]:
    """This module's own nats-server: the plaza's durable consumers then see only the
    events this module publishes (other modules fill the shared streams)."""
    with running_nats_server(tmp_path_factory.mktemp("plaza-jetstream"), nats_users) as url:
        yield nats_users.url(url, HARNESS)


@pytest.fixture
async def plaza(
    nats_url: str, token: Callable[..., str], service_env: ServiceEnv
) -> AsyncIterator[PlazaCaller]:
    host = build(PlazaConfig.from_env(service_env(nats_url, "plaza")))
    async with serving(host, plaza_pb2_grpc.PlazaStub, token) as as_user:
        yield as_user


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


class FakeGroup:
    """A group as the groups service would describe it in its events, one version at a time."""

    def __init__(self, owner: str = "alice", **fields: Any) -> None:
        fields.setdefault("name", "Tea lovers")
        fields.setdefault("category", gpb.FOOD)
        fields.setdefault("capacity", 50)
        fields.setdefault("listed", True)
        created_ms = fields.pop("created_ms", int(time.time() * 1000))
        self.group = gpb.Group(group_id=unique("g"), owner_id=owner, member_count=1, **fields)
        self.group.created_at.FromMilliseconds(created_ms)
        self.seq = 0

    @property
    def id(self) -> str:
        return self.group.group_id

    def _event(self, event_type: str, user: str, **payload: Any) -> OutgoingEvent:
        self.group.version += 1
        return new_event(
            "groups",
            event_type,
            aggregate_id=self.id,
            aggregate_version=self.group.version,
            user_id=user,
            **payload,
        )

    def created(self) -> OutgoingEvent:
        group = gpb.Group()
        group.CopyFrom(self.group)
        group.version = self.group.version + 1
        return self._event("group_created", self.group.owner_id, group_created={"group": group})

    def updated(self, **fields: Any) -> OutgoingEvent:
        for name, value in fields.items():
            if isinstance(value, Message):
                getattr(self.group, name).CopyFrom(value)
            else:
                setattr(self.group, name, value)
        group = gpb.Group()
        group.CopyFrom(self.group)
        group.version = self.group.version + 1
        return self._event(
            "group_updated",
            self.group.owner_id,
            group_updated={"group": group, "changed_fields": sorted(fields)},
        )

    def joined(self, user: str, source: int = gpb.PLAZA) -> OutgoingEvent:
        self.group.member_count += 1
        member = gpb.Member(group_id=self.id, user_id=user, role=gpb.MEMBER)
        return self._event(
            "member_joined",
            user,
            member_joined={
                "member": member,
                "member_count": self.group.member_count,
                "source": source,
            },
        )

    def dissolved(self) -> OutgoingEvent:
        return self._event(
            "group_dissolved", self.group.owner_id, group_dissolved={"group_id": self.id}
        )

    def message(self, sender: str, shared: tuple[str, str] | None = None) -> OutgoingEvent:
        """A message; `shared` = (post id, author) when it shares a post."""
        self.seq += 1
        message = gpb.GroupMessage(
            group_id=self.id, seq=self.seq, sender_id=sender, text="hi", version=1
        )
        if shared is not None:
            message.shared_post.CopyFrom(
                content_pb2.SharedPost(post_id=shared[0], author_id=shared[1], title="t")
            )
        return new_event(
            "groups",
            "group_message_posted",
            aggregate_id=self.id,
            aggregate_version=self.seq,
            user_id=sender,
            group_message_posted={"message": message},
        )

    def recalled(self, seq: int, by: str) -> OutgoingEvent:
        message = gpb.GroupMessage(group_id=self.id, seq=seq, sender_id=by, version=2)
        message.recall.recalled_by = by
        return new_event(
            "groups",
            "group_message_changed",
            aggregate_id=self.id,
            aggregate_version=2,
            user_id=by,
            group_message_changed={"message": message, "change": events_pb2.RECALLED},
        )

    def snapshot(self) -> OutgoingEvent:
        self.group.version += 1
        group = gpb.Group()
        group.CopyFrom(self.group)
        owner = gpb.Member(group_id=self.id, user_id=self.group.owner_id, role=gpb.OWNER)
        return new_event(
            "groups",
            "group_snapshot",
            aggregate_id=self.id,
            aggregate_version=self.group.version,
            user_id=self.group.owner_id,
            group_snapshot={"group": group, "members": [owner]},
        )

    def card_viewed(self, viewer: str) -> OutgoingEvent:
        return new_event(
            "groups",
            "group_card_viewed",
            aggregate_id=self.id,
            aggregate_version=0,
            user_id=viewer,
            group_card_viewed={"group_id": self.id, "viewer_id": viewer},
        )

    def post_opened(self, opener: str, seq: int, post: tuple[str, str]) -> OutgoingEvent:
        return new_event(
            "groups",
            "shared_post_opened",
            aggregate_id=self.id,
            aggregate_version=0,
            user_id=opener,
            shared_post_opened={
                "post_id": post[0],
                "author_id": post[1],
                "opener_id": opener,
                "group_id": self.id,
                "seq": seq,
            },
        )


def opened_in_direct(opener: str, peer: str, post: tuple[str, str]) -> OutgoingEvent:
    """messaging.shared_post_opened: a tap on a post shared in a direct conversation."""
    conversation = ":".join(sorted((opener, peer)))
    return new_event(
        "messaging",
        "shared_post_opened",
        aggregate_id=conversation,
        aggregate_version=0,
        user_id=opener,
        shared_post_opened={
            "post_id": post[0],
            "author_id": post[1],
            "opener_id": opener,
            "conversation_id": conversation,
            "seq": 1,
        },
    )


async def redeliver(nats_url: str, event: OutgoingEvent) -> None:
    """Store `event` in its stream once more, as the relay does when it publishes again
    after JetStream's duplicate window: the same event id, a new stream message."""
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().publish(
            event.subject,
            event.envelope.SerializeToString(),
            headers={"Nats-Msg-Id": uuid.uuid4().hex},
        )
    finally:
        await nc.close()


async def send(bus: EventBus, *events: OutgoingEvent) -> None:
    for event in events:
        await bus.publish(event)


async def browse(plaza: PlazaCaller, **fields: Any) -> pb.BrowsePlazaResponse:
    stub, md = plaza("browser")
    return await stub.BrowsePlaza(pb.BrowsePlazaRequest(**fields), metadata=md)


async def search(plaza: PlazaCaller, query: str, **fields: Any) -> list[str]:
    stub, md = plaza("browser")
    reply = await stub.SearchGroups(pb.SearchGroupsRequest(query=query, **fields), metadata=md)
    return [c.group_id for c in reply.cards]


async def shown(plaza: PlazaCaller, ids: set[str], **fields: Any) -> list[str]:
    """The ids among `ids` on the first page of a browse (page of 100)."""
    reply = await browse(plaza, page_size=100, **fields)
    return [c.group_id for c in reply.cards if c.group_id in ids]


async def card(plaza: PlazaCaller, group_id: str) -> pb.GroupCard | None:
    reply = await browse(plaza, page_size=100)
    return next((c for c in reply.cards if c.group_id == group_id), None)


async def refused(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    info = error_info(caught.value)
    return caught.value.code(), info.reason if info else ""


async def until_shown(plaza: PlazaCaller, ids: set[str], **fields: Any) -> None:
    async def all_there() -> bool:
        return set(await shown(plaza, ids, **fields)) == ids

    await eventually(all_there)


# Cards and linked posts


async def test_a_linked_post_shows_on_the_card_and_a_deleted_one_leaves_it(
    plaza: PlazaCaller, groups: GroupsCaller, platform_url: str
) -> None:
    owner, post_id = unique("creator"), unique("post")
    await publish(platform_url, [post_event("publish", post_id, owner, title="Matcha at home")])
    stub, md = groups(owner)
    request = gpb.CreateGroupRequest(
        name="Matcha club", category=gpb.FOOD, listed=True, linked_post_id=post_id
    )
    created: list[str] = []

    async def create() -> bool:
        try:
            created.append((await stub.CreateGroup(request, metadata=md)).group.group_id)
        except grpc.aio.AioRpcError:  # the groups service has not seen the post yet
            return False
        return True

    await eventually(create)
    group_id = created[0]

    async def linked() -> bool:
        c = await card(plaza, group_id)
        return c is not None and c.linked_post.title == "Matcha at home"

    await eventually(linked)
    c = await card(plaza, group_id)
    assert c is not None
    assert (c.linked_post.post_id, c.linked_post.author_id) == (post_id, owner)
    assert group_id in await search(plaza, "home")

    await publish(platform_url, [post_event("delete", post_id, owner)])

    async def unlinked() -> bool:
        c = await card(plaza, group_id)
        return c is not None and not c.HasField("linked_post")

    await eventually(unlinked)

    async def no_longer_found() -> bool:  # a search's first page may be a second old
        return group_id not in await search(plaza, "home")

    await eventually(no_longer_found)


# Filters and sorts


async def test_category_filter_and_each_sort(plaza: PlazaCaller, bus: EventBus) -> None:
    base = int(time.time() * 1000)
    old = FakeGroup(category=gpb.FOOD, created_ms=base - 3000)
    big = FakeGroup(category=gpb.FOOD, created_ms=base - 2000)
    new = FakeGroup(category=gpb.FOOD, created_ms=base - 1000)
    other = FakeGroup(category=gpb.TRAVEL, created_ms=base)
    await send(bus, *(g.created() for g in (old, big, new, other)))
    await send(bus, big.joined("u1"), big.joined("u2"), old.message("alice"), old.message("bob"))
    ids = {g.id for g in (old, big, new, other)}
    await until_shown(plaza, ids)

    async def hot_first() -> bool:
        return (await shown(plaza, ids))[0] == old.id

    await eventually(hot_first)
    assert await shown(plaza, ids, category=gpb.FOOD, sort=pb.NEW) == [new.id, big.id, old.id]
    assert (await shown(plaza, ids, sort=pb.MEMBERS))[0] == big.id
    hot = await shown(plaza, ids, category=gpb.FOOD, sort=pb.HOT)
    assert hot[:2] == [old.id, big.id]  # messages and speakers beat two joins, joins beat none
    assert await shown(plaza, ids, category=gpb.TRAVEL) == [other.id]


async def test_full_groups_show_full_and_only_with_space_hides_them(
    plaza: PlazaCaller, bus: EventBus
) -> None:
    full, roomy = FakeGroup(capacity=2), FakeGroup(capacity=3)
    await send(bus, full.created(), roomy.created(), full.joined("bob"))
    ids = {full.id, roomy.id}
    await until_shown(plaza, ids)

    async def filled() -> bool:
        c = await card(plaza, full.id)
        return c is not None and c.full

    await eventually(filled)
    assert await shown(plaza, ids, only_with_space=True) == [roomy.id]


async def test_unlisted_and_dissolved_groups_do_not_show(plaza: PlazaCaller, bus: EventBus) -> None:
    hidden, gone, stays = FakeGroup(listed=False), FakeGroup(), FakeGroup()
    await send(bus, hidden.created(), gone.created(), stays.created(), gone.dissolved())
    ids = {hidden.id, gone.id, stays.id}

    async def showing_only(group_id: str) -> bool:
        # Events of different groups are applied in parallel: wait for all of them.
        return await shown(plaza, ids) == [group_id]

    await eventually(lambda: showing_only(stays.id))
    await send(bus, hidden.updated(listed=True), stays.updated(listed=False))
    await eventually(lambda: showing_only(hidden.id))


# Paging


async def walk(plaza: PlazaCaller, ids: set[str], between: Any, **fields: Any) -> list[str]:
    """Page through the plaza 4 cards at a time, calling `between()` after each page."""
    seen: list[str] = []
    token = ""
    while True:
        reply = await browse(plaza, page_size=4, page_token=token, **fields)
        seen += [c.group_id for c in reply.cards if c.group_id in ids]
        token = reply.next_page_token
        if not token:
            return seen
        await between()


async def test_paging_never_repeats_nor_skips_while_messages_reorder_hot(
    plaza: PlazaCaller, bus: EventBus
) -> None:
    groups = [FakeGroup(category=gpb.BOOKS) for _ in range(10)]
    await send(bus, *(g.created() for g in groups))
    ids = {g.id for g in groups}
    await until_shown(plaza, ids, category=gpb.BOOKS)
    first = await shown(plaza, ids, category=gpb.BOOKS)
    # The coldest become the hottest, each hotter than the one before, page after page.
    movers = enumerate(reversed(first), start=2)

    async def heat_up() -> None:
        speakers, mover = next(movers)
        group = next(g for g in groups if g.id == mover)
        await send(bus, *(group.message(f"u{i}") for i in range(speakers)))

        async def on_top() -> bool:
            return (await shown(plaza, ids, category=gpb.BOOKS))[0] == mover

        await eventually(on_top)

    seen = await walk(plaza, ids, heat_up, category=gpb.BOOKS)
    assert sorted(seen) == sorted(ids) and len(seen) == len(ids)
    assert seen == first


async def test_paging_never_repeats_nor_skips_while_joins_reorder_members(
    plaza: PlazaCaller, bus: EventBus
) -> None:
    groups = [FakeGroup(category=gpb.PETS) for _ in range(10)]
    await send(bus, *(g.created() for g in groups))
    ids = {g.id for g in groups}
    await until_shown(plaza, ids, category=gpb.PETS)
    first = await shown(plaza, ids, category=gpb.PETS, sort=pb.MEMBERS)
    movers = enumerate(reversed(first), start=1)

    async def grow() -> None:
        joins, mover = next(movers)
        group = next(g for g in groups if g.id == mover)
        await send(bus, *(group.joined(unique("u")) for _ in range(5 * joins)))

        async def on_top() -> bool:
            top = await shown(plaza, ids, category=gpb.PETS, sort=pb.MEMBERS)
            return top[0] == group.id

        await eventually(on_top)

    seen = await walk(plaza, ids, grow, category=gpb.PETS, sort=pb.MEMBERS)
    assert seen == first


async def test_an_unknown_page_token_has_expired_and_a_negative_page_size_is_invalid(
    plaza: PlazaCaller,
) -> None:
    stub, md = plaza("browser")
    token = encode_page_token({"s": "no-such-snapshot", "o": 20})
    code, reason = await refused(
        stub.BrowsePlaza(pb.BrowsePlazaRequest(page_token=token), metadata=md)
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PAGE_TOKEN_EXPIRED")
    code, _ = await refused(stub.BrowsePlaza(pb.BrowsePlazaRequest(page_size=-1), metadata=md))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


# The Selected shelf and categories


async def test_only_editors_select_and_hot_groups_fill_the_shelf(
    plaza: PlazaCaller, bus: EventBus
) -> None:
    pick, hot, cold = (FakeGroup(category=gpb.PHOTOGRAPHY) for _ in range(3))
    await send(bus, pick.created(), hot.created(), cold.created(), hot.message("bob"))
    ids = {pick.id, hot.id, cold.id}
    await until_shown(plaza, ids, category=gpb.PHOTOGRAPHY)
    stub, md = plaza("visitor")
    code, reason = await refused(
        stub.SetGroupSelected(
            pb.SetGroupSelectedRequest(group_id=pick.id, selected=True), metadata=md
        )
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "EDITOR_ONLY")

    editor, editor_md = plaza("editor1", ["editor"])
    reply = await editor.SetGroupSelected(
        pb.SetGroupSelectedRequest(group_id=pick.id, selected=True), metadata=editor_md
    )
    assert reply.card.selected
    code, reason = await refused(
        editor.SetGroupSelected(pb.SetGroupSelectedRequest(group_id="g_none"), metadata=editor_md)
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "GROUP_NOT_FOUND")

    async def hot_ranked() -> bool:
        return (await shown(plaza, ids, category=gpb.PHOTOGRAPHY))[0] == hot.id

    await eventually(hot_ranked)
    shelf = await stub.ListSelectedGroups(
        pb.ListSelectedGroupsRequest(category=gpb.PHOTOGRAPHY, page_size=2), metadata=md
    )
    assert [(c.group_id, c.selected, c.filler) for c in shelf.cards] == [
        (pick.id, True, False),
        (hot.id, False, True),
    ]


async def test_categories_count_listed_groups(plaza: PlazaCaller, bus: EventBus) -> None:
    listed = [FakeGroup(category=gpb.GAMING) for _ in range(2)]
    hidden, gone = FakeGroup(category=gpb.GAMING, listed=False), FakeGroup(category=gpb.GAMING)
    stub, md = plaza("browser")

    async def counts() -> dict[int, int]:
        reply = await stub.ListCategories(pb.ListCategoriesRequest(), metadata=md)
        return {c.category: c.listed_groups for c in reply.categories}

    async def counted(expected: dict[int, int]) -> bool:
        now = await counts()
        return all(now[category] == n for category, n in expected.items())

    await send(bus, *(g.created() for g in [*listed, hidden, gone]), gone.dissolved())
    await until_shown(plaza, {g.id for g in listed})
    await eventually(lambda: counted({gpb.GAMING: 2}))
    reply = await stub.ListCategories(pb.ListCategoriesRequest(), metadata=md)
    assert len(reply.categories) == len(gpb.Category.values()) - 1
    by_category = {c.category: c for c in reply.categories}
    assert by_category[gpb.MAKEUP_BEAUTY].display_name == "Makeup & beauty"
    assert by_category[gpb.MOVIES_TV].display_name == "Movies & TV"

    # A card moving to another category, or leaving the plaza, moves its count.
    await send(bus, listed[0].updated(category=gpb.PETS), listed[1].updated(listed=False))
    await eventually(lambda: counted({gpb.GAMING: 0, gpb.PETS: 1}))


# Search


async def test_search_matches_every_word_of_names_descriptions_and_cjk(
    plaza: PlazaCaller, bus: EventBus
) -> None:
    word = unique("kw")
    matcha = FakeGroup(name=f"Matcha {word}", description="Whisk together")
    latte = FakeGroup(name=f"Latte art {word}", description="")
    chinese = FakeGroup(name="抹茶控的聚会", description=word)
    await send(bus, matcha.created(), latte.created(), chinese.created())
    await until_shown(plaza, {matcha.id, latte.id, chinese.id})
    assert sorted(await search(plaza, word.upper())) == sorted([matcha.id, latte.id, chinese.id])
    assert await search(plaza, f"whisk {word}") == [matcha.id]
    assert await search(plaza, f"{word} whis") == []  # whole words, not prefixes
    assert await search(plaza, f"抹茶 {word}") == [chinese.id]
    assert await search(plaza, "抹茶控") == [chinese.id]
    stub, md = plaza("browser")
    code, _ = await refused(stub.SearchGroups(pb.SearchGroupsRequest(query=" "), metadata=md))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


# Insights


async def test_insights_count_joins_by_source_leaves_messages_and_impressions(
    plaza: PlazaCaller, groups: GroupsCaller
) -> None:
    owner, admin = unique("owner"), unique("admin")
    stub, md = groups(owner)
    group = (
        await stub.CreateGroup(
            gpb.CreateGroupRequest(name="Insightful", category=gpb.WORK, listed=True), metadata=md
        )
    ).group
    for user, source in [(admin, gpb.PLAZA), (unique("s"), gpb.SEARCH), (unique("p"), gpb.POST)]:
        member_stub, member_md = groups(user)
        await member_stub.JoinGroup(
            gpb.JoinGroupRequest(group_id=group.group_id, source=source), metadata=member_md
        )
    await stub.SetMemberRole(
        gpb.SetMemberRoleRequest(group_id=group.group_id, user_id=admin, role=gpb.ADMIN),
        metadata=md,
    )
    leaver_stub, leaver_md = groups(unique("l"))
    await leaver_stub.JoinGroup(gpb.JoinGroupRequest(group_id=group.group_id), metadata=leaver_md)
    await leaver_stub.LeaveGroup(gpb.LeaveGroupRequest(group_id=group.group_id), metadata=leaver_md)
    for user, text in [(owner, "hi"), (admin, "hello"), (owner, "again")]:
        sender, sender_md = groups(user)
        await sender.SendGroupMessage(
            gpb.SendGroupMessageRequest(group_id=group.group_id, text=text), metadata=sender_md
        )
    await until_shown(plaza, {group.group_id})  # one impression
    await browse(plaza, category=gpb.WORK)  # and another
    insights_stub, admin_md = plaza(admin)

    async def report() -> pb.GetGroupInsightsResponse:
        return await insights_stub.GetGroupInsights(
            pb.GetGroupInsightsRequest(group_id=group.group_id, days=3), metadata=admin_md
        )

    async def counted() -> bool:
        try:
            total = (await report()).total
        except grpc.aio.AioRpcError:  # the plaza has not seen the admin's role yet
            return False
        return total.messages == 3 and total.leaves == 1 and total.plaza_impressions >= 2

    await eventually(counted)
    result = await report()
    assert len(result.days) == 3 and result.days[-1].joins == 4
    total = result.total
    assert {(s.source, s.joins) for s in total.joins_by_source} == {
        (gpb.PLAZA, 1),
        (gpb.SEARCH, 1),
        (gpb.POST, 1),
        (gpb.JOIN_SOURCE_UNSPECIFIED, 1),
    }
    assert (total.joins, total.leaves, total.active_members, total.plaza_joins) == (4, 1, 2, 2)
    assert result.plaza_conversion == pytest.approx(2 / total.plaza_impressions)

    visitor, visitor_md = plaza(unique("visitor"))
    code, reason = await refused(
        visitor.GetGroupInsights(
            pb.GetGroupInsightsRequest(group_id=group.group_id), metadata=visitor_md
        )
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "NOT_GROUP_ADMIN")
    code, _ = await refused(
        visitor.GetGroupInsights(pb.GetGroupInsightsRequest(group_id="g_none"), metadata=visitor_md)
    )
    assert code == grpc.StatusCode.NOT_FOUND


async def test_joins_with_an_invite_count_as_invite_joins_of_an_unlisted_group(
    plaza: PlazaCaller, groups: GroupsCaller
) -> None:
    owner = unique("owner")
    stub, md = groups(owner)
    group = (
        await stub.CreateGroup(gpb.CreateGroupRequest(name="Quiet", category=gpb.WORK), metadata=md)
    ).group
    code = (
        await stub.CreateInvite(gpb.CreateInviteRequest(group_id=group.group_id), metadata=md)
    ).invite.code
    for _ in range(2):
        joiner, joiner_md = groups(unique("guest"))
        # Whatever source the client claims, a join with an invite is an invite join.
        request = gpb.JoinGroupRequest(group_id=group.group_id, source=gpb.PLAZA, invite_code=code)
        await joiner.JoinGroup(request, metadata=joiner_md)
    insights_stub, owner_md = plaza(owner)

    async def by_source() -> set[tuple[int, int]]:
        try:
            reply = await insights_stub.GetGroupInsights(
                pb.GetGroupInsightsRequest(group_id=group.group_id), metadata=owner_md
            )
        except grpc.aio.AioRpcError:  # the plaza has not seen the group yet
            return set()
        return {(s.source, s.joins) for s in reply.total.joins_by_source}

    async def counted() -> bool:
        return await by_source() == {(gpb.INVITE_LINK, 2)}

    await eventually(counted)


# The announcement on the card


async def test_the_card_shows_the_latest_announcement(plaza: PlazaCaller, bus: EventBus) -> None:
    group = FakeGroup()
    created = group.created()
    welcome = group.updated(announcement=gpb.Announcement(text="Welcome!", set_by="alice"))
    stale = events_pb2.Envelope()
    stale.CopyFrom(welcome.envelope)
    stale.event_id = uuid.uuid4().hex
    stale.aggregate_version = created.envelope.aggregate_version
    stale.group_updated.group.announcement.text = "Stale"
    await send(bus, created, welcome, OutgoingEvent(welcome.subject, stale))

    async def announced(text: str) -> bool:
        c = await card(plaza, group.id)
        return c is not None and c.announcement == text

    await eventually(lambda: announced("Welcome!"))
    # The groups service republishes its state for a rebuild; a newer one wins.
    group.group.announcement.text = "Tea on Fridays"
    await send(bus, group.snapshot())
    await eventually(lambda: announced("Tea on Fridays"))
    group.group.ClearField("announcement")  # cleared: no announcement
    await send(bus, group.updated())
    await eventually(lambda: announced(""))
    c = await card(plaza, group.id)
    assert c is not None and c.name == "Tea lovers"


# The creators' funnel


async def insights_of(
    plaza: PlazaCaller, user: str, group_id: str, days: int = 1
) -> pb.GetGroupInsightsResponse | None:
    stub, md = plaza(user)
    try:
        return await stub.GetGroupInsights(
            pb.GetGroupInsightsRequest(group_id=group_id, days=days), metadata=md
        )
    except grpc.aio.AioRpcError:  # the plaza has not seen the group yet
        return None


async def test_the_funnel_counts_each_step_once_and_a_recall_is_no_message(
    plaza: PlazaCaller, bus: EventBus, nats_url: str
) -> None:
    owner = unique("creator")
    group = FakeGroup(owner, category=gpb.FASHION)
    mine, theirs = (unique("p_mine"), owner), (unique("p_theirs"), unique("author"))
    await publish_posts(bus, mine, "My capsule wardrobe")
    opened_twice = group.post_opened("u1", 2, mine)
    await send(
        bus,
        group.created(),
        *(group.card_viewed(f"v{i}") for i in range(3)),
        group.joined("u1"),
        group.joined("u2", gpb.POST),
        group.message("u1"),
        group.message(owner, shared=mine),
        group.message("u1", shared=theirs),
        opened_twice,
        group.post_opened("u2", 2, mine),
        group.post_opened("u2", 3, theirs),
        group.recalled(3, "u1"),
    )
    await redeliver(nats_url, opened_twice)
    # Events of one group are applied in order: once this last view counts, all before it have.
    await send(bus, group.card_viewed("v_last"))
    await until_shown(plaza, {group.id}, category=gpb.FASHION)  # plaza impressions

    async def counted() -> bool:
        report = await insights_of(plaza, owner, group.id)
        if report is None:
            return False
        total, titled = report.total, [p.title for p in report.posts if p.title]
        return total.card_views == 4 and total.plaza_impressions > 0 and titled != []

    await eventually(counted)
    report = await insights_of(plaza, owner, group.id)
    assert report is not None
    total = report.total
    assert (total.card_views, total.joins, total.plaza_joins) == (4, 2, 1)
    assert (total.messages, total.active_members) == (3, 2)  # the recall is no 4th message
    assert (total.posts_shared, total.own_posts_shared) == (2, 1)
    assert (total.shared_post_opens, total.own_post_opens) == (3, 2)  # the redelivery once
    today = pb.DayInsights()
    today.CopyFrom(total)
    today.date = report.days[-1].date
    assert list(report.days) == [today]  # a window of one day: the day is the total
    funnel = total.funnel
    assert funnel.view_rate == pytest.approx(4 / total.plaza_impressions)
    assert (funnel.join_rate, funnel.write_rate) == (pytest.approx(2 / 4), pytest.approx(2 / 2))
    assert (funnel.share_rate, funnel.open_rate) == (pytest.approx(2 / 2), pytest.approx(3 / 2))
    assert [(p.post_id, p.shares, p.opens, p.own, p.title) for p in report.posts] == [
        (mine[0], 1, 2, True, "My capsule wardrobe"),
        (theirs[0], 1, 1, False, ""),  # a post the plaza never saw has no title
    ]
    assert report.time_zone == "Asia/Shanghai"
    assert report.days[-1].date == time.strftime("%Y-%m-%d", time.gmtime(time.time() + 8 * 3600))


async def publish_posts(bus: EventBus, post: tuple[str, str], title: str) -> None:
    await bus.publish(post_event("publish", post[0], post[1], title=title))


async def my_insights(
    plaza: PlazaCaller, user: str, **fields: Any
) -> pb.ListMyGroupInsightsResponse:
    stub, md = plaza(user)
    return await stub.ListMyGroupInsights(pb.ListMyGroupInsightsRequest(**fields), metadata=md)


async def test_a_creator_lists_their_own_groups_best_first_page_by_page(
    plaza: PlazaCaller, bus: EventBus
) -> None:
    creator, someone = unique("creator"), unique("someone")
    post = (unique("p"), creator)
    joined = FakeGroup(creator, name="Most joined")
    opened = FakeGroup(creator, name="Most opened")
    chatty = FakeGroup(creator, name="Chatty")
    unlisted = FakeGroup(creator, name="Unlisted", listed=False)
    handed = FakeGroup(someone, name="Handed over")
    given_away, dissolved, not_mine = FakeGroup(creator), FakeGroup(creator), FakeGroup(someone)
    every = (joined, opened, chatty, unlisted, handed, given_away, dissolved, not_mine)
    await send(bus, *(g.created() for g in every))
    await send(
        bus,
        *(joined.joined(unique("u")) for _ in range(3)),
        opened.joined("u1"),
        opened.post_opened("u1", 1, post),
        opened.post_opened("u2", 1, post),
        chatty.joined("u1"),
        chatty.message("u1"),
        chatty.message("u1"),
        unlisted.joined("u1"),
        unlisted.message("u1"),
        handed.updated(owner_id=creator),  # a transfer to the creator
        given_away.updated(owner_id=someone),  # and one away from them
        dissolved.dissolved(),
        not_mine.joined("u9"),
        opened_in_direct("u7", creator, post),  # their post, opened in a direct conversation
        opened_in_direct("u7", creator, (unique("p"), someone)),  # someone else's post
    )
    expected = [joined.id, opened.id, chatty.id, unlisted.id, handed.id]

    async def listed() -> bool:
        reply = await my_insights(plaza, creator, page_size=100)
        return [g.group_id for g in reply.groups] == expected and reply.own_post_opens == 3

    await eventually(listed)
    pages: list[list[str]] = []
    token = ""
    while True:
        reply = await my_insights(plaza, creator, page_size=2, page_token=token)
        pages.append([g.group_id for g in reply.groups])
        token = reply.next_page_token
        if not token:
            break
    assert pages == [expected[:2], expected[2:4], expected[4:]]
    first = (await my_insights(plaza, creator, page_size=2)).groups
    assert [(g.name, g.total.joins, g.total.shared_post_opens) for g in first] == [
        ("Most joined", 3, 0),
        ("Most opened", 1, 2),
    ]
    assert reply.time_zone == "Asia/Shanghai" and reply.own_post_opens == 3
    theirs = {g.group_id for g in (await my_insights(plaza, someone)).groups}
    assert theirs == {given_away.id, not_mine.id}

    token = (await my_insights(plaza, creator, page_size=2)).next_page_token
    stub, md = plaza(creator)
    code, _ = await refused(
        stub.ListMyGroupInsights(
            pb.ListMyGroupInsightsRequest(days=30, page_token=token), metadata=md
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT  # a token is for the window it came from
    assert (await my_insights(plaza, unique("nobody"))).groups == []


# The projection itself: redelivery, reordering, rebuild

FIXED_NOW = int(time.time() * 1000)
SHANGHAI = ZoneInfo("Asia/Shanghai")


@pytest.fixture
def store(plaza_store: PlazaStore) -> PlazaStore:
    return plaza_store


def projection_of(store: PlazaStore) -> PlazaProjection:
    return PlazaProjection(store, half_life_hours=6, time_zone=SHANGHAI, clock=lambda: FIXED_NOW)


async def test_a_redelivered_or_older_event_changes_nothing(store: PlazaStore) -> None:
    projection = projection_of(store)
    group = FakeGroup()
    created, message = group.created(), group.message("bob")
    renamed = group.updated(name="Renamed")
    stale = events_pb2.Envelope()
    stale.CopyFrom(renamed.envelope)
    stale.event_id = uuid.uuid4().hex
    stale.aggregate_version = created.envelope.aggregate_version
    stale.group_updated.group.name = "Stale"
    for envelope in (
        created.envelope,
        renamed.envelope,
        message.envelope,
        message.envelope,
        created.envelope,
        stale,
    ):
        await projection.handle(envelope)
    card = await store.card(group.id)
    assert card is not None
    assert (card.name, card.messages_last_hour) == ("Renamed", 1)


async def test_a_rebuild_gives_identical_cards(store: PlazaStore, bus: EventBus) -> None:
    projection = projection_of(store)
    owner, post_id = unique("creator"), unique("post")
    linked = FakeGroup(owner, linked_post_id=post_id)
    busy, gone = FakeGroup(), FakeGroup()
    events = [
        post_event("publish", post_id, owner, title="Weekend hikes"),
        linked.created(),
        busy.created(),
        gone.created(),
        busy.joined("bob", gpb.SEARCH),
        busy.message("bob"),
        busy.message("carol"),
        linked.updated(description="Trails"),
        gone.dissolved(),
        new_event(
            "plaza",
            "group_selected",
            aggregate_id=busy.id,
            aggregate_version=1,
            user_id="editor1",
            group_selected={"group_id": busy.id, "selected": True, "editor_id": "editor1"},
        ),
    ]
    for event in events:
        await bus.publish(event)
        await projection.handle(event.envelope)
    await projection.refresh_rankings()
    ids = [linked.id, busy.id, gone.id]
    before = [await store.load(g) for g in ids], [await store.card(g) for g in ids]

    replayed = await rebuild(store, projection, bus)

    after = [await store.load(g) for g in ids], [await store.card(g) for g in ids]
    assert sum(replayed.values()) >= len(events)
    assert [s.state if s else None for s in after[0]] == [s.state if s else None for s in before[0]]
    assert after[1] == before[1]
    busy_card = after[1][1]
    linked_card = after[1][0]
    assert busy_card is not None and busy_card.selected and busy_card.messages_last_day == 2
    assert linked_card is not None and linked_card.linked_post is not None


async def test_a_counter_counts_an_event_once_even_when_handled_again_after_a_failure(
    store: PlazaStore, mongo_db: Any
) -> None:
    projection = projection_of(store)
    group = FakeGroup()
    post = (unique("p"), "alice")
    events = [group.message("bob", shared=post), group.post_opened("bob", 1, post)]
    for event in events:
        await projection.handle(event.envelope)
    # As if the handler had failed after counting and before recording the event id.
    await mongo_db["processed_events"].delete_many({})
    for event in events:
        await projection.handle(event.envelope)
    (day,) = domain.insight_window(1, FIXED_NOW, SHANGHAI)
    counts = (await store.days([group.id], [day]))[group.id][day]
    (shared,) = (await store.shared_posts([group.id], [day]))[group.id]
    assert (counts.messages, shared.shares, shared.opens) == (1, 1, 1)


async def test_batches_that_overlap_count_every_event_of_a_day_once(store: PlazaStore) -> None:
    """A batch's events of one day go in one write, unless the day counted one of them
    already: then each counts on its own. Overlapping batches at once, each with repeats."""
    group_id, date = unique("g"), "2026-12-01"
    start_ms = int(time.mktime(time.strptime(date, "%Y-%m-%d"))) * 1000

    def message(i: int) -> DayCount:
        return DayCount(group_id, date, start_ms, f"e{i}", {"messages": 1}, f"u{i % 7}")

    async def counted() -> tuple[int, int]:
        day = (await store.days([group_id], [date]))[group_id][date]
        return day.messages, len(day.speakers)

    await store.count_days([message(i) for i in range(0, 3)])
    await store.count_days([message(i) for i in range(1, 5)] * 2)
    assert await counted() == (5, 5)
    batches = [[message(i) for i in range(s, s + 20)] * 2 for s in range(0, 100, 10)]
    await asyncio.gather(*(store.count_days(b) for b in random.Random(3).sample(batches, 10)))
    assert await counted() == (110, 7)


async def test_events_handled_together_end_as_one_by_one_and_count_once(store: PlazaStore) -> None:
    await store.load_index()
    projection = projection_of(store)
    groups = [FakeGroup() for _ in range(5)]
    burst = [g.created() for g in groups]
    burst += [g.joined(unique("u")) for g in groups]
    burst += [g.message("bob") for g in groups] + [groups[0].message("carol")]
    envelopes = [e.envelope for e in burst]
    with capture_logs() as logs:
        # Each feed delivers a group's events one after another: one step per kind here.
        for step in (envelopes[:5], envelopes[5:10], envelopes[10:]):
            assert await projection.handle_many(step) == [None] * len(step)
        # Delivered again, together: nothing counts twice.
        assert await projection.handle_many(envelopes) == [None] * len(envelopes)
    assert [entry for entry in logs if entry["event"] == "event_batch_failed"] == []
    cards = {c.group_id: c for c in await store.shown_cards([g.id for g in groups])}
    assert [(cards[g.id].member_count, cards[g.id].messages_last_hour) for g in groups] == [
        (2, 2),
        *[(2, 1)] * 4,
    ]
    assert cards[groups[0].id].active_members == 2
    assert store.ordered_ids(domain.Sort.HOT, 10)[0] == groups[0].id
    (day,) = domain.insight_window(1, FIXED_NOW, SHANGHAI)
    days = await store.days([g.id for g in groups], [day])
    assert [
        (days[g.id][day].messages, sum(days[g.id][day].joins_by_source.values())) for g in groups
    ] == [
        (2, 1),
        *[(1, 1)] * 4,
    ]


async def test_a_storm_of_joins_on_one_group_in_any_order_and_batch_ends_exact(
    store: PlazaStore,
) -> None:
    """The consumers hand one group's joins in together (`in_order`), so a batch holds many
    of them, in any order: the card ends with the newest count and every member's role."""
    await store.load_index()
    projection = projection_of(store)
    group = FakeGroup()
    created = group.created().envelope
    joins = [group.joined(f"u{i:03d}").envelope for i in range(60)]
    shuffled = random.Random(7).sample(joins, len(joins))
    assert await projection.handle_many([created, *shuffled[:30]]) == [None] * 31
    assert await projection.handle_many(shuffled[30:]) == [None] * 30
    (card,) = await store.shown_cards([group.id])
    assert card.member_count == 61
    state = (await store.load(group.id)).state  # type: ignore[union-attr]
    assert sorted(u for u, (role, _) in state.roles.items() if role == gpb.MEMBER) == [
        f"u{i:03d}" for i in range(60)
    ]
    (day,) = domain.insight_window(1, FIXED_NOW, SHANGHAI)
    counted = (await store.days([group.id], [day]))[group.id][day]
    assert sum(counted.joins_by_source.values()) == 60


async def test_a_rebuild_keeps_the_insights_counters(store: PlazaStore, bus: EventBus) -> None:
    projection = projection_of(store)
    group, post = FakeGroup(), (unique("p"), "alice")
    events = [
        group.created(),
        group.card_viewed("v1"),
        group.joined("bob"),
        group.message("bob", shared=post),
        group.post_opened("carol", 1, post),
        opened_in_direct("dan", "alice", post),
    ]
    for event in events:
        await bus.publish(event)
        await projection.handle(event.envelope)
    window = domain.insight_window(1, FIXED_NOW, SHANGHAI)

    async def counters() -> tuple[Any, ...]:
        return (
            await store.days([group.id], window),
            await store.shared_posts([group.id], window),
            await store.author_opens("alice", window),
        )

    before = await counters()
    await rebuild(store, projection, bus)  # replays all of them: each was counted already
    assert await counters() == before
    assert before[2] == 2 and before[0][group.id][window[0]].card_views == 1
